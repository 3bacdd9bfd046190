"""``python -m node_agent``: bad configuration abandons the launch; commands map to exit codes; the agent unit
enables the node's timers after every launch that exits 0, with or without an active launch hook."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from node_agent.__main__ import main
from node_agent.config import AgentConfig, AgentSettings
from node_agent.lifecycle import AutoScalingLaunchHook, RecordingLaunchHook
from tests.agent.conftest import REGION, config_values
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


# -- the agent unit: ExecStart, then ExecStartPost (the timers) only if ExecStart exited 0 -------------------------
REPO = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = REPO / "imagebuilder" / "systemd"
# Where imagebuilder/components/50-node-agent.yaml installs the two programs the unit runs (checked below).
INSTALLED = {
    "/usr/local/bin/dedicated-k8s-agent": SYSTEMD_DIR / "dedicated-k8s-agent",
    "/usr/local/libexec/dedicated-k8s/enable-timers": SYSTEMD_DIR / "dedicated-k8s-enable-timers",
}
TIMERS = ("dedicated-k8s-snapshot.timer dedicated-k8s-rotate-token.timer dedicated-k8s-certificates.timer "
          "dedicated-k8s-upgrade-addons.timer")  # fmt: skip


def _service_commands(unit: str) -> dict[str, list[str]]:
    commands = {}
    for line in unit.splitlines():
        key, _, value = line.partition("=")
        if key in ("ExecStart", "ExecStartPost"):
            commands[key] = shlex.split(value)
    return commands


def start_agent_unit(
    exec_start: Callable[[list[str]], int], env: dict[str, str], files: dict[str, Path]
) -> tuple[bool, list[str]]:
    """systemd starting ``dedicated-k8s-agent.service`` (Type=oneshot): run ExecStart (``exec_start`` gets the agent's
    arguments: the wrapper execs ``python -m node_agent "$@"``), then ExecStartPost only if ExecStart succeeded.
    systemd.service(5): "ExecStartPost= ... commands are only run after the commands specified in ExecStart= have
    been invoked successfully"; success is exit status 0 (no SuccessExitStatus= in the unit); a traceback is not.
    ``files`` maps the node's paths (agent.json) to this machine's. Returns (started, ExecStartPost's argv or [])."""
    unit = (SYSTEMD_DIR / "dedicated-k8s-agent.service").read_text()
    assert "Type=oneshot" in unit.splitlines() and "SuccessExitStatus" not in unit
    commands = _service_commands(unit)
    start, post = commands["ExecStart"], commands["ExecStartPost"]
    assert INSTALLED[start[0]].name == "dedicated-k8s-agent" and 'python3.11 -m node_agent "$@"' in (
        INSTALLED[start[0]].read_text()
    )
    try:
        code = exec_start([str(files.get(arg, arg)) for arg in start[1:]])
    except Exception:  # the program died with a traceback: exit status 1
        code = 1
    if code != 0:
        return False, []
    script = [str(INSTALLED[post[0]]), *(str(files.get(arg, arg)) for arg in post[1:])]
    subprocess.run(script, env=env, check=True, capture_output=True, text=True)
    return True, post


def test_the_image_installs_the_programs_the_agent_unit_runs() -> None:
    component = (REPO / "imagebuilder" / "components" / "50-node-agent.yaml").read_text()
    for installed, source in INSTALLED.items():
        assert f"install -m 0755 /opt/dedicated-k8s/bin/{source.name} {installed}" in component


@pytest.mark.parametrize(
    ("answer", "timers"),
    [
        pytest.param(("ValidationError", "No active Lifecycle Action found with instance ID {iid}"), True,
                     id="no active lifecycle action: timers enabled"),
        pytest.param(("AccessDenied", "User is not authorized to perform: autoscaling:CompleteLifecycleAction"), False,
                     id="any other error: the launch fails, no timers"),
    ],
)  # fmt: skip
def test_a_launch_without_an_active_hook_exits_0_and_the_unit_enables_the_timers(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any], answer: tuple[str, str], timers: bool
) -> None:
    """The group's first instances launched before its launch hook existed: CompleteLifecycleAction answers
    ValidationError "No active Lifecycle Action found with instance ID i-..." (as in convox/rack#2432; the Auto
    Scaling API Reference lists ValidationError among the common errors, HTTP 400). The control-plane node is
    initialised all the same: ``main`` exits 0 and the unit's ExecStartPost enables the snapshot, token,
    certificate and add-on timers. Any other answer still fails the launch, and then no timer is enabled."""
    config = _write(tmp_path, config_values(kmsKeyId=aws["kms_key_id"]))
    node = EmulatedNode(aws, tmp_path, SimulatedApiServer(), AgentConfig.load(config))
    nodes.append(node)
    iid, group = node.identity.instance_id, "dk8s-demo-control-plane-a"
    code, message = answer
    client = boto3.session.Session(
        region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
    ).client("autoscaling")
    stub = Stubber(client)
    stub.add_response("describe_auto_scaling_instances", {"AutoScalingInstances": [{
        "InstanceId": iid, "AutoScalingGroupName": group, "AvailabilityZone": "eu-west-1a",
        "LifecycleState": "InService", "HealthStatus": "HEALTHY", "ProtectedFromScaleIn": False}]},
        {"InstanceIds": [iid]})  # fmt: skip
    stub.add_client_error("complete_lifecycle_action", service_error_code=code, http_status_code=400,
                          service_message=message.format(iid=iid), expected_params={
                              "LifecycleHookName": "dk8s-demo-launch", "AutoScalingGroupName": group,
                              "InstanceId": iid, "LifecycleActionResult": "CONTINUE"})  # fmt: skip
    node.agent.hook = AutoScalingLaunchHook(client, node.cfg.launch_hook_name, iid)  # production wiring

    bin_dir, units = tmp_path / "bin", tmp_path / "etc-systemd-system"
    bin_dir.mkdir()
    calls = tmp_path / "systemctl.calls"
    (bin_dir / "systemctl").write_text(f'#!/bin/bash\necho "$*" >> {calls}\n')
    (bin_dir / "systemctl").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "DK8S_SYSTEMD_UNIT_DIR": str(units)}

    def exec_start(args: list[str]) -> int:
        assert args == ["run", "--config", str(config)]
        return main(args, factory=lambda cfg, settings: node.agent)

    with stub:
        started, post = start_agent_unit(exec_start, env, {"/etc/dedicated-k8s/agent.json": config})
        stub.assert_no_pending_responses()
    assert [m.name for m in node.members()] == [node.identity.node_name], "the node was initialised either way"
    assert started is timers
    if timers:
        assert post == ["/usr/local/libexec/dedicated-k8s/enable-timers", "/etc/dedicated-k8s/agent.json"]
        assert calls.read_text().splitlines() == ["daemon-reload", f"enable --now {TIMERS}"]
        drop_in = units / "dedicated-k8s-snapshot.timer.d" / "50-interval.conf"
        assert drop_in.read_text() == "[Timer]\nOnUnitActiveSec=\nOnUnitActiveSec=30min\n"
    else:
        assert not calls.exists(), "no timer after a failed launch"
