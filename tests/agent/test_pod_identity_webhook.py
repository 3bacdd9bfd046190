"""The pod identity webhook add-on: a serving certificate issued by a real openssl CA that a TLS client verifying
the Service name (as the API server does) accepts with the webhook's caBundle, and manifests that wire the
webhook for IRSA in an air-gapped VPC (pinned pre-pulled image, sts.amazonaws.com, regional STS)."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from imagebuilder.versions import load_versions
from node_agent import addons
from node_agent import pod_identity_webhook as webhook
from node_agent.runner import SubprocessRunner

REGION = "eu-west-1"
IMAGE = "public.ecr.aws/eks/amazon-eks-pod-identity-webhook:v0.6.15"


def openssl(*args: str) -> str:
    return subprocess.run(["openssl", *args], capture_output=True, check=True, text=True, timeout=60).stdout


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cluster CA as kubeadm makes it (``pki/ca.crt``, ``pki/ca.key``)."""
    pki = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pki / "ca.key"), "-out",
            str(pki / "ca.crt"), "-days", "3650", "-subj", "/CN=kubernetes", "-addext",
            "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    return pki


@pytest.fixture(scope="module")
def serving(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> webhook.ServingCertificate:
    return webhook.issue_serving_certificate(SubprocessRunner(), pki, tmp_path_factory.mktemp("issue"))


def documents(serving: webhook.ServingCertificate) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in webhook.pod_identity_webhook(IMAGE, REGION, serving)}


def test_the_serving_certificate_is_a_cluster_ca_signed_server_certificate_for_the_service(
    pki: Path, serving: webhook.ServingCertificate, tmp_path: Path
) -> None:
    cert = tmp_path / "tls.crt"
    cert.write_text(serving.cert)
    assert openssl("verify", "-CAfile", str(pki / "ca.crt"), "-purpose", "sslserver", str(cert)).strip().endswith("OK")
    text = openssl("x509", "-in", str(cert), "-noout", "-text")
    for name in ("pod-identity-webhook.kube-system.svc", "pod-identity-webhook.kube-system.svc.cluster.local"):
        assert f"DNS:{name}" in text
    assert "TLS Web Server Authentication" in text and "TLS Web Client Authentication" not in text
    assert "CA:FALSE" in text
    assert serving.ca == (pki / "ca.crt").read_text()
    assert not (pki / "ca.srl").exists()  # the serial file stays out of the cluster's PKI directory


def test_a_client_trusting_only_the_ca_bundle_completes_tls_to_the_service_name(
    serving: webhook.ServingCertificate, tmp_path: Path
) -> None:
    """The API server dials https://pod-identity-webhook.kube-system.svc and verifies it against caBundle."""
    (tmp_path / "tls.crt").write_text(serving.cert)
    (tmp_path / "tls.key").write_text(serving.key)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    ca_bundle = base64.b64decode(documents(serving)["MutatingWebhookConfiguration"]["webhooks"][0]["clientConfig"]
                                 ["caBundle"]).decode()  # fmt: skip
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client_ctx = ssl.create_default_context(cadata=ca_bundle)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname="pod-identity-webhook.kube-system.svc") as tls,
        ):
            assert tls.recv(2) == b"ok"
        thread.join(timeout=10)
    # The same certificate is refused for a name it does not carry.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve_once() -> None:
            conn, _ = listener.accept()
            with contextlib.suppress(ssl.SSLError, OSError):
                server_ctx.wrap_socket(conn, server_side=True).close()

        thread = threading.Thread(target=serve_once, daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            client_ctx.wrap_socket(raw, server_hostname="something-else.kube-system.svc")
        thread.join(timeout=10)


def test_the_deployment_runs_the_pinned_image_for_sts_with_regional_endpoints_and_mounts_the_certificate(
    serving: webhook.ServingCertificate,
) -> None:
    docs = documents(serving)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE and container["imagePullPolicy"] == "IfNotPresent"
    command = container["command"]
    for flag in ("--in-cluster=false", "--namespace=kube-system", "--service-name=pod-identity-webhook",
                 "--token-audience=sts.amazonaws.com", "--annotation-prefix=eks.amazonaws.com",
                 f"--aws-default-region={REGION}", "--sts-regional-endpoint=true", "--port=8443",
                 "--tls-cert=/etc/webhook/certs/tls.crt", "--tls-key=/etc/webhook/certs/tls.key"):  # fmt: skip
        assert flag in command, flag
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["volumeMounts"] == [{"name": "cert", "mountPath": "/etc/webhook/certs", "readOnly": True}]
    assert pod["volumes"] == [{"name": "cert", "secret": {"secretName": "pod-identity-webhook-cert"}}]
    secret = docs["Secret"]
    assert secret["type"] == "kubernetes.io/tls"
    assert base64.b64decode(secret["data"]["tls.crt"]).decode() == serving.cert
    assert base64.b64decode(secret["data"]["tls.key"]).decode() == serving.key
    assert docs["ClusterRole"]["rules"] == [
        {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get", "list", "watch"]}
    ]


def test_the_webhook_mutates_pod_creation_through_the_service_on_the_container_port(
    serving: webhook.ServingCertificate,
) -> None:
    docs = documents(serving)
    (hook,) = docs["MutatingWebhookConfiguration"]["webhooks"]
    service = hook["clientConfig"]["service"]
    assert service == {"name": "pod-identity-webhook", "namespace": "kube-system", "path": "/mutate", "port": 443}
    assert docs["Service"]["metadata"]["name"] == service["name"]
    assert docs["Service"]["metadata"]["namespace"] == service["namespace"]
    (port,) = docs["Service"]["spec"]["ports"]
    assert port["port"] == service["port"] and f"--port={port['targetPort']}" in docs["Deployment"]["spec"][
        "template"]["spec"]["containers"][0]["command"]  # fmt: skip
    assert docs["Service"]["spec"]["selector"].items() <= docs["Deployment"]["spec"]["template"]["metadata"][
        "labels"].items()  # fmt: skip
    assert hook["rules"] == [
        {"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}
    ]
    assert hook["failurePolicy"] == "Ignore" and hook["sideEffects"] == "None"
    kinds = [doc["kind"] for doc in webhook.pod_identity_webhook(IMAGE, REGION, serving)]
    assert kinds.index("Secret") < kinds.index("Deployment") < kinds.index("MutatingWebhookConfiguration")


def test_webhook_addon_issues_a_certificate_and_renders_one_file(pki: Path, tmp_path: Path) -> None:
    rendered = webhook.webhook_addon(SubprocessRunner(), pki, tmp_path / "issue", REGION, image=IMAGE)
    assert list(rendered) == ["60-pod-identity-webhook.yaml"]
    assert (tmp_path / "issue").stat().st_mode & 0o077 == 0  # the serving key's directory is private
    with pytest.raises(webhook.WebhookError, match="openssl x509"):
        webhook.webhook_addon(SubprocessRunner(), tmp_path / "no-ca-here", tmp_path / "issue2", REGION, image=IMAGE)


def test_the_image_comes_from_versions_json_and_a_missing_pin_is_an_error(tmp_path: Path) -> None:
    pinned = tmp_path / "versions.json"
    pinned.write_text(json.dumps({"images": {"podIdentityWebhook": IMAGE}}))
    assert webhook.load_webhook_image(pinned) == IMAGE
    unpinned = tmp_path / "old.json"
    unpinned.write_text(json.dumps({"images": {}}))
    with pytest.raises(webhook.WebhookError, match=r"images\.podIdentityWebhook"):
        webhook.load_webhook_image(unpinned)


def test_the_webhook_follows_the_add_ons_conventions() -> None:
    assert webhook.NAMESPACE == addons.NAMESPACE and webhook.PULL_POLICY == addons.PULL_POLICY
    assert webhook.LABELS == addons.LABELS and webhook.CONTROL_PLANE_TOLERATIONS == addons.CONTROL_PLANE_TOLERATIONS
    assert webhook.CONTROL_PLANE_LABEL == addons.CONTROL_PLANE_LABEL
    assert webhook.VERSIONS_CANDIDATES == addons.VERSIONS_CANDIDATES


def test_the_pinned_webhook_image_is_one_the_ami_pre_pulls() -> None:
    image = webhook.load_webhook_image()
    assert image.startswith("public.ecr.aws/eks/amazon-eks-pod-identity-webhook:v")
    assert image in load_versions().addon_images and image in load_versions().images
