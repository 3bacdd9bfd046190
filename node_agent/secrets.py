"""The shared secrets (Secrets Manager, KMS-encrypted): cluster PKI, the Lambda's etcd client cert, worker join.

Shapes (JSON):
* PKI: ``{"ca.crt", "ca.key", "front-proxy-ca.crt", "front-proxy-ca.key", "etcd/ca.crt", "etcd/ca.key",
  "sa.key", "sa.pub"}`` -- keys are paths under kubeadm's certificatesDir, values PEM.
* etcd client: ``{"ca", "cert", "key"}`` (the contract with the etcd lifecycle Lambda).
* worker join: ``{"token", "caCertHash", "expiresAt", "apiEndpoint"}``.

A secret that is missing, unreadable or not in its shape raises :class:`SecretUnreadableError` naming it.
"""

from __future__ import annotations

import json
import os
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
            raise SecretUnreadableError(f"secret {name!r} is not JSON ({err.msg})", not_written_yet=True) from err
        if not isinstance(value, dict):
            raise SecretUnreadableError(f"secret {name!r} is not a JSON object", not_written_yet=True)
        missing = [k for k in required if not isinstance(value.get(k), str) or not value.get(k)]
        if missing:
            raise SecretUnreadableError(f"secret {name!r} lacks {', '.join(missing)}", not_written_yet=True)
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
        bad = [f for f in PKI_FILES if "-----BEGIN" not in pki[f]]
        if bad:
            raise SecretUnreadableError(f"secret {name!r}: {', '.join(bad)} not PEM")
        return {f: pki[f] for f in PKI_FILES}

    def read_join(self, name: str) -> JoinSecret:
        v = self.read_json(name, JOIN_KEYS)
        return JoinSecret(v["token"], v["caCertHash"], v["expiresAt"], v["apiEndpoint"], v.get("kubernetesVersion", ""))

    def write_join(self, name: str, secret: JoinSecret) -> None:
        self.write_json(name, json.loads(secret.to_json()))


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
