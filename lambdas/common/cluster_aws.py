"""What the Lambdas need from AWS, over boto3: settings from the environment, the control-plane
instances (by tag and by Auto Scaling group), the etcd client certificate, the lifecycle-hook calls and
the retry queue. Domain decisions stay in :mod:`lambdas.common.membership` and
:mod:`lambdas.common.termination`.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from lambdas.common.etcd_client import EtcdClient, TlsMaterial
from lambdas.common.kube_client import KubeClient
from lambdas.common.writer_lease import WriterLease

CLIENT_PORT = 2379
# EC2 instance states after which the instance can never run again (InstanceState, Amazon EC2 API Reference).
GONE_STATES = frozenset({"shutting-down", "terminated"})
# The node agents' cluster-state item (node_agent/election.py, PK): the Lambdas only ever read it.
CLUSTER_STATE_KEY = "cluster"
# Phases of that item after which the cluster has etcd members (node_agent.election.Phase); "initialising"
# with generation 0 is the very first init, before any member but the initialiser's exists.
_INITIALISED_PHASES = frozenset({"initialised", "restoring"})
_KNOWN_PHASES = frozenset({"uninitialised", "initialising", *_INITIALISED_PHASES})
# When the lifecycle Lambda first saw a terminate action: one item each in the cluster-state table,
# keyed under this prefix (the lifecycle role may write only these and the writer lease: LeadingKeys).
FIRST_SEEN_PREFIX = "first-seen/"


class SettingsError(ValueError):
    """A required environment variable is missing or malformed (the stack sets them all)."""


class CredentialsUnreadableError(RuntimeError):
    """A client-certificate secret cannot be used although the cluster-state item says the cluster was
    initialised (so the secret was written): an error to retry and alarm on, never "nothing to do"."""


class ClusterStateError(RuntimeError):
    """The cluster-state table cannot answer (unknown phase, malformed first-seen item)."""


@dataclass(frozen=True)
class LambdaSettings:
    cluster_name: str
    cluster_tag_key: str
    role_tag_key: str
    control_plane_groups: tuple[str, ...]
    etcd_client_secret_name: str
    retry_queue_url: str
    retry_delay_seconds: int
    removal_deadline_seconds: int
    desired_members: int
    metrics_namespace: str
    # Node drain on terminate hooks (lambdas.common.drain). DRAIN_NODES is required ("true" or "false"):
    # the stack sets "true"; "false" only where no Kubernetes API exists (the local twin).
    drain_nodes: bool = False
    worker_groups: tuple[str, ...] = ()
    kube_api_url: str = ""
    kube_client_secret_name: str = ""
    drain_deadline_seconds: int = 600
    drain_settle_seconds: int = 10
    # The single membership writer's lease (lambdas.common.writer_lease) in the cluster-state table; it must
    # outlive the function timeout (the stack sets twice the timeout).
    cluster_state_table: str = ""
    writer_lease_seconds: int = 120

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LambdaSettings:
        env = os.environ if env is None else env

        def need(key: str) -> str:
            value = env.get(key, "").strip()
            if not value:
                raise SettingsError(f"environment variable {key} is not set")
            return value

        def number(key: str, default: int) -> int:
            raw = env.get(key, str(default)).strip()
            if not raw.isdigit() or int(raw) <= 0:
                raise SettingsError(f"environment variable {key}={raw!r} must be a positive integer")
            return int(raw)

        groups = tuple(g.strip() for g in need("CONTROL_PLANE_GROUP_NAMES").split(",") if g.strip())
        worker_groups = tuple(g.strip() for g in env.get("WORKER_GROUP_NAMES", "").split(",") if g.strip())
        drain_flag = need("DRAIN_NODES").lower()
        if drain_flag not in ("true", "false"):
            raise SettingsError(f"environment variable DRAIN_NODES={drain_flag!r} must be 'true' or 'false'")
        drain = drain_flag == "true"
        removal_deadline = number("REMOVAL_DEADLINE_SECONDS", 3600)
        drain_deadline = number("DRAIN_DEADLINE_SECONDS", 600)
        if drain and drain_deadline >= removal_deadline:
            raise SettingsError(
                f"DRAIN_DEADLINE_SECONDS={drain_deadline} must be shorter than REMOVAL_DEADLINE_SECONDS="
                f"{removal_deadline} (a drain that cannot finish must not use up the etcd removal's time)"
            )
        settle = env.get("DRAIN_SETTLE_SECONDS", "10").strip()
        if not settle.isdigit():
            raise SettingsError(f"environment variable DRAIN_SETTLE_SECONDS={settle!r} must be a whole number")
        cluster_name = need("CLUSTER_NAME")
        return cls(
            cluster_name=cluster_name,
            cluster_tag_key=env.get("CLUSTER_TAG_KEY", "dedicated-k8s:cluster"),
            role_tag_key=env.get("ROLE_TAG_KEY", "dedicated-k8s:role"),
            control_plane_groups=groups,
            etcd_client_secret_name=need("ETCD_CLIENT_SECRET_NAME"),
            retry_queue_url=env.get("RETRY_QUEUE_URL", ""),
            retry_delay_seconds=min(number("RETRY_DELAY_SECONDS", 30), 900),  # SQS DelaySeconds <= 900
            removal_deadline_seconds=removal_deadline,
            desired_members=number("DESIRED_MEMBERS", 3),
            metrics_namespace=env.get("METRICS_NAMESPACE", "DedicatedK8s"),
            drain_nodes=drain,
            worker_groups=worker_groups,
            kube_api_url=need("KUBE_API_URL") if drain else "",
            kube_client_secret_name=need("KUBE_CLIENT_SECRET_NAME") if drain else "",
            drain_deadline_seconds=drain_deadline,
            drain_settle_seconds=int(settle),
            # The stack sets it; without it, the name stages/config.py gives the table (ClusterConfig
            # .cluster_state_table_name), so the lease is never skipped for want of a setting.
            cluster_state_table=env.get("CLUSTER_STATE_TABLE", "").strip() or f"dk8s-{cluster_name}-cluster-state",
            writer_lease_seconds=number("WRITER_LEASE_SECONDS", 120),
        )


@dataclass(frozen=True)
class GroupInstance:
    instance_id: str
    group: str
    lifecycle_state: str


def _error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


class ClusterAws:
    """boto3 calls, each small enough to read at a glance; clients are injected (moto in tests)."""

    def __init__(
        self, settings: LambdaSettings, *, ec2: Any, autoscaling: Any, secretsmanager: Any, sqs: Any, dynamodb: Any
    ) -> None:
        self.settings = settings
        self.ec2 = ec2
        self.autoscaling = autoscaling
        self.secretsmanager = secretsmanager
        self.sqs = sqs
        self.dynamodb = dynamodb

    @classmethod
    def from_boto3(cls, settings: LambdaSettings) -> ClusterAws:
        import boto3

        return cls(
            settings,
            ec2=boto3.client("ec2"),
            autoscaling=boto3.client("autoscaling"),
            secretsmanager=boto3.client("secretsmanager"),
            sqs=boto3.client("sqs"),
            dynamodb=boto3.client("dynamodb"),
        )

    # -- instances ------------------------------------------------------------------------------------------------
    def running_control_plane_ips(self, exclude: Iterable[str] = ()) -> dict[str, str]:
        """instance ID -> private IP of the cluster's running control-plane instances (found by tag)."""
        skip = set(exclude)
        found: dict[str, str] = {}
        paginator = self.ec2.get_paginator("describe_instances")
        filters = [
            {"Name": f"tag:{self.settings.cluster_tag_key}", "Values": [self.settings.cluster_name]},
            {"Name": f"tag:{self.settings.role_tag_key}", "Values": ["control-plane"]},
            {"Name": "instance-state-name", "Values": ["running"]},
        ]
        for page in paginator.paginate(Filters=filters):
            for reservation in page.get("Reservations", []):
                for inst in reservation.get("Instances", []):
                    iid, ip = inst.get("InstanceId"), inst.get("PrivateIpAddress")
                    if iid and ip and iid not in skip:
                        found[iid] = ip
        return dict(sorted(found.items()))

    def etcd_endpoints(self, exclude: Iterable[str] = ()) -> list[str]:
        return [f"https://{ip}:{CLIENT_PORT}" for ip in self.running_control_plane_ips(exclude).values()]

    def instance_states(self, instance_ids: Sequence[str]) -> dict[str, str | None]:
        """instance ID -> EC2 state name, or None when EC2 does not know the ID (long gone)."""
        states: dict[str, str | None] = dict.fromkeys(instance_ids)
        for iid in instance_ids:  # one by one: an unknown ID fails the whole batch call
            try:
                resp = self.ec2.describe_instances(InstanceIds=[iid])
            except ClientError as err:
                if _error_code(err) in ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"):
                    continue
                raise
            for reservation in resp.get("Reservations", []):
                for inst in reservation.get("Instances", []):
                    states[iid] = inst.get("State", {}).get("Name")
        return states

    def private_ip(self, instance_id: str) -> str | None:
        try:
            resp = self.ec2.describe_instances(InstanceIds=[instance_id])
        except ClientError as err:
            if _error_code(err).startswith("InvalidInstanceID"):
                return None
            raise
        for reservation in resp.get("Reservations", []):
            for inst in reservation.get("Instances", []):
                return str(inst["PrivateIpAddress"]) if inst.get("PrivateIpAddress") else None
        return None

    def group_instances(self) -> list[GroupInstance]:
        found: list[GroupInstance] = []
        paginator = self.autoscaling.get_paginator("describe_auto_scaling_groups")
        for page in paginator.paginate(AutoScalingGroupNames=list(self.settings.control_plane_groups)):
            for group in page.get("AutoScalingGroups", []):
                for inst in group.get("Instances", []):
                    found.append(
                        GroupInstance(inst["InstanceId"], group["AutoScalingGroupName"], inst["LifecycleState"])
                    )
        return found

    def lifecycle_state(self, instance_id: str) -> tuple[str, str] | None:
        """(group, LifecycleState) as Auto Scaling's DescribeAutoScalingInstances reports the instance, or None
        when no group holds it. The group is whichever one Auto Scaling says, not the one a message names."""
        resp = self.autoscaling.describe_auto_scaling_instances(InstanceIds=[instance_id])
        for inst in resp.get("AutoScalingInstances", []):
            if inst.get("InstanceId") == instance_id:
                return str(inst["AutoScalingGroupName"]), str(inst["LifecycleState"])
        return None

    def terminate_hook_name(self, group: str) -> str | None:
        resp = self.autoscaling.describe_lifecycle_hooks(AutoScalingGroupName=group)
        for hook in resp.get("LifecycleHooks", []):
            if hook.get("LifecycleTransition") == "autoscaling:EC2_INSTANCE_TERMINATING":
                return str(hook["LifecycleHookName"])
        return None

    # -- etcd credentials ---------------------------------------------------------------------------------------------
    def etcd_tls(self) -> TlsMaterial | None:
        """The client certificate the initialiser stored; None only while the cluster was never initialised.

        Whether it was initialised comes from the node agents' cluster-state item, not from the secret: a
        secret that is missing, a placeholder or corrupt (truncated JSON) on an initialised cluster raises
        :class:`CredentialsUnreadableError`, so a removal is retried and alarmed on, never skipped. The item is
        read only when the secret is unusable (the common path costs no extra call). Access errors raise."""
        name = self.settings.etcd_client_secret_name
        tls, problem = self._tls_secret(name)
        if tls is not None:
            return tls
        if self.cluster_initialised():
            raise CredentialsUnreadableError(
                f"secret {name!r} {problem}, but the cluster-state item says the cluster was initialised"
            )
        return None

    def cluster_initialised(self) -> bool:
        """Has the cluster ever been initialised (so etcd members exist)? From the cluster-state item the node
        agents write (node_agent/election.py); a missing item is a cluster never initialised."""
        item = self.dynamodb.get_item(
            TableName=self.settings.cluster_state_table, Key={"pk": {"S": CLUSTER_STATE_KEY}}, ConsistentRead=True
        ).get("Item")
        if not item:
            return False
        phase = item.get("state", {}).get("S")
        if phase not in _KNOWN_PHASES:
            raise ClusterStateError(f"cluster-state item has unknown state {phase!r}; refusing to guess")
        generation = item.get("generation", {}).get("N", "0")
        return phase in _INITIALISED_PHASES or (generation.isdigit() and int(generation) > 0)

    def etcd_client(self, tls: TlsMaterial, timeout: float = 2.0) -> EtcdClient:
        return EtcdClient(tls, timeout=timeout)

    # -- Kubernetes API credentials (the drain) -----------------------------------------------------------------
    def kube_tls(self) -> TlsMaterial | None:
        """The drainer's client certificate (``{"ca", "cert", "key"}``, written by the node agent at init); None
        while the secret is missing or unusable (the drain waits, then its deadline lets termination go on).
        Access errors raise."""
        return self._tls_secret(self.settings.kube_client_secret_name)[0]

    def kube_client(self, tls: TlsMaterial, timeout: float = 5.0) -> KubeClient:
        return KubeClient(self.settings.kube_api_url, tls, timeout=timeout)

    def _tls_secret(self, name: str) -> tuple[TlsMaterial | None, str]:
        """The certificate, or None and what is wrong with the secret (for the error that names it)."""
        try:
            raw = self.secretsmanager.get_secret_value(SecretId=name)["SecretString"]
        except ClientError as err:
            if _error_code(err) == "ResourceNotFoundException":
                return None, "does not exist or holds no value"
            raise
        try:
            value = json.loads(raw)
        except ValueError as err:
            return None, f"is not JSON ({err})"
        if not isinstance(value, dict):
            return None, "is not a JSON object"
        missing = [k for k in ("ca", "cert", "key") if not value.get(k)]
        if missing:
            return None, f"lacks {', '.join(missing)}"
        return TlsMaterial.from_secret(value), ""

    # -- lifecycle hook --------------------------------------------------------------------------------------------
    def complete(self, group: str, hook: str, instance_id: str, token: str | None, result: str) -> bool:
        """Complete the hook; False if Auto Scaling has no such action any more (completed before, or timed out)."""
        args: dict[str, Any] = {
            "AutoScalingGroupName": group,
            "LifecycleHookName": hook,
            "InstanceId": instance_id,
            "LifecycleActionResult": result,
        }
        if token:
            args["LifecycleActionToken"] = token
        try:
            self.autoscaling.complete_lifecycle_action(**args)
        except ClientError as err:
            if _error_code(err) == "ValidationError" and "No active Lifecycle Action" in str(err):
                return False
            raise
        return True

    def heartbeat(self, group: str, hook: str, instance_id: str, token: str | None) -> bool:
        args: dict[str, Any] = {"AutoScalingGroupName": group, "LifecycleHookName": hook, "InstanceId": instance_id}
        if token:
            args["LifecycleActionToken"] = token
        try:
            self.autoscaling.record_lifecycle_action_heartbeat(**args)
        except ClientError as err:
            if _error_code(err) == "ValidationError" and "No active Lifecycle Action" in str(err):
                return False
            raise
        return True

    # -- the single membership writer ---------------------------------------------------------------------------
    def writer_lease(self) -> WriterLease:
        return WriterLease(self.dynamodb, self.settings.cluster_state_table, self.settings.writer_lease_seconds)

    def first_seen(self, instance_id: str, group: str, hook: str, now: float) -> float:
        """When this lifecycle action was first seen: written once with a conditional put on first sight, read
        back ever after, so no message body can move the removal deadline.

        Keyed by (instance, group, hook), not by the token: the reconciler's repair of a lost event carries no
        token (DescribeAutoScalingInstances does not give it), and it must share the event's clock, not start
        its own. An instance leaves a group once, so one terminate action per key."""
        key = {"pk": {"S": f"{FIRST_SEEN_PREFIX}{instance_id}/{group}/{hook}"}}
        try:
            self.dynamodb.put_item(
                TableName=self.settings.cluster_state_table,
                Item={**key, "first_seen": {"N": repr(now)}},
                ConditionExpression="attribute_not_exists(pk)",
            )
        except ClientError as err:
            if _error_code(err) != "ConditionalCheckFailedException":
                raise
        else:
            return now
        item = self.dynamodb.get_item(TableName=self.settings.cluster_state_table, Key=key, ConsistentRead=True)
        raw = item.get("Item", {}).get("first_seen", {}).get("N", "")
        try:
            seen = float(raw)
        except ValueError:
            seen = math.nan
        if not math.isfinite(seen):
            raise ClusterStateError(f"first-seen item {key['pk']['S']!r} holds {raw!r}, not a time")
        return seen

    # -- queue ---------------------------------------------------------------------------------------------------
    def enqueue(self, body: dict[str, Any], delay_seconds: int = 0) -> None:
        if not self.settings.retry_queue_url:
            raise SettingsError("environment variable RETRY_QUEUE_URL is not set")
        self.sqs.send_message(
            QueueUrl=self.settings.retry_queue_url, MessageBody=json.dumps(body), DelaySeconds=min(delay_seconds, 900)
        )


@functools.cache
def default_cluster_aws() -> ClusterAws:
    """One per Lambda execution environment: settings from the environment, boto3's default clients."""
    return ClusterAws.from_boto3(LambdaSettings.from_env())
