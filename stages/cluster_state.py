"""ClusterState: the cluster's KMS key, snapshot and log buckets, state table and secrets.

Stateful resources are retained when the stack is deleted or they are replaced (``RETAINED``): an etcd snapshot
or the cluster PKI must never disappear with a stack operation. They are not retained when the create that made
them rolls back (DeletionPolicy ``RetainExceptOnCreate``): a fixed-name resource left behind by a failed first
deploy would make the next ``cdk deploy`` fail with AlreadyExists, and the failed create never held any state.

The key policy names each AWS service that writes encrypted data for the cluster, with the actions and the
condition that service's own documentation gives (cited per statement in tests/stacks/test_first_deploy_template.py).
"""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from stages.config import ClusterConfig
from stages.nag import skip_checkov, suppress

# Every retained resource of the cluster stack (RETAIN_ON_UPDATE_OR_DELETE renders DeletionPolicy
# RetainExceptOnCreate, UpdateReplacePolicy Retain).
RETAINED = cdk.RemovalPolicy.RETAIN_ON_UPDATE_OR_DELETE

VOLUME_KEY_ACTIONS = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]
# "Encrypt log data in CloudWatch Logs using AWS KMS": the Logs service principal's actions.
LOGS_KEY_ACTIONS = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
# "Enable compatibility between event sources from AWS services and encrypted topics" (SNS) and "Configure KMS
# permissions for AWS services" (SQS): what an AWS service publishing to an encrypted topic or queue needs.
SNS_EVENT_SOURCE_ACTIONS = ["kms:GenerateDataKey*", "kms:Decrypt"]
SQS_EVENT_SOURCE_ACTIONS = ["kms:GenerateDataKey", "kms:Decrypt"]


def grant_auto_scaling_volumes(key: kms.Key) -> None:
    """Let EC2 Auto Scaling's service-linked role use ``key`` for the encrypted volumes it launches (and for the
    group notifications it publishes to the KMS-encrypted alarm topic: SNS documents Auto Scaling as an event
    source that is named by its role, not a service principal)."""
    # The role exists only once the account has used Auto Scaling, and KMS refuses a key policy whose principal
    # does not exist (MalformedPolicyDocumentException). IamStack creates the service-linked role and the pipeline
    # checks it before deploying (pipeline/preflight.py, check "autoscaling-service-linked-role").
    autoscaling_role = iam.ArnPrincipal(
        cdk.Stack.of(key).format_arn(
            service="iam",
            region="",
            resource="role",
            resource_name="aws-service-role/autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling",
        )
    )
    key.add_to_resource_policy(
        iam.PolicyStatement(
            sid="AutoScalingEncryptedVolumes",
            principals=[autoscaling_role],
            actions=list(VOLUME_KEY_ACTIONS),
            resources=["*"],
        )
    )
    key.add_to_resource_policy(
        iam.PolicyStatement(
            sid="AutoScalingGrants",
            principals=[autoscaling_role],
            actions=["kms:CreateGrant"],
            resources=["*"],
            conditions={"Bool": {"kms:GrantIsForAWSResource": "true"}},
        )
    )


def log_group_arns(stack: cdk.Stack, config: ClusterConfig) -> list[str]:
    """The ARNs of every log group this cluster encrypts with its key: the nodes' groups and the Lambdas'."""
    names = [
        f"{config.node_log_group_prefix}*",
        *(
            f"/aws/lambda/{name}"
            for name in (
                config.etcd_lifecycle_function_name,
                config.reconciler_function_name,
                config.cluster_ops_function_name,
            )
        ),
    ]
    return [
        stack.format_arn(
            service="logs", resource="log-group", resource_name=name, arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME
        )
        for name in names
    ]


class ClusterState(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, config: ClusterConfig) -> None:
        super().__init__(scope, construct_id)
        stack = cdk.Stack.of(self)
        self.key = kms.Key(
            self,
            "Key",
            alias=f"alias/{config.resource_prefix}",
            description=f"dedicated-k8s {config.cluster_name}: EBS, snapshots, state table, secrets, queues, logs",
            enable_key_rotation=True,
            removal_policy=RETAINED,
        )
        # EC2 Auto Scaling launches instances with CMK-encrypted root volumes through its service-linked
        # role, which needs the key (without this, every launch fails with Client.InternalError).
        grant_auto_scaling_volumes(self.key)
        # Services that write encrypted data for the cluster: logs, the alarm topic, EventBridge -> SQS.
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchLogs",
                principals=[iam.ServicePrincipal(f"logs.{stack.region}.{stack.url_suffix}")],
                actions=list(LOGS_KEY_ACTIONS),
                resources=["*"],
                # CloudWatch Logs passes the log group's ARN as encryption context: only this cluster's groups.
                conditions={"ArnLike": {"kms:EncryptionContext:aws:logs:arn": log_group_arns(stack, config)}},
            )
        )
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchAlarms",
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=list(SNS_EVENT_SOURCE_ACTIONS),
                resources=["*"],
                # SNS's documented statement for an AWS event source carries no condition; who may publish to the
                # alarm topic is the topic policy's business.
            )
        )
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="EventBridge",
                principals=[iam.ServicePrincipal("events.amazonaws.com")],
                actions=list(SQS_EVENT_SOURCE_ACTIONS),
                resources=["*"],
                # No aws:SourceAccount / aws:SourceArn: AWS documents them as not supported in a key policy for
                # EventBridge deliveries to encrypted targets (an unsupported condition silently drops every
                # event). The queue policies admit only this stack's rules (aws:SourceArn there is supported).
            )
        )

        # S3 server access logs and VPC flow logs. S3 server access logging requires an SSE-S3 target bucket.
        self.log_bucket = s3.Bucket(
            self,
            "LogBucket",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            versioned=True,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_PREFERRED,
            lifecycle_rules=[
                s3.LifecycleRule(expiration=cdk.Duration.days(365), noncurrent_version_expiration=cdk.Duration.days(30))
            ],
            removal_policy=RETAINED,
        )
        suppress(
            self.log_bucket, "AwsSolutions-S1", "this is the access-log bucket itself; logging it to itself would loop"
        )
        skip_checkov(
            self.log_bucket.node.default_child,  # type: ignore[arg-type]
            [
                ("CKV_AWS_18", "this is the access-log bucket itself"),
                ("CKV_AWS_145", "S3 server access logging supports SSE-S3 target buckets only"),
            ],
        )

        self.snapshot_bucket = s3.Bucket(
            self,
            "SnapshotBucket",
            bucket_name=config.snapshot_bucket_name(cdk.Aws.ACCOUNT_ID, cdk.Aws.REGION),
            encryption=s3.BucketEncryption.KMS,
            encryption_key=self.key,
            bucket_key_enabled=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            versioned=True,
            server_access_logs_bucket=self.log_bucket,
            server_access_logs_prefix="snapshot-bucket/",
            lifecycle_rules=[
                # The agent keeps `snapshotRetentionDays` (and always the newest 3); deleted snapshots stay
                # recoverable as noncurrent versions for a week. The current-version expiry is only a
                # backstop at 3x retention, so a long-dead cluster still has its last snapshots for DR.
                s3.LifecycleRule(
                    id="retention",
                    expiration=cdk.Duration.days(config.snapshot_retention_days * 3),
                    noncurrent_version_expiration=cdk.Duration.days(7),
                    abort_incomplete_multipart_upload_after=cdk.Duration.days(1),
                )
            ],
            removal_policy=RETAINED,
        )

        self.table = dynamodb.Table(
            self,
            "ClusterStateTable",
            table_name=config.cluster_state_table_name,
            partition_key=dynamodb.Attribute(name="pk", type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            encryption=dynamodb.TableEncryption.CUSTOMER_MANAGED,
            encryption_key=self.key,
            # No DynamoDB deletion protection: it would defeat RetainExceptOnCreate for this one table (a rolled-back
            # first create could not delete it, the stack would end ROLLBACK_FAILED and the retry fail with
            # AlreadyExists). The running cluster's table is still kept: DeletionPolicy/UpdateReplacePolicy Retain
            # survive every later stack delete and replacement, and DeleteTable is an administrator's action that no
            # cluster role holds (README "First deploy": enable protection by hand once the cluster is up, if wanted).
            deletion_protection=False,
            removal_policy=RETAINED,
        )

        # Created empty: the values (cluster PKI, the Lambda's etcd and Kubernetes API client certificates,
        # the worker join token) are generated and written by the initialising node, never by CloudFormation.
        self.secrets: dict[str, secretsmanager.CfnSecret] = {}
        for logical_id, name, description in (
            ("PkiSecret", config.pki_secret_name, "cluster CA, front-proxy CA, etcd CA, service-account keys"),
            ("EtcdClientSecret", config.etcd_client_secret_name, "etcd client certificate for the lifecycle Lambdas"),
            (
                "KubeClientSecret",
                config.kube_client_secret_name,
                "Kubernetes API client certificate for the lifecycle Lambda's node drain",
            ),
            ("WorkerJoinSecret", config.join_secret_name, "worker bootstrap token and CA cert hash"),
        ):
            secret = secretsmanager.CfnSecret(
                self, logical_id, name=name, description=f"dedicated-k8s: {description}", kms_key_id=self.key.key_arn
            )
            secret.apply_removal_policy(RETAINED)
            suppress(
                secret,
                "AwsSolutions-SMG4",
                "written and rotated by the node agent (join token every 12 h, certificates by the renewal timer), "
                "not by a Secrets Manager rotation Lambda",
            )
            skip_checkov(secret, [("CKV2_AWS_57", "rotated by the node agent's timers, not a rotation Lambda")])
            self.secrets[logical_id] = secret
