"""Join token rotation: create, store, then delete the old one; never a moment without a working token."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from node_agent.config import AgentConfig
from node_agent.kubeadm import BOOTSTRAP_TOKEN
from node_agent.secrets import JoinSecret, SecretStore
from node_agent.tokens import rotate_join_token
from tests.agent.fakes import FakeEtcdCluster, RecordingRunner
from tests.agent.harness import fast_settings

NOW = datetime(2026, 11, 25, 6, 0, 0, tzinfo=UTC)


def test_rotation_stores_the_new_token_before_deleting_the_old(
    aws: dict[str, Any], agent_config: AgentConfig, tmp_path: Path
) -> None:
    settings = fast_settings(tmp_path)
    secrets = SecretStore(aws["secretsmanager"], kms_key_id=aws["kms_key_id"])
    secrets.write_join(agent_config.join_secret_name, JoinSecret("oldtok.0123456789abcdef", "sha256:x", "t", "e"))

    order: list[str] = []

    class Watching(RecordingRunner):
        def run(self, argv: Any, **kw: Any) -> Any:
            if list(argv[:3]) == ["kubeadm", "token", "delete"]:
                stored = secrets.read_join(agent_config.join_secret_name).token
                order.append(f"delete {argv[3]} while secret holds {stored}")
            return super().run(argv, **kw)

    runner = Watching(FakeEtcdCluster(), "n", "10.0.0.1", settings.pki_dir)
    new = rotate_join_token(agent_config, settings, runner, secrets, now=lambda: NOW)

    assert BOOTSTRAP_TOKEN.match(new.token) and new.token_id != "oldtok"
    assert new.expires_at == "2026-11-26T06:00:00Z"
    assert new.api_endpoint == agent_config.control_plane_endpoint
    assert new.ca_cert_hash.startswith("sha256:")
    assert secrets.read_join(agent_config.join_secret_name) == new
    admin = str(settings.kubernetes_dir / "admin.conf")
    creates = runner.commands("kubeadm token create")
    description = "dedicated-k8s worker join token (rotated by the node agent)"
    assert creates == [
        ["kubeadm", "token", "create", new.token, "--ttl", "24h", "--description", description, "--kubeconfig", admin]
    ]
    assert runner.commands("kubeadm token delete") == [["kubeadm", "token", "delete", "oldtok", "--kubeconfig", admin]]
    assert order == [f"delete oldtok while secret holds {new.token}"]


def test_a_failed_create_leaves_the_old_token_in_place(
    aws: dict[str, Any], agent_config: AgentConfig, tmp_path: Path
) -> None:
    settings = fast_settings(tmp_path)
    secrets = SecretStore(aws["secretsmanager"])
    old = JoinSecret("oldtok.0123456789abcdef", "sha256:x", "t", "e")
    secrets.write_join(agent_config.join_secret_name, old)
    runner = RecordingRunner(FakeEtcdCluster(), "n", "10.0.0.1", settings.pki_dir, fail={"kubeadm token": "refused"})
    try:
        rotate_join_token(agent_config, settings, runner, secrets)
    except Exception as err:
        assert "refused" in str(err)
    else:
        raise AssertionError("rotation must fail when kubeadm cannot create the token")
    assert secrets.read_join(agent_config.join_secret_name) == old
    assert runner.commands("kubeadm token delete") == []
