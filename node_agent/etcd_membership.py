"""The agent's :class:`~node_agent.etcd.EtcdAccess` in production: an adapter over the shared membership
module (``lambdas.common.membership``, the same quorum rules the lifecycle Lambda and the reconciler use)
and its stdlib client for etcd's v3 JSON gateway (HTTPS with the kubeadm-issued client certificate).
"""

from __future__ import annotations

from collections.abc import Sequence

from lambdas.common import membership
from lambdas.common.etcd_client import EtcdClient, EtcdError, TlsMaterial
from node_agent.errors import AgentError
from node_agent.etcd import EtcdTls, Member


class UnsafeRemovalError(AgentError):
    """Removing the member now would leave the healthy voters short of a quorum; wait and retry."""


quorum = membership.quorum


class MembershipEtcd:
    def __init__(self, tls: EtcdTls, timeout: float = 3.0) -> None:
        self.tls = tls
        self.timeout = timeout
        self._client: EtcdClient | None = None

    def client(self) -> EtcdClient:
        """Built on first use: the certificate files exist only once kubeadm (or the PKI restore) wrote them."""
        if self._client is None:
            material = TlsMaterial.from_files(self.tls.ca, self.tls.cert, self.tls.key)
            self._client = EtcdClient(material, timeout=self.timeout)
        return self._client

    # -- EtcdAccess ----------------------------------------------------------------------------------------
    def reachable(self, endpoints: Sequence[str]) -> bool:
        for url in endpoints:
            try:
                status = self.client().status(url)
            except EtcdError:
                continue
            if status.has_leader and not status.errors:
                return True
        return False

    def members(self, endpoints: Sequence[str]) -> list[Member]:
        return [
            Member(id=m.id, name=m.name, peer_urls=m.peer_urls, client_urls=m.client_urls, is_learner=m.is_learner)
            for m in self.client().member_list(endpoints)
        ]

    def member_ready(self, endpoints: Sequence[str], name: str) -> bool:
        view = membership.observe(self.client(), endpoints)
        mine = [m for m in view.members if m.name == name]
        return bool(mine) and mine[0].started and not mine[0].is_learner and mine[0].healthy

    def membership_change_in_progress(self, endpoints: Sequence[str]) -> bool:
        return any(m.is_learner or not m.started for m in self.members(endpoints))

    def remove_stale_member(self, endpoints: Sequence[str], peer_url: str, keep_name: str | None) -> str | None:
        stale = [
            m for m in self.members(endpoints) if peer_url in m.peer_urls and (keep_name is None or m.name != keep_name)
        ]
        if not stale:
            return None
        result = membership.remove_member_by_id(self.client(), endpoints, stale[0].id)
        if result.outcome is membership.RemovalOutcome.UNSAFE:
            raise UnsafeRemovalError(
                f"removing member {stale[0].name or stale[0].id} ({peer_url}) now: {result.reason}"
            )
        return stale[0].id
