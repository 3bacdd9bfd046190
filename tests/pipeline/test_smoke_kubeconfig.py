"""The pipeline's smoke kubeconfig: a short-lived client certificate signed by the cluster CA from the PKI secret.

End to end: the minted kubeconfig authenticates the real kubernetes client to a fake API server that serves
HTTPS with a certificate of the same CA and requires a client certificate, as the API server does.
"""

from __future__ import annotations

import base64
import datetime
import io
import ipaddress
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pipeline.smoke.__main__ import main as smoke_main
from pipeline.smoke.kubeconfig import ADMIN_GROUP, server_url
from pipeline.smoke.kubeconfig import main as kubeconfig_main
from tests.pipeline.fake_kube_api import Scenario, serve

NOW = datetime.datetime.now(datetime.UTC)


def _pem_key(key: Any) -> str:
    return str(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ).decode()
    )


def _ca() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """Like kubeadm's: an RSA CA named "kubernetes"."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ca_key, ca_cert = _ca()
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(2)
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("pki")
    files = {
        "server.crt": server_cert.public_bytes(serialization.Encoding.PEM).decode(),
        "server.key": _pem_key(server_key),
        "ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM).decode(),
    }
    for name, text in files.items():
        (directory / name).write_text(text)
    secret = {"ca.crt": files["ca.crt"], "ca.key": _pem_key(ca_key), "sa.key": "-----BEGIN unused"}
    return {"dir": directory, "secret": secret, "ca_cert": ca_cert}


class SecretsStub:
    def __init__(self, values: dict[str, dict[str, str]]) -> None:
        self.values = values
        self.asked: list[str] = []

    def get_secret_value(self, *, SecretId: str) -> dict[str, str]:  # noqa: N803 (boto3's parameter name)
        self.asked.append(SecretId)
        return {"SecretString": json.dumps(self.values[SecretId])}


def mint(tmp_path: Path, pki: dict[str, Any], endpoint: str, *extra: str) -> tuple[int, Path, SecretsStub]:
    stub = SecretsStub({"k8s-staging/pki": pki["secret"]})
    out = tmp_path / "smoke" / "kubeconfig"
    argv = ["--pki-secret", "k8s-staging/pki", "--api-endpoint", endpoint, "--cluster-name", "k8s-staging"]
    code = kubeconfig_main([*argv, "--out", str(out), *extra], secrets_client=stub)
    return code, out, stub


def test_the_minted_kubeconfig_authenticates_the_smoke_test_over_mutual_tls(
    tmp_path: Path, pki: dict[str, Any]
) -> None:
    tls = (pki["dir"] / "server.crt", pki["dir"] / "server.key", pki["dir"] / "ca.crt")
    with serve(Scenario(), tmp_path, tls=tls) as (api, token_kubeconfig):
        server = json.loads(token_kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        code, kubeconfig, stub = mint(tmp_path, pki, server)
        assert code == 0
        out, err = io.StringIO(), io.StringIO()
        smoke_code = smoke_main(
            ["--kubeconfig", str(kubeconfig), "--expect-workers", "2", "--poll-interval", "0.02", "--skip-irsa"],
            stdout=out,
            stderr=err,
        )
    assert smoke_code == 0, err.getvalue()
    assert stub.asked == ["k8s-staging/pki"]
    # Every request came with the minted certificate (the bearer token of the other kubeconfig was never used).
    assert len(api.client_subjects) == len(api.requests) > 0
    assert {tuple(sorted(s.items())) for s in api.client_subjects} == {
        (("commonName", "k8s-staging-smoke"), ("organizationName", ADMIN_GROUP))
    }


def test_the_client_certificate_is_short_lived_and_for_client_auth_only(tmp_path: Path, pki: dict[str, Any]) -> None:
    code, path, _ = mint(
        tmp_path, pki, "internal-k8s-staging-api-0123456789.elb.us-east-1.amazonaws.com", "--ttl", "900"
    )
    assert code == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    assert document["clusters"][0]["cluster"]["server"] == (
        "https://internal-k8s-staging-api-0123456789.elb.us-east-1.amazonaws.com:6443"
    )
    user = document["users"][0]["user"]
    cert = x509.load_pem_x509_certificate(base64.b64decode(user["client-certificate-data"]))
    cert.verify_directly_issued_by(pki["ca_cert"])
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime <= datetime.timedelta(seconds=900 + 600)
    assert cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=900 + 300)
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    # The CA's own key is not in the kubeconfig: only the new client key.
    assert "ca.key" not in path.read_text()
    key = serialization.load_pem_private_key(base64.b64decode(user["client-key-data"]), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]


def test_a_pki_secret_without_the_ca_key_is_refused(
    tmp_path: Path, pki: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    broken = {**pki, "secret": {"ca.crt": pki["secret"]["ca.crt"]}}
    code, path, _ = mint(tmp_path, broken, "api.example.internal")
    assert code == 1
    assert not path.exists()
    assert "secret k8s-staging/pki lacks ca.key" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [("api.example.internal", "https://api.example.internal:6443"), ("https://10.0.0.5:6443", "https://10.0.0.5:6443")],
)
def test_the_server_url_comes_from_the_api_endpoint_output(endpoint: str, url: str) -> None:
    assert server_url(endpoint) == url
