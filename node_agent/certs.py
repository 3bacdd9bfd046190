"""Certificates never expire by surprise: the daily certificate timer on control-plane nodes.

Every control-plane node, every day:

1. reports the cluster CA's days left (``ClusterCaExpiryDays``; the alarm fires a year ahead: a CA is
   replaced as a planned project, never renewed in place),
2. reports the fewest days left of this node's kubeadm-managed certificates (the API server's, the
   front-proxy client's, etcd's server/peer/client ones and the client certificates embedded in the
   control-plane kubeconfigs) as ``CertificateExpiryDays``,
3. when that is under ``RENEW_AT_DAYS``: ``kubeadm certs renew all``, then restarts the static pods
   (kubeadm's documented step: control-plane components only read their certificates at start) by moving
   their manifests out of the kubelet's manifest directory and back,
4. on the etcd leader's node only (one writer): renews the lifecycle Lambda's etcd client certificate the
   same way, signed by the etcd CA, and writes it back to Secrets Manager.

Replacement nodes get fresh certificates anyway (``kubeadm join`` issues them), so on an immutable cluster
step 3 mostly matters for nodes that live longer than ~9 months. kubelet client and serving certificates
rotate by themselves (``rotateCertificates``/``serverTLSBootstrap`` in the KubeletConfiguration, serving CSRs
approved by kubelet-csr-approver).
"""

from __future__ import annotations

import base64
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from node_agent.config import AgentConfig, AgentSettings
from node_agent.errors import AgentError
from node_agent.kubeadm import Kubeadm
from node_agent.log import Metrics, get_logger, log
from node_agent.runner import CommandRunner
from node_agent.secrets import SecretStore

LOG = get_logger("certs")
RENEW_AT_DAYS = 90  # kubeadm's certificates live a year: renew with a quarter left, long before the 30-day alarm
LAMBDA_CLIENT_CN = "dedicated-k8s-etcd-lifecycle"
# The kubeadm-managed leaf certificates a control-plane node holds (relative to the PKI directory).
LEAF_CERTIFICATES = (
    "apiserver.crt",
    "apiserver-kubelet-client.crt",
    "apiserver-etcd-client.crt",
    "front-proxy-client.crt",
    "etcd/server.crt",
    "etcd/peer.crt",
    "etcd/healthcheck-client.crt",
)
KUBECONFIGS = ("admin.conf", "super-admin.conf", "controller-manager.conf", "scheduler.conf")
_EMBEDDED_CERT = re.compile(r"client-certificate-data:\s*(\S+)")
_NOT_AFTER = re.compile(r"notAfter=(.+)")


class CertificateError(AgentError):
    """A certificate could not be read or renewed."""


@dataclass(frozen=True)
class CertificateReport:
    ca_days_left: float
    leaf_days_left: float
    soonest: str
    renewed_node_certificates: bool
    renewed_lambda_client: bool

    def summary(self) -> str:
        pairs = (("node certificates", self.renewed_node_certificates),
                 ("the Lambda's etcd client certificate", self.renewed_lambda_client))  # fmt: skip
        done = [what for what, did in pairs if did]
        renewed = f"; renewed {' and '.join(done)}" if done else ""
        return (f"CA {self.ca_days_left:.0f} days left; soonest leaf {self.soonest} "
                f"{self.leaf_days_left:.0f} days left{renewed}")  # fmt: skip


def not_after(runner: CommandRunner, pem_path: Path) -> datetime:
    """The certificate's notAfter, read by openssl (the node agent is stdlib-only: no x509 parser)."""
    result = runner.run(["openssl", "x509", "-in", str(pem_path), "-noout", "-enddate"], timeout=30)
    match = _NOT_AFTER.search(result.stdout) if result.ok else None
    if match is None:
        raise CertificateError(f"cannot read the expiry of {pem_path}: {result.stderr.strip()[:200]}")
    return datetime.strptime(match.group(1).strip(), "%b %d %H:%M:%S %Y %Z").replace(tzinfo=UTC)


def _days_left(expiry: datetime, now: datetime) -> float:
    return (expiry - now).total_seconds() / 86400


@dataclass
class CertificateTimer:
    config: AgentConfig
    settings: AgentSettings
    runner: CommandRunner
    secrets: SecretStore
    metrics: Metrics | None = None
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    sleep: Callable[[float], None] = time.sleep
    static_pod_stop_seconds: float = 20.0

    @property
    def kubeadm(self) -> Kubeadm:
        return Kubeadm(self.runner, self.settings)

    def run_once(self, *, etcd_leader: bool) -> CertificateReport:
        now = self.now()
        pki = self.settings.pki_dir
        ca_days = _days_left(not_after(self.runner, pki / "ca.crt"), now)
        soonest, leaf_days = self._soonest_leaf(now)
        self._put("ClusterCaExpiryDays", ca_days)
        renewed = False
        if leaf_days < RENEW_AT_DAYS:
            log(LOG, 30, "renewing kubeadm certificates", soonest=soonest, days_left=round(leaf_days, 1))
            self.runner.run(["kubeadm", "certs", "renew", "all"], timeout=300).check()
            self.restart_static_pods()
            soonest, leaf_days = self._soonest_leaf(now)
            if leaf_days < RENEW_AT_DAYS:
                raise CertificateError(f"{soonest} still expires in {leaf_days:.0f} days after renewal")
            renewed = True
        self._put("CertificateExpiryDays", leaf_days)
        lambda_renewed = self._renew_lambda_client(now) if etcd_leader else False
        report = CertificateReport(ca_days, leaf_days, soonest, renewed, lambda_renewed)
        log(LOG, 20, "certificates checked", summary=report.summary())
        return report

    def _put(self, name: str, days: float) -> None:
        if self.metrics is not None:
            self.metrics.put(name, round(days, 2), unit="None")

    def _soonest_leaf(self, now: datetime) -> tuple[str, float]:
        found: list[tuple[float, str]] = []
        for rel in LEAF_CERTIFICATES:
            path = self.settings.pki_dir / rel
            if path.exists():
                found.append((_days_left(not_after(self.runner, path), now), rel))
        for name in KUBECONFIGS:
            path = self.settings.kubernetes_dir / name
            if not path.exists():
                continue
            match = _EMBEDDED_CERT.search(path.read_text())
            if match is None:
                continue  # a kubeconfig pointing at certificate files: those files are checked above
            with tempfile.NamedTemporaryFile("wb", suffix=".crt") as pem:
                pem.write(base64.b64decode(match.group(1)))
                pem.flush()
                found.append((_days_left(not_after(self.runner, Path(pem.name)), now), name))
        if not found:
            raise CertificateError(f"no kubeadm certificate found under {self.settings.kubernetes_dir}")
        days, name = min(found)
        return name, days

    def restart_static_pods(self) -> None:
        """kubeadm's advice after renewal: restart the control-plane static pods. Moving the manifests out
        makes the kubelet stop them; moving them back starts them with the renewed certificates."""
        manifests = self.settings.kubernetes_dir / "manifests"
        parked = self.settings.state_dir / "parked-manifests"
        parked.mkdir(parents=True, exist_ok=True)
        moved = []
        for manifest in sorted(manifests.glob("*.yaml")):
            shutil.move(str(manifest), parked / manifest.name)
            moved.append(manifest.name)
        try:
            self.sleep(self.static_pod_stop_seconds)
        finally:  # whatever happens, the manifests go back: a node without its static pods is worse
            for name in moved:
                shutil.move(str(parked / name), manifests / name)
        log(LOG, 20, "static pods restarted", manifests=moved)

    def _renew_lambda_client(self, now: datetime) -> bool:
        secret_name = self.config.etcd_client_secret_name
        current = self.secrets.read_json(secret_name, ("ca", "cert", "key"))
        with tempfile.NamedTemporaryFile("w", suffix=".crt") as pem:
            pem.write(current["cert"])
            pem.flush()
            days = _days_left(not_after(self.runner, Path(pem.name)), now)
        if days >= RENEW_AT_DAYS:
            return False
        log(LOG, 30, "renewing the lifecycle Lambda's etcd client certificate", days_left=round(days, 1))
        out = self.settings.state_dir / "lambda-client"
        cert, key = self.kubeadm.create_etcd_client_cert(out, LAMBDA_CLIENT_CN)
        ca = (self.settings.pki_dir / "etcd" / "ca.crt").read_text()
        self.secrets.write_json(secret_name, {"ca": ca, "cert": cert, "key": key})
        shutil.rmtree(out, ignore_errors=True)  # the key lives in Secrets Manager, not on disk
        return True
