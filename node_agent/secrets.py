"""The shared secrets (Secrets Manager, KMS-encrypted): cluster PKI, the Lambda's etcd client cert, worker join.

Shapes (JSON):
* PKI: ``{"ca.crt", "ca.key", "front-proxy-ca.crt", "front-proxy-ca.key", "etcd/ca.crt", "etcd/ca.key",
  "sa.key", "sa.pub"}`` -- keys are paths under kubeadm's certificatesDir, values PEM.
* etcd client: ``{"ca", "cert", "key"}`` (the contract with the etcd lifecycle Lambda).
* worker join: ``{"token", "caCertHash", "expiresAt", "apiEndpoint"}``.

A secret that is missing, unreadable or not in its shape raises :class:`SecretUnreadableError` naming it.
Only a secret with no value yet is "not written yet" (the stack creates them empty: ``GetSecretValue`` answers
``ResourceNotFoundException`` until the first ``PutSecretValue``, AWS::SecretsManager::Secret reference); a value
that is not JSON or not the shape is corrupt, and waiting would not mend it.

PKI values are parsed, not only searched for a header (:func:`check_pem`): the agent is stdlib-only (it vendors
pure-Python packages only, imagebuilder/bundle.py), and reading a secret must not need the command runner, so
each PEM block is decoded (strict base64) and walked as DER (RFC 7468 textual encoding over X.690 DER): an
outer SEQUENCE whose TLVs nest and add up exactly, with the label the file needs (a certificate's three-part
SEQUENCE ending in its signature BIT STRING, a key's version INTEGER). Garbage between correct headers fails
that; a key that is well-formed but wrong is for kubeadm and openssl to find.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from node_agent.errors import SecretUnreadableError

PKI_FILES = (
    "ca.crt",
    "ca.key",
    "front-proxy-ca.crt",
    "front-proxy-ca.key",
    "etcd/ca.crt",
    "etcd/ca.key",
    "sa.key",
    "sa.pub",
)
_PRIVATE = (".key",)
JOIN_KEYS = ("token", "caCertHash", "expiresAt", "apiEndpoint")
ETCD_CLIENT_KEYS = ("ca", "cert", "key")


@dataclass(frozen=True)
class JoinSecret:
    token: str
    ca_cert_hash: str
    expires_at: str
    api_endpoint: str
    # The cluster's recorded Kubernetes version: workers (which may not read the cluster-state table) check their
    # own against it before joining. "" in a secret written by an older agent: the check is skipped.
    kubernetes_version: str = ""

    def to_json(self) -> str:
        value = {"token": self.token, "caCertHash": self.ca_cert_hash, "expiresAt": self.expires_at,
                 "apiEndpoint": self.api_endpoint}  # fmt: skip
        if self.kubernetes_version:
            value["kubernetesVersion"] = self.kubernetes_version
        return json.dumps(value)

    @property
    def token_id(self) -> str:
        return self.token.split(".", 1)[0]


class SecretStore:
    def __init__(self, client: Any, kms_key_id: str = "", tags: dict[str, str] | None = None) -> None:
        self.client = client
        self.kms_key_id = kms_key_id
        self.tags = tags or {}

    def read_json(self, name: str, required: tuple[str, ...]) -> dict[str, str]:
        try:
            raw = self.client.get_secret_value(SecretId=name)["SecretString"]
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            raise SecretUnreadableError(
                f"secret {name!r} cannot be read: {err}", not_written_yet=code == "ResourceNotFoundException"
            ) from err
        except (BotoCoreError, KeyError) as err:
            raise SecretUnreadableError(f"secret {name!r} cannot be read: {err}") from err
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as err:
            raise SecretUnreadableError(f"secret {name!r} is corrupt: not JSON ({err.msg})") from err
        if not isinstance(value, dict):
            raise SecretUnreadableError(f"secret {name!r} is corrupt: not a JSON object")
        missing = [k for k in required if not isinstance(value.get(k), str) or not value.get(k)]
        if missing:
            raise SecretUnreadableError(f"secret {name!r} is corrupt: lacks {', '.join(missing)}")
        return {k: str(v) for k, v in value.items()}

    def holds(self, name: str, required: tuple[str, ...]) -> bool:
        """Has the agent written this secret (JSON of the expected shape, not the stack's placeholder)?"""
        try:
            self.read_json(name, required)
        except SecretUnreadableError:
            return False
        return True

    def write_json(self, name: str, value: dict[str, str]) -> None:
        text = json.dumps(value, sort_keys=True)
        try:
            self.client.put_secret_value(SecretId=name, SecretString=text)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                raise
            args: dict[str, Any] = {"Name": name, "SecretString": text}
            if self.kms_key_id:
                args["KmsKeyId"] = self.kms_key_id
            if self.tags:
                args["Tags"] = [{"Key": k, "Value": v} for k, v in self.tags.items()]
            try:
                self.client.create_secret(**args)
            except ClientError as create_err:
                # Someone created it between our put and our create: it exists now, so put our value.
                if create_err.response.get("Error", {}).get("Code") != "ResourceExistsException":
                    raise
                self.client.put_secret_value(SecretId=name, SecretString=text)

    # -- typed helpers -----------------------------------------------------------------------------
    def read_pki(self, name: str) -> dict[str, str]:
        pki = self.read_json(name, PKI_FILES)
        bad = [f"{f} ({problem})" for f in PKI_FILES if (problem := check_pem(f, pki[f])) is not None]
        if bad:
            raise SecretUnreadableError(f"secret {name!r}: {'; '.join(bad)}")
        return {f: pki[f] for f in PKI_FILES}

    def read_join(self, name: str) -> JoinSecret:
        v = self.read_json(name, JOIN_KEYS)
        return JoinSecret(v["token"], v["caCertHash"], v["expiresAt"], v["apiEndpoint"], v.get("kubernetesVersion", ""))

    def write_join(self, name: str, secret: JoinSecret) -> None:
        self.write_json(name, json.loads(secret.to_json()))


_PEM_BLOCK = re.compile(r"-----BEGIN (?P<label>[A-Z0-9 ]+)-----\s*(?P<body>[A-Za-z0-9+/=\s]*?)-----END (?P=label)-----")
# What each file of kubeadm's certificatesDir holds: certificates, private keys (PKCS#8, PKCS#1 or SEC1), sa.pub.
_LABELS = {
    ".crt": ("CERTIFICATE",),
    ".key": ("PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"),
    ".pub": ("PUBLIC KEY", "RSA PUBLIC KEY"),
}
_SEQUENCE, _INTEGER, _BIT_STRING = 0x30, 0x02, 0x03


def check_pem(rel: str, text: str) -> str | None:
    """None when ``text`` is one well-formed PEM block of the kind ``rel`` needs; else what is wrong."""
    labels = next((v for suffix, v in _LABELS.items() if rel.endswith(suffix)), ())
    blocks = list(_PEM_BLOCK.finditer(text))
    if len(blocks) != 1:
        return f"{len(blocks)} PEM blocks, expected 1"
    block = blocks[0]
    if block["label"] not in labels:
        return f"a {block['label']} block, expected {' or '.join(labels)}"
    try:
        der = base64.b64decode("".join(block["body"].split()), validate=True)
    except (binascii.Error, ValueError) as err:
        return f"base64 does not decode ({err})"
    try:
        children = _der_children(der, 0, len(der), top=True)
    except ValueError as err:
        return f"not DER ({err})"
    return _shape_problem(block["label"], [tag for tag, _, _ in children])


def _shape_problem(label: str, tags: list[int]) -> str | None:
    if label == "CERTIFICATE" and tags != [_SEQUENCE, _SEQUENCE, _BIT_STRING]:
        return "not an X.509 certificate (tbsCertificate, signatureAlgorithm, signature)"
    if "PRIVATE" in label and (not tags or tags[0] != _INTEGER):
        return "not a private key (no version INTEGER)"
    return None


def _der_children(der: bytes, start: int, end: int, *, top: bool = False) -> list[tuple[int, int, int]]:
    """The TLVs in der[start:end] (tag, value start, value end), descending into constructed ones; at the top,
    exactly one SEQUENCE spanning every byte."""
    out: list[tuple[int, int, int]] = []
    pos = start
    while pos < end:
        tag = der[pos]
        if tag & 0x1F == 0x1F:
            raise ValueError(f"multi-byte tag at {pos}")
        if pos + 1 >= end:
            raise ValueError(f"no length at {pos + 1}")
        first = der[pos + 1]
        pos += 2
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            if count == 0 or count > 4 or pos + count > end:
                raise ValueError(f"bad length encoding at {pos - 1}")
            length = int.from_bytes(der[pos : pos + count], "big")
            pos += count
        if pos + length > end:
            raise ValueError(f"element at {pos} runs {pos + length - end} bytes past its container")
        if tag & 0x20:
            _der_children(der, pos, pos + length)
        out.append((tag, pos, pos + length))
        pos += length
    if top:
        if len(out) != 1 or out[0][0] != _SEQUENCE:
            raise ValueError("not one SEQUENCE")
        return _der_children(der, out[0][1], out[0][2])
    return out


def read_pki_from_disk(pki_dir: Path) -> dict[str, str]:
    try:
        return {f: (pki_dir / f).read_text() for f in PKI_FILES}
    except OSError as err:
        raise SecretUnreadableError(f"kubeadm did not leave the shared PKI in {pki_dir}: {err}") from err


def place_pki_on_disk(pki: dict[str, str], pki_dir: Path) -> None:
    """Write the shared CAs and SA keys where kubeadm looks, so ``kubeadm join`` needs no certificate key."""
    for rel, pem in pki.items():
        path = pki_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pem)
        os.chmod(path, 0o600 if rel.endswith(_PRIVATE) else 0o644)
