"""In-memory stand-ins for the fast election trials: a recorded kubeadm and a dict-backed etcd.

The slow, honest counterpart is ``tests/agent/kubeadm_emulator.py`` (real etcd processes). These fakes
only record what each node ran and keep a member list, so 50 randomized elections run in seconds.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from node_agent.etcd import Member
from node_agent.runner import CommandResult

FAKE_PEM = "-----BEGIN CERTIFICATE-----\nZmFrZQ==\n-----END CERTIFICATE-----\n"
FAKE_PUB = "-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(b"fake-spki").decode() + "\n-----END PUBLIC KEY-----\n"
SHARED = (
    "ca.crt",
    "ca.key",
    "front-proxy-ca.crt",
    "front-proxy-ca.key",
    "etcd/ca.crt",
    "etcd/ca.key",
    "sa.key",
    "sa.pub",
)


@dataclass
class FakeEtcdCluster:
    """One etcd cluster's member list, shared by all nodes of a trial."""

    members: dict[str, Member] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    inits: list[str] = field(default_factory=list)
    joins: list[str] = field(default_factory=list)
    next_id: int = 1

    def add(self, name: str, ip: str) -> None:
        with self.lock:
            mid = str(self.next_id)
            self.next_id += 1
            self.members[mid] = Member(mid, name, (f"https://{ip}:2380",), (f"https://{ip}:2379",))

    def alive_at(self, url: str) -> bool:
        return any(url in m.client_urls for m in self.members.values())


class FakeEtcd:
    def __init__(self, cluster: FakeEtcdCluster) -> None:
        self.cluster = cluster

    def reachable(self, endpoints: Sequence[str]) -> bool:
        return any(self.cluster.alive_at(u) for u in endpoints)

    def members(self, endpoints: Sequence[str]) -> list[Member]:
        if not self.reachable(endpoints):
            raise ConnectionError("no endpoint answers")
        return list(self.cluster.members.values())

    def remove_stale_member(self, endpoints: Sequence[str], peer_url: str, keep_name: str | None) -> str | None:
        with self.cluster.lock:
            for mid, m in list(self.cluster.members.items()):
                if peer_url in m.peer_urls and (keep_name is None or m.name != keep_name):
                    del self.cluster.members[mid]
                    return mid
        return None

    def member_ready(self, endpoints: Sequence[str], name: str) -> bool:
        return any(m.name == name and m.started and not m.is_learner for m in self.members(endpoints))

    def membership_change_in_progress(self, endpoints: Sequence[str]) -> bool:
        return any(m.is_learner or not m.started for m in self.members(endpoints))


class RecordingRunner:
    """Records every argv; plays kubeadm's observable effects (files on disk, a member in the fake etcd)."""

    def __init__(
        self, cluster: FakeEtcdCluster, node_name: str, ip: str, pki_dir: Path, fail: Mapping[str, str] | None = None
    ) -> None:
        self.cluster = cluster
        self.node_name = node_name
        self.ip = ip
        self.pki_dir = pki_dir
        self.fail = dict(fail or {})
        self.calls: list[list[str]] = []

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float | None = None
    ) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        key = " ".join(argv[:2])
        if key in self.fail:
            return CommandResult(tuple(argv), 1, "", self.fail[key])
        out = ""
        if argv[:2] == ["kubeadm", "init"]:
            for rel in (*SHARED, "apiserver-etcd-client.crt", "apiserver-etcd-client.key"):
                (self.pki_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                (self.pki_dir / rel).write_text(FAKE_PEM)
            self.cluster.inits.append(self.node_name)
            self.cluster.add(self.node_name, self.ip)
        elif argv[:2] == ["kubeadm", "join"]:
            self.cluster.joins.append(self.node_name)
            if "controlPlane" in Path(argv[argv.index("--config") + 1]).read_text():
                self.cluster.add(self.node_name, self.ip)
        elif argv[:2] == ["openssl", "req"]:
            Path(argv[argv.index("-keyout") + 1]).write_text(FAKE_PEM)
        elif argv[:3] == ["openssl", "x509", "-req"]:
            Path(argv[argv.index("-out") + 1]).write_text(FAKE_PEM)
        elif argv[:2] == ["openssl", "x509"]:
            out = FAKE_PUB
        elif argv[0] == "kubectl" and "/readyz" in argv:
            out = "ok"
        elif argv[0] == "kubectl" and "node" in argv:
            out = f"node/{argv[argv.index('node') + 1]}"
        return CommandResult(tuple(argv), 0, out, "")

    def commands(self, prefix: str) -> list[list[str]]:
        return [c for c in self.calls if " ".join(c).startswith(prefix)]
