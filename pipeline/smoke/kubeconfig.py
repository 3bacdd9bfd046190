"""``python -m pipeline.smoke.kubeconfig``: write a short-lived admin kubeconfig for the pipeline's smoke step.

No secret of the cluster holds a kubeconfig: kubeadm's admin.conf stays on the control-plane nodes. The
cluster's PKI secret (written by the initialising node, see node_agent/secrets.py) holds the cluster CA, so
the step signs a client certificate of its own: a fresh EC key that never leaves the build, valid for
``--ttl`` seconds (default 1 h), subject O=kubeadm:cluster-admins (the group kubeadm binds to cluster-admin
through a ClusterRoleBinding, so unlike system:masters it can be revoked with RBAC) and CN=<cluster>-smoke
(how the API server's audit log names the smoke test).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ADMIN_GROUP = "kubeadm:cluster-admins"
API_PORT = 6443


def client_certificate(
    ca_cert_pem: str, ca_key_pem: str, *, common_name: str, ttl_s: int, now: datetime.datetime | None = None
) -> tuple[str, str]:
    """A client certificate (PEM) signed by the cluster CA and its new private key (PEM)."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem.encode())
    ca_key = serialization.load_pem_private_key(ca_key_pem.encode(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("the cluster CA key is neither RSA nor EC")
    key = ec.generate_private_key(ec.SECP256R1())
    start = (now or datetime.datetime.now(datetime.UTC)) - datetime.timedelta(minutes=5)  # clock skew
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ADMIN_GROUP),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(seconds=ttl_s + 300))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def kubeconfig(*, server: str, ca_cert_pem: str, cert_pem: str, key_pem: str, name: str) -> dict[str, Any]:
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority-data": b64(ca_cert_pem)}}],
        "users": [
            {
                "name": f"{name}-smoke",
                "user": {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)},
            }
        ],
        "contexts": [{"name": name, "context": {"cluster": name, "user": f"{name}-smoke"}}],
        "current-context": name,
    }


def server_url(api_endpoint: str) -> str:
    """The API server URL for the stack output ApiEndpoint (the NLB's DNS name)."""
    if api_endpoint.startswith("https://"):
        return api_endpoint
    return f"https://{api_endpoint}:{API_PORT}"


def write_kubeconfig(path: Path, document: dict[str, Any]) -> None:
    """JSON is YAML: the kubernetes client and kubectl read it. Owner-only from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle)


def main(argv: list[str] | None = None, *, secrets_client: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.smoke.kubeconfig", description=__doc__.splitlines()[0])
    parser.add_argument("--pki-secret", default=os.environ.get("PKI_SECRET_NAME"), help="the cluster PKI secret")
    parser.add_argument("--api-endpoint", default=os.environ.get("API_ENDPOINT"), help="stack output ApiEndpoint")
    parser.add_argument("--cluster-name", default=os.environ.get("CLUSTER_NAME", "cluster"))
    parser.add_argument("--region", default=os.environ.get("CLUSTER_REGION") or os.environ.get("AWS_REGION"))
    parser.add_argument("--ttl", type=int, default=3600, help="certificate lifetime in seconds (60..86400)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.pki_secret or not args.api_endpoint:
        parser.error("need --pki-secret and --api-endpoint (or PKI_SECRET_NAME and API_ENDPOINT)")
    if not 60 <= args.ttl <= 86400:
        parser.error("--ttl must be between 60 and 86400 seconds")
    if secrets_client is None:
        import boto3

        secrets_client = boto3.client("secretsmanager", region_name=args.region)
    pki = json.loads(secrets_client.get_secret_value(SecretId=args.pki_secret)["SecretString"])
    missing = [k for k in ("ca.crt", "ca.key") if "-----BEGIN" not in str(pki.get(k, ""))]
    if missing:
        print(f"kubeconfig FAILED: secret {args.pki_secret} lacks {', '.join(missing)}", file=sys.stderr)
        return 1
    cert, key = client_certificate(
        pki["ca.crt"], pki["ca.key"], common_name=f"{args.cluster_name}-smoke", ttl_s=args.ttl
    )
    document = kubeconfig(
        server=server_url(args.api_endpoint),
        ca_cert_pem=pki["ca.crt"],
        cert_pem=cert,
        key_pem=key,
        name=args.cluster_name,
    )
    write_kubeconfig(args.out, document)
    print(f"wrote {args.out}: {document['clusters'][0]['cluster']['server']}, valid {args.ttl}s, group {ADMIN_GROUP}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
