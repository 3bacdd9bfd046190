"""The pod identity webhook (aws/amazon-eks-pod-identity-webhook): the IRSA add-on the initialiser applies.

A pod whose ServiceAccount carries ``eks.amazonaws.com/role-arn`` is mutated at creation: a projected
service-account token with audience ``sts.amazonaws.com`` is mounted and ``AWS_ROLE_ARN``,
``AWS_WEB_IDENTITY_TOKEN_FILE`` (and the region, and the regional STS endpoint) are set, so every AWS SDK calls
``sts:AssumeRoleWithWebIdentity`` with it. STS checks the token against the issuer documents the initialiser
published (:mod:`node_agent.irsa`).

What is applied (``60-pod-identity-webhook.yaml``, ``kube-system``):

* ServiceAccount + ClusterRole (serviceaccounts get/list/watch: the webhook's cache, nothing else: it does not
  request its own certificate) + ClusterRoleBinding.
* the serving certificate as a ``kubernetes.io/tls`` Secret. The agent issues it with openssl from the cluster CA
  (``pki/ca.{crt,key}``, like the drainer's client certificate): serverAuth only, SANs the Service's DNS names.
  It is valid for 10 years (the CA's own lifetime as kubeadm creates it) because nothing renews it yet: the
  certificates timer does not know it (see the report). The webhook runs ``--in-cluster=false`` and reads the
  files (certwatcher), so no CSR permissions and no cert-manager are needed.
* a 2-replica Deployment on control-plane nodes (the image pre-pulled into the AMI, ``IfNotPresent``), non-root
  on port 8443, ``--sts-regional-endpoint=true`` and ``--aws-default-region``: the VPC reaches STS only through
  its regional interface endpoint (there is no route to the global ``sts.amazonaws.com``).
* a Service (443 -> 8443) and the MutatingWebhookConfiguration (pods CREATE, ``caBundle`` = the cluster CA,
  ``failurePolicy: Ignore`` as upstream ships it: a webhook outage must not stop every pod creation, including
  kube-system's own, at the price of pods created meanwhile getting no AWS credentials).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_agent.errors import AgentError
from node_agent.irsa import STS_AUDIENCE
from node_agent.runner import CommandRunner

# The add-ons' conventions (node_agent/addons.py; kept here so this module stands alone, a test keeps them equal).
HERE = Path(__file__).resolve().parent
VERSIONS_CANDIDATES = (HERE / "versions.json", HERE.parent / "imagebuilder" / "versions.json")
NAMESPACE = "kube-system"
PULL_POLICY = "IfNotPresent"
CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane"
LABELS = {"app.kubernetes.io/part-of": "dedicated-k8s", "app.kubernetes.io/managed-by": "dedicated-k8s-agent"}
CONTROL_PLANE_TOLERATIONS = [
    {"key": CONTROL_PLANE_LABEL, "operator": "Exists", "effect": "NoSchedule"},
    {"key": "CriticalAddonsOnly", "operator": "Exists"},
]

WEBHOOK_FILE = "60-pod-identity-webhook.yaml"
NAME = "pod-identity-webhook"
SECRET = f"{NAME}-cert"
VERSIONS_IMAGE_KEY = "podIdentityWebhook"  # images.podIdentityWebhook in imagebuilder/versions.json
ANNOTATION_PREFIX = "eks.amazonaws.com"
PORT = 8443
METRICS_PORT = 9999
CERT_DIR = "/etc/webhook/certs"
SERVING_DAYS = 3650
_SELECTOR = {"app.kubernetes.io/name": NAME}


class WebhookError(AgentError):
    """The webhook's image is not pinned or its serving certificate could not be issued."""


def service_dns_names(namespace: str = NAMESPACE) -> list[str]:
    """What the API server may dial: it verifies ``<service>.<namespace>.svc``; the others for completeness."""
    return [NAME, f"{NAME}.{namespace}", f"{NAME}.{namespace}.svc", f"{NAME}.{namespace}.svc.cluster.local"]


@dataclass(frozen=True)
class ServingCertificate:
    cert: str  # PEM
    key: str  # PEM
    ca: str  # PEM: the CA bundle the API server verifies the webhook with


def issue_serving_certificate(
    runner: CommandRunner, pki_dir: Path, out_dir: Path, days: int = SERVING_DAYS
) -> ServingCertificate:
    """A fresh RSA key and a serverAuth certificate for the Service's DNS names, signed by ``pki_dir/ca.{crt,key}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir.chmod(0o700)
    key, csr, crt, ext, serial = (out_dir / f"{NAME}.{s}" for s in ("key", "csr", "crt", "ext", "srl"))
    names = service_dns_names()
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        f"subjectAltName={','.join(f'DNS:{n}' for n in names)}\n"
    )
    steps = (
        ["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-subj", f"/CN={names[2]}", "-out", str(csr)],
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(pki_dir / "ca.crt"), "-CAkey", str(pki_dir / "ca.key"),
         "-CAserial", str(serial), "-CAcreateserial", "-days", str(days), "-extfile", str(ext), "-out", str(crt)],
    )  # fmt: skip
    for argv in steps:
        result = runner.run(argv, timeout=60)
        if not result.ok:
            raise WebhookError(f"{' '.join(argv[:2])} failed: {(result.stderr or result.stdout).strip()[-300:]}")
    try:
        return ServingCertificate(cert=crt.read_text(), key=key.read_text(), ca=(pki_dir / "ca.crt").read_text())
    except OSError as err:
        raise WebhookError(f"the webhook's serving certificate was not written: {err}") from err


def load_webhook_image(path: Path | None = None) -> str:
    """The pinned image (the AMI bundle carries versions.json beside the agent; the repository in imagebuilder/)."""
    path = path or next((c for c in VERSIONS_CANDIDATES if c.is_file()), VERSIONS_CANDIDATES[-1])
    try:
        image = json.loads(path.read_text()).get("images", {}).get(VERSIONS_IMAGE_KEY)
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise WebhookError(f"{path}: {err}") from err
    if not isinstance(image, str) or ":" not in image:
        raise WebhookError(f"{path}: images.{VERSIONS_IMAGE_KEY} is missing (the AMI must pre-pull the webhook)")
    return image


def _meta(name: str, namespaced: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespaced:
        meta["namespace"] = NAMESPACE
    meta["labels"] = {**LABELS, **_SELECTOR}
    return meta


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def pod_identity_webhook(image: str, region: str, serving: ServingCertificate) -> list[dict[str, Any]]:
    """The webhook's documents, in apply order (the Secret and Service before the webhook points at them)."""
    subject = {"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}
    rbac: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(NAME)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": _meta(NAME, namespaced=False),
            "rules": [{"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get", "list", "watch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": _meta(NAME, namespaced=False),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
            "subjects": [subject],
        },
    ]
    secret: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(SECRET),
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": _b64(serving.cert), "tls.key": _b64(serving.key)},
    }
    container: dict[str, Any] = {
        "name": NAME,
        "image": image,
        "imagePullPolicy": PULL_POLICY,
        "command": [
            "/webhook",
            "--in-cluster=false",
            f"--namespace={NAMESPACE}",
            f"--service-name={NAME}",
            f"--port={PORT}",
            f"--metrics-port={METRICS_PORT}",
            f"--tls-cert={CERT_DIR}/tls.crt",
            f"--tls-key={CERT_DIR}/tls.key",
            f"--annotation-prefix={ANNOTATION_PREFIX}",
            f"--token-audience={STS_AUDIENCE}",
            f"--aws-default-region={region}",
            "--sts-regional-endpoint=true",
            "--logtostderr",
        ],
        "ports": [
            {"name": "https", "containerPort": PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": METRICS_PORT}, "periodSeconds": 10},
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": METRICS_PORT}, "periodSeconds": 5},
        "volumeMounts": [{"name": "cert", "mountPath": CERT_DIR, "readOnly": True}],
        "resources": {"requests": {"cpu": "25m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65534,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    deployment: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(NAME),
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": dict(_SELECTOR)},
            "template": {
                "metadata": {"labels": {**LABELS, **_SELECTOR}},
                "spec": {
                    "nodeSelector": {CONTROL_PLANE_LABEL: "", "kubernetes.io/os": "linux"},
                    "tolerations": [*CONTROL_PLANE_TOLERATIONS],
                    "affinity": {
                        "podAntiAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": [
                                {
                                    "weight": 100,
                                    "podAffinityTerm": {
                                        "labelSelector": {"matchLabels": dict(_SELECTOR)},
                                        "topologyKey": "kubernetes.io/hostname",
                                    },
                                }
                            ]
                        }
                    },
                    "serviceAccountName": NAME,
                    "priorityClassName": "system-cluster-critical",
                    "containers": [container],
                    "volumes": [{"name": "cert", "secret": {"secretName": SECRET}}],
                },
            },
        },
    }
    service: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(NAME),
        "spec": {
            "selector": dict(_SELECTOR),
            "ports": [{"name": "https", "port": 443, "targetPort": PORT, "protocol": "TCP"}],
        },
    }
    webhook: dict[str, Any] = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": _meta(NAME, namespaced=False),
        "webhooks": [
            {
                "name": "pod-identity-webhook.amazonaws.com",
                "failurePolicy": "Ignore",
                "clientConfig": {
                    "service": {"name": NAME, "namespace": NAMESPACE, "path": "/mutate", "port": 443},
                    "caBundle": _b64(serving.ca),
                },
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
                "sideEffects": "None",
                "admissionReviewVersions": ["v1beta1"],
                "timeoutSeconds": 10,
            }
        ],
    }
    return [*rbac, secret, deployment, service, webhook]


def webhook_addon(
    runner: CommandRunner, pki_dir: Path, work_dir: Path, region: str, image: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    """``{WEBHOOK_FILE: documents}`` to merge into the rendered add-ons: issues a fresh serving certificate."""
    serving = issue_serving_certificate(runner, pki_dir, work_dir)
    return {WEBHOOK_FILE: pod_identity_webhook(image or load_webhook_image(), region, serving)}
