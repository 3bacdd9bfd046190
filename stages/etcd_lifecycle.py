"""EtcdLifecycle: the Lambdas that keep etcd membership in step with the control-plane instances, and drain
every terminating node (control plane and workers) before its terminate hook completes.

Terminate events (control-plane and worker groups) go EventBridge -> SQS -> lifecycle Lambda. The queue is
the retry mechanism: when a drain or a removal cannot finish yet the Lambda heartbeats the hook and
re-enqueues the event with a delay (no Lambda ever sleeps for minutes), and a crash simply redelivers the
message.

One membership change at a time (invariant 4a, docs/architecture.md) is kept by the membership writer lease
in the cluster-state table (lambdas/common/writer_lease.py), not by reserved concurrency: Lambda keeps at
least 100 unreserved concurrent executions per account ("Configuring reserved concurrency for a function",
AWS Lambda Developer Guide), so an account whose concurrency quota is 10 cannot reserve any and stack creation
failed. The SQS event source is capped at MaximumConcurrency 2 (the smallest value Lambda accepts, ScalingConfig
in the Lambda API reference) so a burst of terminations does not fan out into invocations that would only find
the lease held and re-enqueue.

Who may send to the lifecycle queue: the stack's own terminate rules (``aws:SourceArn`` = their ARNs, built from
their fixed names so the KMS key's grant does not depend on the rules), the reconciler's role (its repair requests)
and the lifecycle Lambda's role (its delayed retries); a Deny for every other sender makes that hold against a
broad identity policy too. CDK's ``targets.SqsQueue`` on a KMS-encrypted queue allows any rule of the account
(``aws:SourceAccount`` only), so the rules use :class:`_LifecycleQueueTarget`, which adds no policy of its own.
The Lambda still verifies every request with AWS (lambdas/common/verify.py): the policy narrows who can ask, the
Lambda decides whether what is asked is true.

Why the drain of ASG terminate hooks is here and not in aws-node-termination-handler: see
lambdas/common/termination.py (NTH completes the hook right after its drain, so it cannot be ordered before
the etcd removal, and it never deletes the Node object).
"""

from __future__ import annotations

from typing import cast

import aws_cdk as cdk
import jsii
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_event_sources as sources
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from stages.config import ClusterConfig
from stages.control_plane import CONTROL_PLANE_LAUNCH_TIMEOUT
from stages.iam_stack import cluster_ops_role_name
from stages.lambda_bundling import lambda_code
from stages.nag import skip_checkov, suppress
from stages.security import API_PORT

FUNCTION_TIMEOUT = cdk.Duration.seconds(60)
RETRY_DELAY_SECONDS = 30
# The terminate hook can be kept alive by heartbeats for up to 100 heartbeat timeouts or 48 hours;
# past this deadline the Lambda abandons (the group retains the instance) and an alarm fires.
REMOVAL_DEADLINE_SECONDS = 3600
# Every minute: a lost terminate event is repaired by the reconciler, which must get there (twice, with the retry
# and the Lambda's own time) before the control-plane terminate hook's 300 s timeout, or the hook's default ABANDON
# retains a node whose member was never removed (tests/stacks/test_launch_timeouts.py). Found by the twin.
RECONCILE_EVERY = cdk.Duration.minutes(1)
# Past this the drain is skipped (logged, DrainDeadlinePassed metric): a dead API server must not block
# scale-in or the etcd removal. Shorter than the removal deadline, so the removal still has its time.
DRAIN_DEADLINE_SECONDS = 600
TERMINATE_EVENT = "EC2 Instance-terminate Lifecycle Action"
# Longer than the function timeout: an invocation cannot outlive its timeout, so a live writer never has its
# lease taken over; a dead one's is free again after this.
WRITER_LEASE_SECONDS = int(FUNCTION_TIMEOUT.to_seconds()) * 2
# An etcd learner whose raft index has not moved for this long (and is behind the leader) is an abandoned join:
# the reconciler has the lifecycle Lambda withdraw it, well before the launch hook's timeout, so a joiner killed
# after its `member add` does not block every removal for CONTROL_PLANE_LAUNCH_TIMEOUT (lambdas/common/join_watch.py).
LEARNER_STALL_SECONDS = 300
# ScalingConfig.MaximumConcurrency: Lambda's minimum (2..1000).
LIFECYCLE_MAX_CONCURRENCY = 2


@jsii.implements(events.IRuleTarget)
class _LifecycleQueueTarget:
    """The lifecycle queue as a rule target, adding no queue policy (EtcdLifecycle writes the only one)."""

    def __init__(self, queue: sqs.IQueue) -> None:
        self.queue = queue

    def bind(self, _rule: events.IRule, _id: str | None = None) -> events.RuleTargetConfig:
        return events.RuleTargetConfig(arn=self.queue.queue_arn)


def _queue_target(queue: sqs.IQueue) -> events.IRuleTarget:
    return cast(events.IRuleTarget, _LifecycleQueueTarget(queue))  # jsii.implements is invisible to mypy


class EtcdLifecycle(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: ClusterConfig,
        vpc: ec2.IVpc,
        subnets: list[ec2.ISubnet],
        security_group: ec2.ISecurityGroup,
        key: kms.IKey,
        api_endpoint: str,
    ) -> None:
        super().__init__(scope, construct_id)
        queue_name = f"{config.resource_prefix}-etcd-lifecycle"
        self.dead_letter_queue = sqs.Queue(
            self,
            "DeadLetterQueue",
            queue_name=f"{queue_name}-dlq",
            encryption=sqs.QueueEncryption.KMS,
            encryption_master_key=key,
            enforce_ssl=True,
            retention_period=cdk.Duration.days(14),
        )
        suppress(self.dead_letter_queue, "AwsSolutions-SQS3", "this is the dead-letter queue")
        self.queue = sqs.Queue(
            self,
            "Queue",
            queue_name=queue_name,
            encryption=sqs.QueueEncryption.KMS,
            encryption_master_key=key,
            enforce_ssl=True,
            visibility_timeout=cdk.Duration.seconds(FUNCTION_TIMEOUT.to_seconds() * 6),
            dead_letter_queue=sqs.DeadLetterQueue(queue=self.dead_letter_queue, max_receive_count=5),
        )

        environment = {
            "CLUSTER_NAME": config.cluster_name,
            "CLUSTER_TAG_KEY": ClusterConfig.CLUSTER_TAG_KEY,
            "ROLE_TAG_KEY": ClusterConfig.ROLE_TAG_KEY,
            "CONTROL_PLANE_GROUP_NAMES": ",".join(config.control_plane_group_names),
            "ETCD_CLIENT_SECRET_NAME": config.etcd_client_secret_name,
            "RETRY_QUEUE_URL": self.queue.queue_url,
            "RETRY_DELAY_SECONDS": str(RETRY_DELAY_SECONDS),
            "REMOVAL_DEADLINE_SECONDS": str(REMOVAL_DEADLINE_SECONDS),
            "DESIRED_MEMBERS": str(config.control_plane_count),
            "METRICS_NAMESPACE": "DedicatedK8s",
            # Node drain before termination continues (lambdas/common/drain.py; README "Draining nodes").
            "DRAIN_NODES": "true",
            # The API through the internal NLB, as the nodes reach it (its DNS name is in the API server's SANs).
            "KUBE_API_URL": f"https://{api_endpoint}:{API_PORT}",
            "KUBE_CLIENT_SECRET_NAME": config.kube_client_secret_name,
            "WORKER_GROUP_NAMES": ",".join(config.worker_group_name(g) for g in config.worker_groups),
            "DRAIN_DEADLINE_SECONDS": str(DRAIN_DEADLINE_SECONDS),
            # The membership writer lease (lambdas/common/writer_lease.py).
            "CLUSTER_STATE_TABLE": config.cluster_state_table_name,
            "WRITER_LEASE_SECONDS": str(WRITER_LEASE_SECONDS),
            # How long a join may take (the launch hook's timeout) and how long a learner may stall: past them
            # the reconciler has an abandoned join's member withdrawn (lambdas/common/join_watch.py).
            "JOIN_TIMEOUT_SECONDS": str(CONTROL_PLANE_LAUNCH_TIMEOUT),
            "LEARNER_STALL_SECONDS": str(LEARNER_STALL_SECONDS),
        }
        code = lambda_code()

        def function(logical_id: str, name: str, handler: str, role_name: str, *, description: str) -> lambda_.Function:
            log_group = logs.LogGroup(
                self,
                f"{logical_id}Logs",
                log_group_name=f"/aws/lambda/{name}",
                retention=logs.RetentionDays.THREE_MONTHS,
                encryption_key=key,
                # Kept on update and delete, but removed when the create that made it rolls back: a fixed-name
                # log group left behind by a failed first deploy would block the retry ("already exists").
                removal_policy=cdk.RemovalPolicy.RETAIN_ON_UPDATE_OR_DELETE,
            )
            created = lambda_.Function(
                self,
                logical_id,
                function_name=name,
                description=description,
                runtime=lambda_.Runtime.PYTHON_3_14,
                architecture=lambda_.Architecture.X86_64,
                handler=handler,
                code=code,
                role=iam.Role.from_role_name(self, f"{logical_id}Role", role_name, mutable=False),
                vpc=vpc,
                vpc_subnets=ec2.SubnetSelection(subnets=subnets),
                security_groups=[security_group],
                environment=environment,
                environment_encryption=key,
                timeout=FUNCTION_TIMEOUT,
                memory_size=256,
                tracing=lambda_.Tracing.ACTIVE,
                log_group=log_group,
            )
            skip_checkov(
                created.node.default_child,  # type: ignore[arg-type]
                [
                    ("CKV_AWS_116", "invoked from SQS (whose redrive policy is the dead-letter queue) or a schedule"),
                    (
                        "CKV_AWS_115",
                        "no reserved concurrency on purpose: Lambda keeps >= 100 unreserved per account, so a "
                        "quota-10 account cannot reserve; the SQS source's MaximumConcurrency caps the lifecycle "
                        "function and its writer lease serialises membership changes",
                    ),
                ],
            )
            return created

        # No reserved concurrency (see the module docstring): the writer lease serialises membership changes.
        self.lifecycle_function = function(
            "LifecycleFunction",
            config.etcd_lifecycle_function_name,
            "lambdas.etcd_lifecycle.handler.handle",
            config.etcd_lifecycle_role_name,
            description="Drains a terminating node; for control-plane nodes then removes the etcd member safely; "
            "then completes the hook",
        )
        self.reconciler_function = function(
            "ReconcilerFunction",
            config.reconciler_function_name,
            "lambdas.reconciler.handler.handle",
            config.reconciler_role_name,
            description="Removes etcd members whose instances no longer exist (level-triggered)",
        )
        self.ops_function = function(
            "ClusterOpsFunction",
            config.cluster_ops_function_name,
            "lambdas.cluster_ops.handler.handle",
            cluster_ops_role_name(config),
            description="Read-only etcd status and the canary's sentinel key",
        )

        self.lifecycle_function.add_event_source(
            sources.SqsEventSource(
                self.queue, batch_size=1, report_batch_item_failures=True, max_concurrency=LIFECYCLE_MAX_CONCURRENCY
            )
        )
        rule_names = [f"{config.resource_prefix}-control-plane-terminate"]
        self.terminate_rule = events.Rule(
            self,
            "TerminateRule",
            rule_name=rule_names[0],
            description="Control-plane terminate lifecycle actions to the etcd lifecycle queue",
            event_pattern=events.EventPattern(
                source=["aws.autoscaling"],
                detail_type=[TERMINATE_EVENT],
                detail={"AutoScalingGroupName": list(config.control_plane_group_names)},
            ),
            targets=[_queue_target(self.queue)],
        )
        worker_groups = [config.worker_group_name(g) for g in config.worker_groups]
        if worker_groups:
            # Workers: drain and delete the Node, then CONTINUE (never etcd). NTH handles only non-ASG events.
            rule_names.append(f"{config.resource_prefix}-worker-terminate")
            self.worker_terminate_rule = events.Rule(
                self,
                "WorkerTerminateRule",
                rule_name=rule_names[-1],
                description="Worker terminate lifecycle actions to the lifecycle queue (drain before termination)",
                event_pattern=events.EventPattern(
                    source=["aws.autoscaling"],
                    detail_type=[TERMINATE_EVENT],
                    detail={"AutoScalingGroupName": worker_groups},
                ),
                targets=[_queue_target(self.queue)],
            )
        self._restrict_senders(rule_names, [config.reconciler_role_name, config.etcd_lifecycle_role_name])
        self.reconcile_rule = events.Rule(
            self,
            "ReconcileSchedule",
            rule_name=f"{config.resource_prefix}-etcd-reconcile",
            description="Level-triggered etcd membership reconcile",
            schedule=events.Schedule.rate(RECONCILE_EVERY),
            targets=[targets.LambdaFunction(self.reconciler_function, retry_attempts=0)],
        )

    def _restrict_senders(self, rule_names: list[str], sender_role_names: list[str]) -> None:
        """EventBridge may send only for the stack's own rules; other principals only as the sender roles."""
        stack = cdk.Stack.of(self)
        rule_arns = [stack.format_arn(service="events", resource="rule", resource_name=name) for name in rule_names]
        role_arns = [
            stack.format_arn(service="iam", region="", resource="role", resource_name=name)
            for name in sender_role_names
        ]
        # "Amazon SQS permissions", Using resource-based policies for Amazon EventBridge (EventBridge User Guide).
        # The queue policy only: the key policy already lets EventBridge use the key, with no condition, as it
        # must (tests/stacks/test_first_deploy_template.py), so no conditioned KMS grant is added here.
        self.queue.add_to_resource_policy(
            iam.PolicyStatement(
                sid="TerminateRulesSend",
                principals=[iam.ServicePrincipal("events.amazonaws.com")],
                actions=["sqs:SendMessage", "sqs:GetQueueAttributes", "sqs:GetQueueUrl"],
                resources=[self.queue.queue_arn],
                conditions={"ArnEquals": {"aws:SourceArn": rule_arns}},
            )
        )
        # Both keys must differ for the Deny to apply (keys in one condition operator are ANDed; an absent key
        # makes ArnNotEquals true): EventBridge for our rules and the two roles pass, every other sender is
        # refused whatever its identity policy says (IAM JSON policy elements: Condition operators).
        self.queue.add_to_resource_policy(
            iam.PolicyStatement(
                sid="OnlyTheClusterSends",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=["sqs:SendMessage"],
                resources=[self.queue.queue_arn],
                conditions={"ArnNotEquals": {"aws:PrincipalArn": role_arns, "aws:SourceArn": rule_arns}},
            )
        )
