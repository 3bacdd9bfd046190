"""Observability: the alarm topic, the node log groups, alarms and the cluster dashboard.

Where each signal comes from:

* AWS metrics: Auto Scaling group in-service counts, the API NLB's unhealthy targets, Lambda errors and
  duration, the lifecycle dead-letter queue, DynamoDB throttles.
* The reconciler (every minute): etcd members, healthy voters, quorum margin, retained instances.
* The node agent, as embedded-metric-format lines through the CloudWatch agent (node_agent/telemetry.py):
  snapshots uploaded (the leader's snapshot timer) and certificate expiry (the certificate timer).
"""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from stages.config import ClusterConfig

METRICS_NAMESPACE = "DedicatedK8s"
# Alarm well before the deadlines: a year for the cluster CA (replacing a CA is a planned project), 30 days
# for the kubeadm-managed certificates (the certificate timer renews them at 90 days left).
CA_EXPIRY_ALARM_DAYS = 365
CERTIFICATE_EXPIRY_ALARM_DAYS = 30
DURATION_NEAR_TIMEOUT = 0.8


class NodeLogGroups(Construct):
    """The log groups the nodes' CloudWatch agents write to (the node roles may not create groups)."""

    def __init__(self, scope: Construct, construct_id: str, *, config: ClusterConfig, key: kms.IKey) -> None:
        super().__init__(scope, construct_id)
        self.groups: dict[str, logs.LogGroup] = {}
        for kind, what in (("audit", "API server audit log"), ("metrics", "node agent EMF metrics")):
            self.groups[kind] = logs.LogGroup(
                self,
                kind.capitalize(),
                log_group_name=f"{config.node_log_group_prefix}{kind}",
                encryption_key=key,
                # Kept on stack deletion, not when the create that made it rolls back: a leftover fixed-name group
                # would fail the retried create with AlreadyExists.
                removal_policy=cdk.RemovalPolicy.RETAIN_ON_UPDATE_OR_DELETE,
            )
            # Set on the L1: the configured value is already one CloudWatch accepts (ClusterConfig checks it).
            cfn = self.groups[kind].node.default_child
            assert isinstance(cfn, logs.CfnLogGroup)
            cfn.retention_in_days = config.audit_log_retention_days
            cdk.Tags.of(self.groups[kind]).add("dedicated-k8s:content", what)


class AlarmTopic(Construct):
    """The SNS topic every alarm and ASG notification goes to (created first: groups notify it)."""

    def __init__(self, scope: Construct, construct_id: str, *, config: ClusterConfig, key: kms.IKey) -> None:
        super().__init__(scope, construct_id)
        self.topic = sns.Topic(
            self, "Topic", topic_name=f"{config.resource_prefix}-alarms", master_key=key, enforce_ssl=True
        )
        for email in config.alarm_emails:
            self.topic.add_subscription(subscriptions.EmailSubscription(email))


class ClusterObservability(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: ClusterConfig,
        topic: sns.ITopic,
        lifecycle_function: lambda_.Function,
        reconciler_function: lambda_.IFunction,
        dead_letter_queue: sqs.IQueue,
        control_plane_groups: list[autoscaling.AutoScalingGroup],
        api_target_group: elbv2.NetworkTargetGroup,
        api_load_balancer: elbv2.NetworkLoadBalancer,
        state_table: dynamodb.ITable,
    ) -> None:
        super().__init__(scope, construct_id)
        action = cw_actions.SnsAction(topic)
        dimensions = {"ClusterName": config.cluster_name}

        def cluster_metric(name: str, statistic: str = "Minimum") -> cloudwatch.Metric:
            return cloudwatch.Metric(
                namespace=METRICS_NAMESPACE,
                metric_name=name,
                dimensions_map=dimensions,
                statistic=statistic,
                period=cdk.Duration.minutes(5),
            )

        self.alarms: dict[str, cloudwatch.Alarm] = {}

        def alarm(name: str, description: str, **kwargs: object) -> None:
            created = cloudwatch.Alarm(self, name, alarm_description=description, **kwargs)  # type: ignore[arg-type]
            created.add_alarm_action(action)
            self.alarms[name] = created

        alarm(
            "LifecycleFunctionErrors",
            "the etcd lifecycle Lambda failed",
            metric=lifecycle_function.metric_errors(period=cdk.Duration.minutes(5)),
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        alarm(
            "ReconcilerErrors",
            "the etcd reconciler failed",
            metric=reconciler_function.metric_errors(period=cdk.Duration.minutes(15)),
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        alarm(
            "LifecycleDeadLetters",
            "a terminate lifecycle event could not be processed: a hook may be stuck",
            metric=dead_letter_queue.metric_approximate_number_of_messages_visible(period=cdk.Duration.minutes(5)),
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        alarm(
            "RemovalAbandoned",
            "an etcd removal stayed unsafe past its deadline; the instance is Retained and needs an operator",
            metric=cluster_metric("RemovalAbandoned", "Sum"),
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        alarm(
            "DrainDeadlinePassed",
            "a terminating node could not be drained within the drain deadline (PDB never allowed eviction, or the "
            "API server was unreachable) and termination went on anyway: check the workloads it ran",
            metric=cluster_metric("DrainDeadlinePassed", "Sum"),
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        alarm(
            "RetainedControlPlaneInstances",
            "a control-plane terminate hook was abandoned or timed out: the instance is Retained (running, outside "
            "the group's capacity) and its etcd member may remain; check the etcd lifecycle logs, then terminate it",
            metric=cluster_metric("RetainedInstances", "Maximum"),
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        in_service = {
            f"g{i}": cloudwatch.Metric(
                namespace="AWS/AutoScaling",
                metric_name="GroupInServiceInstances",
                dimensions_map={"AutoScalingGroupName": group.auto_scaling_group_name},
                statistic="Minimum",
                period=cdk.Duration.minutes(5),
            )
            for i, group in enumerate(control_plane_groups)
        }
        alarm(
            "ControlPlaneInstancesUnhealthy",
            f"fewer than {len(control_plane_groups)} control-plane instances in service for 15 minutes "
            "(a replacement is failing its launch hook, or a hook is stuck)",
            metric=cloudwatch.MathExpression(
                expression=" + ".join(in_service) if in_service else "0",
                using_metrics=in_service,
                period=cdk.Duration.minutes(5),
            ),
            threshold=len(control_plane_groups),
            evaluation_periods=3,
            comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.BREACHING,
        )
        unhealthy_targets = cloudwatch.Metric(
            namespace="AWS/NetworkELB",
            metric_name="UnHealthyHostCount",
            dimensions_map={
                "TargetGroup": api_target_group.target_group_full_name,
                "LoadBalancer": api_load_balancer.load_balancer_full_name,
            },
            statistic="Maximum",
            period=cdk.Duration.minutes(1),
        )
        alarm(
            "ApiUnhealthyTargets",
            "an API server behind the NLB fails its health check for 5 minutes",
            metric=unhealthy_targets,
            threshold=1,
            evaluation_periods=5,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        timeout = lifecycle_function.timeout or cdk.Duration.seconds(60)
        alarm(
            "LifecycleDurationNearTimeout",
            f"the etcd lifecycle Lambda ran over {int(DURATION_NEAR_TIMEOUT * 100)}% of its timeout",
            metric=lifecycle_function.metric_duration(statistic="Maximum", period=cdk.Duration.minutes(5)),
            threshold=timeout.to_milliseconds() * DURATION_NEAR_TIMEOUT,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        snapshots = cloudwatch.Metric(
            namespace=METRICS_NAMESPACE,
            metric_name="SnapshotUploaded",
            dimensions_map={**dimensions, "Role": "control-plane"},
            statistic="Sum",
            period=cdk.Duration.minutes(config.snapshot_interval_minutes),
        )
        alarm(
            "BackupAge",
            f"no etcd snapshot uploaded for 2 snapshot intervals ({2 * config.snapshot_interval_minutes} minutes)",
            metric=snapshots,
            threshold=1,
            evaluation_periods=2,
            datapoints_to_alarm=2,
            comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.BREACHING,
        )
        throttles = {
            name[0].lower(): state_table.metric(name, statistic="Sum", period=cdk.Duration.minutes(5))
            for name in ("ReadThrottleEvents", "WriteThrottleEvents")
        }
        alarm(
            "ClusterStateThrottles",
            "the cluster-state table throttled requests (bootstrap lock renewals may fail)",
            metric=cloudwatch.MathExpression(
                expression="r + w", using_metrics=throttles, period=cdk.Duration.minutes(5)
            ),
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        for name, metric_name, days in (
            ("ClusterCaExpiry", "ClusterCaExpiryDays", CA_EXPIRY_ALARM_DAYS),
            ("CertificateExpiry", "CertificateExpiryDays", CERTIFICATE_EXPIRY_ALARM_DAYS),
        ):
            alarm(
                name,
                f"{metric_name} fell below {days} days (the control-plane certificate timer reports it daily)",
                metric=cloudwatch.Metric(
                    namespace=METRICS_NAMESPACE,
                    metric_name=metric_name,
                    dimensions_map=dimensions,
                    statistic="Minimum",
                    period=cdk.Duration.days(1),
                ),
                threshold=days,
                evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.BREACHING,
            )
        members = cluster_metric("EtcdMembers", "Maximum")
        alarm(
            "EtcdMemberCount",
            f"etcd member count differs from the desired {config.control_plane_count} for 15 minutes",
            metric=cloudwatch.MathExpression(
                expression=f"ABS(members - {config.control_plane_count})",
                using_metrics={"members": members},
                period=cdk.Duration.minutes(5),
            ),
            threshold=1,
            evaluation_periods=3,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.BREACHING,
        )
        alarm(
            "QuorumMargin",
            "healthy etcd voters minus quorum reached 0: one more failure loses quorum",
            metric=cluster_metric("QuorumMargin"),
            threshold=0,
            evaluation_periods=2,
            comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.BREACHING,
        )

        self.dashboard = cloudwatch.Dashboard(self, "Dashboard", dashboard_name=f"{config.resource_prefix}-cluster")
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="etcd membership",
                left=[members, cluster_metric("HealthyVoters"), cluster_metric("QuorumMargin")],
            ),
            cloudwatch.GraphWidget(
                title="Lifecycle Lambda",
                left=[lifecycle_function.metric_invocations(), lifecycle_function.metric_errors()],
                right=[lifecycle_function.metric_duration()],
            ),
            cloudwatch.GraphWidget(
                title="Control plane",
                left=list(in_service.values()),
                right=[unhealthy_targets],
            ),
            cloudwatch.GraphWidget(
                title="Backups and certificates",
                left=[
                    snapshots,
                    cloudwatch.Metric(
                        namespace=METRICS_NAMESPACE,
                        metric_name="LastSnapshotAgeSeconds",
                        dimensions_map={**dimensions, "Role": "control-plane"},
                        statistic="Maximum",
                        period=cdk.Duration.minutes(config.snapshot_interval_minutes),
                    ),
                ],
                right=[
                    cluster_metric("ClusterCaExpiryDays"),
                    cluster_metric("CertificateExpiryDays"),
                ],
            ),
            cloudwatch.GraphWidget(title="Cluster-state table throttles", left=list(throttles.values())),
            cloudwatch.AlarmStatusWidget(title="Alarms", alarms=list(self.alarms.values()), width=24),
        )
