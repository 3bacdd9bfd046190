"""``python -m node_agent``: bad configuration abandons the launch; commands map to exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from node_agent.__main__ import main
from node_agent.config import AgentConfig, AgentSettings
from node_agent.lifecycle import RecordingLaunchHook
from tests.agent.conftest import config_values
from tests.agent.harness import EmulatedNode
from tests.agent.kubeadm_emulator import SimulatedApiServer


def _write(tmp_path: Path, values: Any) -> Path:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(values) if not isinstance(values, str) else values)
    return path


def test_a_malformed_config_abandons_the_launch_naming_the_key(tmp_path: Path) -> None:
    values = config_values(apiPort="6443")
    del values["clusterStateTable"]
    hooks: list[tuple[str, str, RecordingLaunchHook]] = []

    def fallback(name: str, region: str) -> RecordingLaunchHook:
        hooks.append((name, region, RecordingLaunchHook()))
        return hooks[-1][2]

    def never(*_: Any) -> Any:
        raise AssertionError("no agent is built from an invalid config")

    code = main(["run", "--config", str(_write(tmp_path, values))], factory=never, fallback_hook=fallback)
    assert code == 2
    assert [(n, r) for n, r, _ in hooks] == [("dk8s-demo-launch", "eu-west-1")]
    result, reason = hooks[0][2].calls[0]
    assert result == "ABANDON" and "'clusterStateTable': missing" in reason and "'apiPort'" in reason


def test_an_unreadable_config_cannot_name_its_hook_and_exits_2(tmp_path: Path) -> None:
    called: list[str] = []

    def never(*_: Any) -> Any:
        raise AssertionError("no agent is built from an invalid config")

    def fallback(name: str, region: str) -> RecordingLaunchHook:
        called.append(name)
        return RecordingLaunchHook()

    assert main(["run", "--config", str(tmp_path / "absent.json")], factory=never, fallback_hook=fallback) == 2
    assert called == []
    assert main(["snapshot", "--config", str(_write(tmp_path, "{oops"))], factory=never) == 2


def test_run_and_timers_through_main(aws: dict[str, Any], tmp_path: Path, nodes: list[Any]) -> None:
    """The commands on one node with real etcd: the agent main builds is the emulated node's (moto, real etcd)."""
    path = _write(tmp_path, config_values(kmsKeyId=aws["kms_key_id"]))
    built: list[AgentConfig] = []

    def factory(cfg: AgentConfig, settings: AgentSettings) -> Any:
        built.append(cfg)
        if not nodes:
            nodes.append(EmulatedNode(aws, tmp_path, SimulatedApiServer(), cfg))
        return nodes[0].agent

    assert main(["snapshot", "--config", str(path)], factory=factory) == 0  # uninitialised: skipped, not an error
    assert main(["run", "--config", str(path)], factory=factory) == 0
    node = nodes[0]
    assert node.hook.calls == [("CONTINUE", "initialised")]
    assert [m.name for m in node.members()] == [node.identity.node_name]
    assert main(["restore", "--config", str(path)], factory=factory) == 1, "restore refuses while members answer"
    assert node.runner.commands("etcdutl") == [] and len(node.runner.commands("kubeadm init")) == 1
    # What the API server would have written (the emulator simulates it without touching etcd).
    assert node.runner.etcdctl([node.agent.client_url], "put", "/registry/namespaces/default", "x").returncode == 0
    assert main(["snapshot", "--config", str(path)], factory=factory) == 0  # the single member is the leader
    assert len(aws["s3"].list_objects_v2(Bucket=built[0].snapshot_bucket)["Contents"]) == 1
    assert all(cfg == built[0] for cfg in built) and built[0].cluster_name == "demo"


def test_the_module_runs_as_a_program_and_lists_its_commands() -> None:
    proc = subprocess.run([sys.executable, "-m", "node_agent", "--help"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    assert "{run,snapshot,rotate-token,upgrade-addons,certificates,restore}" in proc.stdout
