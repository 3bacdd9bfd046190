"""Upgrades by replacement, the node's part (node_agent/upgrade.py), on real etcd with the kubeadm emulator.

The API server is the emulator's simulated one (kube-system/kubeadm-config, the version each control-plane
join renders its static pods with, and the add-on upgrades are its objects). An older AMI refusing to join is
covered by tests/agent/test_version_skew.py and not repeated here.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest

from node_agent.config import AgentConfig
from node_agent.election import ClusterState, ClusterStateStore, Phase
from node_agent.etcd import EtcdAccess, EtcdTls, Member
from node_agent.etcd_membership import MembershipEtcd, UnsafeRemovalError
from node_agent.runner import CommandResult
from node_agent.upgrade import ClusterUpgrade, UpgradeStore
from tests.agent.conftest import config_values
from tests.agent.harness import EmulatedNode, fast_settings, identity
from tests.agent.kubeadm_emulator import (
    ADDON_UPGRADES,
    CONFIG_WRITES,
    STATIC_PODS,
    SimulatedApiServer,
    api_events,
    kubeadm_config_version,
)

OLD, NEW = "1.34.2", "1.35.0"


def _node(aws: dict[str, Any], tmp_path: Path, api: SimulatedApiServer, version: str, nodes: list[Any]) -> EmulatedNode:
    node = EmulatedNode(aws, tmp_path, api, AgentConfig.from_mapping(config_values(kubernetesVersion=version)))
    nodes.append(node)
    return node


def _launch(node: EmulatedNode, action: str) -> None:
    outcome = node.agent.run_launch()
    assert outcome.ok and outcome.action == action, outcome


def _configmap_calls(node: EmulatedNode) -> list[list[str]]:
    return [c for c in node.runner.calls if "configmap" in c or "replace" in c]


def _leave(node: EmulatedNode, survivor: EmulatedNode, aws: dict[str, Any], api: SimulatedApiServer) -> None:
    """The old instance leaves: its member is removed (the terminate hook's job), then it dies."""
    etcd = MembershipEtcd(EtcdTls.kubeadm_apiserver_client(survivor.settings.pki_dir))
    deadline = time.monotonic() + 30
    while True:  # etcd refuses a removal until every member has been connected for 5 s (strict reconfig check)
        try:
            removed = etcd.remove_stale_member([survivor.agent.client_url], node.agent.peer_url, keep_name=None)
            break
        except UnsafeRemovalError:
            assert time.monotonic() < deadline, "etcd kept refusing the removal"
            time.sleep(0.5)
    assert removed, f"{node.identity.node_name} was not removed"
    node.terminate(aws, api)


@pytest.mark.etcd
def test_a_rolling_replacement_upgrades_the_config_once_then_the_addons_once_all_control_planes_are_new(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    api = SimulatedApiServer()
    a, b = _node(aws, tmp_path, api, OLD, nodes), _node(aws, tmp_path, api, OLD, nodes)
    _launch(a, "initialised")
    _launch(b, "joined")
    upgrades = UpgradeStore(ClusterStateStore(aws["dynamodb"], a.cfg.cluster_state_table))
    assert kubeadm_config_version(api) == f"v{OLD}"
    assert api_events(api, CONFIG_WRITES) == [], "a same-version join leaves kubeadm-config alone"
    assert api_events(api, ADDON_UPGRADES) == [], "kubeadm init installed the add-ons of its version"
    assert upgrades.read().addons_version == OLD
    assert b.runner.commands("kubeadm kubeconfig") == [] and _configmap_calls(b) == []

    # Launch before terminate, one control-plane node at a time (the rollout's order for 1-instance groups).
    c = _node(aws, tmp_path, api, NEW, nodes)
    _launch(c, "joined")
    writes = api_events(api, CONFIG_WRITES)
    assert [(w["node"], w["from"], w["to"]) for w in writes] == [(c.identity.node_name, f"v{OLD}", f"v{NEW}")]
    assert api.objects[STATIC_PODS + c.identity.node_name] == f"v{NEW}", "join rendered the new static pods"
    assert upgrades.read().kubeadm_config_version == NEW
    assert c.agent.store.read().kubernetes_version == NEW
    assert api_events(api, ADDON_UPGRADES) == [], "two control-plane nodes still run the old version"
    issued = c.runner.commands("kubeadm kubeconfig user")
    assert len(issued) == 1 and "kubeadm:cluster-admins" in issued[0], issued
    assert not (c.settings.state_dir / "upgrade-admin.conf").exists(), "the joiner's admin kubeconfig is deleted"
    _leave(a, c, aws, api)

    d = _node(aws, tmp_path, api, NEW, nodes)
    _launch(d, "joined")
    assert len(api_events(api, CONFIG_WRITES)) == 1, "the second new node sees the configuration done"
    assert d.runner.commands("kubeadm kubeconfig") == [] and _configmap_calls(d) == []
    assert api.objects[STATIC_PODS + d.identity.node_name] == f"v{NEW}"
    assert api_events(api, ADDON_UPGRADES) == [], f"{b.identity.node_name} still runs {OLD}"
    assert d.agent.upgrade_addons_once().startswith("waiting: "), "the timer waits too"
    join_version = lambda: a.agent.secrets.read_join(a.cfg.join_secret_name).kubernetes_version  # noqa: E731
    assert join_version() == OLD, "workers keep joining at the old version while an old control plane remains"
    _leave(b, c, aws, api)

    # The old node has left after the last new one joined: the upgrade-addons timer completes the upgrade.
    assert d.agent.upgrade_addons_once() == "upgraded"
    assert join_version() == NEW, "the whole control plane moved: workers of the new version may join"
    assert c.agent.upgrade_addons_once() == "addons-current"
    events = api_events(api, ADDON_UPGRADES)
    assert [(e["node"], e["version"]) for e in events] == [(d.identity.node_name, f"v{NEW}")]
    assert upgrades.read().addons_version == NEW and upgrades.read().addons_holder == ""
    assert len(api_events(api, CONFIG_WRITES)) == 1


@pytest.mark.etcd
def test_the_last_new_node_upgrades_the_addons_in_its_join_when_the_old_one_left_first(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    api = SimulatedApiServer()
    a, b = _node(aws, tmp_path, api, OLD, nodes), _node(aws, tmp_path, api, NEW, nodes)
    _launch(a, "initialised")
    _launch(b, "joined")
    assert api_events(api, ADDON_UPGRADES) == []
    _leave(a, b, aws, api)  # terminate before launch: the old node has gone when the next new one joins
    c = _node(aws, tmp_path, api, NEW, nodes)
    _launch(c, "joined")
    events = api_events(api, ADDON_UPGRADES)
    assert [(e["node"], e["version"]) for e in events] == [(c.identity.node_name, f"v{NEW}")]
    assert len(api_events(api, CONFIG_WRITES)) == 1


# -- without etcd: the gating and the exactly-once writes ---------------------------------------------------


class FakeEtcd:
    def __init__(self, members: list[Member]) -> None:
        self._members = members

    def members(self, endpoints: Any) -> list[Member]:
        return self._members


def _etcd(*members: Member) -> EtcdAccess:
    return cast(EtcdAccess, FakeEtcd(list(members)))


class AddonRunner:
    """Answers the add-on phase; can hold it until released (two nodes racing for the claim)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[list[str]] = []
        self.gate = gate
        self.started = threading.Event()

    def run(self, argv: Any, *, env: Any = None, timeout: Any = None) -> CommandResult:
        self.calls.append(list(argv))
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        return CommandResult(tuple(argv), 0, "ok", "")


def _member(n: int, learner: bool = False) -> Member:
    ident = identity(n)
    return Member(str(n), ident.node_name, (f"https://{ident.private_ip}:2380",), (f"https://{ident.private_ip}:2379",),
                  is_learner=learner)  # fmt: skip


def _upgrade(aws: dict[str, Any], tmp_path: Path, n: int, runner: Any, version: str = NEW) -> ClusterUpgrade:
    cfg = AgentConfig.from_mapping(config_values(kubernetesVersion=version))
    store = ClusterStateStore(aws["dynamodb"], cfg.cluster_state_table)
    return ClusterUpgrade(
        cfg, fast_settings(tmp_path / str(n)), identity(n), runner, store, apply_addons=lambda _: None
    )


def _initialised(aws: dict[str, Any]) -> None:
    aws["dynamodb"].put_item(
        TableName="dk8s-demo-cluster-state",
        Item={"pk": {"S": "cluster"}, "state": {"S": "initialised"}, "generation": {"N": "1"},
              "kubernetes_version": {"S": OLD}, "addons_version": {"S": OLD}},
    )  # fmt: skip


def test_the_addons_wait_for_a_learner_and_for_unrecorded_or_older_members(aws: dict[str, Any], tmp_path: Path) -> None:
    _initialised(aws)
    runner = AddonRunner()
    one, two = _upgrade(aws, tmp_path, 1, runner), _upgrade(aws, tmp_path, 2, runner)
    etcd = _etcd(_member(1), _member(2), _member(3, learner=True))
    assert one.after_join(etcd, []).startswith("waiting: membership change in flight")
    etcd = _etcd(_member(1), _member(2))
    assert one.upgrade_addons_if_ready(etcd, []) == f"waiting: {identity(2).instance_id} runs an unrecorded version"
    _upgrade(aws, tmp_path, 2, runner, version=OLD).after_join(_etcd(_member(1), _member(2, learner=True)), [])
    assert one.upgrade_addons_if_ready(etcd, []) == f"waiting: {identity(2).instance_id} runs {OLD}"
    assert runner.calls == []
    assert two.after_join(etcd, []) == "upgraded"
    assert [c[:6] for c in runner.calls] == [["kubeadm", "upgrade", "node", "phase", "addon", "all"]]
    assert one.upgrade_addons_if_ready(etcd, []) == "addons-current"


def test_two_nodes_racing_for_the_addon_upgrade_run_it_once(aws: dict[str, Any], tmp_path: Path) -> None:
    _initialised(aws)
    gate = threading.Event()
    slow, fast = AddonRunner(gate), AddonRunner()
    first, second = _upgrade(aws, tmp_path, 1, slow), _upgrade(aws, tmp_path, 2, fast)
    etcd = _etcd(_member(1), _member(2))
    UpgradeStore(first.store).record_node_version(identity(1).instance_id, NEW)
    UpgradeStore(first.store).record_node_version(identity(2).instance_id, NEW)
    outcome: list[str] = []
    t = threading.Thread(target=lambda: outcome.append(first.upgrade_addons_if_ready(etcd, [])))
    t.start()
    assert slow.started.wait(10)
    assert second.upgrade_addons_if_ready(etcd, []) == "claimed-by-another"
    gate.set()
    t.join(10)
    assert outcome == ["upgraded"] and fast.calls == [] and len(slow.calls) == 1
    assert second.read().addons_version == NEW


def test_a_failed_addon_upgrade_releases_its_claim(aws: dict[str, Any], tmp_path: Path) -> None:
    _initialised(aws)

    class Failing(AddonRunner):
        def run(self, argv: Any, *, env: Any = None, timeout: Any = None) -> CommandResult:
            self.calls.append(list(argv))
            return CommandResult(tuple(argv), 1, "", "coredns: image not found")

    etcd = _etcd(_member(1))
    failing = _upgrade(aws, tmp_path, 1, Failing())
    with pytest.raises(Exception, match="image not found"):
        failing.after_join(etcd, [])
    record = failing.read()
    assert record.addons_holder == "" and record.addons_version == OLD
    assert _upgrade(aws, tmp_path, 1, AddonRunner()).upgrade_addons_if_ready(etcd, []) == "upgraded"


def test_before_join_runs_no_command_for_a_same_older_or_unrecorded_cluster_version(
    aws: dict[str, Any], tmp_path: Path
) -> None:
    runner = AddonRunner()
    joiner = _upgrade(aws, tmp_path, 1, runner)
    assert joiner.before_join(ClusterState(Phase.INITIALISED, kubernetes_version=NEW)) == "same-version"
    assert joiner.before_join(ClusterState(Phase.INITIALISED, kubernetes_version="1.35.1")) == "same-version"
    assert joiner.before_join(ClusterState(Phase.INITIALISED, kubernetes_version="")) == "unrecorded"
    assert runner.calls == []
