"""The agent on real etcd (TLS, loopback): init, learner joins and promotion, stale member, DR, snapshots."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from node_agent.bootstrap import LaunchOutcome
from node_agent.config import AgentConfig
from node_agent.election import ClusterStateStore, Phase
from node_agent.etcd import EtcdTls
from node_agent.snapshots import RESTORE_REVISION_BUMP
from tests.agent.conftest import config_values
from tests.agent.etcdctl_access import EtcdctlAccess
from tests.agent.harness import EmulatedNode, emitted_metrics
from tests.agent.kubeadm_emulator import SimulatedApiServer

pytestmark = pytest.mark.etcd


@pytest.fixture
def cluster_nodes() -> Any:
    nodes: list[EmulatedNode] = []
    yield nodes
    for n in nodes:
        n.runner.kill()


def _launch_all(nodes: list[EmulatedNode]) -> list[LaunchOutcome]:
    results: list[LaunchOutcome | None] = [None] * len(nodes)

    def go(i: int) -> None:
        results[i] = nodes[i].agent.run_launch()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(nodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return [r for r in results if r is not None]


def _etcd(node: EmulatedNode) -> EtcdctlAccess:
    return EtcdctlAccess(EtcdTls.kubeadm_apiserver_client(node.settings.pki_dir))


def test_three_concurrent_agents_build_a_real_three_member_cluster(
    aws: dict[str, Any], tmp_path: Path, cluster_nodes: list[EmulatedNode]
) -> None:
    cfg = AgentConfig.from_mapping(config_values())
    api = SimulatedApiServer()
    cluster_nodes += [EmulatedNode(aws, tmp_path, api, cfg) for _ in range(3)]
    outcomes = _launch_all(cluster_nodes)
    assert sorted(o.action for o in outcomes) == ["initialised", "joined", "joined"], outcomes
    assert all(n.hook.calls == [("CONTINUE", o.action)] for n, o in zip(cluster_nodes, outcomes, strict=True))

    members = _etcd(cluster_nodes[0]).members([n.agent.client_url for n in cluster_nodes])
    assert sorted(m.name for m in members) == sorted(n.identity.node_name for n in cluster_nodes)
    assert not any(m.is_learner for m in members), "every joiner was promoted"
    joiners = [n for n, o in zip(cluster_nodes, outcomes, strict=True) if o.action == "joined"]
    for n in joiners:
        assert len(n.runner.commands("kubeadm join")) == 1 and n.runner.commands("kubeadm init") == []
    state = ClusterStateStore(aws["dynamodb"], cfg.cluster_state_table).read()
    assert state.phase == Phase.INITIALISED and state.generation == 1
    assert {m.instance_id for m in state.last_membership} == {n.identity.instance_id for n in cluster_nodes}


def _put_keys(node: EmulatedNode, count: int, prefix: str = "/registry/test/") -> dict[str, str]:
    keys = {f"{prefix}{i:04d}": f"value-{i}" for i in range(count)}
    for k, v in keys.items():
        proc = node.runner.etcdctl([node.agent.client_url], "put", k, v)
        assert proc.returncode == 0, proc.stderr
    return keys


def _get_prefix(node: EmulatedNode, prefix: str = "/registry/test/") -> dict[str, str]:
    proc = node.runner.etcdctl([node.agent.client_url], "get", prefix, "--prefix")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    return dict(zip(lines[0::2], lines[1::2], strict=True))


@pytest.mark.slow  # etcd refuses reconfiguration until peers were connected for 5 s
def test_a_node_reusing_a_dead_members_ip_removes_it_then_joins_as_a_promoted_learner(
    aws: dict[str, Any], tmp_path: Path, cluster_nodes: list[EmulatedNode]
) -> None:
    cfg = AgentConfig.from_mapping(config_values())
    api = SimulatedApiServer()
    cluster_nodes += [EmulatedNode(aws, tmp_path, api, cfg) for _ in range(3)]
    assert all(o.ok for o in _launch_all(cluster_nodes))
    victim = cluster_nodes[2]
    victim.terminate(aws, api)
    # The replacement gets the same private IP (EC2 reuses addresses); its instance ID differs.
    new = EmulatedNode(aws, tmp_path, api, cfg, ip=victim.identity.private_ip)
    cluster_nodes.append(new)
    outcome = new.agent.run_launch()
    assert outcome.action == "joined", outcome
    members = _etcd(cluster_nodes[0]).members([cluster_nodes[0].agent.client_url])
    names = sorted(m.name for m in members)
    expected = sorted(
        [cluster_nodes[0].identity.node_name, cluster_nodes[1].identity.node_name, new.identity.node_name]
    )
    assert names == expected, "the stale member is gone, the new one is a member"
    assert not any(m.is_learner for m in members)
    assert new.hook.calls == [("CONTINUE", "joined")]


@pytest.mark.slow
def test_snapshots_come_from_the_leader_only_and_restore_brings_back_every_key(
    aws: dict[str, Any], tmp_path: Path, cluster_nodes: list[EmulatedNode]
) -> None:
    cfg = AgentConfig.from_mapping(config_values(kmsKeyId=aws["kms_key_id"]))
    api = SimulatedApiServer()
    cluster_nodes += [EmulatedNode(aws, tmp_path, api, cfg) for _ in range(3)]
    assert all(o.ok for o in _launch_all(cluster_nodes))
    keys = _put_keys(cluster_nodes[0], 40)

    messages = [n.agent.snapshot_once() for n in cluster_nodes]
    uploaded = [m for m in messages if m.startswith("uploaded")]
    assert len(uploaded) == 1 and messages.count("skipped: not the etcd leader") == 2, messages
    objects = aws["s3"].list_objects_v2(Bucket=cfg.snapshot_bucket)["Contents"]
    assert len(objects) == 1
    head = aws["s3"].head_object(Bucket=cfg.snapshot_bucket, Key=objects[0]["Key"])
    assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == aws["kms_key_id"]
    assert head["Metadata"]["generation"] == "1" and int(head["Metadata"]["total-key"]) >= 40
    # Every node reports the newest snapshot's age, not only the leader: those that ran after the upload did.
    leader = next(i for i, m in enumerate(messages) if m.startswith("uploaded"))
    for i, n in enumerate(cluster_nodes):
        ages = [v for name, v in emitted_metrics(n.agent) if name == "LastSnapshotAgeSeconds"]
        if i >= leader:
            assert len(ages) == 1 and 0 <= ages[0] < 120, (i, leader, ages)
        else:
            assert ages == [], "no snapshot existed yet when it ran"
    leader_uploads = [name for n in cluster_nodes for name, _ in emitted_metrics(n.agent) if name == "SnapshotUploaded"]
    assert leader_uploads == ["SnapshotUploaded"]

    # Every member dies and every instance is terminated: disaster recovery is proven necessary.
    for n in cluster_nodes:
        n.runner.kill()
    aws["ec2"].terminate_instances(InstanceIds=[n.identity.instance_id for n in cluster_nodes])
    api.etcd_endpoints.clear()
    restorer = EmulatedNode(aws, tmp_path, api, cfg)
    cluster_nodes.append(restorer)
    outcome = restorer.agent.run_launch()
    assert outcome.action == "restored", outcome
    assert restorer.hook.calls == [("CONTINUE", "restored")]
    # The restore re-applies the add-ons once (server-side, idempotent: this AMI's pre-pulled images).
    assert len([c for c in restorer.runner.calls if c[0] == "kubectl" and "apply" in c]) == 1
    restore_argv = restorer.runner.commands("etcdutl snapshot restore")
    # First a trial restore into a scratch directory (the snapshot is chosen only if it restores), then the real one.
    trial, real = (" ".join(argv) for argv in restore_argv)
    assert len(restore_argv) == 2 and "/trial-restore-" in trial and f"{cfg.cluster_name}-g2" not in trial
    assert f"{cfg.cluster_name}-g2" in real and f"--data-dir {restorer.settings.etcd_data_dir} " in real
    assert _get_prefix(restorer) == keys, "every key written before the snapshot is back"
    state = ClusterStateStore(aws["dynamodb"], cfg.cluster_state_table).read()
    assert (state.phase, state.generation) == (Phase.INITIALISED, 2)
    assert [m.instance_id for m in state.last_membership] == [restorer.identity.instance_id]
    # --bump-revision/--mark-compacted (etcd's op-guide "Disaster recovery"; Kubernetes' "Operating etcd clusters
    # for Kubernetes", restoring): revisions never go backwards across a restore and the old ones read as
    # compacted, so a watcher that outlived the old cluster re-lists instead of reading reused revisions.
    url = restorer.agent.client_url
    status = json.loads(restorer.runner.etcdctl([url], "endpoint", "status", "-w", "json").stdout)
    assert status[0]["Status"]["header"]["revision"] > RESTORE_REVISION_BUMP
    old = restorer.runner.etcdctl([url], "get", "/registry/test/", "--prefix", "--rev", "2")
    assert old.returncode != 0 and "compacted" in old.stderr, (old.returncode, old.stderr)

    # The others join the restored cluster (never a second restore).
    joiner = EmulatedNode(aws, tmp_path, api, cfg)
    cluster_nodes.append(joiner)
    assert joiner.agent.run_launch().action == "joined"
    assert joiner.runner.commands("etcdutl") == []
    assert not [c for c in joiner.runner.calls if c[0] == "kubectl" and "apply" in c], "joiners never apply add-ons"
    assert _get_prefix(joiner) == keys


@pytest.mark.slow
def test_disaster_recovery_refuses_while_one_member_instance_still_runs(
    aws: dict[str, Any], tmp_path: Path, cluster_nodes: list[EmulatedNode]
) -> None:
    cfg = AgentConfig.from_mapping(config_values(kmsKeyId=aws["kms_key_id"]))
    api = SimulatedApiServer()
    # Two members (a third would only add etcd's 5 s reconfiguration health wait to the test).
    cluster_nodes += [EmulatedNode(aws, tmp_path, api, cfg) for _ in range(2)]
    assert all(o.ok for o in _launch_all(cluster_nodes))
    _put_keys(cluster_nodes[0], 5)
    assert any(n.agent.snapshot_once().startswith("uploaded") for n in cluster_nodes)
    for n in cluster_nodes:
        n.runner.kill()  # every etcd is unreachable ...
    # ... but only one instance is terminated: the other is merely unreachable (partition, reboot).
    aws["ec2"].terminate_instances(InstanceIds=[cluster_nodes[0].identity.instance_id])
    store = ClusterStateStore(aws["dynamodb"], cfg.cluster_state_table)
    before = store.read()
    newcomer = EmulatedNode(aws, tmp_path, api, cfg, join_deadline_seconds=3.0, health_timeout_seconds=1.5)
    cluster_nodes.append(newcomer)
    outcome = newcomer.agent.run_launch()
    assert not outcome.ok
    assert newcomer.hook.result == "ABANDON"
    assert newcomer.runner.commands("etcdutl") == [] and newcomer.runner.commands("kubeadm init") == []
    assert store.read() == before, "no restore, no generation bump, nothing written"
    assert newcomer.agent.restore_if_needed().startswith("refused")


def test_a_joiner_whose_etcd_cannot_start_abandons_and_withdraws_its_learner(
    aws: dict[str, Any], tmp_path: Path, cluster_nodes: list[EmulatedNode]
) -> None:
    cfg = AgentConfig.from_mapping(config_values())
    api = SimulatedApiServer()
    first = EmulatedNode(aws, tmp_path, api, cfg)
    cluster_nodes.append(first)
    assert first.agent.run_launch().action == "initialised"
    broken = EmulatedNode(aws, tmp_path, api, cfg)
    cluster_nodes.append(broken)
    # Something else holds the joiner's peer port: its etcd exits at once, after kubeadm added the learner.
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind((broken.identity.private_ip, 2380))
    blocker.listen()
    try:
        outcome = broken.agent.run_launch()
    finally:
        blocker.close()
    assert not outcome.ok and "exited before it could be promoted" in outcome.reason, outcome
    assert broken.hook.calls == [("ABANDON", outcome.reason)], "never CONTINUE: the member is not healthy"
    members = _etcd(first).members([first.agent.client_url])
    assert [m.name for m in members] == [first.identity.node_name], "the learner it left was withdrawn"
    # The next replacement joins normally (nothing blocks invariant 4a).
    after = EmulatedNode(aws, tmp_path, api, cfg)
    cluster_nodes.append(after)
    assert after.agent.run_launch().action == "joined"


def test_token_rotation_on_the_leader_lets_workers_join_with_the_new_token_only(
    aws: dict[str, Any], tmp_path: Path, cluster_nodes: list[EmulatedNode]
) -> None:
    cfg = AgentConfig.from_mapping(config_values())
    api = SimulatedApiServer()
    first = EmulatedNode(aws, tmp_path, api, cfg)
    cluster_nodes.append(first)
    assert first.agent.run_launch().ok
    old = first.agent.secrets.read_join(cfg.join_secret_name)
    assert api.tokens == {old.token}, "kubeadm init created the token stored in the join secret"

    message = first.agent.rotate_token_once()
    new = first.agent.secrets.read_join(cfg.join_secret_name)
    assert message.startswith("rotated") and new.token != old.token
    assert api.tokens == {new.token}, "the old token is deleted once the new one is stored"
    assert new.ca_cert_hash == old.ca_cert_hash

    worker = EmulatedNode(aws, tmp_path, api, AgentConfig.from_mapping(config_values(role="worker")))
    assert worker.agent.run_launch().action == "worker-joined"
    assert api.nodes[worker.identity.node_name] == "worker"
