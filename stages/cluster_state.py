"""ClusterState: the cluster's KMS key, snapshot and log buckets, state table and secrets.

Stateful resources are retained when the stack is deleted: an etcd snapshot or the cluster PKI must
never disappear with a stack operation.
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

VOLUME_KEY_ACTIONS = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]


def grant_auto_scaling_volumes(key: kms.Key) -> None:
    """Let EC2 Auto Scaling's service-linked role use ``key`` for the encrypted volumes it launches."""
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
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )
        # EC2 Auto Scaling launches instances with CMK-encrypted root volumes through its service-linked
        # role, which needs the key (without this, every launch fails with Client.InternalError).
        grant_auto_scaling_volumes(self.key)
        # Services that write encrypted data for the cluster: logs, the alarm topic, EventBridge -> SQS.
        for sid, principal in (
            ("CloudWatchLogs", iam.ServicePrincipal(f"logs.{stack.region}.{stack.url_suffix}")),
            ("CloudWatchAlarms", iam.ServicePrincipal("cloudwatch.amazonaws.com")),
            ("EventBridge", iam.ServicePrincipal("events.amazonaws.com")),
        ):
            self.key.add_to_resource_policy(
                iam.PolicyStatement(
                    sid=sid,
                    principals=[principal],
                    actions=["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"],
                    resources=["*"],
                    conditions={"StringEquals": {"aws:SourceAccount": stack.account}},
                )
            )

        # Server access logs, NLB access logs and VPC flow logs. Log-delivery targets cannot use
        # SSE-KMS (S3 server access logging and NLB access logs require SSE-S3).
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
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )
        suppress(
            self.log_bucket, "AwsSolutions-S1", "this is the access-log bucket itself; logging it to itself would loop"
        )
        skip_checkov(
            self.log_bucket.node.default_child,  # type: ignore[arg-type]
            [
                ("CKV_AWS_18", "this is the access-log bucket itself"),
                ("CKV_AWS_145", "log-delivery targets (S3 access logs, NLB logs) support SSE-S3 only"),
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
            removal_policy=cdk.RemovalPolicy.RETAIN,
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
            deletion_protection=True,
            removal_policy=cdk.RemovalPolicy.RETAIN,
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
            secret.apply_removal_policy(cdk.RemovalPolicy.RETAIN)
            suppress(
                secret,
                "AwsSolutions-SMG4",
                "written and rotated by the node agent (join token every 12 h, certificates by the renewal timer), "
                "not by a Secrets Manager rotation Lambda",
            )
            skip_checkov(secret, [("CKV2_AWS_57", "rotated by the node agent's timers, not a rotation Lambda")])
            self.secrets[logical_id] = secret
