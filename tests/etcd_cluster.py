"""Real etcd clusters for tests: several ``etcd`` server processes (Debian's etcd-server, installed by
``make setup``), each on its own loopback address, with mutual TLS as in production (a CA, server and peer
certificates with the member's IP as SAN, and a client certificate such as the Lambda's).

Member names carry an EC2-style instance ID, as kubeadm names them from the node name
(``i-0123456789abcdef0.us-east-1.compute.internal``). Loopback addresses are picked at random from
127.0.0.0/8 with free ports, so parallel test workers never clash. Fast raft timings (heartbeat 50 ms,
election 500 ms) keep elections short; nothing else is faked.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lambdas.common.etcd_client import EtcdClient, EtcdError, MemberRecord, TlsMaterial, UnhealthyClusterError
from lambdas.common.membership import committed_member_list
from tests.agent.kubeadm_emulator import free_loopback_ip, make_ca, make_leaf

REGION = "us-east-1"


def etcd_available() -> bool:
    return shutil.which("etcd") is not None


def new_instance_id() -> str:
    return "i-" + secrets.token_hex(9)[:17]


@dataclass
class EtcdNode:
    name: str
    ip: str
    data_dir: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    member_id: str | None = None

    @property
    def instance_id(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def client_url(self) -> str:
        return f"https://{self.ip}:2379"

    @property
    def peer_url(self) -> str:
        return f"https://{self.ip}:2380"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def free_ip_in(network: str, ports: tuple[int, ...] = (2379, 2380)) -> str:
    """A free address in ``network`` ("127.N"): the members of one cluster share a /16, so a moto VPC with
    that CIDR can hold EC2 instances whose private IPs are the members' real addresses."""
    rng = random.SystemRandom()
    for _ in range(200):
        ip = f"{network}.{rng.randint(0, 255)}.{rng.randint(4, 254)}"
        try:
            for port in ports:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind((ip, port))
        except OSError:
            continue
        return ip
    raise RuntimeError(f"no free address in {network}.0.0/16")


def random_network() -> str:
    return f"127.{random.SystemRandom().randint(2, 254)}"


@dataclass
class EtcdCluster:
    root: Path
    network: str | None = None  # "127.N": every member in 127.N.0.0/16 (else anywhere in 127/8)
    nodes: dict[str, EtcdNode] = field(default_factory=dict)
    tls: TlsMaterial | None = None

    # -- setup ------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.pki = self.root / "pki"
        self.ca_cert, self.ca_key = self.pki / "ca.crt", self.pki / "ca.key"
        make_ca(self.ca_cert, self.ca_key, "etcd-ca")
        client_cert, client_key = self.pki / "client.crt", self.pki / "client.key"
        make_leaf(self.ca_cert, self.ca_key, client_cert, client_key, cn="dedicated-k8s-etcd-lifecycle")
        self.tls = TlsMaterial.from_files(self.ca_cert, client_cert, client_key)
        self.client = EtcdClient(self.tls, timeout=2.0)

    def _node(self, instance_id: str | None = None, ip: str | None = None) -> EtcdNode:
        iid = instance_id or new_instance_id()
        ip = ip or (free_ip_in(self.network) if self.network else free_loopback_ip())
        name = f"{iid}.{REGION}.compute.internal"
        node = EtcdNode(name=name, ip=ip, data_dir=self.root / name / "data", log=self.root / name / "etcd.log")
        for kind in ("server", "peer"):
            # kubeadm puts localhost and 127.0.0.1 in etcd certificates too; loopback peers dial from 127.0.0.1.
            make_leaf(self.ca_cert, self.ca_key, self.pki / f"{ip}-{kind}.crt", self.pki / f"{ip}-{kind}.key",
                      cn=name, sans=[f"IP:{ip}", f"DNS:{name}", "IP:127.0.0.1", "DNS:localhost"])  # fmt: skip
        return node

    def _start(self, node: EtcdNode, initial_cluster: str, state: str) -> None:
        node.data_dir.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            "etcd", "--name", node.name, "--data-dir", str(node.data_dir),
            "--listen-client-urls", node.client_url, "--advertise-client-urls", node.client_url,
            "--listen-peer-urls", node.peer_url, "--initial-advertise-peer-urls", node.peer_url,
            "--initial-cluster", initial_cluster, "--initial-cluster-state", state,
            "--initial-cluster-token", f"test-{self.root.name}",
            "--client-cert-auth", "--trusted-ca-file", str(self.ca_cert),
            "--cert-file", str(self.pki / f"{node.ip}-server.crt"),
            "--key-file", str(self.pki / f"{node.ip}-server.key"),
            "--peer-client-cert-auth", "--peer-trusted-ca-file", str(self.ca_cert),
            "--peer-cert-file", str(self.pki / f"{node.ip}-peer.crt"),
            "--peer-key-file", str(self.pki / f"{node.ip}-peer.key"),
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--logger", "zap", "--log-level", "warn",
        ]  # fmt: skip
        with node.log.open("ab") as log:
            node.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def start(self, size: int, identities: list[tuple[str, str]] | None = None) -> EtcdCluster:
        """``identities``: (instance ID, IP) per member, e.g. of EC2 instances created in moto first."""
        nodes = [self._node(*identities[i]) if identities else self._node() for i in range(size)]
        initial = ",".join(f"{n.name}={n.peer_url}" for n in nodes)
        for node in nodes:
            self.nodes[node.name] = node
            self._start(node, initial, "new")
        self.wait_healthy([n.name for n in nodes])
        self.wait_reconfigurable()
        return self

    def wait_reconfigurable(self) -> None:
        """etcd's strict reconfiguration check (on by default, as kubeadm runs it) refuses member changes
        until the voters have been connected to each other for 5 s; wait that long, as an operator would."""
        time.sleep(5.2)

    # -- observation -----------------------------------------------------------------------------------------------
    @property
    def endpoints(self) -> list[str]:
        return [n.client_url for n in self.nodes.values() if n.running]

    def node_for(self, instance_id: str) -> EtcdNode:
        return next(n for n in self.nodes.values() if n.instance_id == instance_id)

    def healthy(self, name: str) -> bool:
        node = self.nodes[name]
        if not node.running:
            return False
        try:
            return self.client.status(node.client_url).has_leader
        except EtcdError:
            return False

    def wait_healthy(self, names: list[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name in names:
                node = self.nodes[name]
                if node.process is not None and node.process.poll() is not None:
                    raise RuntimeError(f"etcd {name} exited: {node.log.read_text()[-1500:]}")
            if all(self.healthy(n) for n in names):
                return
            time.sleep(0.1)
        raise RuntimeError(f"etcd members not healthy after {timeout}s: {names}")

    def current_members(self) -> list[MemberRecord]:
        """The membership as committed (``committed_member_list``), asked of the leader first: a just-removed
        member that has not heard of its removal yet still lists itself and cannot serve the read barrier, so
        asking it first would only cost a timeout (seen: a test asserting a removal read the leaving member's list).
        """
        endpoints = self.endpoints
        for endpoint in endpoints:
            try:
                status = self.client.status(endpoint)
            except EtcdError:
                continue
            if status.member_id and status.member_id == status.leader_id:
                endpoints = [endpoint, *(e for e in endpoints if e != endpoint)]
                break
        return committed_member_list(self.client, endpoints)

    def member_names(self) -> list[str]:
        return sorted(m.name for m in self.current_members())

    def voter_names(self) -> list[str]:
        return sorted(m.name for m in self.current_members() if not m.is_learner)

    # -- faults and changes ------------------------------------------------------------------------------------------
    def kill(self, name: str) -> None:
        """SIGKILL the member's process: the instance died or is unreachable."""
        node = self.nodes[name]
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            node.process.wait(timeout=10)

    def restart(self, name: str) -> None:
        node = self.nodes[name]
        self._start(node, "", "existing")  # an existing data dir ignores the initial-cluster flags
        self.wait_healthy([name])
        self.wait_reconfigurable()

    def add_learner_node(
        self, instance_id: str | None = None, ip: str | None = None, *, start: bool = True
    ) -> EtcdNode:
        """What kubeadm join does: member add --learner through the cluster, then start the new member."""
        node = self._node(instance_id, ip)
        deadline = time.monotonic() + 15
        while True:  # etcd refuses changes until its members have been connected for 5 s (strict reconfig)
            try:
                record = self.client.member_add_learner(self.endpoints, [node.peer_url])
                break
            except UnhealthyClusterError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)
        members = self.current_members()
        initial = ",".join(f"{m.name or node.name}={m.peer_urls[0]}" for m in members if m.peer_urls)
        self.nodes[node.name] = node
        node.member_id = record.id
        if start:
            self._start(node, initial, "existing")
        return node

    def promote_when_ready(self, node: EtcdNode, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        member_id = next(m.id for m in self.current_members() if node.peer_url in m.peer_urls)
        while True:
            try:
                self.client.member_promote(self.endpoints, member_id)
                return
            except EtcdError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                self.kill(node.name)
            # etcd preallocates 64 MB WAL segments: leave nothing that large behind.
            shutil.rmtree(node.data_dir, ignore_errors=True)


@contextlib.contextmanager
def etcd_cluster(root: Path, size: int, network: str | None = None) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(root, network)
    try:
        yield cluster.start(size)
    finally:
        cluster.stop()
