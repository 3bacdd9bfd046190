"""Join token rotation: create, store, then delete the old one; never a moment without a working token.

kubeadm is the :class:`~tests.agent.kubeadm_emulator.KubeadmEmulator` (its simulated API server keeps the
bootstrap tokens; ``openssl`` runs for real on a real cluster CA). Rotation never touches etcd, so no etcd runs:
the node's API server is taken as answering (:class:`RunningControlPlane`), and its calls still go where the
node's hosts file and admin.conf send them (tests/agent/test_api_endpoint.py covers what happens otherwise).
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from node_agent.config import AgentConfig, AgentSettings
from node_agent.hosts import map_endpoint
from node_agent.kubeadm import BOOTSTRAP_TOKEN
from node_agent.runner import CommandResult
from node_agent.secrets import JoinSecret, SecretStore
from node_agent.tokens import rotate_join_token
from tests.agent.conftest import config_values
from tests.agent.harness import fast_settings
from tests.agent.kubeadm_emulator import KubeadmEmulator, SimulatedApiServer, make_ca, write_kubeconfig
from twin.loadbalancer import LoadBalancer, TargetGroupSettings

NOW = datetime(2026, 11, 25, 6, 0, 0, tzinfo=UTC)
OLD = JoinSecret("oldtok.0123456789abcdef", "sha256:x", "t", "e")


class RunningControlPlane(KubeadmEmulator):
    """An initialised control-plane node whose own API server answers (no etcd is started for it)."""

    def _answers(self, ip: str) -> bool:
        return ip == self.ip


def _kubeadm(
    settings: AgentSettings,
    api: SimulatedApiServer,
    fail: Mapping[str, str] | None = None,
    cls: type[KubeadmEmulator] = RunningControlPlane,
) -> KubeadmEmulator:
    """This control-plane node's kubeadm as ``kubeadm init`` and the agent left it: the cluster CA, admin.conf
    naming controlPlaneEndpoint, the endpoint name mapped to this node; the NLB has no target yet."""
    cfg = AgentConfig.from_mapping(config_values())
    make_ca(settings.pki_dir / "ca.crt", settings.pki_dir / "ca.key", "kubernetes")
    write_kubeconfig(
        settings.kubernetes_dir / "admin.conf", f"https://{cfg.control_plane_endpoint}", "kubernetes-admin"
    )
    map_endpoint(settings.hosts_file, cfg.api_endpoint, "127.0.0.1")
    nlb = LoadBalancer(cfg.api_endpoint, TargetGroupSettings(interval_seconds=10, healthy_threshold=2,
                       unhealthy_threshold=2, deregistration_delay_seconds=0, preserve_client_ip=True))  # fmt: skip
    return cls(node_name="n", ip="127.0.0.1", kubernetes_dir=settings.kubernetes_dir,
               etcd_data_dir=settings.etcd_data_dir, api=api, hosts_file=settings.hosts_file, load_balancer=nlb,
               fail=fail)  # fmt: skip


def _ca_hash(ca: Path) -> str:
    """kubeadm's discovery CA hash, computed with openssl alone: sha256 of the DER SubjectPublicKeyInfo."""
    pem = subprocess.run(["openssl", "x509", "-in", str(ca), "-noout", "-pubkey"], capture_output=True, check=True)
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pem.stdout, capture_output=True,
                         check=True).stdout  # fmt: skip
    return "sha256:" + hashlib.sha256(der).hexdigest()


@pytest.fixture
def settings(tmp_path: Path) -> AgentSettings:
    return fast_settings(tmp_path)


def test_rotation_stores_the_new_token_before_deleting_the_old(
    aws: dict[str, Any], agent_config: AgentConfig, settings: AgentSettings
) -> None:
    secrets = SecretStore(aws["secretsmanager"], kms_key_id=aws["kms_key_id"])
    secrets.write_join(agent_config.join_secret_name, OLD)
    api = SimulatedApiServer(tokens={OLD.token})
    order: list[str] = []

    class Watching(RunningControlPlane):
        def run(self, argv: Any, **kw: Any) -> CommandResult:
            if list(argv[:3]) == ["kubeadm", "token", "delete"]:
                stored = secrets.read_join(agent_config.join_secret_name).token
                order.append(f"delete {argv[3]} while secret holds {stored}")
            return super().run(argv, **kw)

    runner = _kubeadm(settings, api, cls=Watching)
    new = rotate_join_token(agent_config, settings, runner, secrets, now=lambda: NOW, cluster_version="1.34.2")

    assert BOOTSTRAP_TOKEN.match(new.token) and new.token_id != "oldtok"
    assert new.kubernetes_version == "1.34.2", "workers check their version against the cluster's"
    assert new.expires_at == "2026-11-26T06:00:00Z"
    assert new.api_endpoint == agent_config.control_plane_endpoint
    assert new.ca_cert_hash == _ca_hash(settings.pki_dir / "ca.crt")
    assert secrets.read_join(agent_config.join_secret_name) == new
    assert api.tokens == {new.token}, "the new token works, the old one is gone"
    admin = str(settings.kubernetes_dir / "admin.conf")
    creates = runner.commands("kubeadm token create")
    description = "dedicated-k8s worker join token (rotated by the node agent)"
    assert creates == [
        ["kubeadm", "token", "create", new.token, "--ttl", "24h", "--description", description, "--kubeconfig", admin]
    ]
    assert runner.commands("kubeadm token delete") == [["kubeadm", "token", "delete", "oldtok", "--kubeconfig", admin]]
    assert order == [f"delete oldtok while secret holds {new.token}"]
    assert {(c.via, c.target_ip) for c in runner.connections} == {("hosts file", "127.0.0.1")}, "its own API server"


def test_a_failed_create_leaves_the_old_token_in_place(
    aws: dict[str, Any], agent_config: AgentConfig, settings: AgentSettings
) -> None:
    secrets = SecretStore(aws["secretsmanager"])
    secrets.write_join(agent_config.join_secret_name, OLD)
    api = SimulatedApiServer(tokens={OLD.token})
    runner = _kubeadm(settings, api, fail={"kubeadm token": "refused"})
    with pytest.raises(Exception, match="refused"):
        rotate_join_token(agent_config, settings, runner, secrets)
    assert secrets.read_join(agent_config.join_secret_name) == OLD
    assert runner.commands("kubeadm token delete") == []
    assert api.tokens == {OLD.token}


def test_rotation_keeps_the_workers_version_until_the_whole_control_plane_moves(
    aws: dict[str, Any], agent_config: AgentConfig, settings: AgentSettings
) -> None:
    secrets = SecretStore(aws["secretsmanager"], kms_key_id=aws["kms_key_id"])
    secrets.write_join(
        agent_config.join_secret_name, JoinSecret("oldtok.0123456789abcdef", "sha256:x", "t", "e", "1.34.2")
    )
    runner = _kubeadm(settings, SimulatedApiServer(tokens={"oldtok.0123456789abcdef"}))
    # Mid-rollout the recorded version is already the new one; workers must still join at the old one.
    new = rotate_join_token(agent_config, settings, runner, secrets, now=lambda: NOW, cluster_version="1.35.0")
    assert new.kubernetes_version == "1.34.2"
    assert secrets.read_join(agent_config.join_secret_name).kubernetes_version == "1.34.2"
