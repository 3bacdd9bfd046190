"""Invariant 9: a control-plane node reaches its OWN API server; the load balancer serves the others.

Real etcd, the kubeadm emulator sending each phase where kubeadm 1.34 sends it (tests/agent/kubeadm_emulator.py,
its docstring's table), names resolved through the node's own hosts file, and the API NLB model
(twin/loadbalancer.py) with client IP preservation on. AWS behaviour modelled here: an Auto Scaling group
registers an instance with its target groups only after the launch hook completes (Amazon EC2 Auto Scaling
user guide, "How lifecycle hooks work in Auto Scaling groups"); an internal NLB with instance targets drops a
target's connection routed back to itself (ELB, "Troubleshoot your Network Load Balancer": requests from a
target to its load balancer time out); with no healthy target it has nowhere to send a connection (ELB,
"Health checks for Network Load Balancer target groups").
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from node_agent import bootstrap
from node_agent.config import AgentConfig
from node_agent.hosts import mapped_address, unmap_endpoint
from tests.agent.conftest import config_values
from tests.agent.harness import EmulatedNode
from tests.agent.kubeadm_emulator import Connection, SimulatedApiServer
from twin.loadbalancer import HEALTHY

INIT_PHASES = ("init wait-control-plane", "init upload-config", "init mark-control-plane", "init bootstrap-token",
               "init addon")  # fmt: skip


def _node(aws: dict[str, Any], tmp_path: Path, api: SimulatedApiServer, nodes: list[Any], **kw: Any) -> EmulatedNode:
    node = EmulatedNode(aws, tmp_path, api, kw.pop("cfg", None) or AgentConfig.from_mapping(config_values()), **kw)
    nodes.append(node)
    return node


def _healthy_target(node: EmulatedNode, timeout: float = 15.0) -> None:
    """Wait for the NLB's own health checks (the harness's clock) to mark the registered node healthy."""
    deadline = time.monotonic() + timeout
    while node.load_balancer.states().get(node.identity.instance_id) != HEALTHY:
        assert time.monotonic() < deadline, f"never healthy: {node.load_balancer.states()}"
        time.sleep(0.05)


def _by(connections: list[Connection], prefix: str) -> list[Connection]:
    return [c for c in connections if c.what.startswith(prefix)]


def test_the_initialisers_init_phases_readiness_and_add_ons_reach_its_own_api_server(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    """Before init the NLB has no target at all (the initialiser is not InService): every phase that kubeadm
    sends to controlPlaneEndpoint must reach this node through its hosts file, never the NLB."""
    node = _node(aws, tmp_path, SimulatedApiServer(), nodes)
    assert node.agent.run_launch().action == "initialised"
    me = node.identity.private_ip
    assert mapped_address(node.settings.hosts_file) == me
    reached = node.runner.connections
    assert [c.what for c in reached if c.what.startswith("init ")] == list(INIT_PHASES)
    assert all(c.via != "load balancer" for c in reached), [c for c in reached if c.via == "load balancer"]
    assert {c.target_ip for c in reached} == {me}
    assert {c.via for c in _by(reached, "init ") if c.what != "init wait-control-plane"} == {"hosts file"}
    assert {c.via for c in _by(reached, "kubectl apply")} == {"hosts file"}, "the add-ons"
    admin = str(node.settings.kubernetes_dir / "admin.conf")
    readyz = ["kubectl", "--kubeconfig", admin, "--server", f"https://{me}:6443", "get", "--raw", "/readyz"]
    assert readyz in node.runner.calls
    assert all(c.via == "address" for c in _by(reached, "kubectl get --raw /readyz"))
    assert node.load_balancer.states() == {node.identity.instance_id: "initial"}, "registered at CONTINUE only"


def test_a_joiner_discovers_and_joins_etcd_through_the_nlb_to_another_member_then_maps_itself(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    api = SimulatedApiServer()
    first = _node(aws, tmp_path, api, nodes)
    assert first.agent.run_launch().action == "initialised"
    joiner = _node(aws, tmp_path, api, nodes)
    assert joiner.agent.run_launch().action == "joined"  # discovery retries until the NLB finds first healthy
    me, other = joiner.identity.private_ip, first.identity.private_ip
    reached = joiner.runner.connections
    before_mapping = [c for c in reached if c.what.startswith("join ") and "wait-control-plane" not in c.what]
    assert before_mapping and all(c.target_ip == other for c in before_mapping), before_mapping
    assert {c.via for c in _by(reached, "join preflight")} == {"load balancer"}
    assert [c.server for c in _by(reached, "join etcd member add")] == [first.agent.client_url]
    assert {(c.via, c.target_ip) for c in _by(reached, "join wait-control-plane")} == {("address", me)}
    assert mapped_address(joiner.settings.hosts_file) == me, "mapped right after the join"
    assert {(c.via, c.target_ip) for c in _by(reached, "kubectl get --raw /readyz")} == {("address", me)}
    assert joiner.load_balancer.states()[joiner.identity.instance_id] in ("initial", HEALTHY)


def test_a_worker_never_maps_the_endpoint(aws: dict[str, Any], tmp_path: Path, nodes: list[Any]) -> None:
    api = SimulatedApiServer()
    first = _node(aws, tmp_path, api, nodes)
    assert first.agent.run_launch().action == "initialised"
    worker = _node(aws, tmp_path, api, nodes, cfg=AgentConfig.from_mapping(config_values(role="worker")))
    assert worker.agent.run_launch().action == "worker-joined"
    assert not worker.settings.hosts_file.exists(), "a worker has no local API server: its hosts file is untouched"
    assert {(c.via, c.target_ip) for c in worker.runner.connections} == {("load balancer", first.identity.private_ip)}


def test_without_the_mapping_the_init_fails_with_the_nlbs_no_healthy_target(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mutation: an agent that does not map the name sends upload-config to an NLB with no target."""
    monkeypatch.setattr(bootstrap, "map_endpoint", lambda *args: False)
    node = _node(aws, tmp_path, SimulatedApiServer(), nodes)
    outcome = node.agent.run_launch()
    assert outcome.action == "abandoned"
    assert "init upload-config" in outcome.reason and "no healthy target" in outcome.reason, outcome.reason
    assert node.load_balancer.states() == {}, "an abandoned launch is never registered"


def test_a_registered_nodes_call_through_the_nlb_to_itself_is_dropped_and_the_mapping_avoids_it(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    """Once InService the node is a target; with the mapping gone its token rotation goes through the NLB, which
    (one healthy target: itself) routes it back to its source and drops it. With the mapping, it stays local."""
    node = _node(aws, tmp_path, SimulatedApiServer(), nodes)
    assert node.agent.run_launch().action == "initialised"
    _healthy_target(node)
    assert node.agent.rotate_token_once().startswith("rotated")
    last = node.runner.connections[-2:]
    assert [(c.what, c.via, c.target_ip) for c in last] == [
        ("kubeadm token create", "hosts file", node.identity.private_ip),
        ("kubeadm token delete", "hosts file", node.identity.private_ip),
    ]
    assert unmap_endpoint(node.settings.hosts_file)
    with pytest.raises(Exception, match="hairpin: a target's connection to itself through the NLB is dropped"):
        node.agent.rotate_token_once()
