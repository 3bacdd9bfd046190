"""The agent's :class:`~node_agent.etcd.EtcdAccess` in production: etcd's v3 JSON gateway over HTTPS.

Interim: the shared ``lambdas.common.membership`` module (owned by the Lambda issue) had not landed when
this was written; this small stdlib client implements the same rules (healthy voters after removal must
be a quorum of the new membership; learners never count; removing a member that is gone is success) so
the agent runs. When the shared module is available the methods below should delegate to it, so the
quorum rule lives in one place.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from node_agent.errors import AgentError
from node_agent.etcd import EtcdTls, Member


class UnsafeRemovalError(AgentError):
    """Removing the member now would leave the healthy voters short of a quorum; wait and retry."""


def quorum(voters: int) -> int:
    return voters // 2 + 1


class MembershipEtcd:
    def __init__(self, tls: EtcdTls, timeout: float = 3.0) -> None:
        self.tls = tls
        self.timeout = timeout
        self._ctx: ssl.SSLContext | None = None

    def _context(self) -> ssl.SSLContext:
        if self._ctx is None:
            ctx = ssl.create_default_context(cafile=str(self.tls.ca))
            ctx.load_cert_chain(str(self.tls.cert), str(self.tls.key))
            self._ctx = ctx
        return self._ctx

    def _post(self, url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        req = urllib.request.Request(  # noqa: S310 (https URLs of etcd members)
            url.rstrip("/") + path,
            data=json.dumps(body or {}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=self.timeout, context=self._context()) as resp:  # noqa: S310
            return dict(json.loads(resp.read().decode() or "{}"))

    def _first(self, endpoints: Sequence[str], path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        errors = []
        for url in endpoints:
            try:
                return self._post(url, path, body)
            except urllib.error.HTTPError as err:  # etcd answered with an error: say what it said
                errors.append(f"{url}: {err.code} {err.read().decode(errors='replace')[:300]}")
            except (OSError, ValueError) as err:
                errors.append(f"{url}: {err}")
        raise ConnectionError("no etcd endpoint answered: " + "; ".join(errors))

    def _status(self, url: str) -> dict[str, Any] | None:
        try:
            status = self._post(url, "/v3/maintenance/status")
        except (OSError, ValueError, urllib.error.URLError):
            return None
        if status.get("errors") or str(status.get("leader", "0")) == "0":
            return None
        return status

    # -- EtcdAccess ----------------------------------------------------------------------------------------
    def reachable(self, endpoints: Sequence[str]) -> bool:
        return any(self._status(url) is not None for url in endpoints)

    def members(self, endpoints: Sequence[str]) -> list[Member]:
        doc = self._first(endpoints, "/v3/cluster/member/list")
        return [
            Member(
                id=str(m.get("ID", "")),
                name=str(m.get("name", "")),
                peer_urls=tuple(m.get("peerURLs", [])),
                client_urls=tuple(m.get("clientURLs", [])),
                is_learner=bool(m.get("isLearner", False)),
            )
            for m in doc.get("members", [])
        ]

    def member_ready(self, endpoints: Sequence[str], name: str) -> bool:
        mine = [m for m in self.members(endpoints) if m.name == name]
        if not mine or not mine[0].started or mine[0].is_learner:
            return False
        return self._status(mine[0].client_urls[0]) is not None

    def membership_change_in_progress(self, endpoints: Sequence[str]) -> bool:
        return any(m.is_learner or not m.started for m in self.members(endpoints))

    def can_remove(self, members: list[Member], target: Member) -> bool:
        """Learners and unstarted members never count; otherwise healthy voters left >= quorum of the rest."""
        if target.is_learner or not target.started:
            return True
        remaining = [m for m in members if not m.is_learner and m.id != target.id]
        healthy = [m for m in remaining if m.client_urls and self._status(m.client_urls[0]) is not None]
        return len(remaining) > 0 and len(healthy) >= quorum(len(remaining))

    def remove_stale_member(self, endpoints: Sequence[str], peer_url: str, keep_name: str | None) -> str | None:
        members = self.members(endpoints)
        stale = [m for m in members if peer_url in m.peer_urls and (keep_name is None or m.name != keep_name)]
        if not stale:
            return None
        target = stale[0]
        if not self.can_remove(members, target):
            raise UnsafeRemovalError(f"removing member {target.name or target.id} ({peer_url}) now would lose quorum")
        try:
            self._first(endpoints, "/v3/cluster/member/remove", {"ID": target.id})
        except ConnectionError as err:
            if "member not found" not in str(err):
                raise
        return target.id
