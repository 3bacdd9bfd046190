"""A real 3-member etcd cluster with TLS, and the control-plane instances that own its members in moto.

What is real: etcd (Debian's etcd-server, mutual TLS, each member on its own loopback address), the
Lambda code and boto3 against moto (EC2 instances carrying the members' private IPs and the cluster's
tags, Auto Scaling groups, Secrets Manager holding the etcd client certificate, the SQS lifecycle queue, the
cluster-state DynamoDB table that holds the membership writer lease).

What the harness drives (moto lacks it: docs/facts.md): Auto Scaling lifecycle actions.
moto raises NotImplementedError for CompleteLifecycleAction and RecordLifecycleActionHeartbeat, so
:class:`HookRecorder` answers those two calls the way Auto Scaling does (a completed or unknown action, or
a token that is not the action's, gives "No active Lifecycle Action found") and records them for the
assertions. moto ignores hooks (its DescribeAutoScalingInstances / DescribeAutoScalingGroups say InService
always), so this is the tests' one place for the lifecycle state: :class:`HarnessAws` takes the group from
moto (the instance must really be attached to it) and the state from :meth:`HookRecorder.state` --
``InService``, ``Terminating:Wait`` while the terminate hook waits, ``Terminating:Proceed`` once completed
(AutoScalingInstanceDetails.LifecycleState, Amazon EC2 Auto Scaling API Reference; "How lifecycle hooks
work", Amazon EC2 Auto Scaling User Guide). The twin's proxy does the same from its state machine
(twin/aws.py rewrites LifecycleState in both describe answers).

The cluster-state table holds the node agents' cluster item as an initialised cluster (state
``initialised``, generation 1, as node_agent/election.py writes it): these etcd clusters were initialised.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from lambdas.common.cluster_aws import ClusterAws, GroupInstance, LambdaSettings
from tests.etcd_cluster import EtcdCluster, free_ip_in, random_network

REGION = "us-east-1"
CLUSTER = "lambdatest"
GROUPS = tuple(f"dk8s-{CLUSTER}-control-plane-{i}" for i in range(3))
HOOK = "dk8s-terminate"
SECRET = f"dedicated-k8s/{CLUSTER}/etcd-client"
TABLE = f"dk8s-{CLUSTER}-cluster-state"

pytestmark = pytest.mark.etcd


@dataclass
class HookRecorder:
    """Auto Scaling's lifecycle actions, answered by the harness (moto does not implement them)."""

    waiting: dict[str, str] = field(default_factory=dict)  # instance -> token of the terminate hook
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (call, instance, result)
    proceeding: set[str] = field(default_factory=set)  # instances whose terminate hook was completed

    def state(self, instance_id: str) -> str:
        """The LifecycleState Auto Scaling would report for an instance in a group."""
        if instance_id in self.waiting:
            return "Terminating:Wait"
        return "Terminating:Proceed" if instance_id in self.proceeding else "InService"

    def _active(self, instance_id: str, token: str | None, call: str) -> None:
        if instance_id not in self.waiting or (token and token != self.waiting[instance_id]):
            message = f"No active Lifecycle Action found with instance ID {instance_id}"
            raise ClientError({"Error": {"Code": "ValidationError", "Message": message}}, call)

    def complete(self, instance_id: str, token: str | None, result: str) -> None:
        self._active(instance_id, token, "CompleteLifecycleAction")
        self.calls.append(("complete", instance_id, result))
        del self.waiting[instance_id]
        self.proceeding.add(instance_id)

    def heartbeat(self, instance_id: str, token: str | None) -> None:
        self._active(instance_id, token, "RecordLifecycleActionHeartbeat")
        self.calls.append(("heartbeat", instance_id, ""))

    def results(self, instance_id: str) -> list[str]:
        return [r for c, i, r in self.calls if c == "complete" and i == instance_id]


class HarnessAws(ClusterAws):
    """The production :class:`ClusterAws` on moto clients; only the two lifecycle-action calls and the
    lifecycle states go to :class:`HookRecorder` instead of moto."""

    def __init__(self, settings: LambdaSettings, hooks: HookRecorder, **clients: Any) -> None:
        super().__init__(settings, **clients)
        self.hooks = hooks

    def complete(self, group: str, hook: str, instance_id: str, token: str | None, result: str) -> bool:
        try:
            self.hooks.complete(instance_id, token, result)
        except ClientError:
            return False
        return True

    def heartbeat(self, group: str, hook: str, instance_id: str, token: str | None) -> bool:
        try:
            self.hooks.heartbeat(instance_id, token)
        except ClientError:
            return False
        return True

    def group_instances(self) -> list[GroupInstance]:
        return [
            GroupInstance(gi.instance_id, gi.group, self.hooks.state(gi.instance_id))
            for gi in super().group_instances()
        ]

    def lifecycle_state(self, instance_id: str) -> tuple[str, str] | None:
        found = super().lifecycle_state(instance_id)  # moto: the real group, and "InService" whatever the hook
        return None if found is None else (found[0], self.hooks.state(instance_id))


@dataclass
class Env:
    etcd: EtcdCluster
    aws: HarnessAws
    hooks: HookRecorder
    ec2: Any
    sqs: Any
    queue_url: str
    dynamodb: Any
    group_of: dict[str, str]
    subnet_id: str
    network: str

    @property
    def instance_ids(self) -> list[str]:
        return [n.instance_id for n in self.etcd.nodes.values()]

    def begin_termination(self, instance_id: str) -> dict[str, Any]:
        """What Auto Scaling does on TerminateInstanceInAutoScalingGroup: Terminating:Wait + the event. Only an
        instance of a group can terminate in it: one not attached yet (a test's worker) is attached first."""
        group = self.group_of[instance_id]
        autoscaling = self.aws.autoscaling
        if not autoscaling.describe_auto_scaling_instances(InstanceIds=[instance_id])["AutoScalingInstances"]:
            autoscaling.attach_instances(InstanceIds=[instance_id], AutoScalingGroupName=group)
        token = f"token-{instance_id}"
        self.hooks.waiting[instance_id] = token
        return terminate_event(group, instance_id, token)

    def terminate_in_ec2(self, instance_id: str) -> None:
        self.ec2.terminate_instances(InstanceIds=[instance_id])

    def launch_instance(self, group: str) -> tuple[str, str]:
        ip = free_ip_in(self.network)
        iid = _run_instance(self.ec2, self.subnet_id, ip)
        self.aws.autoscaling.attach_instances(InstanceIds=[iid], AutoScalingGroupName=group)
        self.group_of[iid] = group
        return iid, ip

    def forget_initialisation(self) -> None:
        """A cluster never initialised: no cluster-state item (node_agent.election.parse_item: uninitialised)."""
        self.dynamodb.delete_item(TableName=TABLE, Key={"pk": {"S": "cluster"}})

    def queued(self, wait: float = 0.0) -> list[dict[str, Any]]:
        """Drain the queue (after ``wait`` seconds, for delayed retries)."""
        import time

        time.sleep(wait)
        found: list[dict[str, Any]] = []
        while True:
            msgs = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10).get("Messages", [])
            if not msgs:
                return found
            for m in msgs:
                found.append(json.loads(m["Body"]))
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=m["ReceiptHandle"])


def terminate_event(group: str, instance_id: str, token: str) -> dict[str, Any]:
    return {
        "version": "0",
        "id": "7e2b5c3a-0000-4000-8000-000000000000",
        "detail-type": "EC2 Instance-terminate Lifecycle Action",
        "source": "aws.autoscaling",
        "account": "123456789012",
        "time": "2026-11-25T08:00:00Z",
        "region": REGION,
        "resources": [f"arn:aws:autoscaling:{REGION}:123456789012:autoScalingGroup:x:autoScalingGroupName/{group}"],
        "detail": {
            "LifecycleActionToken": token,
            "AutoScalingGroupName": group,
            "LifecycleHookName": HOOK,
            "EC2InstanceId": instance_id,
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
            "Origin": "AutoScalingGroup",
            "Destination": "EC2",
        },
    }


def sqs_event(*bodies: dict[str, Any] | str) -> dict[str, Any]:
    return {
        "Records": [
            {"messageId": f"m-{i}", "body": b if isinstance(b, str) else json.dumps(b), "eventSource": "aws:sqs"}
            for i, b in enumerate(bodies)
        ]
    }


def _run_instance(ec2: Any, subnet_id: str, ip: str) -> str:
    resp = ec2.run_instances(
        ImageId="ami-12c6146b",
        MinCount=1,
        MaxCount=1,
        InstanceType="m6i.large",
        SubnetId=subnet_id,
        PrivateIpAddress=ip,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "dedicated-k8s:cluster", "Value": CLUSTER},
                    {"Key": "dedicated-k8s:role", "Value": "control-plane"},
                ],
            }
        ],
    )
    return str(resp["Instances"][0]["InstanceId"])


def settings(queue_url: str, **overrides: str) -> LambdaSettings:
    env = {
        "CLUSTER_NAME": CLUSTER,
        "CONTROL_PLANE_GROUP_NAMES": ",".join(GROUPS),
        "ETCD_CLIENT_SECRET_NAME": SECRET,
        "RETRY_QUEUE_URL": queue_url,
        "RETRY_DELAY_SECONDS": "1",
        "REMOVAL_DEADLINE_SECONDS": "600",
        "DESIRED_MEMBERS": "3",
        "DRAIN_NODES": "false",  # the drain tests (test_drain.py) switch it on with a Kubernetes API simulation
        "CLUSTER_STATE_TABLE": TABLE,
        "WRITER_LEASE_SECONDS": "120",
        **overrides,
    }
    return LambdaSettings.from_env(env)


@pytest.fixture
def moto_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        yield


@contextlib.contextmanager
def lambda_env(root: Path) -> Iterator[Env]:
    """Inside ``mock_aws``: three control-plane instances in moto whose private IPs are a real etcd cluster's."""
    if shutil.which("etcd") is None:
        raise RuntimeError("etcd is not installed: run `make setup` (Debian etcd-server)")
    network = random_network()
    ec2 = boto3.client("ec2", region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock=f"{network}.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=f"{network}.0.0/16")["Subnet"]["SubnetId"]
    ips = [free_ip_in(network) for _ in range(3)]
    ids = [_run_instance(ec2, subnet, ip) for ip in ips]
    autoscaling = boto3.client("autoscaling", region_name=REGION)
    autoscaling.create_launch_configuration(
        LaunchConfigurationName="lc", ImageId="ami-12c6146b", InstanceType="m6i.large"
    )
    for group in GROUPS:
        autoscaling.create_auto_scaling_group(
            AutoScalingGroupName=group, LaunchConfigurationName="lc", MinSize=0, MaxSize=2, DesiredCapacity=0,
            VPCZoneIdentifier=subnet,
        )  # fmt: skip
        autoscaling.put_lifecycle_hook(
            AutoScalingGroupName=group, LifecycleHookName=HOOK,
            LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING", HeartbeatTimeout=900, DefaultResult="ABANDON",
        )  # fmt: skip
    for group, iid in zip(GROUPS, ids, strict=True):
        autoscaling.attach_instances(InstanceIds=[iid], AutoScalingGroupName=group)
    sqs = boto3.client("sqs", region_name=REGION)
    queue_url = sqs.create_queue(QueueName=f"dk8s-{CLUSTER}-etcd-lifecycle")["QueueUrl"]
    dynamodb = boto3.client("dynamodb", region_name=REGION)
    dynamodb.create_table(  # as stages/cluster_state.py declares it: partition key "pk" only
        TableName=TABLE,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    dynamodb.put_item(  # the node agents' item of an initialised cluster (node_agent/election.py, complete)
        TableName=TABLE,
        Item={"pk": {"S": "cluster"}, "state": {"S": "initialised"}, "generation": {"N": "1"}},
    )
    cluster = EtcdCluster(root / "etcd", network)
    try:
        cluster.start(3, list(zip(ids, ips, strict=True)))
        assert cluster.tls is not None
        secrets = boto3.client("secretsmanager", region_name=REGION)
        secrets.create_secret(
            Name=SECRET,
            SecretString=json.dumps(
                {"ca": cluster.tls.ca_pem, "cert": cluster.tls.cert_pem, "key": cluster.tls.key_pem}
            ),
        )
        hooks = HookRecorder()
        aws = HarnessAws(
            settings(queue_url), hooks, ec2=ec2, autoscaling=autoscaling, secretsmanager=secrets, sqs=sqs,
            dynamodb=dynamodb,
        )  # fmt: skip
        group_of = dict(zip(ids, GROUPS, strict=True))
        yield Env(cluster, aws, hooks, ec2, sqs, queue_url, dynamodb, group_of, subnet, network)
    finally:
        cluster.stop()


@pytest.fixture
def env(moto_env: None, tmp_path: Path) -> Iterator[Env]:
    with lambda_env(tmp_path) as built:
        yield built


@pytest.fixture
def handlers(env: Env, monkeypatch: pytest.MonkeyPatch) -> Env:
    """Point the three handlers at the harness's ClusterAws (their only seam)."""
    from lambdas.cluster_ops import handler as ops
    from lambdas.etcd_lifecycle import handler as lifecycle
    from lambdas.reconciler import handler as reconciler

    for module in (lifecycle, reconciler, ops):
        monkeypatch.setattr(module, "cluster_aws", lambda: env.aws)
    return env
