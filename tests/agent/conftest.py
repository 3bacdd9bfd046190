"""Fixtures for the node agent tests: moto in-process AWS and a valid agent configuration."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from node_agent.config import AgentConfig

REGION = "eu-west-1"


class Serialized:
    """A boto3 client whose calls run one at a time.

    Real DynamoDB applies each conditional write atomically; moto's in-process backend checks the
    condition and writes without a lock, so two threads can both "win". Serializing calls restores the
    per-item atomicity the election relies on (measured: without this, 1 in ~10 runs of 8 contending
    threads had two winners in moto).
    """

    _lock = threading.RLock()

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with Serialized._lock:
                return attr(*args, **kwargs)

        return call


def config_values(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "clusterName": "demo",
        "role": "control-plane",
        "region": REGION,
        "kubernetesVersion": "1.34.2",
        "apiEndpoint": "dk8s-demo-api-0123456789.elb.eu-west-1.amazonaws.com",
        "apiPort": 6443,
        "clusterStateTable": "dk8s-demo-cluster-state",
        "snapshotBucket": "dk8s-demo-etcd-snapshots-123456789012-eu-west-1",
        "kmsKeyId": "arn:aws:kms:eu-west-1:123456789012:key/11111111-2222-3333-4444-555555555555",
        "pkiSecretName": "dedicated-k8s/demo/pki",
        "etcdClientSecretName": "dedicated-k8s/demo/etcd-client",
        "joinSecretName": "dedicated-k8s/demo/worker-join",
        "snapshotIntervalMinutes": 30,
        "snapshotRetentionDays": 7,
        "launchHookName": "dk8s-demo-launch",
        "podCidr": "10.244.0.0/16",
        "serviceCidr": "10.96.0.0/12",
        "kubeClientSecretName": "dedicated-k8s/demo/lifecycle-kube-client",
        "terminationHandlerQueueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/dk8s-demo-termination-handler",
        "vpcCidr": "10.40.0.0/16",
    }
    values.update(overrides)
    return values


@pytest.fixture
def agent_config() -> AgentConfig:
    return AgentConfig.from_mapping(config_values())


@pytest.fixture
def aws() -> Iterator[dict[str, Any]]:
    """moto with the cluster-state table, the snapshot bucket and a KMS key; yields boto3 clients."""
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with mock_aws():
            ddb = boto3.client("dynamodb", region_name=REGION)
            ddb.create_table(
                TableName="dk8s-demo-cluster-state",
                KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
                AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                BillingMode="PAY_PER_REQUEST",
            )
            s3 = boto3.client("s3", region_name=REGION)
            s3.create_bucket(
                Bucket="dk8s-demo-etcd-snapshots-123456789012-eu-west-1",
                CreateBucketConfiguration={"LocationConstraint": REGION},
            )
            kms = boto3.client("kms", region_name=REGION)
            key_id = kms.create_key()["KeyMetadata"]["Arn"]
            secrets = boto3.client("secretsmanager", region_name=REGION)
            for name in ("dedicated-k8s/demo/pki", "dedicated-k8s/demo/etcd-client", "dedicated-k8s/demo/worker-join"):
                # As the stack creates them (stages/cluster_state.py): KMS-encrypted and EMPTY (no version, so
                # GetSecretValue answers ResourceNotFoundException until the agent's first PutSecretValue).
                secrets.create_secret(Name=name, KmsKeyId=key_id)
            yield {
                "dynamodb": Serialized(ddb),
                "s3": s3,
                "kms": kms,
                "kms_key_id": key_id,
                "secretsmanager": Serialized(secrets),
                "ec2": boto3.client("ec2", region_name=REGION),
                "autoscaling": boto3.client("autoscaling", region_name=REGION),
            }
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def nodes() -> Iterator[list[Any]]:
    """A list for the :class:`~tests.agent.harness.EmulatedNode` s a test starts: every node is discarded at
    teardown (etcd killed, its data dir deleted), whether the test passed or failed."""
    started: list[Any] = []
    yield started
    for node in started:
        node.discard()
