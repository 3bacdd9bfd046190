"""What K8sClusterStack creates, created in the twin's moto: network, launch templates, groups with their
hooks and tags, the cluster-state table, the snapshot bucket, the KMS key and the lifecycle queues.

Deviation (moto): a group is created with MinSize=0/DesiredCapacity=0 and the twin attaches each instance
it launches (desired becomes 1) and detaches it (decrementing) before terminating it, so moto never
launches instances of its own; the twin's state machine holds the real capacity of min=max=desired=1.
The secrets are created by the initialising node agent (create-or-put), as on AWS after the first boot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from stages.config import ClusterConfig
from twin.aws import ACCOUNT, REGION
from twin.lifecycle import Group, Hook

AMI = "ami-12c6146b"  # moto's default image


@dataclass(frozen=True)
class CloudNames:
    vpc_id: str
    subnets: dict[str, str]  # zone -> subnet id
    kms_key_arn: str
    bucket: str
    events_queue_url: str
    events_queue_arn: str
    dlq_url: str
    launch_hook: str
    terminate_hook: str


def hook_names(cfg: ClusterConfig) -> tuple[str, str]:
    """As stages/nodes.py names them (the same on every group)."""
    return "dk8s-launch", "dk8s-terminate"


def create_cloud(aws: Any, cfg: ClusterConfig, second_octet: int) -> CloudNames:
    ec2, _asg, ddb, s3, kms, sqs = (aws.client(s) for s in ("ec2", "autoscaling", "dynamodb", "s3", "kms", "sqs"))
    cluster_tag = {"Key": cfg.CLUSTER_TAG_KEY, "Value": cfg.cluster_name}
    vpc = ec2.create_vpc(
        CidrBlock=f"127.{second_octet}.0.0/16", TagSpecifications=[{"ResourceType": "vpc", "Tags": [cluster_tag]}]
    )["Vpc"]["VpcId"]
    subnets = {}
    for i, zone in enumerate(cfg.availability_zones[:3]):
        subnets[zone] = ec2.create_subnet(
            VpcId=vpc, CidrBlock=f"127.{second_octet}.{64 * i}.0/18", AvailabilityZone=zone
        )["Subnet"]["SubnetId"]
    for role in ("control-plane", "worker"):
        ec2.create_launch_template(
            LaunchTemplateName=f"{cfg.resource_prefix}-{role}",
            LaunchTemplateData={
                "ImageId": AMI,
                "InstanceType": cfg.control_plane_instance_type,
                "Placement": {"Tenancy": cfg.tenancy},
                "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1},
            },
        )
    key_arn = kms.create_key(
        Description=f"{cfg.cluster_name} cluster key",
        Tags=[{"TagKey": cfg.CLUSTER_TAG_KEY, "TagValue": cfg.cluster_name}],
    )["KeyMetadata"]["Arn"]
    ddb.create_table(
        TableName=cfg.cluster_state_table_name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    bucket = cfg.snapshot_bucket_name(ACCOUNT, REGION)
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    dlq = sqs.create_queue(QueueName=f"{cfg.resource_prefix}-etcd-lifecycle-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue = sqs.create_queue(
        QueueName=f"{cfg.resource_prefix}-etcd-lifecycle",
        Attributes={
            "KmsMasterKeyId": key_arn,
            "VisibilityTimeout": "3",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"}),
        },
    )["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    launch, terminate = hook_names(cfg)
    return CloudNames(vpc, subnets, key_arn, bucket, queue, queue_arn, dlq, launch, terminate)


def create_groups(
    aws: Any,
    cfg: ClusterConfig,
    names: CloudNames,
    *,
    launch_timeout: float,
    terminate_timeout: float,
    terminate_default: str,
    retain_on_abandon: bool,
) -> list[Group]:
    asg = aws.client("autoscaling")
    groups: list[Group] = []
    zones = list(names.subnets)
    specs: list[tuple[str, str, str, int]] = [
        (name, "control-plane", cfg.control_plane_zone(i), 1) for i, name in enumerate(cfg.control_plane_group_names)
    ]
    for wg in cfg.worker_groups:
        specs.append((cfg.worker_group_name(wg), "worker", zones[0], wg.desired_capacity))
    for name, role, zone, desired in specs:
        tags = [
            {"Key": cfg.CLUSTER_TAG_KEY, "Value": cfg.cluster_name, "PropagateAtLaunch": True},
            {"Key": cfg.ROLE_TAG_KEY, "Value": role, "PropagateAtLaunch": True},
        ]
        asg.create_auto_scaling_group(
            AutoScalingGroupName=name,
            MinSize=0,
            MaxSize=desired,
            DesiredCapacity=0,
            LaunchTemplate={"LaunchTemplateName": f"{cfg.resource_prefix}-{role}"},
            VPCZoneIdentifier=",".join(names.subnets.values()) if role == "worker" else names.subnets[zone],
            Tags=tags,
        )
        launch = Hook(names.launch_hook, launch_timeout, "ABANDON")
        asg.put_lifecycle_hook(
            AutoScalingGroupName=name,
            LifecycleHookName=launch.name,
            LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING",
            HeartbeatTimeout=max(30, int(launch_timeout)),
            DefaultResult="ABANDON",
        )
        # Control plane: ABANDON + retain-on-abandon (stages/control_plane.py); workers: CONTINUE (drain).
        term = Hook(
            names.terminate_hook, terminate_timeout, terminate_default if role == "control-plane" else "CONTINUE"
        )
        asg.put_lifecycle_hook(
            AutoScalingGroupName=name,
            LifecycleHookName=term.name,
            LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
            HeartbeatTimeout=max(30, int(terminate_timeout)),
            DefaultResult=term.default_result,
        )
        groups.append(
            Group(
                name,
                role,
                zone,
                names.subnets[zone],
                desired,
                launch,
                term,
                retain_on_abandon and role == "control-plane",
            )
        )
    return groups
