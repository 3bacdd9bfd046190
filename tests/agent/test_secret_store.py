"""SecretStore.write_json against moto: create on first write, and a concurrent creator is not an error."""

from __future__ import annotations

import json
from typing import Any

from node_agent.secrets import SecretStore


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
