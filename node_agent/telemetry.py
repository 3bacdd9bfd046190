"""The CloudWatch agent on every node: its configuration (log group names carry the cluster name, so it is
written at boot, not baked into the AMI) and its start.

What it ships, through the VPC endpoints for CloudWatch Logs (never the internet):

* the API server's audit log (control-plane nodes; :mod:`node_agent.audit`) to ``/dedicated-k8s/<cluster>/audit``,
* the node agent's embedded-metric-format lines, which :class:`node_agent.log.Metrics` sends to the agent's
  local EMF listener (127.0.0.1:25888); CloudWatch turns them into metrics in the ``DedicatedK8s`` namespace
  and keeps the raw lines in ``/dedicated-k8s/<cluster>/metrics``.

The stack creates both log groups (retention from configuration, KMS-encrypted); the node roles may only
create streams and put events in ``/dedicated-k8s/<cluster>/*``, so the agent never creates a group itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from node_agent.audit import AUDIT_LOG_FILE
from node_agent.config import AgentConfig
from node_agent.log import get_logger, log
from node_agent.runner import CommandRunner

LOG = get_logger("telemetry")
AGENT_HOME = Path("/opt/aws/amazon-cloudwatch-agent")
AGENT_CTL = AGENT_HOME / "bin" / "amazon-cloudwatch-agent-ctl"
EMF_ENDPOINT = ("127.0.0.1", 25888)


def log_group(cluster_name: str, kind: str) -> str:
    """``/dedicated-k8s/<cluster>/<kind>``: the names stages/observability.py creates."""
    return f"/dedicated-k8s/{cluster_name}/{kind}"


def cloudwatch_agent_config(cfg: AgentConfig) -> dict[str, Any]:
    files: list[dict[str, Any]] = []
    if cfg.is_control_plane:
        files.append(
            {
                "file_path": str(AUDIT_LOG_FILE),
                "log_group_name": log_group(cfg.cluster_name, "audit"),
                "log_stream_name": "{instance_id}",
                # kube-apiserver rotates the file (audit-log-maxsize): follow the newest, never re-read rotated ones.
                "auto_removal": False,
                "timezone": "UTC",
            }
        )
    logs: dict[str, Any] = {
        "metrics_collected": {"emf": {}},
        "force_flush_interval": 15,
    }
    if files:
        logs["logs_collected"] = {"files": {"collect_list": files}}
    return {
        "agent": {"region": cfg.region, "run_as_user": "root", "omit_hostname": True},
        "logs": logs,
    }


def start_cloudwatch_agent(cfg: AgentConfig, runner: CommandRunner, config_path: Path) -> bool:
    """Write the configuration and (re)start the agent. Telemetry never blocks a launch: a failure is logged
    (the node still joins; the missing metrics make the snapshot-age and membership alarms fire)."""
    try:
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(cloudwatch_agent_config(cfg), indent=2, sort_keys=True))
    except OSError as err:
        log(LOG, 40, "could not write the CloudWatch agent configuration", error=str(err))
        return False
    argv = [str(AGENT_CTL), "-a", "fetch-config", "-m", "ec2", "-c", f"file:{config_path}", "-s"]
    result = runner.run(argv, timeout=120)
    if not result.ok:
        log(LOG, 40, "the CloudWatch agent did not start", exit_code=result.returncode, stderr=result.stderr[-2000:])
        return False
    return True
