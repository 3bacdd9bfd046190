"""kubeadm, honestly: the configuration documents and the exact commands the node runs.

Everything here is pure (it builds documents and argv lists) except :class:`Kubeadm`, which sends the
argv lists through the one :class:`~node_agent.runner.CommandRunner`. The documents are
``kubeadm.k8s.io/v1beta4`` (kubeadm 1.31+) and ``kubelet.config.k8s.io/v1beta1``.

Control-plane joins never use ``--certificate-key`` (kubeadm's uploaded certs expire after 2 hours): the
agent places the shared PKI from Secrets Manager on disk first, and kubeadm uses the files it finds.
``kubeadm join`` gets everything from ``--config`` (kubeadm refuses to mix ``--config`` with
``--control-plane``; a ``controlPlane`` section in the JoinConfiguration is the same thing).
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_agent.audit import api_server_audit
from node_agent.config import AgentConfig, AgentSettings
from node_agent.errors import AgentError
from node_agent.instance import InstanceIdentity
from node_agent.irsa import api_server_extra_args, with_extra_args
from node_agent.runner import CommandResult, CommandRunner
from node_agent.yamlgen import dump_documents

KUBEADM_API = "kubeadm.k8s.io/v1beta4"
KUBELET_API = "kubelet.config.k8s.io/v1beta1"
CRI_SOCKET = "unix:///run/containerd/containerd.sock"
BOOTSTRAP_TOKEN = re.compile(r"^[a-z0-9]{6}\.[a-z0-9]{16}$")
# etcd flags for members spread over three AZs (etcd's tuning guide: heartbeat ~ RTT, election ~10x).
ETCD_EXTRA_ARGS = (
    ("heartbeat-interval", "250"),
    ("election-timeout", "2500"),
    ("quota-backend-bytes", str(8 * 1024**3)),
    ("auto-compaction-mode", "periodic"),
    ("auto-compaction-retention", "8h"),
)
# JoinConfiguration ``timeouts`` (kubeadm.k8s.io/v1beta4 Timeouts, "kubeadm Configuration (v1beta4)" on
# kubernetes.io; kubeadm's defaults in brackets). A control-plane joiner's etcd learner is promoted only once it
# has caught up with the leader, and kubeadm retries the promotion for at most etcdAPICall [2m]: a learner that
# must receive a multi-GB database as a snapshot needs longer, so 10m. The others keep kubeadm's defaults.
JOIN_TIMEOUTS_SECONDS: tuple[tuple[str, int, int], ...] = (  # (field, seconds, how many waits of it one join has)
    ("discovery", 300, 1),  # [5m] token discovery of the cluster CA through controlPlaneEndpoint
    ("tlsBootstrap", 300, 1),  # [5m] the kubelet's TLS bootstrap
    ("etcdAPICall", 600, 1),  # [2m] the learner's catch-up and promotion
    ("kubeletHealthCheck", 240, 1),  # [4m] the kubelet's /healthz
    ("controlPlaneComponentHealthCheck", 240, 1),  # [4m] the new static pods (wait-control-plane)
    ("kubernetesAPICall", 60, 3),  # [1m] per call: read kubeadm-config, read kubelet-config, mark-control-plane
)
# A worker's join has no etcd member and no control-plane static pods: those two fields are left out of its document.
CONTROL_PLANE_ONLY_TIMEOUTS = ("etcdAPICall", "controlPlaneComponentHealthCheck")
# Worst case of one control-plane ``kubeadm join`` (each wait runs to its timeout, one after the other):
# 300 + 300 + 600 + 240 + 240 + 3 x 60 = 1860 s (31 min). With the agent's health wait after it (600 s): 2460 s,
# inside AgentSettings.join_deadline_seconds (2700 s). The join's subprocess timeout is this plus a minute.
KUBEADM_JOIN_WORST_CASE_SECONDS = sum(seconds * waits for _, seconds, waits in JOIN_TIMEOUTS_SECONDS)


def _duration(seconds: int) -> str:
    """A metav1.Duration as kubeadm prints one: 600 -> ``10m0s``."""
    return f"{seconds // 60}m{seconds % 60}s"


def _args(pairs: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> list[dict[str, str]]:
    """v1beta4 extra args: a list of {name, value} (v1beta3 used a map)."""
    return [{"name": n, "value": v} for n, v in pairs]


def _node_registration(ident: InstanceIdentity) -> dict[str, Any]:
    return {
        "name": ident.node_name,
        "criSocket": CRI_SOCKET,
        "kubeletExtraArgs": _args([("cloud-provider", "external"), ("node-ip", ident.private_ip)]),
    }


def kubelet_configuration() -> dict[str, Any]:
    return {
        "apiVersion": KUBELET_API,
        "kind": "KubeletConfiguration",
        "cgroupDriver": "systemd",
        "rotateCertificates": True,
        "serverTLSBootstrap": True,
    }


def cluster_configuration(cfg: AgentConfig, ident: InstanceIdentity, settings: AgentSettings) -> dict[str, Any]:
    return {
        "apiVersion": KUBEADM_API,
        "kind": "ClusterConfiguration",
        "clusterName": cfg.cluster_name,
        "kubernetesVersion": f"v{cfg.kubernetes_version}",
        "controlPlaneEndpoint": cfg.control_plane_endpoint,
        "certificatesDir": str(settings.pki_dir),
        # kubeadm's default, pinned: the service-account key must be RSA for the IRSA JWKS (RS256, node_agent/irsa.py).
        "encryptionAlgorithm": "RSA-2048",
        "networking": {"podSubnet": cfg.pod_cidr, "serviceSubnet": cfg.service_cidr, "dnsDomain": "cluster.local"},
        # The audit settings, then (when IRSA is on) the service-account issuer flags appended to the same extraArgs.
        "apiServer": with_extra_args(
            {
                "certSANs": [cfg.api_endpoint, ident.private_ip, ident.node_name, "127.0.0.1", "localhost"],
                **api_server_audit(settings.kubernetes_dir),
            },
            api_server_extra_args(cfg.irsa_issuer_url),
        ),
        "controllerManager": {"extraArgs": _args([("cloud-provider", "external")])},
        "etcd": {
            "local": {
                "dataDir": str(settings.etcd_data_dir),
                "extraArgs": _args(ETCD_EXTRA_ARGS),
                "serverCertSANs": [ident.private_ip, ident.node_name],
                "peerCertSANs": [ident.private_ip, ident.node_name],
            }
        },
    }


def init_configuration_yaml(
    cfg: AgentConfig, ident: InstanceIdentity, settings: AgentSettings, bootstrap_token: str
) -> str:
    """InitConfiguration + ClusterConfiguration + KubeletConfiguration for ``kubeadm init --config``."""
    if not BOOTSTRAP_TOKEN.match(bootstrap_token):
        raise ValueError("bootstrap token must look like [a-z0-9]{6}.[a-z0-9]{16}")
    init = {
        "apiVersion": KUBEADM_API,
        "kind": "InitConfiguration",
        "bootstrapTokens": [
            {
                "token": bootstrap_token,
                "ttl": settings.bootstrap_token_ttl,
                "usages": ["signing", "authentication"],
                "groups": ["system:bootstrappers:kubeadm:default-node-token"],
                "description": "dedicated-k8s worker join token (rotated by the node agent)",
            }
        ],
        "localAPIEndpoint": {"advertiseAddress": ident.private_ip, "bindPort": cfg.api_port},
        "nodeRegistration": _node_registration(ident),
    }
    return dump_documents([init, cluster_configuration(cfg, ident, settings), kubelet_configuration()])


def join_configuration_yaml(
    cfg: AgentConfig, ident: InstanceIdentity, token: str, ca_cert_hash: str, *, control_plane: bool
) -> str:
    join: dict[str, Any] = {
        "apiVersion": KUBEADM_API,
        "kind": "JoinConfiguration",
        "discovery": {
            "bootstrapToken": {
                "apiServerEndpoint": cfg.control_plane_endpoint,
                "token": token,
                "caCertHashes": [ca_cert_hash],
            }
        },
        "nodeRegistration": _node_registration(ident),
        "timeouts": {
            name: _duration(seconds)
            for name, seconds, _ in JOIN_TIMEOUTS_SECONDS
            if control_plane or name not in CONTROL_PLANE_ONLY_TIMEOUTS
        },
    }
    if control_plane:
        join["controlPlane"] = {"localAPIEndpoint": {"advertiseAddress": ident.private_ip, "bindPort": cfg.api_port}}
    return dump_documents([join])


def ca_cert_hash_from_public_key_pem(pem: str) -> str:
    """kubeadm's discovery hash: ``sha256:`` + hex SHA-256 of the CA's DER SubjectPublicKeyInfo."""
    body = "".join(line for line in pem.strip().splitlines() if not line.startswith("-----"))
    return "sha256:" + hashlib.sha256(base64.b64decode(body)).hexdigest()


def generate_bootstrap_token() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"

    def part(n: int) -> str:
        return "".join(secrets.choice(alphabet) for _ in range(n))

    return f"{part(6)}.{part(16)}"


@dataclass
class Kubeadm:
    """The commands the agent runs, each one argv list through the runner."""

    runner: CommandRunner
    settings: AgentSettings

    @property
    def admin_conf(self) -> str:
        return str(self.settings.kubernetes_dir / "admin.conf")

    @property
    def kubelet_conf(self) -> str:
        return str(self.settings.kubernetes_dir / "kubelet.conf")

    def _run(self, argv: list[str], timeout: float = 900) -> CommandResult:
        return self.runner.run(argv, timeout=timeout).check()

    def init(self, config_path: Path, ignore_preflight_errors: tuple[str, ...] = ()) -> CommandResult:
        argv = ["kubeadm", "init", "--config", str(config_path), "--skip-token-print"]
        if ignore_preflight_errors:
            argv += ["--ignore-preflight-errors", ",".join(ignore_preflight_errors)]
        return self._run(argv)

    def join(self, config_path: Path) -> CommandResult:
        # Never killed before kubeadm's own timeouts end it (the runner's default 900 s is shorter than them).
        argv = ["kubeadm", "join", "--config", str(config_path)]
        return self._run(argv, timeout=KUBEADM_JOIN_WORST_CASE_SECONDS + 60)

    def reset(self) -> CommandResult:
        return self._run(["kubeadm", "reset", "--force"])

    def token_create(self, token: str, ttl: str) -> CommandResult:
        return self._run(
            [
                "kubeadm", "token", "create", token,
                "--ttl", ttl,
                "--description", "dedicated-k8s worker join token (rotated by the node agent)",
                "--kubeconfig", self.admin_conf,
            ]
        )  # fmt: skip

    def token_delete(self, token_id: str) -> CommandResult:
        return self._run(["kubeadm", "token", "delete", token_id, "--kubeconfig", self.admin_conf])

    def ca_public_key_pem(self) -> str:
        ca = str(self.settings.pki_dir / "ca.crt")
        return self._run(["openssl", "x509", "-in", ca, "-noout", "-pubkey"], timeout=30).stdout

    def ca_cert_hash(self) -> str:
        return ca_cert_hash_from_public_key_pem(self.ca_public_key_pem())

    def api_server_ready(self, advertise_address: str, port: int) -> bool:
        """THIS node's API server answers /readyz: admin.conf's credentials, but ``--server`` at the node's own
        address (kubeadm's wait-control-plane does the same: admin.conf with the server set to the local API
        endpoint). Through controlPlaneEndpoint the answer could come from another member, or, before this node
        is a load balancer target, from nobody. The certificate carries the address (kubeadm adds
        advertiseAddress to the API server's SANs; :func:`cluster_configuration` lists it too)."""
        server = f"https://{advertise_address}:{port}"
        argv = ["kubectl", "--kubeconfig", self.admin_conf, "--server", server, "get", "--raw", "/readyz"]
        result = self.runner.run(argv, timeout=30)
        return result.ok and result.stdout.strip() == "ok"

    def node_registered(self, node_name: str) -> bool:
        argv = ["kubectl", "--kubeconfig", self.kubelet_conf, "get", "node", node_name, "-o", "name"]
        result = self.runner.run(argv, timeout=30)
        return result.ok and result.stdout.strip() == f"node/{node_name}"

    def create_etcd_client_cert(self, out_dir: Path, common_name: str, days: int = 365) -> tuple[str, str]:
        """A client certificate signed by the etcd CA (for the etcd lifecycle Lambda); returns (cert, key) PEM."""
        return self._client_cert(out_dir, common_name, self.settings.pki_dir / "etcd", days, what="etcd")

    def create_kube_client_cert(self, out_dir: Path, common_name: str, days: int = 365) -> tuple[str, str]:
        """A Kubernetes client certificate signed by the cluster CA (``pki/ca.crt``): the API server authenticates
        it as user ``common_name`` (no organisation, so no group: RBAC binds the user itself)."""
        return self._client_cert(out_dir, common_name, self.settings.pki_dir, days, what="Kubernetes")

    def _client_cert(self, out_dir: Path, common_name: str, ca_dir: Path, days: int, *, what: str) -> tuple[str, str]:
        """openssl: a fresh RSA key and CSR, signed by ``ca_dir/ca.{crt,key}`` with extendedKeyUsage clientAuth."""
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = common_name.replace(":", "-")
        key, csr, crt, ext = (out_dir / f"{stem}.{s}" for s in ("key", "csr", "crt", "ext"))
        ext.write_text("keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n")
        etcd_ca = ca_dir
        self._run(
            ["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-subj", f"/CN={common_name}", "-out", str(csr)],
            timeout=60,
        )  # fmt: skip
        self._run(
            ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(etcd_ca / "ca.crt"),
             "-CAkey", str(etcd_ca / "ca.key"), "-CAcreateserial", "-days", str(days),
             "-extfile", str(ext), "-out", str(crt)],
            timeout=60,
        )  # fmt: skip
        try:
            return crt.read_text(), key.read_text()
        except OSError as err:
            raise AgentError(f"{what} client certificate was not written: {err}") from err
