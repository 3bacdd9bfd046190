"""IAM Roles for Service Accounts: the service-account issuer's public documents and the API server's issuer flags.

STS validates a pod's projected token (audience ``sts.amazonaws.com``) by fetching, anonymously, the issuer's
OIDC discovery document and the JWKS it names. On a self-managed cluster the initialiser publishes both into the
issuer bucket (``stages/irsa.py``: exactly these two objects are publicly readable) from the service-account
public key ``pki/sa.pub`` that kubeadm generated (and that every control-plane node shares through the PKI
secret, so the documents never change while the cluster lives):

* ``keys.json``: one RSA key, ``n``/``e`` base64url without padding, ``kid`` computed as kube-apiserver computes
  the ``kid`` header of the tokens it signs (``pkg/serviceaccount/jwt.go: keyIDFromPublicKey``): base64url
  (no padding) of the SHA-256 of the DER SubjectPublicKeyInfo. STS picks the key by that ``kid``.
* ``.well-known/openid-configuration``: the fields kube-apiserver serves in its own discovery document.

The key is parsed with ``openssl`` through the one :class:`~node_agent.runner.CommandRunner` (stdlib only).

kube-apiserver flags (:func:`api_server_extra_args`, v1beta4 list form, so a flag may repeat):

* ``service-account-issuer`` twice: the issuer URL first (the first one signs every new token), then kubeadm's
  default ``https://kubernetes.default.svc.cluster.local``, which stays *accepted* (later issuers are only
  verified, never used to sign). Costs nothing (the same key verifies both) and keeps every token minted under
  the default valid: the Kubernetes-documented way to move an issuer without breaking running pods.
* ``service-account-jwks-uri``: ``<issuer>/keys.json``, so the API server's own in-cluster discovery document
  points at the published JWKS instead of at itself.
* ``api-audiences``: kubeadm's effective default, ``https://kubernetes.default.svc.cluster.local``, set
  explicitly because an unset flag defaults to the *first issuer*, which would silently change the audience of
  every in-cluster token. ``sts.amazonaws.com`` is deliberately **not** an API audience: the kubelet obtains
  the webhook's STS tokens through the TokenRequest API, which issues any requested audience, so adding it would
  only let a token meant for STS authenticate to the Kubernetes API as well (audience separation lost for no
  gain).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_agent.errors import AgentError
from node_agent.runner import CommandRunner

# The same keys and audience as stages/config.py (the bucket policy and IamStack grant exactly these two keys).
DISCOVERY_KEY = ".well-known/openid-configuration"
JWKS_KEY = "keys.json"
STS_AUDIENCE = "sts.amazonaws.com"
# kubeadm's default issuer (and, through it, the default API audience).
IN_CLUSTER_ISSUER = "https://kubernetes.default.svc.cluster.local"
CONTENT_TYPE = "application/json"
_PEM_BODY = re.compile(r"-----BEGIN PUBLIC KEY-----\s*(?P<body>[A-Za-z0-9+/=\s]+?)\s*-----END PUBLIC KEY-----")
_MODULUS = re.compile(r"^Modulus=(?P<hex>[0-9A-Fa-f]+)\s*$", re.MULTILINE)
_EXPONENT = re.compile(r"^\s*(Public)?Exponent:\s*(?P<value>\d+)", re.MULTILINE)


class IrsaError(AgentError):
    """The service-account public key cannot be read, or the issuer documents cannot be published."""


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unsigned_bytes(value: int) -> bytes:
    """Big-endian, minimal length (RFC 7518 section 6.3.1: no leading zero octets)."""
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


@dataclass(frozen=True)
class RsaPublicKey:
    modulus: int
    exponent: int
    der: bytes  # the DER SubjectPublicKeyInfo

    @property
    def kid(self) -> str:
        """kube-apiserver's key ID: base64url(SHA-256(DER SubjectPublicKeyInfo)), no padding."""
        return b64url(hashlib.sha256(self.der).digest())

    def jwk(self) -> dict[str, str]:
        return {
            "use": "sig",
            "kty": "RSA",
            "kid": self.kid,
            "alg": "RS256",
            "n": b64url(_unsigned_bytes(self.modulus)),
            "e": b64url(_unsigned_bytes(self.exponent)),
        }


def read_public_key(runner: CommandRunner, path: Path) -> RsaPublicKey:
    """Parse an RSA public key PEM (SubjectPublicKeyInfo or PKCS#1) with openssl."""
    spki = runner.run(["openssl", "pkey", "-pubin", "-in", str(path), "-pubout"], timeout=30)
    if not spki.ok:
        raise IrsaError(f"{path}: not a public key openssl can read: {(spki.stderr or spki.stdout).strip()[-200:]}")
    body = _PEM_BODY.search(spki.stdout)
    if body is None:
        raise IrsaError(f"{path}: openssl printed no PUBLIC KEY block")
    der = base64.b64decode("".join(body.group("body").split()))
    text = runner.run(["openssl", "rsa", "-pubin", "-in", str(path), "-noout", "-text", "-modulus"], timeout=30)
    if not text.ok:
        raise IrsaError(f"{path}: not an RSA public key (service-account tokens are signed with RS256)")
    modulus, exponent = _MODULUS.search(text.stdout), _EXPONENT.search(text.stdout)
    if modulus is None or exponent is None:
        raise IrsaError(f"{path}: openssl printed no modulus/exponent")
    return RsaPublicKey(modulus=int(modulus.group("hex"), 16), exponent=int(exponent.group("value")), der=der)


def jwks(key: RsaPublicKey) -> dict[str, Any]:
    return {"keys": [key.jwk()]}


def jwks_uri(issuer_url: str) -> str:
    return f"{issuer_url.rstrip('/')}/{JWKS_KEY}"


def discovery_document(issuer_url: str) -> dict[str, Any]:
    """The fields kube-apiserver serves at ``/.well-known/openid-configuration`` (``iss`` must match exactly)."""
    return {
        "issuer": issuer_url,
        "jwks_uri": jwks_uri(issuer_url),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }


def api_server_extra_args(issuer_url: str) -> list[dict[str, str]]:
    """kube-apiserver ``extraArgs`` (v1beta4 ``{name, value}`` list) for IRSA; empty when IRSA is off."""
    if not issuer_url:
        return []
    pairs = (
        ("service-account-issuer", issuer_url),
        ("service-account-issuer", IN_CLUSTER_ISSUER),
        ("service-account-jwks-uri", jwks_uri(issuer_url)),
        ("api-audiences", IN_CLUSTER_ISSUER),
    )
    return [{"name": name, "value": value} for name, value in pairs]


def with_extra_args(section: dict[str, Any], extra: list[dict[str, str]]) -> dict[str, Any]:
    """``section`` (an apiServer/controllerManager block) with ``extra`` appended to its extraArgs (merged, never
    replaced: the audit settings already live there)."""
    if not extra:
        return section
    return {**section, "extraArgs": [*section.get("extraArgs", []), *extra]}


@dataclass
class IssuerPublisher:
    """Writes the two documents into the issuer bucket (``s3`` is a boto3 S3 client)."""

    runner: CommandRunner
    s3: Any
    bucket: str
    issuer_url: str

    def documents(self, public_key: Path) -> dict[str, bytes]:
        key = read_public_key(self.runner, public_key)
        return {
            DISCOVERY_KEY: json.dumps(discovery_document(self.issuer_url), indent=2).encode(),
            JWKS_KEY: json.dumps(jwks(key), indent=2).encode(),
        }

    def publish(self, public_key: Path) -> dict[str, bytes]:
        """Put both objects (idempotent: the same key always gives the same bytes); returns what was written."""
        documents = self.documents(public_key)
        for name, body in documents.items():
            try:
                self.s3.put_object(Bucket=self.bucket, Key=name, Body=body, ContentType=CONTENT_TYPE)
            except Exception as err:  # botocore errors carry the reason; the caller decides to retry or abandon
                raise IrsaError(f"could not write s3://{self.bucket}/{name}: {err}") from err
        return documents
