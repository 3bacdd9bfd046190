"""``python -m node_agent {run,snapshot,rotate-token,upgrade-addons,certificates,restore} [--config PATH]``.

* ``run``: the launch (systemd unit started by user data): initialise, join or restore, then complete
  the launch hook (CONTINUE, or ABANDON with the reason). Exit 0 on CONTINUE, 1 on ABANDON.
* ``snapshot``: the snapshot timer (every snapshotIntervalMinutes); only the etcd leader's node acts.
* ``rotate-token``: the 12-hour timer; a fresh 24 h worker join token, only on the leader's node.
* ``upgrade-addons``: timer; records this control-plane node's version and upgrades the add-ons once every
  control-plane node runs it (:mod:`node_agent.upgrade`; one node does it).
* ``certificates``: the daily timer on control-plane nodes (:mod:`node_agent.certs`): expiry metrics, renewal
  90 days ahead, the Lambda's etcd client certificate renewed on the leader's node.
* ``restore``: operator command; disaster recovery now, only if invariant 7 holds. Exit 1 if refused.

A configuration that cannot be read is reported key by key; ``run`` then still tries to ABANDON its
launch hook (using ``launchHookName`` if that much of the file is readable) so the group replaces the
node at once instead of waiting for the hook timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import boto3

from node_agent.bootstrap import Agent
from node_agent.config import DEFAULT_CONFIG_PATH, AgentConfig, AgentConfigError, AgentSettings
from node_agent.election import ClusterStateStore
from node_agent.etcd_membership import MembershipEtcd
from node_agent.instance import Imdsv2
from node_agent.lifecycle import AutoScalingLaunchHook, LaunchHook
from node_agent.log import Metrics, configure_logging, get_logger, log
from node_agent.runner import SubprocessRunner
from node_agent.secrets import SecretStore
from node_agent.telemetry import EMF_ENDPOINT, log_group, start_cloudwatch_agent

LOG = get_logger("main")
COMMANDS = ("run", "snapshot", "rotate-token", "upgrade-addons", "certificates", "restore")
AgentFactory = Callable[[AgentConfig, AgentSettings], Agent]
FallbackHookFactory = Callable[[str, str], LaunchHook]  # (hook name, region) -> hook


def production_agent(cfg: AgentConfig, settings: AgentSettings) -> Agent:
    """Wire the real world: IMDSv2, boto3 in the configured region, subprocess runner, membership module."""
    identity = Imdsv2().identity()
    session = boto3.session.Session(region_name=cfg.region)
    return Agent(
        config=cfg,
        settings=settings,
        identity=identity,
        runner=SubprocessRunner(),
        store=ClusterStateStore(session.client("dynamodb"), cfg.cluster_state_table),
        secrets=SecretStore(
            session.client("secretsmanager"),
            kms_key_id=cfg.kms_key_id,
            tags={"dedicated-k8s:cluster": cfg.cluster_name},
        ),
        hook=AutoScalingLaunchHook(session.client("autoscaling"), cfg.launch_hook_name, identity.instance_id),
        etcd_for=MembershipEtcd,
        ec2=session.client("ec2"),
        s3=session.client("s3"),
        metrics=Metrics(cfg.cluster_name, emf_endpoint=EMF_ENDPOINT, log_group=log_group(cfg.cluster_name, "metrics")),
    )


def _production_fallback_hook(hook_name: str, region: str) -> LaunchHook:
    identity = Imdsv2().identity()
    client = boto3.session.Session(region_name=region or identity.region).client("autoscaling")
    return AutoScalingLaunchHook(client, hook_name, identity.instance_id)


def _abandon_without_config(path: Path, reason: str, fallback: FallbackHookFactory) -> None:
    try:
        raw: Any = json.loads(path.read_text())
        hook_name = raw.get("launchHookName") if isinstance(raw, dict) else None
        region = raw.get("region", "") if isinstance(raw, dict) else ""
    except (OSError, ValueError):
        hook_name, region = None, ""
    if not isinstance(hook_name, str) or not hook_name:
        log(LOG, 40, "cannot name the launch hook; it will time out to its default result (ABANDON)")
        return
    try:
        fallback(hook_name, str(region)).complete("ABANDON", reason)
    except Exception as err:
        log(LOG, 40, "could not abandon the launch hook", error=str(err))


def main(
    argv: Sequence[str] | None = None,
    *,
    factory: AgentFactory = production_agent,
    settings: AgentSettings | None = None,
    fallback_hook: FallbackHookFactory = _production_fallback_hook,
) -> int:
    parser = argparse.ArgumentParser(prog="python -m node_agent", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    args = parser.parse_args(argv)
    try:
        cfg = AgentConfig.load(args.config)
    except AgentConfigError as err:
        log(LOG, 40, "invalid configuration", config=str(args.config), problems=err.problems)
        if args.command == "run":
            _abandon_without_config(args.config, str(err), fallback_hook)
        return 2
    agent = factory(cfg, settings or AgentSettings())
    if args.command == "run":
        start_cloudwatch_agent(
            cfg, agent.runner, agent.settings.state_dir / "cloudwatch-agent.json"
        )  # before the launch: the audit log and metrics from the start
        return 0 if agent.run_launch().ok else 1
    try:
        if args.command == "snapshot":
            message = agent.snapshot_once()
        elif args.command == "rotate-token":
            message = agent.rotate_token_once()
        elif args.command == "upgrade-addons":
            message = agent.upgrade_addons_once()
        elif args.command == "certificates":
            message = agent.certificates_once()
        else:
            message = agent.restore_if_needed()
    except Exception as err:
        log(LOG, 40, f"{args.command} failed", error=f"{type(err).__name__}: {err}")
        return 1
    log(LOG, 20, f"{args.command}: {message}")
    return 1 if message.startswith("refused") else 0


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
