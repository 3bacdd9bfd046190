"""Worker join token rotation: a fresh 24 h token every 12 h, so join material is never stale.

Order matters: create the new token, store it in the join secret, and only then delete the old token, so
a worker that reads the secret at any moment gets a token that works. Only the etcd leader's node rotates
(the timer runs on every control-plane node; the others exit), like snapshots.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from node_agent.config import AgentConfig, AgentSettings
from node_agent.errors import SecretUnreadableError
from node_agent.kubeadm import Kubeadm, generate_bootstrap_token
from node_agent.log import get_logger, log
from node_agent.runner import CommandRunner
from node_agent.secrets import JoinSecret, SecretStore

LOG = get_logger("tokens")


def _ttl_hours(ttl: str) -> int:
    if not ttl.endswith("h") or not ttl[:-1].isdigit():
        raise ValueError(f"token TTL must be whole hours like '24h', not {ttl!r}")
    return int(ttl[:-1])


def rotate_join_token(
    cfg: AgentConfig,
    settings: AgentSettings,
    runner: CommandRunner,
    secrets: SecretStore,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    *,
    cluster_version: str = "",
) -> JoinSecret:
    kubeadm = Kubeadm(runner, settings)
    try:
        old: JoinSecret | None = secrets.read_join(cfg.join_secret_name)
    except SecretUnreadableError as err:
        log(LOG, 30, "no readable join secret; creating one", error=str(err))
        old = None
    token = generate_bootstrap_token()
    kubeadm.token_create(token, settings.bootstrap_token_ttl)
    expires = now() + timedelta(hours=_ttl_hours(settings.bootstrap_token_ttl))
    # The workers' version moves only when the whole control plane has (bootstrap._publish_version_to_workers):
    # a rotation keeps it, and writes ``cluster_version`` only into a secret that had none.
    version = old.kubernetes_version if old is not None and old.kubernetes_version else cluster_version
    new = JoinSecret(token, kubeadm.ca_cert_hash(), expires.strftime("%Y-%m-%dT%H:%M:%SZ"), cfg.control_plane_endpoint,
                     version)  # fmt: skip
    secrets.write_join(cfg.join_secret_name, new)
    log(LOG, 20, "join token rotated", token_id=new.token_id, expires_at=new.expires_at)
    if old is not None and old.token_id != new.token_id:
        result = runner.run(
            ["kubeadm", "token", "delete", old.token_id, "--kubeconfig", kubeadm.admin_conf], timeout=60
        )
        if not result.ok:  # it expires by itself; a failed delete is not worth failing the rotation for
            log(LOG, 30, "old token not deleted", token_id=old.token_id, stderr=result.stderr.strip()[-200:])
    return new
