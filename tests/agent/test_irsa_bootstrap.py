"""IRSA through the real initialiser (kubeadm emulated on real etcd, moto S3): the cluster's own service-account
key is published as the issuer's JWKS, the uploaded ClusterConfiguration carries the issuer flags, and the pod
identity webhook is applied with the cluster CA as its caBundle. With IRSA off none of it happens."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from node_agent.config import AgentConfig
from node_agent.irsa import DISCOVERY_KEY, IN_CLUSTER_ISSUER, JWKS_KEY, read_public_key
from node_agent.runner import SubprocessRunner
from tests.agent.conftest import REGION, config_values
from tests.agent.harness import EmulatedNode
from tests.agent.kubeadm_emulator import KUBEADM_CONFIG, SimulatedApiServer

BUCKET = f"dk8s-demo-irsa-oidc-123456789012-{REGION}"
ISSUER = f"https://{BUCKET}.s3.{REGION}.amazonaws.com"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], capture_output=True, check=True, timeout=60)


def uploaded_api_server(api: SimulatedApiServer) -> dict[str, Any]:
    cluster = yaml.safe_load(json.loads(api.objects[KUBEADM_CONFIG])["data"]["ClusterConfiguration"])
    return dict(cluster["apiServer"])


@pytest.mark.etcd
def test_init_publishes_the_clusters_key_configures_the_issuer_and_applies_the_webhook(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    aws["s3"].create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    cfg = AgentConfig.from_mapping(config_values(irsaIssuerUrl=ISSUER, irsaBucket=BUCKET))
    api = SimulatedApiServer()
    node = EmulatedNode(aws, tmp_path, api, cfg)
    nodes.append(node)
    # kubeadm's default service-account key is RSA 2048 (the emulator would make an EC key; like kubeadm, it keeps a
    # key already on disk).
    pki = node.settings.pki_dir
    pki.mkdir(parents=True, exist_ok=True)
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(pki / "sa.key"))
    openssl("pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
    assert node.agent.run_launch().action == "initialised", node.hook.calls

    keys = sorted(o["Key"] for o in aws["s3"].list_objects_v2(Bucket=BUCKET)["Contents"])
    assert keys == sorted([DISCOVERY_KEY, JWKS_KEY])
    published = json.loads(aws["s3"].get_object(Bucket=BUCKET, Key=JWKS_KEY)["Body"].read())
    own_key = read_public_key(SubprocessRunner(), node.settings.pki_dir / "sa.pub")
    assert published == {"keys": [own_key.jwk()]}, "the JWKS is this cluster's service-account key"
    discovery = json.loads(aws["s3"].get_object(Bucket=BUCKET, Key=DISCOVERY_KEY)["Body"].read())
    assert discovery["issuer"] == ISSUER and discovery["jwks_uri"] == f"{ISSUER}/keys.json"

    args = uploaded_api_server(api)["extraArgs"]
    issuers = [a["value"] for a in args if a["name"] == "service-account-issuer"]
    assert issuers == [ISSUER, IN_CLUSTER_ISSUER]
    assert {"name": "audit-log-format", "value": "json"} in args, "merged with the audit settings"

    applied = {(d["kind"], d["metadata"]["name"]): d for d in node.runner.applied}
    hook = applied[("MutatingWebhookConfiguration", "pod-identity-webhook")]
    ca_bundle = base64.b64decode(hook["webhooks"][0]["clientConfig"]["caBundle"]).decode()
    assert ca_bundle == (node.settings.pki_dir / "ca.crt").read_text()
    assert ("Deployment", "pod-identity-webhook") in applied and ("Secret", "pod-identity-webhook-cert") in applied
    assert ("Deployment", "kubelet-csr-approver") in applied, "beside the other add-ons, not instead of them"
    addons_dir = node.settings.state_dir / "addons"
    assert addons_dir.stat().st_mode & 0o077 == 0, "the add-ons directory holds the webhook's private key"


@pytest.mark.etcd
def test_with_irsa_off_nothing_is_published_configured_or_applied(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    aws["s3"].create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    cfg = AgentConfig.from_mapping(config_values())
    api = SimulatedApiServer()
    node = EmulatedNode(aws, tmp_path, api, cfg)
    nodes.append(node)
    assert node.agent.run_launch().action == "initialised"
    assert "Contents" not in aws["s3"].list_objects_v2(Bucket=BUCKET)
    assert not any(a["name"] == "service-account-issuer" for a in uploaded_api_server(api)["extraArgs"])
    assert not any(d["metadata"]["name"] == "pod-identity-webhook" for d in node.runner.applied)
