"""What the agent needs from etcd, as one small interface over the shared membership module.

The agent never speaks to etcd's API directly: :class:`MembershipEtcd` adapts
``lambdas.common.membership`` (the intent-level module the Lambda and reconciler use, so the quorum
rules live in one place). Tests may pass any object with the same methods.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Member:
    id: str
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    is_learner: bool = False

    @property
    def started(self) -> bool:
        """etcd reports an added-but-never-started member with an empty name and no client URLs."""
        return bool(self.name) and bool(self.client_urls)


@dataclass(frozen=True)
class EtcdTls:
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def kubeadm_apiserver_client(cls, pki_dir: Path) -> EtcdTls:
        """The client certificate kubeadm issues to the API server for etcd (present on every control plane)."""
        return cls(
            pki_dir / "etcd" / "ca.crt", pki_dir / "apiserver-etcd-client.crt", pki_dir / "apiserver-etcd-client.key"
        )


class EtcdAccess(Protocol):
    def reachable(self, endpoints: Sequence[str]) -> bool:
        """Does any endpoint answer as a member of a cluster with a leader?"""

    def members(self, endpoints: Sequence[str]) -> list[Member]: ...

    def remove_stale_member(self, endpoints: Sequence[str], peer_url: str, keep_name: str | None) -> str | None:
        """Remove a member carrying ``peer_url`` (quorum-safe) unless it is named ``keep_name``; its id or None.

        ``keep_name=None`` removes whatever member carries the peer URL (withdrawing my own failed join).
        """

    def member_ready(self, endpoints: Sequence[str], name: str) -> bool:
        """Member ``name`` is started, a voter (promoted) and healthy."""

    def membership_change_in_progress(self, endpoints: Sequence[str]) -> bool:
        """A learner or an unstarted member exists (invariant 4a: one change at a time)."""


def client_url_for(peer_url: str, client_port: int = 2379) -> str:
    """``https://10.0.1.5:2380`` -> ``https://10.0.1.5:2379`` (kubeadm: same address, client port)."""
    scheme, _, rest = peer_url.partition("://")
    host = rest.rsplit(":", 1)[0]
    return f"{scheme}://{host}:{client_port}"


def listening(url: str, timeout: float = 2.0) -> bool:
    """Is anything accepting connections at ``url``'s host:port? (No client certificate needed.)

    Used after a bootstrap takeover, before this node has any etcd credentials: a conservative probe,
    since anything listening on the dead holder's client port counts as "an etcd may be alive there".
    """
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 2379), timeout=timeout):
            return True
    except OSError:
        return False
