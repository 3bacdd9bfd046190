"""API server audit logging: the policy, where it lives and the kube-apiserver settings that use it.

The policy follows the shape Kubernetes recommends for production clusters (and GKE/kOps ship): drop the
high-volume noise that tells an investigator nothing (health probes, the node and kube-proxy watch loops,
events), record only metadata for anything that can carry a secret (Secrets, ConfigMaps, token reviews,
service-account tokens) so no credential ever lands in a log, record request bodies for every other
change, and metadata for all reads. kube-apiserver writes JSON lines to ``AUDIT_LOG_DIR``; the CloudWatch
agent ships that file to the cluster's audit log group (``node_agent/telemetry.py``).

Every control-plane node writes the policy before ``kubeadm init``/``join``: the ClusterConfiguration (one
copy, in the kubeadm-config ConfigMap) points every API server at the same path on its own host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from node_agent.yamlgen import dump_documents

AUDIT_LOG_DIR = Path("/var/log/kubernetes/audit")
AUDIT_LOG_FILE = AUDIT_LOG_DIR / "audit.log"
# Rotated by kube-apiserver itself: 100 MB files, 5 kept, 7 days (CloudWatch holds the long history).
LOG_ROTATION = (("audit-log-maxsize", "100"), ("audit-log-maxbackup", "5"), ("audit-log-maxage", "7"))

SECRET_BEARING = [
    {"group": "", "resources": ["secrets", "configmaps", "serviceaccounts/token"]},
    {"group": "authentication.k8s.io", "resources": ["tokenreviews"]},
    {"group": "certificates.k8s.io", "resources": ["certificatesigningrequests"]},
]


def audit_policy() -> dict[str, Any]:
    """The audit.k8s.io/v1 Policy; rules are evaluated in order, the first match wins."""
    return {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        # RequestReceived is a duplicate of every ResponseComplete: half the volume for nothing.
        "omitStages": ["RequestReceived"],
        "rules": [
            {"level": "None", "nonResourceURLs": ["/healthz*", "/livez*", "/readyz*", "/version", "/metrics"]},
            {
                "level": "None",
                "users": ["system:kube-proxy"],
                "verbs": ["watch"],
                "resources": [
                    {"group": "", "resources": ["endpoints", "services", "services/status"]},
                    {"group": "discovery.k8s.io", "resources": ["endpointslices"]},
                ],
            },
            {
                "level": "None",
                "userGroups": ["system:nodes"],
                "verbs": ["get"],
                "resources": [{"group": "", "resources": ["nodes", "nodes/status"]}],
            },
            {
                "level": "None",
                "users": ["system:kube-controller-manager", "system:kube-scheduler"],
                "verbs": ["get", "update"],
                "namespaces": ["kube-system"],
                "resources": [{"group": "coordination.k8s.io", "resources": ["leases"]}],
            },
            {
                "level": "None",
                "resources": [
                    {"group": "", "resources": ["events"]},
                    {"group": "events.k8s.io", "resources": ["events"]},
                ],
            },
            # Never a body for anything that can hold a credential.
            {"level": "Metadata", "resources": SECRET_BEARING},
            {"level": "Request", "verbs": ["create", "update", "patch", "delete", "deletecollection"]},
            {"level": "Metadata"},
        ],
    }


def policy_path(kubernetes_dir: Path) -> Path:
    return kubernetes_dir / "audit" / "policy.yaml"


def write_policy(kubernetes_dir: Path) -> Path:
    """Write the policy (0600: it says what is and is not recorded) and return its path."""
    path = policy_path(kubernetes_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_documents([audit_policy()]))
    path.chmod(0o600)
    return path


def api_server_audit(kubernetes_dir: Path, log_dir: Path = AUDIT_LOG_DIR) -> dict[str, Any]:
    """kube-apiserver extraArgs (v1beta4 list form) and the host mounts the static pod needs."""
    policy = policy_path(kubernetes_dir)
    args = [
        ("audit-policy-file", str(policy)),
        ("audit-log-path", str(log_dir / AUDIT_LOG_FILE.name)),
        ("audit-log-format", "json"),
        *LOG_ROTATION,
    ]
    return {
        "extraArgs": [{"name": n, "value": v} for n, v in args],
        "extraVolumes": [
            {
                "name": "audit-policy",
                "hostPath": str(policy.parent),
                "mountPath": str(policy.parent),
                "readOnly": True,
                "pathType": "DirectoryOrCreate",
            },
            {
                "name": "audit-logs",
                "hostPath": str(log_dir),
                "mountPath": str(log_dir),
                "readOnly": False,
                "pathType": "DirectoryOrCreate",
            },
        ],
    }
