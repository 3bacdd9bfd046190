"""Drain before termination continues: the lifecycle Lambda cordons the node, evicts its pods through the
Eviction API (PodDisruptionBudgets hold) and deletes the Node object before it completes a worker's hook, and
before the etcd removal on a control-plane node.

Real: the Lambda code and boto3 on moto (conftest), a 3-member TLS etcd cluster (conftest), HTTPS with mutual
TLS to the API. Simulated: the Kubernetes API server (tests/kube_api_sim.py; we cannot run one here) and Auto
Scaling's lifecycle actions (conftest's HookRecorder, moto lacks them). One journal records, in order, the
API's state changes, every etcd call and every lifecycle action, so ordering is asserted across all three.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lambdas.common.cluster_aws import LambdaSettings, SettingsError
from lambdas.common.drain import DrainStatus, drain_node
from lambdas.common.etcd_client import EtcdClient
from lambdas.common.kube_client import KubeClient, KubeUnauthorizedError, KubeUnavailableError
from lambdas.etcd_lifecycle import handler as lifecycle
from tests.kube_api_sim import KubeApiSim, pod_json
from tests.lambdas.conftest import CLUSTER, HOOK, Env, settings, sqs_event

pytestmark = pytest.mark.etcd

WORKER_GROUP = f"dk8s-{CLUSTER}-workers-general"
KUBE_SECRET = f"dedicated-k8s/{CLUSTER}/lifecycle-kube-client"
DS = ("DaemonSet", "calico-node")


class Ctx:
    aws_request_id = "test-request"


def node_name(instance_id: str) -> str:
    return f"{instance_id}.ec2.internal"  # node_agent.instance.InstanceIdentity.node_name in us-east-1


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeApiSim]:
    sim = KubeApiSim(tmp_path)
    try:
        yield sim
    finally:
        sim.stop()


@dataclass
class DrainEnv:
    env: Env
    kube: KubeApiSim

    @property
    def journal(self) -> list[tuple[str, str]]:
        return self.kube.journal

    def configure(self, **overrides: str) -> None:
        base = {
            "DRAIN_NODES": "true",
            "KUBE_API_URL": self.kube.url,
            "KUBE_CLIENT_SECRET_NAME": KUBE_SECRET,
            "WORKER_GROUP_NAMES": WORKER_GROUP,
            "DRAIN_SETTLE_SECONDS": "0",
            "DRAIN_DEADLINE_SECONDS": "300",
        }
        self.env.aws.settings = settings(self.env.queue_url, **{**base, **overrides})

    def launch_worker(self) -> str:
        resp = self.env.ec2.run_instances(
            ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="m6i.large", SubnetId=self.env.subnet_id,
            TagSpecifications=[{"ResourceType": "instance", "Tags": [
                {"Key": "dedicated-k8s:cluster", "Value": CLUSTER}, {"Key": "dedicated-k8s:role", "Value": "worker"}]}],
        )  # fmt: skip
        iid = str(resp["Instances"][0]["InstanceId"])
        self.env.group_of[iid] = WORKER_GROUP
        return iid

    def run(self, *bodies: dict[str, Any]) -> dict[str, Any]:
        return lifecycle.handle(sqs_event(*bodies), Ctx())

    def deliver_retries(self, until: Any, timeout: float = 30.0) -> int:
        """Hand the queue's delayed retries to the handler, as the SQS event source would, until ``until()``."""
        deadline = time.monotonic() + timeout
        deliveries = 0
        while not until():
            assert time.monotonic() < deadline, "the retries did not get there in time"
            bodies = self.env.queued(wait=0.3)
            if bodies:
                deliveries += len(bodies)
                self.run(*bodies)
        return deliveries

    def etcd_calls(self) -> list[int]:
        return [i for i, (what, _) in enumerate(self.journal) if what == "etcd"]

    def index(self, entry: tuple[str, str]) -> int:
        assert entry in self.journal, f"{entry} not in {self.journal}"
        return self.journal.index(entry)


@pytest.fixture
def drain_env(handlers: Env, kube: KubeApiSim, monkeypatch: pytest.MonkeyPatch) -> DrainEnv:
    env = handlers
    env.aws.secretsmanager.create_secret(Name=KUBE_SECRET, SecretString=kube.secret_value())
    env.aws.autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=WORKER_GROUP, LaunchConfigurationName="lc", MinSize=0, MaxSize=3, DesiredCapacity=0,
        VPCZoneIdentifier=env.subnet_id,
    )  # fmt: skip
    env.aws.autoscaling.put_lifecycle_hook(
        AutoScalingGroupName=WORKER_GROUP, LifecycleHookName=HOOK, HeartbeatTimeout=300, DefaultResult="CONTINUE",
        LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
    )  # fmt: skip
    journal = kube.journal
    hooks = env.hooks
    real_complete, real_heartbeat = hooks.complete, hooks.heartbeat

    def complete(instance_id: str, token: str | None, result: str) -> None:
        real_complete(instance_id, token, result)
        journal.append(("complete", f"{instance_id}:{result}"))

    def heartbeat(instance_id: str, token: str | None) -> None:
        real_heartbeat(instance_id, token)
        journal.append(("heartbeat", instance_id))

    monkeypatch.setattr(hooks, "complete", complete)
    monkeypatch.setattr(hooks, "heartbeat", heartbeat)

    class JournaledEtcd(EtcdClient):
        def call(self, endpoint: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
            journal.append(("etcd", path))
            return super().call(endpoint, path, body)

        def member_remove(self, endpoints: Sequence[str], member_id: str) -> None:
            super().member_remove(endpoints, member_id)
            journal.append(("member-removed", member_id))

    monkeypatch.setattr(env.aws, "etcd_client", lambda tls, timeout=2.0: JournaledEtcd(tls, timeout=timeout))
    built = DrainEnv(env, kube)
    built.configure()
    return built


def workload(kube: KubeApiSim, node: str) -> None:
    """A Deployment's pod, a bare pod, a DaemonSet's pod, a static pod's mirror and a finished Job pod."""
    kube.add_pod(pod_json("shop", "web-7d9f-abcde", node))
    kube.add_pod(pod_json("default", "debug-shell", node, owner=None))
    kube.add_pod(pod_json("kube-system", "calico-node-x1", node, owner=DS))
    kube.add_pod(
        pod_json("kube-system", f"kube-proxy-{node}", node, owner=("Node", node),
                 annotations={"kubernetes.io/config.mirror": "abc123"})
    )  # fmt: skip
    kube.add_pod(pod_json("batch", "report-29x7q", node, owner=("Job", "report"), phase="Succeeded"))


# -- workers ---------------------------------------------------------------------------------------------------


def test_worker_is_cordoned_drained_and_deleted_before_the_hook_continues(drain_env: DrainEnv) -> None:
    d = drain_env
    worker = d.launch_worker()
    node = node_name(worker)
    d.kube.add_node(node, worker)
    d.kube.add_node(node_name("i-0aaaaaaaaaaaaaaaa"), "i-0aaaaaaaaaaaaaaaa")  # another node: left alone
    workload(d.kube, node)
    members_before = d.env.etcd.member_names()

    assert d.run(d.env.begin_termination(worker)) == {"batchItemFailures": []}

    assert d.journal == [
        ("heartbeat", worker),  # the lifecycle Lambda's check that the hook is live (lambdas/common/verify.py)
        ("cordon", node),
        ("evict", "shop/web-7d9f-abcde"),
        ("evict", "default/debug-shell"),
        ("delete-node", node),
        ("complete", f"{worker}:CONTINUE"),
    ]
    assert node not in d.kube.nodes and node_name("i-0aaaaaaaaaaaaaaaa") in d.kube.nodes
    assert d.env.hooks.results(worker) == ["CONTINUE"]
    assert d.etcd_calls() == [], "a worker has no etcd member: etcd is never called"
    assert d.env.etcd.member_names() == members_before


def test_eviction_blocked_by_a_pdb_heartbeats_and_retries_then_continues(drain_env: DrainEnv) -> None:
    d = drain_env
    worker = d.launch_worker()
    node = node_name(worker)
    d.kube.add_node(node, worker)
    d.kube.add_pod(pod_json("shop", "db-0", node, owner=("StatefulSet", "db")))
    d.kube.add_pod(pod_json("shop", "web-1", node))
    d.kube.block("shop", "db-0")

    d.run(d.env.begin_termination(worker))
    assert ("eviction-refused", "shop/db-0") in d.journal and ("evict", "shop/web-1") in d.journal
    assert d.journal[0] == ("heartbeat", worker), "the hook is kept alive while the PDB blocks (verified first)"
    assert node in d.kube.nodes and "shop/db-0" in d.kube.pod_names(node)
    assert d.env.hooks.results(worker) == []

    retried = d.env.queued(wait=1.2)  # the delayed retry (RETRY_DELAY_SECONDS=1)
    assert len(retried) == 1 and retried[0]["dedicatedK8sRetry"]["attempt"] == 2
    d.run(*retried)  # still blocked: another heartbeat and retry, nothing completed
    assert d.journal.count(("eviction-refused", "shop/db-0")) == 2 and d.env.hooks.results(worker) == []

    d.kube.allow("shop", "db-0")  # the budget allows it now (another replica became ready)
    d.deliver_retries(until=lambda: d.env.hooks.results(worker) == ["CONTINUE"])
    assert (
        d.index(("evict", "shop/db-0")) < d.index(("delete-node", node)) < d.index(("complete", f"{worker}:CONTINUE"))
    )
    assert d.journal.count(("evict", "shop/web-1")) == 1, "an evicted pod is not evicted again"


def test_daemonset_and_mirror_pods_are_not_evicted(kube: KubeApiSim) -> None:
    node = node_name("i-0123456789abcdef0")
    kube.add_node(node, "i-0123456789abcdef0")
    workload(kube, node)
    terminating = pod_json("shop", "old-web", node)
    terminating["metadata"]["deletionTimestamp"] = "2026-11-25T08:00:00Z"
    kube.add_pod(terminating)
    kube.grace = "manual"

    result = drain_node(KubeClient(kube.url, kube.tls), "i-0123456789abcdef0")

    evicted = [what for kind, what in kube.journal if kind == "evict"]
    assert sorted(evicted) == ["default/debug-shell", "shop/web-7d9f-abcde"]
    assert result.status is DrainStatus.WAITING and set(result.terminating) >= {"shop/old-web"}
    assert node in kube.nodes, "the Node stays while pods are still terminating"
    kube.finish_terminating()
    result = drain_node(KubeClient(kube.url, kube.tls), "i-0123456789abcdef0")
    assert result.status is DrainStatus.DRAINED and node not in kube.nodes
    assert [kind for kind, _ in kube.journal].count("evict") == 2, "nothing is evicted twice"
    assert set(result.skipped) == {"kube-system/calico-node-x1", f"kube-system/kube-proxy-{node}", "batch/report-29x7q"}


def test_a_node_is_found_by_its_provider_id_when_its_name_does_not_carry_the_instance(kube: KubeApiSim) -> None:
    kube.add_node("ip-10-0-1-23.ec2.internal", "i-0fedcba9876543210")
    found = KubeClient(kube.url, kube.tls).node_for_instance("i-0fedcba9876543210")
    assert found is not None and found.name == "ip-10-0-1-23.ec2.internal"
    assert KubeClient(kube.url, kube.tls).node_for_instance("i-0fedcba987654321f") is None


# -- control plane ---------------------------------------------------------------------------------------------


def test_control_plane_drain_happens_before_the_etcd_removal(drain_env: DrainEnv) -> None:
    d = drain_env
    leaving = d.env.instance_ids[0]
    node = node_name(leaving)
    d.kube.add_node(node, leaving)
    d.kube.add_pod(pod_json("kube-system", "coredns-5d78-abcde", node))
    d.kube.add_pod(pod_json("kube-system", "calico-node-cp", node, owner=DS))

    assert d.run(d.env.begin_termination(leaving)) == {"batchItemFailures": []}

    cordon, evict = d.index(("cordon", node)), d.index(("evict", "kube-system/coredns-5d78-abcde"))
    deleted = d.index(("delete-node", node))
    removed = next(i for i, (kind, _) in enumerate(d.journal) if kind == "member-removed")
    completed = d.index(("complete", f"{leaving}:CONTINUE"))
    assert cordon < evict < deleted < removed < completed
    assert min(d.etcd_calls()) > deleted, "etcd is not even read before the drain has finished"
    assert not any(leaving in name for name in d.env.etcd.member_names())
    assert len(d.env.etcd.member_names()) == 2


def test_control_plane_removal_waits_while_a_pdb_blocks_the_drain(drain_env: DrainEnv) -> None:
    d = drain_env
    leaving = d.env.instance_ids[1]
    node = node_name(leaving)
    d.kube.add_node(node, leaving)
    d.kube.add_pod(pod_json("kube-system", "coredns-5d78-fghij", node))
    d.kube.block("kube-system", "coredns-5d78-fghij")

    d.run(d.env.begin_termination(leaving))
    assert d.etcd_calls() == [] and len(d.env.etcd.member_names()) == 3
    assert d.journal[0] == ("heartbeat", leaving) and d.env.hooks.results(leaving) == []

    d.kube.allow("kube-system", "coredns-5d78-fghij")
    d.deliver_retries(until=lambda: d.env.hooks.results(leaving) == ["CONTINUE"])
    assert d.index(("delete-node", node)) < min(d.etcd_calls())
    assert len(d.env.etcd.member_names()) == 2


# -- an API that cannot help ------------------------------------------------------------------------------------


def metric_names(out: str) -> set[str]:
    names: set[str] = set()
    for line in out.splitlines():
        if line.startswith("{") and "_aws" in line:
            doc = json.loads(line)
            names |= {m["Name"] for d in doc["_aws"]["CloudWatchMetrics"] for m in d["Metrics"]}
    return names


def test_unreachable_api_proceeds_after_the_drain_deadline(
    drain_env: DrainEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    d = drain_env
    d.kube.stop()  # the API server is down
    d.configure(DRAIN_DEADLINE_SECONDS="2")
    leaving = d.env.instance_ids[2]

    d.run(d.env.begin_termination(leaving))
    first = capsys.readouterr().out
    assert len(d.env.etcd.member_names()) == 3, "no etcd removal while the drain may still succeed"
    assert d.journal == [("heartbeat", leaving)] and "Kubernetes API unreachable" in first
    assert "DrainDeadlinePassed" not in metric_names(first)

    d.deliver_retries(until=lambda: d.env.hooks.results(leaving) == ["CONTINUE"])
    rest = capsys.readouterr().out
    assert not any(leaving in name for name in d.env.etcd.member_names())
    assert "DrainDeadlinePassed" in metric_names(rest)
    assert "drain unfinished after" in rest


def test_a_worker_proceeds_after_the_drain_deadline_while_the_kube_secret_is_a_placeholder(
    drain_env: DrainEnv,
) -> None:
    d = drain_env
    d.env.aws.secretsmanager.put_secret_value(SecretId=KUBE_SECRET, SecretString="{}")
    d.configure(DRAIN_DEADLINE_SECONDS="2")
    worker = d.launch_worker()
    d.kube.add_node(node_name(worker), worker)

    d.run(d.env.begin_termination(worker))
    assert d.env.hooks.results(worker) == [] and d.journal == [("heartbeat", worker)]
    d.deliver_retries(until=lambda: d.env.hooks.results(worker) == ["CONTINUE"])
    assert node_name(worker) in d.kube.nodes, "no credentials: the Node could not be touched"
    assert d.kube.requests == []


def test_drain_is_idempotent_after_a_crash(drain_env: DrainEnv) -> None:
    d = drain_env
    d.kube.grace = "manual"  # evicted pods take a while to terminate
    worker = d.launch_worker()
    node = node_name(worker)
    d.kube.add_node(node, worker)
    d.kube.add_pod(pod_json("shop", "web-1", node))
    d.kube.add_pod(pod_json("shop", "web-2", node))
    event = d.env.begin_termination(worker)

    # The first attempt cordons and evicts, then the Lambda dies before it could re-enqueue: SQS redelivers
    # the same message (same attempt, same first-seen time).
    first = drain_node(KubeClient(d.kube.url, d.kube.tls), worker)
    assert first.status is DrainStatus.WAITING
    d.run(event)  # redelivery: pods still terminating -> retry, nothing repeated
    assert d.kube.count("PATCH", "/nodes/") == 1, "an already cordoned node is not patched again"
    assert d.kube.count("POST", "/eviction") == 2, "terminating pods are not evicted again"
    assert d.env.hooks.results(worker) == []

    d.kube.finish_terminating()
    d.deliver_retries(until=lambda: d.env.hooks.results(worker) == ["CONTINUE"])
    assert node not in d.kube.nodes and d.kube.count("DELETE", "/nodes/") == 1

    # A crash after the hook was completed: the redelivered message finds no Node and no waiting hook.
    before = len(d.kube.journal)
    d.run(event)
    assert d.kube.journal[before:] == [] and d.env.hooks.results(worker) == ["CONTINUE"]


def test_an_unauthorized_client_is_a_clear_error_and_the_drain_waits(drain_env: DrainEnv) -> None:
    d = drain_env
    with pytest.raises(KubeUnauthorizedError) as err:
        KubeClient(d.kube.url, d.kube.unauthorized_tls).list_nodes()
    assert err.value.status == 403
    with pytest.raises(KubeUnavailableError):
        KubeClient("https://127.0.0.1:9", d.kube.tls, timeout=1.0).list_nodes()

    tls = d.kube.unauthorized_tls
    d.env.aws.secretsmanager.put_secret_value(
        SecretId=KUBE_SECRET, SecretString=json.dumps({"ca": tls.ca_pem, "cert": tls.cert_pem, "key": tls.key_pem})
    )
    worker = d.launch_worker()
    d.kube.add_node(node_name(worker), worker)
    d.run(d.env.begin_termination(worker))
    assert d.journal == [("heartbeat", worker)], "403 (RBAC not applied yet) waits like an unreachable API"


# -- settings ------------------------------------------------------------------------------------------------------


def test_drain_configuration_is_explicit() -> None:
    base = {"CLUSTER_NAME": CLUSTER, "CONTROL_PLANE_GROUP_NAMES": "a,b,c", "ETCD_CLIENT_SECRET_NAME": "s"}
    with pytest.raises(SettingsError, match="DRAIN_NODES"):
        LambdaSettings.from_env(base)
    with pytest.raises(SettingsError, match="DRAIN_NODES"):
        LambdaSettings.from_env({**base, "DRAIN_NODES": "yes"})
    with pytest.raises(SettingsError, match="KUBE_API_URL"):
        LambdaSettings.from_env({**base, "DRAIN_NODES": "true", "KUBE_CLIENT_SECRET_NAME": "k"})
    on = {**base, "DRAIN_NODES": "true", "KUBE_API_URL": "https://api:6443", "KUBE_CLIENT_SECRET_NAME": "k"}
    with pytest.raises(SettingsError, match="shorter than REMOVAL_DEADLINE_SECONDS"):
        LambdaSettings.from_env({**on, "DRAIN_DEADLINE_SECONDS": "3600", "REMOVAL_DEADLINE_SECONDS": "3600"})
    parsed = LambdaSettings.from_env({**on, "WORKER_GROUP_NAMES": "w1, w2"})
    assert parsed.drain_nodes and parsed.worker_groups == ("w1", "w2") and parsed.drain_deadline_seconds == 600
    assert not LambdaSettings.from_env({**base, "DRAIN_NODES": "false"}).drain_nodes


def test_with_drain_disabled_a_worker_hook_continues_without_calling_the_api(drain_env: DrainEnv) -> None:
    d = drain_env
    d.configure(DRAIN_NODES="false")
    worker = d.launch_worker()
    d.kube.add_node(node_name(worker), worker)
    d.run(d.env.begin_termination(worker))
    assert d.env.hooks.results(worker) == ["CONTINUE"] and d.kube.requests == []
