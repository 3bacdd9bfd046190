"""The certificate timer on real certificates made by openssl: expiry metrics, renewal well before expiry with
a static-pod restart, and the Lambda's etcd client certificate renewed and written back to Secrets Manager.

kubeadm cannot run here: ``kubeadm certs renew all`` is performed by :class:`KubeadmCertsStandIn`, which
re-issues every leaf certificate from the same CA with a year's validity, as kubeadm does.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from node_agent import bootstrap
from node_agent.certs import KUBECONFIGS, LAMBDA_CLIENT_CN, LEAF_CERTIFICATES, CertificateTimer, not_after
from node_agent.config import AgentConfig, AgentSettings
from node_agent.log import Metrics
from node_agent.runner import CommandResult
from node_agent.secrets import SecretStore

EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")  # fast to generate, unlike RSA


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ca(directory: Path, name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", *EC_KEY, "-nodes", "-keyout", str(directory / f"{name}.key"),
             "-out", str(directory / f"{name}.crt"), "-subj", f"/CN={name}", "-days", "3650")  # fmt: skip


def _leaf(pki: Path, rel: str, days: int) -> None:
    ca_dir = pki / "etcd" if rel.startswith("etcd/") else pki
    out = pki / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    key, csr = out.with_suffix(".key"), out.with_suffix(".csr")
    _openssl("req", "-new", *EC_KEY, "-nodes", "-keyout", str(key), "-subj", f"/CN={out.stem}",
             "-out", str(csr))  # fmt: skip
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_dir / "ca.crt"), "-CAkey", str(ca_dir / "ca.key"),
             "-CAcreateserial", "-days", str(days), "-out", str(out))  # fmt: skip


def _kubeconfig(kubernetes_dir: Path, name: str, cert: Path) -> None:
    data = base64.b64encode(cert.read_bytes()).decode()
    (kubernetes_dir / name).write_text(
        f"apiVersion: v1\nusers:\n- name: x\n  user:\n    client-certificate-data: {data}\n"
    )


class KubeadmCertsStandIn:
    """Runs openssl for real; performs ``kubeadm certs renew all`` (re-issue every leaf for 365 days)."""

    def __init__(self, pki: Path, kubernetes_dir: Path) -> None:
        self.pki, self.kubernetes_dir = pki, kubernetes_dir
        self.calls: list[list[str]] = []

    def run(self, argv: Sequence[str], **_: Any) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        if argv[:4] == ["kubeadm", "certs", "renew", "all"]:
            for rel in LEAF_CERTIFICATES:
                _leaf(self.pki, rel, 365)
            for name in KUBECONFIGS:
                if (self.kubernetes_dir / name).exists():
                    _leaf(self.pki, f"kubeconfig-{name}.crt", 365)
                    _kubeconfig(self.kubernetes_dir, name, self.pki / f"kubeconfig-{name}.crt")
            return CommandResult(tuple(argv), 0, "certificates renewed\n", "")
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        return CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def node(tmp_path: Path, aws: dict[str, Any], agent_config: AgentConfig) -> dict[str, Any]:
    settings = AgentSettings(kubernetes_dir=tmp_path / "k8s", state_dir=tmp_path / "state")
    pki = settings.pki_dir
    _ca(pki, "ca")
    _ca(pki / "etcd", "ca")
    manifests = settings.kubernetes_dir / "manifests"
    manifests.mkdir(parents=True)
    for pod in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd"):
        (manifests / f"{pod}.yaml").write_text(f"kind: Pod\nmetadata:\n  name: {pod}\n")
    store = SecretStore(aws["secretsmanager"], kms_key_id=aws["kms_key_id"])
    runner = KubeadmCertsStandIn(pki, settings.kubernetes_dir)
    stream = io.StringIO()
    timer = CertificateTimer(agent_config, settings, runner, store, Metrics("demo", stream),
                             sleep=lambda _: None)  # fmt: skip
    return {"settings": settings, "pki": pki, "runner": runner, "timer": timer, "store": store, "stream": stream}


def _issue_all(node: dict[str, Any], days: int, kubeconfig_days: int | None = None) -> None:
    for rel in LEAF_CERTIFICATES:
        _leaf(node["pki"], rel, days)
    _leaf(node["pki"], "kubeconfig-admin.conf.crt", kubeconfig_days or days)
    _kubeconfig(node["settings"].kubernetes_dir, "admin.conf", node["pki"] / "kubeconfig-admin.conf.crt")


def _lambda_secret(node: dict[str, Any], agent_config: AgentConfig, days: int) -> str:
    _leaf(node["pki"], "etcd/lambda-old.crt", days)
    cert = (node["pki"] / "etcd" / "lambda-old.crt").read_text()
    value = {"ca": "x", "cert": cert, "key": "k"}
    node["store"].write_json(agent_config.etcd_client_secret_name, value)
    return cert


def _metrics(stream: io.StringIO) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in stream.getvalue().splitlines():
        doc = json.loads(line)
        name = doc["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Name"]
        out[name] = doc[name]
    return out


def test_fresh_certificates_are_reported_and_left_alone(node: dict[str, Any], agent_config: AgentConfig) -> None:
    _issue_all(node, 365)
    _lambda_secret(node, agent_config, 365)
    report = node["timer"].run_once(etcd_leader=True)
    assert not report.renewed_node_certificates and not report.renewed_lambda_client
    assert node["runner"].calls and not [c for c in node["runner"].calls if c[0] == "kubeadm"]
    metrics = _metrics(node["stream"])
    assert 3640 < metrics["ClusterCaExpiryDays"] <= 3650
    assert 363 < metrics["CertificateExpiryDays"] <= 365
    assert sorted(p.name for p in (node["settings"].kubernetes_dir / "manifests").iterdir())[0] == "etcd.yaml"


def test_a_certificate_near_expiry_renews_all_and_restarts_the_static_pods(
    node: dict[str, Any], agent_config: AgentConfig
) -> None:
    _issue_all(node, 365)
    _leaf(node["pki"], "etcd/peer.crt", 40)  # one certificate under the 90-day threshold
    _lambda_secret(node, agent_config, 365)
    moves: list[list[str]] = []
    manifests = node["settings"].kubernetes_dir / "manifests"
    node["timer"].sleep = lambda _: moves.append(sorted(p.name for p in manifests.iterdir()))
    report = node["timer"].run_once(etcd_leader=False)
    assert report.renewed_node_certificates and report.soonest != "etcd/peer.crt"
    assert [c for c in node["runner"].calls if c[0] == "kubeadm"] == [["kubeadm", "certs", "renew", "all"]]
    assert moves == [[]], "the kubelet saw no manifests while the pods stopped"
    assert len(list(manifests.iterdir())) == 4, "every manifest is back"
    assert _metrics(node["stream"])["CertificateExpiryDays"] > 360, "the metric reports the renewed certificates"


def test_an_expiring_kubeconfig_client_certificate_also_triggers_renewal(
    node: dict[str, Any], agent_config: AgentConfig
) -> None:
    _issue_all(node, 365, kubeconfig_days=20)
    _lambda_secret(node, agent_config, 365)
    report = node["timer"].run_once(etcd_leader=False)
    assert report.renewed_node_certificates


def test_the_leader_renews_the_lambdas_etcd_client_certificate_into_secrets_manager(
    node: dict[str, Any], agent_config: AgentConfig
) -> None:
    _issue_all(node, 365)
    old = _lambda_secret(node, agent_config, 30)
    report = node["timer"].run_once(etcd_leader=True)
    assert report.renewed_lambda_client
    value = node["store"].read_json(agent_config.etcd_client_secret_name, ("ca", "cert", "key"))
    assert value["cert"] != old and "PRIVATE KEY" in value["key"]
    assert value["ca"] == (node["pki"] / "etcd" / "ca.crt").read_text()
    renewed = node["settings"].state_dir / "renewed.crt"
    renewed.write_text(value["cert"])
    subject = subprocess.run(["openssl", "x509", "-in", str(renewed), "-noout", "-subject"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert LAMBDA_CLIENT_CN in subject
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(node["pki"] / "etcd" / "ca.crt"), str(renewed)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert not (node["settings"].state_dir / "lambda-client").exists(), "the private key is not left on disk"


def test_only_the_leader_touches_the_shared_lambda_certificate(node: dict[str, Any], agent_config: AgentConfig) -> None:
    _issue_all(node, 365)
    old = _lambda_secret(node, agent_config, 30)
    assert not node["timer"].run_once(etcd_leader=False).renewed_lambda_client
    assert node["store"].read_json(agent_config.etcd_client_secret_name, ("ca", "cert", "key"))["cert"] == old


def test_the_lambda_certificate_name_is_the_one_bootstrap_issues() -> None:
    assert LAMBDA_CLIENT_CN == bootstrap.ETCD_CLIENT_CN


def test_not_after_reads_openssls_date(node: dict[str, Any]) -> None:
    _leaf(node["pki"], "apiserver.crt", 10)
    expiry = not_after(node["runner"], node["pki"] / "apiserver.crt")
    assert expiry.tzinfo is not None and expiry.year >= 2026
