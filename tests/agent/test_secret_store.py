"""SecretStore against moto: create on first write, a concurrent creator is not an error; what is read is checked
(an empty secret is "not written yet", a corrupt one is not; PKI PEM must parse as the file's kind)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from node_agent.config import AgentConfig
from node_agent.errors import SecretUnreadableError
from node_agent.secrets import SecretStore, read_pki_from_disk
from tests.agent.conftest import config_values
from tests.agent.harness import EmulatedNode
from tests.agent.kubeadm_emulator import SimulatedApiServer, make_ca

PKI = "dedicated-k8s/demo/pki"


class RacingClient:
    """moto's client, except that another writer creates the secret between our put and our create."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.creates = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def create_secret(self, **kwargs: Any) -> Any:
        self.creates += 1
        self.client.create_secret(Name=kwargs["Name"], SecretString=json.dumps({"from": "the other writer"}))
        return self.client.create_secret(**kwargs)  # moto: ResourceExistsException


def test_first_write_creates_the_secret_with_the_key(aws: dict[str, Any]) -> None:
    store = SecretStore(aws["secretsmanager"], kms_key_id=aws["kms_key_id"])
    store.write_json("new/secret", {"a": "1"})
    assert store.read_json("new/secret", ("a",)) == {"a": "1"}
    described = aws["secretsmanager"].describe_secret(SecretId="new/secret")
    assert described["KmsKeyId"] == aws["kms_key_id"]


def test_a_concurrent_creator_does_not_fail_the_write_and_ours_wins(aws: dict[str, Any]) -> None:
    racing = RacingClient(aws["secretsmanager"])
    store = SecretStore(racing, kms_key_id=aws["kms_key_id"])
    store.write_json("raced/secret", {"mine": "yes"})
    assert racing.creates == 1
    assert store.read_json("raced/secret", ("mine",)) == {"mine": "yes"}


# -- what is read is checked: corrupt is not "not written yet", PEM must parse ----------------------------------


@pytest.fixture(scope="module")
def real_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """kubeadm's shared PKI as the emulator's certs phase makes it with openssl (EC CAs, PKCS#8 keys, SPKI sa.pub)."""
    pki = tmp_path_factory.mktemp("pki")
    for cert, key, cn in (("ca.crt", "ca.key", "kubernetes"), ("front-proxy-ca.crt", "front-proxy-ca.key", "fp"),
                          ("etcd/ca.crt", "etcd/ca.key", "etcd-ca")):  # fmt: skip
        make_ca(pki / cert, pki / key, cn)
    ec = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    subprocess.run(["openssl", "genpkey", *ec, "-out", str(pki / "sa.key")], check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub")],
                   check=True, capture_output=True)  # fmt: skip
    return read_pki_from_disk(pki)


def _garbage_between_headers(pem: str) -> str:
    label = pem.split("-----")[1].removeprefix("BEGIN ")
    body = base64.b64encode(bytes(range(256)) * 2).decode()
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def _truncated(pem: str) -> str:
    lines = pem.strip().splitlines()
    return "\n".join([*lines[:-2], lines[-1]]) + "\n"  # the last body line gone: an incomplete DER


def test_a_real_kubeadm_pki_reads_back(aws: dict[str, Any], real_pki: dict[str, str]) -> None:
    store = SecretStore(aws["secretsmanager"])
    store.write_json(PKI, real_pki)
    assert store.read_pki(PKI) == real_pki


@pytest.mark.parametrize("damage", [_garbage_between_headers, _truncated], ids=["garbage", "truncated"])
@pytest.mark.parametrize("file", ["ca.crt", "etcd/ca.key", "sa.pub"])
def test_a_pem_with_the_right_headers_that_does_not_parse_is_refused_naming_secret_and_file(
    aws: dict[str, Any], real_pki: dict[str, str], file: str, damage: Callable[[str], str]
) -> None:
    """kubeadm would fail on it later ("failed to load certificate": certutil/keyutil parse the PEM's DER)."""
    store = SecretStore(aws["secretsmanager"])
    store.write_json(PKI, {**real_pki, file: damage(real_pki[file])})
    with pytest.raises(SecretUnreadableError, match=rf"{PKI}.*{re.escape(file)}") as err:
        store.read_pki(PKI)
    assert not err.value.not_written_yet


def test_a_key_in_the_certificates_place_is_refused(aws: dict[str, Any], real_pki: dict[str, str]) -> None:
    store = SecretStore(aws["secretsmanager"])
    store.write_json(PKI, {**real_pki, "ca.crt": real_pki["ca.key"]})
    with pytest.raises(SecretUnreadableError, match=re.escape("ca.crt (a PRIVATE KEY block, expected CERTIFICATE")):
        store.read_pki(PKI)


def test_a_secret_with_no_value_yet_is_not_written_yet(aws: dict[str, Any]) -> None:
    """The stack creates the secrets empty; GetSecretValue answers ResourceNotFoundException until a value is put
    (AWS::SecretsManager::Secret: "If you omit both GenerateSecretString and SecretString, you create an empty
    secret"; GetSecretValue errors: ResourceNotFoundException)."""
    aws["secretsmanager"].create_secret(Name="empty/join")
    with pytest.raises(SecretUnreadableError) as err:
        SecretStore(aws["secretsmanager"]).read_join("empty/join")
    assert err.value.not_written_yet


@pytest.mark.parametrize(
    "value",
    ['{"token": "abcdef.0123456789abcdef", "caCertHash": "sha2', '["token"]', '{"token": "abcdef.0123456789abcdef"}'],
    ids=["truncated JSON", "not an object", "wrong shape"],
)
def test_a_corrupt_join_secret_is_corrupt_not_not_written_yet(aws: dict[str, Any], value: str) -> None:
    aws["secretsmanager"].create_secret(Name="bad/join", SecretString=value)
    with pytest.raises(SecretUnreadableError, match="'bad/join' is corrupt") as err:
        SecretStore(aws["secretsmanager"]).read_join("bad/join")
    assert not err.value.not_written_yet


def test_a_worker_whose_join_secret_is_corrupt_abandons_at_once_naming_it(aws: dict[str, Any], tmp_path: Path) -> None:
    cfg = AgentConfig.from_mapping(config_values(role="worker"))
    aws["secretsmanager"].put_secret_value(SecretId=cfg.join_secret_name, SecretString='{"token": "abc')
    worker = EmulatedNode(aws, tmp_path, SimulatedApiServer(), cfg)
    try:
        started = time.monotonic()
        outcome = worker.agent.run_launch()
    finally:
        worker.runner.kill()
    assert not outcome.ok and cfg.join_secret_name in outcome.reason and "corrupt" in outcome.reason
    assert time.monotonic() - started < 5, "corrupt is not waited for (the join deadline is 30 s here)"
    assert worker.hook.calls == [("ABANDON", outcome.reason)] and worker.runner.calls == []
