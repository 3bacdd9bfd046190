"""Node telemetry: the CloudWatch agent's configuration and start, and EMF delivery to its local listener."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

from node_agent.audit import AUDIT_LOG_FILE
from node_agent.config import AgentConfig
from node_agent.log import Metrics
from node_agent.runner import CommandResult
from node_agent.telemetry import AGENT_CTL, cloudwatch_agent_config, log_group, start_cloudwatch_agent
from tests.agent.conftest import config_values


class RecordingRunner:
    def __init__(self, returncode: int = 0) -> None:
        self.calls: list[list[str]] = []
        self.returncode = returncode

    def run(self, argv: list[str], **_: object) -> CommandResult:
        self.calls.append(list(argv))
        return CommandResult(tuple(argv), self.returncode, "", "" if self.returncode == 0 else "agent failed")


def _config(role: str) -> AgentConfig:
    values = config_values()
    if role == "worker":
        values = {**values, "role": "worker"}
    return AgentConfig.from_mapping(values)


def test_control_plane_ships_the_audit_log_to_the_clusters_audit_group() -> None:
    cfg = _config("control-plane")
    files = cloudwatch_agent_config(cfg)["logs"]["logs_collected"]["files"]["collect_list"]
    assert [(f["file_path"], f["log_group_name"]) for f in files] == [
        (str(AUDIT_LOG_FILE), f"/dedicated-k8s/{cfg.cluster_name}/audit")
    ]


def test_workers_run_no_api_server_so_ship_no_audit_log_but_still_take_metrics() -> None:
    config = cloudwatch_agent_config(_config("worker"))
    assert "logs_collected" not in config["logs"]
    assert config["logs"]["metrics_collected"] == {"emf": {}}


def test_the_agent_is_started_with_the_written_configuration(tmp_path: Path) -> None:
    cfg, runner = _config("control-plane"), RecordingRunner()
    path = tmp_path / "cw.json"
    assert start_cloudwatch_agent(cfg, runner, path) is True  # type: ignore[arg-type]
    assert runner.calls == [[str(AGENT_CTL), "-a", "fetch-config", "-m", "ec2", "-c", f"file:{path}", "-s"]]
    assert json.loads(path.read_text()) == cloudwatch_agent_config(cfg)
    assert json.loads(path.read_text())["agent"]["region"] == cfg.region


def test_a_failed_start_is_reported_not_raised(tmp_path: Path) -> None:
    assert start_cloudwatch_agent(_config("worker"), RecordingRunner(1), tmp_path / "cw.json") is False  # type: ignore[arg-type]
    assert start_cloudwatch_agent(_config("worker"), RecordingRunner(), tmp_path / "file" / "x.json") is True  # type: ignore[arg-type]
    (tmp_path / "blocked").write_text("a file where a directory should be")
    assert start_cloudwatch_agent(_config("worker"), RecordingRunner(), tmp_path / "blocked" / "x.json") is False  # type: ignore[arg-type]


def test_metrics_reach_the_local_emf_listener_with_the_log_group() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(5)
    try:
        stream = io.StringIO()
        metrics = Metrics("blue", stream, emf_endpoint=listener.getsockname(), log_group=log_group("blue", "metrics"))
        metrics.put("SnapshotUploaded", 1, Role="control-plane")
        received = json.loads(listener.recv(65536))
    finally:
        listener.close()
    assert received == json.loads(stream.getvalue())
    assert received["_aws"]["LogGroupName"] == "/dedicated-k8s/blue/metrics"
    assert received["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["ClusterName", "Role"]]
    assert received["SnapshotUploaded"] == 1 and received["ClusterName"] == "blue"


def test_metrics_survive_a_missing_cloudwatch_agent() -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    address = closed.getsockname()
    closed.close()
    stream = io.StringIO()
    Metrics("blue", stream, emf_endpoint=address).put("LaunchCompleted", 1)
    assert json.loads(stream.getvalue())["LaunchCompleted"] == 1
