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
from tests.agent.fakes import FakeEtcd, FakeEtcdCluster, RecordingRunner
from tests.agent.harness import build_agent, fast_settings, identity


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


def test_run_and_timers_through_main(aws: dict[str, Any], tmp_path: Path) -> None:
    path = _write(tmp_path, config_values())
    cluster = FakeEtcdCluster()
    built: list[Any] = []

    def factory(cfg: AgentConfig, settings: AgentSettings) -> Any:
        ident = identity(1)
        s = fast_settings(tmp_path / "node")
        runner = RecordingRunner(cluster, ident.node_name, ident.private_ip, s.pki_dir)
        agent, hook = build_agent(aws, cfg, ident=ident, settings=s, runner=runner,
                                  etcd_for=lambda _t: FakeEtcd(cluster), probe=cluster.alive_at)  # fmt: skip
        built.append((agent, hook, runner))
        return agent

    assert main(["snapshot", "--config", str(path)], factory=factory) == 0  # uninitialised: skipped, not an error
    assert main(["run", "--config", str(path)], factory=factory) == 0
    assert built[-1][1].calls == [("CONTINUE", "initialised")]
    assert main(["restore", "--config", str(path)], factory=factory) == 1, "restore refuses while members answer"


def test_the_module_runs_as_a_program_and_lists_its_commands() -> None:
    proc = subprocess.run([sys.executable, "-m", "node_agent", "--help"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    assert "{run,snapshot,rotate-token,restore}" in proc.stdout
