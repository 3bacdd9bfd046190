"""IamStack: every role and instance profile of the cluster, deployed before K8sClusterStack.

Policies are scoped before the resources exist, by the deterministic names in ClusterConfig (table,
secrets, bucket, groups, queues, log groups) or by the cluster tag. Actions that AWS does not scope to
a resource (Describe*, the SSM agent's channels, PutMetricData, VPC Lambda network interfaces) keep a
``*`` resource; each such statement carries a cdk-nag acknowledgement with the action that needs it.
"""

from __future__ import annotations

import re
from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from cdk_nag import RegexAppliesTo
from constructs import Construct

from lambdas.common.cluster_aws import CLUSTER_STATE_KEY, FIRST_SEEN_PREFIX
from lambdas.common.join_watch import WATCH_KEY as JOIN_WATCH_KEY
from lambdas.common.writer_lease import LEASE_KEY
from stages.config import ClusterConfig
from stages.irsa import issuer_writer_statements
from stages.nag import skip_checkov, suppress


def _applies(patterns: list[str]) -> list[object]:
    """cdk-nag ``applies_to`` entries for wildcard resources, tolerant of a concrete or token region."""
    entries: list[object] = []
    for pattern in patterns:
        if pattern == "Resource::*":
            entries.append(pattern)
            continue
        regex = re.escape(pattern).replace(re.escape("<AWS::Region>"), "(<AWS::Region>|[a-z0-9-]+)")
        entries.append(RegexAppliesTo(regex=f"/^{regex}$/g"))
    return entries


METRICS_NAMESPACE = "DedicatedK8s"

# Statements whose resource must be "*": the API has no resource-level permissions for them.
SSM_AGENT_ACTIONS = (
    "ssm:UpdateInstanceInformation",
    "ssmmessages:CreateControlChannel",
    "ssmmessages:CreateDataChannel",
    "ssmmessages:OpenControlChannel",
    "ssmmessages:OpenDataChannel",
    "ec2messages:AcknowledgeMessage",
    "ec2messages:DeleteMessage",
    "ec2messages:FailMessage",
    "ec2messages:GetEndpoint",
    "ec2messages:GetMessages",
    "ec2messages:SendReply",
)
DESCRIBE_ACTIONS = (
    "ec2:DescribeInstances",
    "ec2:DescribeTags",
    "autoscaling:DescribeAutoScalingGroups",
    "autoscaling:DescribeAutoScalingInstances",
    "autoscaling:DescribeLifecycleHooks",
)
VPC_LAMBDA_ENI_ACTIONS = (
    "ec2:CreateNetworkInterface",
    "ec2:DescribeNetworkInterfaces",
    "ec2:DeleteNetworkInterface",
    "ec2:AssignPrivateIpAddresses",
    "ec2:UnassignPrivateIpAddresses",
)
XRAY_ACTIONS = ("xray:PutTraceSegments", "xray:PutTelemetryRecords")
# The AWS cloud controller manager (cloud-provider-aws docs/prerequisites.md, "Control Plane Policy", and the
# calls pkg/providers/v1/aws_loadbalancer.go makes). Service load balancers it supports here: the classic ELB
# (a Service of type LoadBalancer without annotations) and the NLB (aws-load-balancer-type: nlb), both with
# instance targets. Its read calls:
CCM_DESCRIBE_ACTIONS = (
    "ec2:DescribeAvailabilityZones",
    "ec2:DescribeRegions",
    "ec2:DescribeRouteTables",
    "ec2:DescribeSecurityGroups",
    "ec2:DescribeSubnets",
    "ec2:DescribeVpcs",
    "elasticloadbalancing:DescribeLoadBalancers",
    "elasticloadbalancing:DescribeLoadBalancerAttributes",
    "elasticloadbalancing:DescribeListeners",
    "elasticloadbalancing:DescribeTargetGroups",
    "elasticloadbalancing:DescribeTargetHealth",
    "elasticloadbalancing:DescribeTags",
    "elasticloadbalancing:DescribeTargetGroupAttributes",
    "elasticloadbalancing:DescribeLoadBalancerPolicies",
)
# Mutating CCM calls, allowed only on resources the CCM tagged as the cluster's own.
CCM_TAGGED_ACTIONS = (
    "ec2:AuthorizeSecurityGroupIngress",
    "ec2:RevokeSecurityGroupIngress",
    "ec2:DeleteSecurityGroup",
    "ec2:CreateRoute",
    "ec2:DeleteRoute",
    "ec2:ModifyInstanceAttribute",
    "elasticloadbalancing:AddTags",
    "elasticloadbalancing:CreateListener",
    "elasticloadbalancing:DeleteListener",
    "elasticloadbalancing:DeleteLoadBalancer",
    "elasticloadbalancing:DeleteTargetGroup",
    "elasticloadbalancing:ModifyListener",
    "elasticloadbalancing:ModifyLoadBalancerAttributes",
    "elasticloadbalancing:ModifyTargetGroup",
    "elasticloadbalancing:RegisterTargets",
    "elasticloadbalancing:DeregisterTargets",
    "elasticloadbalancing:SetSecurityGroups",
    "elasticloadbalancing:ModifyTargetGroupAttributes",
    # the classic ELB (elasticloadbalancing API 2012-06-01), the CCM's default for type LoadBalancer
    "elasticloadbalancing:ConfigureHealthCheck",
    "elasticloadbalancing:RegisterInstancesWithLoadBalancer",
    "elasticloadbalancing:DeregisterInstancesFromLoadBalancer",
    "elasticloadbalancing:CreateLoadBalancerListeners",
    "elasticloadbalancing:DeleteLoadBalancerListeners",
    "elasticloadbalancing:AttachLoadBalancerToSubnets",
    "elasticloadbalancing:DetachLoadBalancerFromSubnets",
    "elasticloadbalancing:ApplySecurityGroupsToLoadBalancer",
    "elasticloadbalancing:CreateLoadBalancerPolicy",
    "elasticloadbalancing:SetLoadBalancerPoliciesOfListener",
    "elasticloadbalancing:SetLoadBalancerPoliciesForBackendServer",
)
# aws-node-termination-handler in queue mode: which instance/group an event names (no resource-level permissions).
NTH_DESCRIBE_ACTIONS = (
    "autoscaling:DescribeAutoScalingInstances",
    "autoscaling:DescribeTags",
    "ec2:DescribeInstances",
)
# cluster-autoscaler (optional): reads without resource-level permissions ...
AUTOSCALER_DESCRIBE_ACTIONS = (
    "autoscaling:DescribeAutoScalingGroups",
    "autoscaling:DescribeAutoScalingInstances",
    "autoscaling:DescribeLaunchConfigurations",
    "autoscaling:DescribeScalingActivities",
    "autoscaling:DescribeTags",
    "ec2:DescribeImages",
    "ec2:DescribeInstanceTypes",
    "ec2:DescribeLaunchTemplateVersions",
    "ec2:GetInstanceTypesFromInstanceRequirements",
)
# ... and the two writes, on this cluster's worker groups only (never a control-plane group).
AUTOSCALER_SCALE_ACTIONS = ("autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup")
# The lifecycle Lambda's membership writer lease: a conditional put to take it, a conditional delete to give
# it back (lambdas/common/writer_lease.py, whose item key LEASE_KEY the grant is limited to).
WRITER_LEASE_ACTIONS = ("dynamodb:PutItem", "dynamodb:DeleteItem")
# The lifecycle Lambda's first sight of each terminate action (ClusterAws.first_seen): a conditional put, then reads.
FIRST_SEEN_ACTIONS = ("dynamodb:PutItem", "dynamodb:GetItem")


def cluster_ops_role_name(config: ClusterConfig) -> str:
    """The cluster-ops function's own role (stages/config.py names the others; kept here so config.py is not
    touched by this change): read-only etcd status and the canary's sentinel, no queue and no hook."""
    return f"{config.resource_prefix}-cluster-ops"


# Creations, allowed only when the request tags the new resource as the cluster's own (aws:RequestTag): the CCM
# puts kubernetes.io/cluster/<name>=owned in every CreateLoadBalancer, CreateTargetGroup, CreateListener and
# CreateSecurityGroup it sends (buildTags(ResourceLifecycleOwned, ...)).
CCM_CREATE_ACTIONS = (
    "ec2:CreateSecurityGroup",
    "elasticloadbalancing:CreateLoadBalancer",
    "elasticloadbalancing:CreateTargetGroup",
)
# Tags sent with a create are authorized as a separate tagging action on a resource that has no tags yet, so
# the ResourceTag statement cannot allow them: they are allowed only as part of those creates (the
# ...:CreateAction condition keys) and only with the owned request tag, as the AWS Load Balancer Controller's
# reference policy does (docs/install/iam_policy.json). Never CreateTags/AddTags on an existing foreign
# resource: tagging it owned would hand it to the ResourceTag statement.
CCM_TAG_ON_CREATE = (  # (Sid, action, its create-action condition key, the creates it may tag)
    (
        "CloudControllerTagLoadBalancersOnCreate",
        "elasticloadbalancing:AddTags",
        "elasticloadbalancing:CreateAction",
        ("CreateLoadBalancer", "CreateTargetGroup", "CreateListener"),
    ),
    ("CloudControllerTagSecurityGroupsOnCreate", "ec2:CreateTags", "ec2:CreateAction", ("CreateSecurityGroup",)),
)


def _stack_arn(stack: cdk.Stack, service: str, resource: str, name: str | None = None, *, colon: bool = False) -> str:
    fmt = cdk.ArnFormat.COLON_RESOURCE_NAME if colon else cdk.ArnFormat.SLASH_RESOURCE_NAME
    return stack.format_arn(service=service, resource=resource, resource_name=name, arn_format=fmt)


def ssm_agent_statements(stack: cdk.Stack, config: ClusterConfig) -> list[iam.PolicyStatement]:
    """The SSM agent's channels ("*": no resource-level permissions) and the cluster's own parameters."""
    return [
        iam.PolicyStatement(sid="SsmAgent", actions=list(SSM_AGENT_ACTIONS), resources=["*"]),
        iam.PolicyStatement(
            sid="ClusterParameters",
            actions=["ssm:GetParameter", "ssm:GetParameters"],
            resources=[_stack_arn(stack, "ssm", "parameter", config.ssm_prefix.lstrip("/") + "/*")],
        ),
    ]


def cluster_key_statement(stack: cdk.Stack, config: ClusterConfig) -> iam.PolicyStatement:
    """Use of the KMS keys that carry the cluster tag."""
    return iam.PolicyStatement(
        sid="ClusterKmsKey",
        actions=["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:DescribeKey"],
        resources=[_stack_arn(stack, "kms", "key", "*")],
        conditions={"StringEquals": {f"aws:ResourceTag/{ClusterConfig.CLUSTER_TAG_KEY}": config.cluster_name}},
    )


def image_builder_statements(stack: cdk.Stack, config: ClusterConfig) -> list[iam.PolicyStatement]:
    """What the Image Builder build instance needs: one definition for IamStack's role and ImageStack's own."""
    logs_bucket = stack.format_arn(
        service="s3", region="", account="", resource=f"{config.resource_prefix}-imagebuilder-logs-*"
    )
    return [
        *ssm_agent_statements(stack, config),
        iam.PolicyStatement(
            sid="ImageBuilderAgent",
            actions=["imagebuilder:GetComponent", "imagebuilder:GetContainerRecipe", "ssm:GetDocument"],
            resources=[
                _stack_arn(stack, "imagebuilder", "component", "*"),
                _stack_arn(stack, "imagebuilder", "container-recipe", "*"),
                _stack_arn(stack, "ssm", "document", "*"),
            ],
        ),
        iam.PolicyStatement(sid="BuildLogs", actions=["s3:PutObject"], resources=[f"{logs_bucket}/*"]),
        iam.PolicyStatement(
            sid="BuildAssets",
            actions=["s3:GetObject"],
            resources=[stack.format_arn(service="s3", region="", account="", resource="cdk-*-assets-*/*")],
        ),
        iam.PolicyStatement(
            sid="BuildInstanceLogs",
            actions=["logs:CreateLogStream", "logs:CreateLogGroup", "logs:PutLogEvents"],
            resources=[_stack_arn(stack, "logs", "log-group", "/aws/imagebuilder/*:*", colon=True)],
        ),
        cluster_key_statement(stack, config),
    ]


IMAGE_BUILDER_WILDCARDS_REASON = (
    "Image Builder's agent reads components/recipes/SSM documents chosen at build time, writes logs under "
    "the cluster's build-log buckets and reads the CDK asset bucket; the SSM agent channels need '*'"
)


def image_builder_wildcards(config: ClusterConfig) -> list[object]:
    """cdk-nag ``applies_to`` for the wildcards of :func:`image_builder_statements`, and only those."""
    return _applies(
        [
            "Resource::*",
            "Resource::arn:<AWS::Partition>:kms:<AWS::Region>:<AWS::AccountId>:key/*",
            f"Resource::arn:<AWS::Partition>:ssm:<AWS::Region>:<AWS::AccountId>:parameter{config.ssm_prefix}/*",
            "Resource::arn:<AWS::Partition>:imagebuilder:<AWS::Region>:<AWS::AccountId>:component/*",
            "Resource::arn:<AWS::Partition>:imagebuilder:<AWS::Region>:<AWS::AccountId>:container-recipe/*",
            "Resource::arn:<AWS::Partition>:ssm:<AWS::Region>:<AWS::AccountId>:document/*",
            f"Resource::arn:<AWS::Partition>:s3:::{config.resource_prefix}-imagebuilder-logs-*/*",
            "Resource::arn:<AWS::Partition>:s3:::cdk-*-assets-*/*",
            "Resource::arn:<AWS::Partition>:logs:<AWS::Region>:<AWS::AccountId>:log-group:/aws/imagebuilder/*:*",
        ]
    )


class IamStack(cdk.Stack):
    """Roles for control-plane nodes, workers, the etcd Lambdas and the Image Builder instance."""

    def __init__(self, scope: Construct, construct_id: str, *, config: ClusterConfig, **kwargs: Any) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.config = config
        cdk.Tags.of(self).add(ClusterConfig.CLUSTER_TAG_KEY, config.cluster_name)

        self.control_plane_role = self._node_role(config.control_plane_role_name, "control-plane nodes")
        self.worker_role = self._node_role(config.worker_role_name, "worker nodes")
        self.etcd_lifecycle_role = self._lambda_role(config.etcd_lifecycle_role_name, "etcd lifecycle Lambda")
        self.reconciler_role = self._lambda_role(config.reconciler_role_name, "etcd reconciler Lambda")
        # Its own role, not the reconciler's: the reconciler may send to the lifecycle queue, cluster-ops never.
        self.cluster_ops_role = self._lambda_role(cluster_ops_role_name(config), "cluster-ops Lambda (etcd status)")
        self.image_builder_role = self._node_role(config.image_builder_role_name, "the Image Builder build instance")

        self._control_plane_policy()
        self._worker_policy()
        self._lambda_policies()
        self._image_builder_policy()

        # Opt-in (createAutoScalingServiceLinkedRole): the cluster's KMS key policy names this role, and KMS
        # refuses a key policy whose principal does not exist; an account that never used Auto Scaling lacks it.
        # Never by default: AWS::IAM::ServiceLinkedRole fails when the role already exists (every account that
        # used Auto Scaling once). The preflight check says which of the two applies.
        self.auto_scaling_service_linked_role: iam.CfnServiceLinkedRole | None = None
        if config.create_auto_scaling_service_linked_role:
            self.auto_scaling_service_linked_role = iam.CfnServiceLinkedRole(
                self,
                "AutoScalingServiceLinkedRole",
                aws_service_name="autoscaling.amazonaws.com",
                description="EC2 Auto Scaling's service-linked role (launches the cluster's KMS-encrypted volumes)",
            )

    # ---- ARNs built from the deterministic names (the resources are created later) ----------

    def _arn(self, service: str, resource: str, name: str | None = None, *, colon: bool = False) -> str:
        return _stack_arn(self, service, resource, name, colon=colon)

    def _group_arns(self, names: tuple[str, ...] | list[str]) -> list[str]:
        return [
            self._arn("autoscaling", "autoScalingGroup", f"*:autoScalingGroupName/{name}", colon=True) for name in names
        ]

    @property
    def _worker_group_names(self) -> list[str]:
        return [self.config.worker_group_name(group) for group in self.config.worker_groups]

    @property
    def _secrets_arn(self) -> str:
        # Secrets Manager appends a random 6-character suffix to every secret ARN.
        return self._arn("secretsmanager", "secret", f"{self.config.secrets_prefix}/*", colon=True)

    def _secret_arn(self, name: str) -> str:
        return self._arn("secretsmanager", "secret", f"{name}-??????", colon=True)

    @property
    def _bucket_arn(self) -> str:
        name = self.config.snapshot_bucket_name(cdk.Aws.ACCOUNT_ID, cdk.Aws.REGION)
        return self.format_arn(service="s3", region="", account="", resource=name)

    @property
    def _table_arn(self) -> str:
        return self._arn("dynamodb", "table", self.config.cluster_state_table_name)

    @property
    def _cluster_keys(self) -> iam.PolicyStatement:
        return cluster_key_statement(self, self.config)

    @property
    def _cluster_keys_decrypt_only(self) -> iam.PolicyStatement:
        """Reading a secret encrypted with the cluster key needs kms:Decrypt alone (cluster-ops writes nothing)."""
        full = cluster_key_statement(self, self.config).to_statement_json()
        return iam.PolicyStatement(
            sid=full["Sid"], actions=["kms:Decrypt"], resources=[full["Resource"]], conditions=full["Condition"]
        )

    def _log_groups(self, *names: str) -> list[str]:
        return [self._arn("logs", "log-group", f"{name}:*", colon=True) for name in names]

    # ---- roles ----------------------------------------------------------------------------------

    def _node_role(self, name: str, purpose: str) -> iam.Role:
        role = iam.Role(
            self,
            name.removeprefix(self.config.resource_prefix + "-").title().replace("-", "") + "Role",
            role_name=name,
            description=f"dedicated-k8s {self.config.cluster_name}: {purpose}",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
        )
        # The profile carries the role's name so K8sClusterStack and Image Builder find it by name.
        iam.CfnInstanceProfile(self, role.node.id + "Profile", instance_profile_name=name, roles=[role.role_name])
        return role

    def _lambda_role(self, name: str, purpose: str) -> iam.Role:
        return iam.Role(
            self,
            name.removeprefix(self.config.resource_prefix + "-").title().replace("-", "") + "Role",
            role_name=name,
            description=f"dedicated-k8s {self.config.cluster_name}: {purpose}",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
        )

    def _attach(self, role: iam.Role, policy_name: str, statements: list[iam.PolicyStatement]) -> iam.Policy:
        policy = iam.Policy(self, f"{role.node.id}{policy_name}", statements=statements)
        policy.attach_to_role(role)
        # checkov reads any write action on "*" as unconstrained, even where a condition scopes it.
        skip_checkov(
            policy.node.default_child,  # type: ignore[arg-type]
            [
                (
                    "CKV_AWS_111",
                    "writes on '*' are only APIs without resource-level permissions (SSM agent channels, "
                    "VPC Lambda ENIs, X-Ray, PutMetricData limited by namespace) or tag-conditioned CCM calls",
                )
            ],
        )
        return policy

    def _metrics(self) -> iam.PolicyStatement:
        return iam.PolicyStatement(
            sid="Metrics",
            actions=["cloudwatch:PutMetricData"],
            resources=["*"],
            conditions={"StringEquals": {"cloudwatch:namespace": METRICS_NAMESPACE}},
        )

    def _ssm_agent(self) -> list[iam.PolicyStatement]:
        return ssm_agent_statements(self, self.config)

    def _describe(self) -> iam.PolicyStatement:
        return iam.PolicyStatement(sid="Describe", actions=list(DESCRIBE_ACTIONS), resources=["*"])

    def _node_logs(self) -> iam.PolicyStatement:
        return iam.PolicyStatement(
            sid="NodeLogs",
            actions=["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
            resources=self._log_groups(f"/dedicated-k8s/{self.config.cluster_name}/*"),
        )

    def _control_plane_policy(self) -> None:
        config = self.config
        all_groups = self._group_arns(list(config.control_plane_group_names) + self._worker_group_names)
        cluster_tag = f"kubernetes.io/cluster/{config.cluster_name}"
        statements = [
            *self._ssm_agent(),
            self._describe(),
            self._metrics(),
            self._node_logs(),
            self._cluster_keys,
            iam.PolicyStatement(
                sid="ClusterState",
                actions=[
                    "dynamodb:GetItem",
                    "dynamodb:PutItem",
                    "dynamodb:UpdateItem",
                    "dynamodb:DeleteItem",
                    "dynamodb:ConditionCheckItem",
                ],
                resources=[self._table_arn],
            ),
            iam.PolicyStatement(
                sid="ClusterSecrets",
                actions=[
                    "secretsmanager:GetSecretValue",
                    "secretsmanager:PutSecretValue",
                    "secretsmanager:DescribeSecret",
                ],
                resources=[self._secrets_arn],
            ),
            iam.PolicyStatement(sid="SnapshotBucket", actions=["s3:ListBucket"], resources=[self._bucket_arn]),
            iam.PolicyStatement(
                sid="Snapshots",
                actions=["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                resources=[f"{self._bucket_arn}/snapshots/*"],
            ),
            iam.PolicyStatement(
                sid="LaunchHooks",
                actions=["autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat"],
                resources=all_groups,
            ),
            iam.PolicyStatement(sid="CloudControllerRead", actions=list(CCM_DESCRIBE_ACTIONS), resources=["*"]),
            iam.PolicyStatement(
                sid="CloudControllerOwned",
                actions=list(CCM_TAGGED_ACTIONS),
                resources=["*"],
                conditions={"StringEquals": {f"aws:ResourceTag/{cluster_tag}": "owned"}},
            ),
            iam.PolicyStatement(
                sid="CloudControllerCreate",
                actions=list(CCM_CREATE_ACTIONS),
                resources=["*"],
                conditions={"StringEquals": {f"aws:RequestTag/{cluster_tag}": "owned"}},
            ),
            *[
                iam.PolicyStatement(
                    sid=sid,
                    actions=[action],
                    resources=["*"],
                    conditions={"StringEquals": {key: list(creates), f"aws:RequestTag/{cluster_tag}": "owned"}},
                )
                for sid, action, key, creates in CCM_TAG_ON_CREATE
            ],
            # CreateSecurityGroup is also authorized on the VPC the group goes into, which carries no request
            # tags: the cluster's VPC only (the imported one by ID, the stack's own by its owned tag).
            self._ccm_security_group_vpc(cluster_tag),
            # aws-node-termination-handler (queue mode, host network on control-plane nodes: this role via IMDS).
            iam.PolicyStatement(
                sid="TerminationHandlerQueue",
                actions=["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"],
                resources=[self._arn("sqs", config.termination_handler_queue_name)],
            ),
            iam.PolicyStatement(
                sid="TerminationHandlerDescribe",
                actions=list(NTH_DESCRIBE_ACTIONS),
                resources=["*"],
            ),
            # IRSA: the initialiser publishes the service-account issuer's two documents (stages/irsa.py).
            *issuer_writer_statements(self, config),
        ]
        if config.cluster_autoscaler:
            statements += [
                iam.PolicyStatement(
                    sid="ClusterAutoscalerDescribe", actions=list(AUTOSCALER_DESCRIBE_ACTIONS), resources=["*"]
                ),
                iam.PolicyStatement(
                    sid="ClusterAutoscalerScaleWorkers",
                    actions=list(AUTOSCALER_SCALE_ACTIONS),
                    resources=self._group_arns(self._worker_group_names),
                ),
            ]
        policy = self._attach(self.control_plane_role, "Policy", statements)
        suppress(
            policy,
            "AwsSolutions-IAM5",
            "Resource '*' only where the API has no resource-level permissions (SSM agent channels, "
            "ec2/autoscaling/elb Describe*, the termination handler's autoscaling:DescribeTags, PutMetricData "
            "limited by namespace) or where a tag condition "
            "(kubernetes.io/cluster/<name>=owned on the resource or in the create request, the cluster tag on KMS "
            "keys and on the cluster's own VPC) scopes it",
            applies_to=_applies(
                [
                    "Resource::*",
                    "Resource::arn:<AWS::Partition>:kms:<AWS::Region>:<AWS::AccountId>:key/*",
                    "Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:vpc/*",
                    f"Resource::arn:<AWS::Partition>:ssm:<AWS::Region>:<AWS::AccountId>:parameter{config.ssm_prefix}/*",
                    f"Resource::arn:<AWS::Partition>:secretsmanager:<AWS::Region>:<AWS::AccountId>:secret:{config.secrets_prefix}/*",
                    "Resource::arn:<AWS::Partition>:logs:<AWS::Region>:<AWS::AccountId>:log-group:"
                    f"/dedicated-k8s/{config.cluster_name}/*:*",
                    "Resource::arn:<AWS::Partition>:s3:::" + self._bucket_pattern() + "/snapshots/*",
                    *[
                        f"Resource::{self._group_pattern(name)}"
                        for name in list(config.control_plane_group_names) + self._worker_group_names
                    ],
                ]
            ),
        )

    def _ccm_security_group_vpc(self, cluster_tag: str) -> iam.PolicyStatement:
        vpc_id = self.config.vpc.vpc_id
        if vpc_id is not None:
            return iam.PolicyStatement(
                sid="CloudControllerSecurityGroupVpc",
                actions=["ec2:CreateSecurityGroup"],
                resources=[self._arn("ec2", "vpc", vpc_id)],
            )
        return iam.PolicyStatement(
            sid="CloudControllerSecurityGroupVpc",
            actions=["ec2:CreateSecurityGroup"],
            resources=[self._arn("ec2", "vpc", "*")],
            conditions={"StringEquals": {f"aws:ResourceTag/{cluster_tag}": "owned"}},
        )

    def _bucket_pattern(self) -> str:
        return self.config.snapshot_bucket_name("<AWS::AccountId>", "<AWS::Region>")

    @staticmethod
    def _group_pattern(name: str) -> str:
        return (
            "arn:<AWS::Partition>:autoscaling:<AWS::Region>:<AWS::AccountId>:"
            f"autoScalingGroup:*:autoScalingGroupName/{name}"
        )

    def _worker_policy(self) -> None:
        config = self.config
        statements = [
            *self._ssm_agent(),
            self._describe(),
            self._metrics(),
            self._node_logs(),
            self._cluster_keys,
            iam.PolicyStatement(
                sid="WorkerJoinSecret",
                actions=["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"],
                resources=[self._secret_arn(config.join_secret_name)],
            ),
            iam.PolicyStatement(
                sid="WorkerHooks",
                actions=["autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat"],
                resources=self._group_arns(self._worker_group_names),
            ),
        ]
        policy = self._attach(self.worker_role, "Policy", statements)
        suppress(
            policy,
            "AwsSolutions-IAM5",
            "Resource '*' only for the SSM agent channels, Describe* and PutMetricData (namespace-limited); "
            "KMS keys by the cluster tag; the secret ARN's random suffix; hooks on the cluster's worker groups",
            applies_to=_applies(
                [
                    "Resource::*",
                    "Resource::arn:<AWS::Partition>:kms:<AWS::Region>:<AWS::AccountId>:key/*",
                    f"Resource::arn:<AWS::Partition>:ssm:<AWS::Region>:<AWS::AccountId>:parameter{config.ssm_prefix}/*",
                    f"Resource::arn:<AWS::Partition>:secretsmanager:<AWS::Region>:<AWS::AccountId>:secret:{config.join_secret_name}-??????",
                    "Resource::arn:<AWS::Partition>:logs:<AWS::Region>:<AWS::AccountId>:log-group:"
                    f"/dedicated-k8s/{config.cluster_name}/*:*",
                    *[f"Resource::{self._group_pattern(name)}" for name in self._worker_group_names],
                ]
            ),
        )

    def _lambda_policies(self) -> None:
        config = self.config
        for role, function_names, kind in (
            (self.etcd_lifecycle_role, [config.etcd_lifecycle_function_name], "lifecycle"),
            (self.reconciler_role, [config.reconciler_function_name], "reconciler"),
            (self.cluster_ops_role, [config.cluster_ops_function_name], "cluster-ops"),
        ):
            log_groups = [f"/aws/lambda/{name}" for name in function_names]
            statements = [
                # cluster-ops finds the etcd endpoints by tag and publishes no metrics: DescribeInstances only.
                self._describe()
                if kind != "cluster-ops"
                else iam.PolicyStatement(sid="Describe", actions=["ec2:DescribeInstances"], resources=["*"]),
                *([self._metrics()] if kind != "cluster-ops" else []),
                self._cluster_keys if kind != "cluster-ops" else self._cluster_keys_decrypt_only,
                iam.PolicyStatement(sid="VpcNetworkInterfaces", actions=list(VPC_LAMBDA_ENI_ACTIONS), resources=["*"]),
                iam.PolicyStatement(sid="Tracing", actions=list(XRAY_ACTIONS), resources=["*"]),
                iam.PolicyStatement(
                    sid="FunctionLogs",
                    actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                    resources=self._log_groups(*log_groups),
                ),
                iam.PolicyStatement(
                    sid="EtcdClientCertificate",
                    actions=["secretsmanager:GetSecretValue"],
                    resources=[self._secret_arn(config.etcd_client_secret_name)],
                ),
                # "Was the cluster initialised?" when the etcd client secret is unusable (ClusterAws.etcd_tls):
                # a read of the nodes' cluster-state item, never a write (LeadingKeys).
                iam.PolicyStatement(
                    sid="ClusterInitialisedRead",
                    actions=["dynamodb:GetItem"],
                    resources=[self._table_arn],
                    conditions={"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": [CLUSTER_STATE_KEY]}},
                ),
            ]
            applies = [
                "Resource::*",
                "Resource::arn:<AWS::Partition>:kms:<AWS::Region>:<AWS::AccountId>:key/*",
                f"Resource::arn:<AWS::Partition>:secretsmanager:<AWS::Region>:<AWS::AccountId>:secret:{config.etcd_client_secret_name}-??????",
                *[
                    f"Resource::arn:<AWS::Partition>:logs:<AWS::Region>:<AWS::AccountId>:log-group:{group}:*"
                    for group in log_groups
                ],
            ]
            if kind == "lifecycle":
                # The lifecycle Lambda drains every terminating node (control plane and workers) before it
                # completes the hook, with its own Kubernetes API client certificate.
                terminate_groups = [*config.control_plane_group_names, *self._worker_group_names]
                statements.append(
                    iam.PolicyStatement(
                        sid="TerminateHooks",
                        actions=["autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat"],
                        resources=self._group_arns(terminate_groups),
                    )
                )
                statements.append(
                    iam.PolicyStatement(
                        sid="KubeClientCertificate",
                        actions=["secretsmanager:GetSecretValue"],
                        resources=[self._secret_arn(config.kube_client_secret_name)],
                    )
                )
                # The membership writer lease (lambdas/common/writer_lease.py): that one item of the
                # cluster-state table, never the bootstrap/initialised item the nodes own (LeadingKeys).
                statements.append(
                    iam.PolicyStatement(
                        sid="MembershipWriterLease",
                        actions=list(WRITER_LEASE_ACTIONS),
                        resources=[self._table_arn],
                        conditions={"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": [LEASE_KEY]}},
                    )
                )
                # When each terminate action was first seen (the removal deadline's start, ClusterAws.first_seen):
                # only items under that prefix, never the nodes' item or the lease (LeadingKeys).
                statements.append(
                    iam.PolicyStatement(
                        sid="FirstSeenRecords",
                        actions=list(FIRST_SEEN_ACTIONS),
                        resources=[self._table_arn],
                        conditions={"ForAllValues:StringLike": {"dynamodb:LeadingKeys": [f"{FIRST_SEEN_PREFIX}*"]}},
                    )
                )
                statements.append(
                    iam.PolicyStatement(
                        sid="RetryQueue",
                        actions=[
                            "sqs:SendMessage",
                            "sqs:ReceiveMessage",
                            "sqs:DeleteMessage",
                            "sqs:GetQueueAttributes",
                            "sqs:ChangeMessageVisibility",
                        ],
                        resources=[self._arn("sqs", f"{config.resource_prefix}-etcd-lifecycle")],
                    )
                )
                applies.extend(f"Resource::{self._group_pattern(name)}" for name in terminate_groups)
                applies.append(
                    "Resource::arn:<AWS::Partition>:secretsmanager:<AWS::Region>:<AWS::AccountId>:secret:"
                    f"{config.kube_client_secret_name}-??????"
                )
            elif kind == "reconciler":
                # The reconciler never changes membership itself: it asks the lifecycle Lambda (the single
                # writer) through its queue, so it may only send to that queue.
                statements.append(
                    iam.PolicyStatement(
                        sid="LifecycleQueueRequests",
                        actions=["sqs:SendMessage"],
                        resources=[self._arn("sqs", f"{config.resource_prefix}-etcd-lifecycle")],
                    )
                )
                # Its records of the joins in flight (lambdas/common/join_watch.py): that one item of the
                # cluster-state table, read and replaced (LeadingKeys), never the nodes' or the writer lease's.
                statements.append(
                    iam.PolicyStatement(
                        sid="JoinWatchRecords",
                        actions=["dynamodb:GetItem", "dynamodb:PutItem"],
                        resources=[self._table_arn],
                        conditions={"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": [JOIN_WATCH_KEY]}},
                    )
                )
            policy = self._attach(role, "Policy", statements)
            suppress(
                policy,
                "AwsSolutions-IAM5",
                "Resource '*' only for VPC network interfaces (Lambda's ENI management), X-Ray, Describe* and "
                "PutMetricData (namespace-limited); KMS keys by cluster tag; the secret ARN's random suffix; "
                "log streams of the function's own log group",
                applies_to=_applies(applies),
            )

    def _image_builder_policy(self) -> None:
        policy = self._attach(self.image_builder_role, "Policy", image_builder_statements(self, self.config))
        suppress(
            policy,
            "AwsSolutions-IAM5",
            IMAGE_BUILDER_WILDCARDS_REASON,
            applies_to=image_builder_wildcards(self.config),
        )
