"""An EtcdAccess over etcdctl, used by the real-etcd agent tests until/unless the membership adapter is wired.

It implements the same small interface as node_agent.etcd_membership.MembershipEtcd; the quorum check
here is the plain rule (healthy voters after removal >= quorum of the new size).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from typing import Any

from node_agent.etcd import EtcdTls, Member


class EtcdctlAccess:
    def __init__(self, tls: EtcdTls) -> None:
        self.tls = tls

    def _ctl(self, endpoints: Sequence[str], *args: str) -> Any:
        tls = ["--cacert", str(self.tls.ca), "--cert", str(self.tls.cert), "--key", str(self.tls.key)]
        timeouts = ["--dial-timeout", "2s", "--command-timeout", "4s"]
        argv = ["etcdctl", "--endpoints", ",".join(endpoints), *tls, *timeouts, *args, "-w", "json"]
        env = {**os.environ, "ETCDCTL_API": "3"}
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=15, check=False)
        if proc.returncode != 0:
            raise ConnectionError(proc.stderr.strip()[-300:])
        return json.loads(proc.stdout)

    def reachable(self, endpoints: Sequence[str]) -> bool:
        for url in endpoints:
            try:
                self._ctl([url], "endpoint", "status")
                return True
            except (ConnectionError, ValueError):
                continue
        return False

    def members(self, endpoints: Sequence[str]) -> list[Member]:
        doc = self._ctl(endpoints, "member", "list")
        return [
            Member(
                str(m["ID"]),
                m.get("name", ""),
                tuple(m.get("peerURLs", [])),
                tuple(m.get("clientURLs", [])),
                bool(m.get("isLearner", False)),
            )
            for m in doc.get("members", [])
        ]

    def _healthy(self, url: str) -> bool:
        try:
            self._ctl([url], "endpoint", "health")
            return True
        except (ConnectionError, ValueError):
            return False

    def remove_stale_member(self, endpoints: Sequence[str], peer_url: str, keep_name: str | None) -> str | None:
        members = self.members(endpoints)
        stale = [m for m in members if peer_url in m.peer_urls and (keep_name is None or m.name != keep_name)]
        if not stale:
            return None
        target = stale[0]
        voters = [m for m in members if not m.is_learner and m.id != target.id]
        healthy = [m for m in voters if m.client_urls and self._healthy(m.client_urls[0])]
        if len(healthy) < len(voters) // 2 + 1:
            raise RuntimeError(f"removing {target.name or target.id} now would lose quorum")
        self._ctl(endpoints, "member", "remove", format(int(target.id), "x"))
        return target.id

    def member_ready(self, endpoints: Sequence[str], name: str) -> bool:
        mine = [m for m in self.members(endpoints) if m.name == name]
        return bool(mine) and mine[0].started and not mine[0].is_learner and self._healthy(mine[0].client_urls[0])

    def membership_change_in_progress(self, endpoints: Sequence[str]) -> bool:
        return any(m.is_learner or not m.started for m in self.members(endpoints))
