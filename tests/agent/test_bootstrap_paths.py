"""Takeover after a dead holder, stale members, healthy-before-InService, and bad input (fast, recorded kubeadm)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from node_agent.bootstrap import Agent
from node_agent.config import AgentConfig
from node_agent.election import Attempt, ClusterStateStore, Phase
from node_agent.etcd import Member
from node_agent.instance import InstanceIdentity
from node_agent.lifecycle import RecordingLaunchHook
from tests.agent.conftest import REGION, config_values
from tests.agent.fakes import FakeEtcd, FakeEtcdCluster, RecordingRunner
from tests.agent.harness import build_agent, fast_settings


def _moto_instance(aws: dict[str, Any]) -> InstanceIdentity:
    inst = aws["ec2"].run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="m5.large")[
        "Instances"
    ][0]
    return InstanceIdentity(inst["InstanceId"], inst["PrivateIpAddress"], REGION)


def _agent(aws: dict[str, Any], tmp: Path, ident: InstanceIdentity, cluster: FakeEtcdCluster, *,
           cfg: AgentConfig | None = None, fail: dict[str, str] | None = None,
           etcd: Any = None, **settings: Any) -> tuple[Agent, RecordingLaunchHook, RecordingRunner]:  # fmt: skip
    cfg = cfg or AgentConfig.from_mapping(config_values())
    s = fast_settings(tmp / ident.instance_id, **settings)
    runner = RecordingRunner(cluster, ident.node_name, ident.private_ip, s.pki_dir, fail=fail)
    agent, hook = build_agent(
        aws, cfg, ident=ident, settings=s, runner=runner,
        etcd_for=lambda _tls: etcd or FakeEtcd(cluster), probe=cluster.alive_at,
    )  # fmt: skip
    return agent, hook, runner


def _raw_item(aws: dict[str, Any]) -> dict[str, Any]:
    return aws["dynamodb"].get_item(TableName="dk8s-demo-cluster-state", Key={"pk": {"S": "cluster"}}).get("Item", {})


def _dead_holder(aws: dict[str, Any], holder: InstanceIdentity, lease: float = 0.5) -> ClusterStateStore:
    """A node that took the lock, recorded its init attempt, and died (no renewals, no release)."""
    store = ClusterStateStore(aws["dynamodb"], "dk8s-demo-cluster-state")
    store.ensure_item()
    assert store.try_acquire(holder.instance_id, lease)
    attempt = Attempt(holder.instance_id, holder.instance_id, f"https://{holder.private_ip}:2379", "initialising")
    store.begin(holder.instance_id, Phase.INITIALISING, attempt, store.read())
    return store


def test_takeover_after_the_holder_died_and_its_instance_is_gone(aws: dict[str, Any], tmp_path: Path) -> None:
    cluster = FakeEtcdCluster()
    dead = _moto_instance(aws)
    aws["ec2"].terminate_instances(InstanceIds=[dead.instance_id])
    agent, hook, runner = _agent(aws, tmp_path, _moto_instance(aws), cluster)
    # Measured from just before the dead holder took its 0.5 s lease, so a slow machine cannot make the
    # takeover look early: the lower bound only depends on when the lease began.
    lease_taken = time.monotonic()
    store = _dead_holder(aws, dead)
    outcome = agent.run_launch()
    assert outcome.action == "initialised", outcome
    assert time.monotonic() - lease_taken >= 0.5, "waited for the dead holder's lease to expire"
    assert len(runner.commands("kubeadm init")) == 1
    assert runner.commands("kubeadm reset") == []
    state = store.read()
    assert (state.phase, state.generation, state.holder) == (Phase.INITIALISED, 1, None)
    assert hook.calls == [("CONTINUE", "initialised")]


def test_no_takeover_while_the_dead_holders_instance_still_runs(aws: dict[str, Any], tmp_path: Path) -> None:
    cluster = FakeEtcdCluster()
    holder = _moto_instance(aws)
    store = _dead_holder(aws, holder)
    agent, hook, runner = _agent(aws, tmp_path, _moto_instance(aws), cluster, join_deadline_seconds=2.0)
    outcome = agent.run_launch()
    assert not outcome.ok
    assert runner.commands("kubeadm") == [], "never initialises beside a possibly-alive initialiser"
    state = store.read()
    assert state.phase == Phase.INITIALISING and state.attempt is not None
    assert state.attempt.holder == holder.instance_id
    assert hook.result == "ABANDON"


def test_a_live_half_initialised_etcd_without_secrets_is_never_duplicated(aws: dict[str, Any], tmp_path: Path) -> None:
    cluster = FakeEtcdCluster()
    holder = _moto_instance(aws)
    _dead_holder(aws, holder)
    aws["ec2"].terminate_instances(InstanceIds=[holder.instance_id])  # even so: something answers there
    cluster.add(holder.node_name, holder.private_ip)
    agent, hook, runner = _agent(aws, tmp_path, _moto_instance(aws), cluster, join_deadline_seconds=2.0)
    assert not agent.run_launch().ok
    assert runner.commands("kubeadm") == []
    assert hook.result == "ABANDON"


def test_an_etcd_left_with_all_secrets_stored_is_adopted_and_joined(aws: dict[str, Any], tmp_path: Path) -> None:
    cluster = FakeEtcdCluster()
    first, _, _ = _agent(aws, tmp_path, _moto_instance(aws), cluster)
    assert first.run_launch().action == "initialised"
    # Rewind the table to "initialising" as if the initialiser died just before writing "initialised".
    holder = first.identity
    aws["dynamodb"].delete_item(TableName="dk8s-demo-cluster-state", Key={"pk": {"S": "cluster"}})
    store = _dead_holder(aws, holder)
    agent, _, runner = _agent(aws, tmp_path, _moto_instance(aws), cluster)
    outcome = agent.run_launch()
    assert outcome.action == "joined", outcome
    assert runner.commands("kubeadm init") == [] and len(runner.commands("kubeadm join")) == 1
    state = store.read()
    assert state.phase == Phase.INITIALISED and state.generation == 1
    assert {m.instance_id for m in state.last_membership} == {holder.instance_id, agent.me}


def test_a_stale_member_with_my_ip_is_removed_before_i_join(aws: dict[str, Any], tmp_path: Path) -> None:
    cluster = FakeEtcdCluster()
    a = _moto_instance(aws)
    first, _, _ = _agent(aws, tmp_path, a, cluster)
    assert first.run_launch().ok
    old = InstanceIdentity("i-0123456789abcdef0", "10.9.9.9", REGION)
    cluster.add(old.node_name, old.private_ip)  # an earlier instance that had the IP the new one gets
    new = InstanceIdentity("i-0fedcba9876543210", "10.9.9.9", REGION)
    agent, hook, _ = _agent(aws, tmp_path, new, cluster)
    assert agent.run_launch().action == "joined"
    names = sorted(m.name for m in cluster.members.values())
    assert names == sorted([a.node_name, new.node_name])
    assert hook.calls == [("CONTINUE", "joined")]


class NeverPromoted(FakeEtcd):
    """kubeadm join added the learner, but it never catches up (so it is never promoted)."""

    def member_ready(self, endpoints: Any, name: str) -> bool:
        return False


def test_the_launch_hook_is_abandoned_when_etcd_fails_to_start(aws: dict[str, Any], tmp_path: Path) -> None:
    cluster = FakeEtcdCluster()
    first, _, _ = _agent(aws, tmp_path, _moto_instance(aws), cluster)
    assert first.run_launch().ok
    agent, hook, _ = _agent(aws, tmp_path, _moto_instance(aws), cluster,
                            fail={"kubeadm join": "[etcd] etcd member failed to start"})  # fmt: skip
    outcome = agent.run_launch()
    assert not outcome.ok
    assert hook.calls and hook.calls[0][0] == "ABANDON" and "etcd member failed to start" in hook.calls[0][1]
    assert len(hook.calls) == 1, "never CONTINUE after ABANDON"


def test_the_launch_hook_waits_for_promotion_and_abandons_if_it_never_comes(
    aws: dict[str, Any], tmp_path: Path
) -> None:
    cluster = FakeEtcdCluster()
    first, _, _ = _agent(aws, tmp_path, _moto_instance(aws), cluster)
    assert first.run_launch().ok
    agent, hook, runner = _agent(aws, tmp_path, _moto_instance(aws), cluster, etcd=NeverPromoted(cluster),
                                 health_timeout_seconds=0.5)  # fmt: skip
    outcome = agent.run_launch()
    assert not outcome.ok and "promoted and healthy" in outcome.reason
    assert hook.calls == [("ABANDON", outcome.reason)]
    assert len(runner.commands("kubeadm join")) == 1


def test_an_unknown_cluster_state_abandons_and_changes_nothing(aws: dict[str, Any], tmp_path: Path) -> None:
    aws["dynamodb"].put_item(
        TableName="dk8s-demo-cluster-state",
        Item={"pk": {"S": "cluster"}, "state": {"S": "migrating"}, "generation": {"N": "4"}},
    )
    before = _raw_item(aws)
    cluster = FakeEtcdCluster()
    agent, hook, runner = _agent(aws, tmp_path, _moto_instance(aws), cluster)
    outcome = agent.run_launch()
    assert not outcome.ok and "unknown state 'migrating'" in outcome.reason
    assert hook.calls == [("ABANDON", outcome.reason)]
    assert runner.calls == [] and cluster.members == {}
    assert _raw_item(aws) == before


def test_unreadable_secrets_abandon_the_join_and_change_nothing(aws: dict[str, Any], tmp_path: Path) -> None:
    cluster = FakeEtcdCluster()
    cfg = AgentConfig.from_mapping(config_values())
    first, _, _ = _agent(aws, tmp_path, _moto_instance(aws), cluster, cfg=cfg)
    assert first.run_launch().ok
    aws["secretsmanager"].put_secret_value(SecretId=cfg.pki_secret_name, SecretString=json.dumps({"ca.crt": "x"}))
    before_item, before_members = _raw_item(aws), dict(cluster.members)
    agent, hook, runner = _agent(aws, tmp_path, _moto_instance(aws), cluster, cfg=cfg)
    outcome = agent.run_launch()
    assert not outcome.ok and "SecretUnreadableError" in outcome.reason and cfg.pki_secret_name in outcome.reason
    assert hook.calls == [("ABANDON", outcome.reason)]
    assert runner.calls == []
    assert cluster.members == before_members
    assert _raw_item(aws) == before_item


def test_a_worker_joins_with_the_stored_token_once_the_kubelet_registers(aws: dict[str, Any], tmp_path: Path) -> None:
    cluster = FakeEtcdCluster()
    first, _, _ = _agent(aws, tmp_path, _moto_instance(aws), cluster)
    assert first.run_launch().ok
    cfg = AgentConfig.from_mapping(config_values(role="worker"))
    worker, hook, runner = _agent(aws, tmp_path, _moto_instance(aws), cluster, cfg=cfg)
    assert worker.run_launch().action == "worker-joined"
    assert hook.calls == [("CONTINUE", "worker-joined")]
    kubelet_conf = str(worker.settings.kubernetes_dir / "kubelet.conf")
    assert runner.calls[-1] == ["kubectl", "--kubeconfig", kubelet_conf, "get", "node", worker.node_name, "-o", "name"]
    text = (worker.settings.state_dir / "kubeadm-join.yaml").read_text()
    token = first.secrets.read_join(cfg.join_secret_name).token
    assert token in text and "controlPlane" not in text
    assert len(cluster.members) == 1, "a worker adds no etcd member"


def test_an_agent_restart_after_a_completed_join_changes_nothing(aws: dict[str, Any], tmp_path: Path) -> None:
    cluster = FakeEtcdCluster()
    first, _, _ = _agent(aws, tmp_path, _moto_instance(aws), cluster)
    assert first.run_launch().ok
    ident = _moto_instance(aws)
    agent, _, _ = _agent(aws, tmp_path, ident, cluster)
    assert agent.run_launch().action == "joined"
    # The membership write was lost (say the agent crashed right after the join): a restart repairs it.
    store = ClusterStateStore(aws["dynamodb"], "dk8s-demo-cluster-state")
    state = store.read()
    assert store.update_membership(1, [m for m in state.last_membership if m.instance_id != ident.instance_id],
                                   state.membership_rev)  # fmt: skip
    again, hook, runner2 = _agent(aws, tmp_path, ident, cluster)
    assert again.run_launch().action == "already-member"
    assert hook.calls == [("CONTINUE", "already-member")]
    assert runner2.commands("kubeadm") == [], "no second join"
    assert ident.instance_id in {m.instance_id for m in store.read().last_membership}


def test_an_unrecorded_live_control_plane_member_blocks_disaster_recovery(aws: dict[str, Any], tmp_path: Path) -> None:
    cluster = FakeEtcdCluster()
    first_ident = _moto_instance(aws)
    first, _, _ = _agent(aws, tmp_path, first_ident, cluster)
    assert first.run_launch().ok
    cluster.members.clear()  # the recorded member is gone ...
    aws["ec2"].terminate_instances(InstanceIds=[first_ident.instance_id])
    newcomer, _, _ = _agent(aws, tmp_path, _moto_instance(aws), cluster)
    state = ClusterStateStore(aws["dynamodb"], "dk8s-demo-cluster-state").read()
    assert newcomer._dr_needed(state), "all recorded members terminated, nothing answers: restore"
    # ... but a running control-plane instance of this cluster, never recorded, answers on its client port.
    tags = [{"Key": "dedicated-k8s:cluster", "Value": "demo"}, {"Key": "dedicated-k8s:role", "Value": "control-plane"}]
    unrecorded = aws["ec2"].run_instances(
        ImageId="ami-12c6146b", MinCount=1, MaxCount=1, TagSpecifications=[{"ResourceType": "instance", "Tags": tags}]
    )["Instances"][0]
    cluster.add("i-unrecorded.eu-west-1.compute.internal", unrecorded["PrivateIpAddress"])
    assert not newcomer._dr_needed(state), "something answers: never restore beside it"


def test_a_stale_unstarted_learner_with_my_ip_does_not_block_my_join(aws: dict[str, Any], tmp_path: Path) -> None:
    cluster = FakeEtcdCluster()
    first, _, _ = _agent(aws, tmp_path, _moto_instance(aws), cluster)
    assert first.run_launch().ok
    # An earlier instance with this IP died after kubeadm added its learner, before it ever started.
    with cluster.lock:
        cluster.members["99"] = Member("99", "", ("https://10.9.9.8:2380",), (), is_learner=True)
    agent, hook, _ = _agent(aws, tmp_path, InstanceIdentity("i-0aaaabbbbccccdddd", "10.9.9.8", REGION), cluster,
                            health_timeout_seconds=1.0)  # fmt: skip
    assert agent.run_launch().action == "joined"
    assert "99" not in cluster.members
    assert hook.calls == [("CONTINUE", "joined")]


def test_someone_elses_learner_makes_me_wait_and_abandon_rather_than_join_beside_it(
    aws: dict[str, Any], tmp_path: Path
) -> None:
    cluster = FakeEtcdCluster()
    first, _, _ = _agent(aws, tmp_path, _moto_instance(aws), cluster)
    assert first.run_launch().ok
    with cluster.lock:
        cluster.members["98"] = Member("98", "i-other.x", ("https://10.9.9.7:2380",), ("https://10.9.9.7:2379",), True)
    agent, hook, runner = _agent(aws, tmp_path, _moto_instance(aws), cluster, health_timeout_seconds=0.5)
    outcome = agent.run_launch()
    assert not outcome.ok and "no other etcd membership change in flight" in outcome.reason
    assert hook.result == "ABANDON"
    assert runner.commands("kubeadm join") == [], "one membership change at a time (invariant 4a)"
    assert "98" in cluster.members


def test_a_worker_started_before_the_cluster_waits_for_the_join_secret(aws: dict[str, Any], tmp_path: Path) -> None:
    """Workers cannot read the cluster-state table: they wait while the join secret holds the placeholder."""
    cluster = FakeEtcdCluster()
    cfg = AgentConfig.from_mapping(config_values(role="worker"))
    worker, hook, runner = _agent(aws, tmp_path, _moto_instance(aws), cluster, cfg=cfg)
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(worker.run_launch()))
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive() and runner.calls == [], "nothing runs before the join secret is written"
    first, _, _ = _agent(aws, tmp_path, _moto_instance(aws), cluster)
    assert first.run_launch().ok
    thread.join(timeout=20)
    assert result and result[0].action == "worker-joined"
    assert hook.calls == [("CONTINUE", "worker-joined")]


class DeniedSecrets:
    def __init__(self, client: Any) -> None:
        self.client = client

    def get_secret_value(self, **kwargs: Any) -> Any:
        from botocore.exceptions import ClientError

        raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "not authorized"}}, "GetSecretValue")


def test_a_worker_that_may_not_read_the_join_secret_abandons_at_once(aws: dict[str, Any], tmp_path: Path) -> None:
    cfg = AgentConfig.from_mapping(config_values(role="worker"))
    worker, hook, runner = _agent(aws, tmp_path, _moto_instance(aws), FakeEtcdCluster(), cfg=cfg)
    worker.secrets.client = DeniedSecrets(worker.secrets.client)
    started = time.monotonic()
    outcome = worker.run_launch()
    assert not outcome.ok and "AccessDeniedException" in outcome.reason
    assert time.monotonic() - started < 2, "an access error is not worth waiting for"
    assert hook.calls == [("ABANDON", outcome.reason)] and runner.calls == []
