"""Builds agents for tests: identity, fast timings, moto clients, a recorded launch hook."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from node_agent.bootstrap import Agent
from node_agent.config import AgentConfig, AgentSettings
from node_agent.election import ClusterStateStore
from node_agent.etcd import EtcdAccess, EtcdTls, listening
from node_agent.etcd_membership import MembershipEtcd
from node_agent.instance import InstanceIdentity
from node_agent.lifecycle import RecordingLaunchHook
from node_agent.runner import CommandRunner
from node_agent.secrets import SecretStore
from tests.agent.conftest import REGION
from tests.agent.kubeadm_emulator import KubeadmEmulator, SimulatedApiServer, free_loopback_ip


def fast_settings(root: Path, **overrides: Any) -> AgentSettings:
    base = AgentSettings(
        kubernetes_dir=root / "etc-kubernetes",
        state_dir=root / "state",
        etcd_data_dir=root / "etcd-data",
        lease_seconds=2.0,
        renew_interval_seconds=0.3,
        poll_interval_seconds=0.02,
        join_deadline_seconds=30.0,
        health_timeout_seconds=20.0,
    )
    return replace(base, **overrides)


def identity(n: int, ip: str | None = None) -> InstanceIdentity:
    return InstanceIdentity(instance_id=f"i-{n:017x}", private_ip=ip or f"10.0.0.{n}", region=REGION)


def build_agent(
    aws: dict[str, Any],
    cfg: AgentConfig,
    *,
    ident: InstanceIdentity,
    settings: AgentSettings,
    runner: CommandRunner,
    etcd_for: Callable[[EtcdTls], EtcdAccess],
    probe: Callable[[str], bool],
) -> tuple[Agent, RecordingLaunchHook]:
    hook = RecordingLaunchHook()
    agent = Agent(
        config=cfg,
        settings=settings,
        identity=ident,
        runner=runner,
        store=ClusterStateStore(aws["dynamodb"], cfg.cluster_state_table),
        secrets=SecretStore(aws["secretsmanager"], kms_key_id=aws["kms_key_id"]),
        hook=hook,
        etcd_for=etcd_for,
        ec2=aws["ec2"],
        s3=aws["s3"],
        probe=probe,
    )
    return agent, hook


class EmulatedNode:
    """One instance for the real-etcd tests and the local twin: a moto EC2 instance, a loopback address,
    a :class:`KubeadmEmulator` with real etcd, and an :class:`Agent` wired to moto.

    ``etcd_for`` defaults to the production adapter (:class:`MembershipEtcd`, etcd's JSON gateway);
    tests pass ``EtcdctlAccess`` to check the agent against an independent implementation.
    """

    def __init__(
        self,
        aws: dict[str, Any],
        root: Path,
        api: SimulatedApiServer,
        cfg: AgentConfig,
        *,
        ip: str | None = None,
        etcd_for: Callable[[EtcdTls], EtcdAccess] | None = None,
        **settings: Any,
    ) -> None:
        inst = aws["ec2"].run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0]
        ip = ip or free_loopback_ip()
        self.identity = InstanceIdentity(inst["InstanceId"], ip, REGION)
        settings.setdefault("poll_interval_seconds", 0.1)  # each poll is an etcdctl process: spare the CPU
        self.settings = fast_settings(root / self.identity.instance_id, **settings)
        self.runner = KubeadmEmulator(
            node_name=self.identity.node_name,
            ip=ip,
            kubernetes_dir=self.settings.kubernetes_dir,
            etcd_data_dir=self.settings.etcd_data_dir,
            api=api,
        )
        self.agent, self.hook = build_agent(
            aws,
            cfg,
            ident=self.identity,
            settings=self.settings,
            runner=self.runner,
            etcd_for=etcd_for or MembershipEtcd,
            probe=listening,
        )

    def terminate(self, aws: dict[str, Any], api: SimulatedApiServer) -> None:
        """The instance dies: its etcd is killed, EC2 says terminated, the API server forgets its endpoint."""
        self.runner.kill()
        aws["ec2"].terminate_instances(InstanceIds=[self.identity.instance_id])
        with api.lock:
            api.etcd_endpoints.pop(self.identity.node_name, None)
            api.nodes.pop(self.identity.node_name, None)
