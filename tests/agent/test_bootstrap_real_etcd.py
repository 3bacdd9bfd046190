"""The agent on real etcd (TLS, loopback): init, learner joins and promotion, stale member, DR, snapshots."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from node_agent.bootstrap import LaunchOutcome
from node_agent.config import AgentConfig
from node_agent.election import ClusterStateStore, Phase
from node_agent.etcd import EtcdTls, listening
from node_agent.instance import InstanceIdentity
from tests.agent.conftest import REGION, config_values
from tests.agent.etcdctl_access import EtcdctlAccess
from tests.agent.harness import build_agent, fast_settings
from tests.agent.kubeadm_emulator import KubeadmEmulator, SimulatedApiServer, free_loopback_ip

pytestmark = pytest.mark.etcd


class Node:
    def __init__(
        self, aws: dict[str, Any], root: Path, api: SimulatedApiServer, cfg: AgentConfig, **settings: Any
    ) -> None:
        inst = aws["ec2"].run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0]
        ip = settings.pop("ip", None) or free_loopback_ip()
        self.identity = InstanceIdentity(inst["InstanceId"], ip, REGION)
        self.settings = fast_settings(root / self.identity.instance_id, **settings)
        self.runner = KubeadmEmulator(
            node_name=self.identity.node_name, ip=ip, kubernetes_dir=self.settings.kubernetes_dir,
            etcd_data_dir=self.settings.etcd_data_dir, api=api,
        )  # fmt: skip
        self.agent, self.hook = build_agent(
            aws, cfg, ident=self.identity, settings=self.settings, runner=self.runner,
            etcd_for=EtcdctlAccess, probe=listening,
        )  # fmt: skip


@pytest.fixture
def cluster_nodes() -> Any:
    nodes: list[Node] = []
    yield nodes
    for n in nodes:
        n.runner.kill()


def _launch_all(nodes: list[Node]) -> list[LaunchOutcome]:
    results: list[LaunchOutcome | None] = [None] * len(nodes)

    def go(i: int) -> None:
        results[i] = nodes[i].agent.run_launch()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(nodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return [r for r in results if r is not None]


def _etcd(node: Node) -> EtcdctlAccess:
    return EtcdctlAccess(EtcdTls.kubeadm_apiserver_client(node.settings.pki_dir))


def test_three_concurrent_agents_build_a_real_three_member_cluster(
    aws: dict[str, Any], tmp_path: Path, cluster_nodes: list[Node]
) -> None:
    cfg = AgentConfig.from_mapping(config_values())
    api = SimulatedApiServer()
    cluster_nodes += [Node(aws, tmp_path, api, cfg) for _ in range(3)]
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
