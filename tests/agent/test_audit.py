"""API server audit logging: the generated kubeadm configuration turns it on and the policy is sensible."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml

from node_agent.audit import AUDIT_LOG_DIR, audit_policy, policy_path, write_policy
from node_agent.config import AgentConfig, AgentSettings
from node_agent.instance import InstanceIdentity
from node_agent.kubeadm import init_configuration_yaml

IDENT = InstanceIdentity(instance_id="i-0abc1234def567890", private_ip="10.0.1.23", region="eu-west-1")
TOKEN = "abcdef.0123456789abcdef"


def _first_match(request: dict[str, Any]) -> str:
    """The level the policy gives ``request`` (first matching rule wins, as in kube-apiserver)."""
    for rule in audit_policy()["rules"]:
        if "users" in rule and request.get("user") not in rule["users"]:
            continue
        if "userGroups" in rule and not set(request.get("groups", ())) & set(rule["userGroups"]):
            continue
        if "verbs" in rule and request.get("verb") not in rule["verbs"]:
            continue
        if "namespaces" in rule and request.get("namespace") not in rule["namespaces"]:
            continue
        if "nonResourceURLs" in rule:
            url = request.get("url")
            if url is None or not any(
                url == p or (p.endswith("*") and url.startswith(p[:-1])) for p in rule["nonResourceURLs"]
            ):
                continue
        if "resources" in rule:
            resource = request.get("resource")
            if resource is None or not any(
                r["group"] == resource[0] and resource[1] in r["resources"] for r in rule["resources"]
            ):
                continue
        return str(rule["level"])
    return "None"


def test_api_server_configuration_turns_audit_logging_on(agent_config: AgentConfig, tmp_path: Path) -> None:
    settings = AgentSettings(kubernetes_dir=tmp_path / "k8s")
    docs = {d["kind"]: d for d in yaml.safe_load_all(init_configuration_yaml(agent_config, IDENT, settings, TOKEN))}
    api = docs["ClusterConfiguration"]["apiServer"]
    args = {a["name"]: a["value"] for a in api["extraArgs"]}
    assert args["audit-policy-file"] == str(policy_path(settings.kubernetes_dir))
    assert args["audit-log-path"] == str(AUDIT_LOG_DIR / "audit.log")
    assert args["audit-log-format"] == "json"
    assert int(args["audit-log-maxbackup"]) >= 1 and int(args["audit-log-maxsize"]) > 0
    mounts = {v["mountPath"]: v for v in api["extraVolumes"]}
    # The static pod sees the policy (read-only) and writes the log to the host, where the CloudWatch agent reads it.
    assert mounts[str(policy_path(settings.kubernetes_dir).parent)]["readOnly"] is True
    assert mounts[str(AUDIT_LOG_DIR)]["readOnly"] is False
    assert all(v["hostPath"] == v["mountPath"] for v in api["extraVolumes"])
    assert IDENT.private_ip in api["certSANs"], "the audit settings sit beside, not instead of, the SANs"


def test_written_policy_parses_and_is_private(tmp_path: Path) -> None:
    path = write_policy(tmp_path)
    doc = yaml.safe_load(path.read_text())
    assert doc == audit_policy()
    assert doc["apiVersion"] == "audit.k8s.io/v1" and doc["kind"] == "Policy"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_secrets_are_never_logged_with_their_bodies() -> None:
    for verb in ("get", "list", "create", "update", "patch", "delete"):
        assert _first_match({"verb": verb, "resource": ("", "secrets")}) == "Metadata", verb
        assert _first_match({"verb": verb, "resource": ("", "configmaps")}) == "Metadata", verb
    assert _first_match({"verb": "create", "resource": ("authentication.k8s.io", "tokenreviews")}) == "Metadata"
    assert _first_match({"verb": "create", "resource": ("", "serviceaccounts/token")}) == "Metadata"


def test_changes_are_logged_with_the_request_and_reads_with_metadata() -> None:
    assert _first_match({"verb": "create", "resource": ("apps", "deployments")}) == "Request"
    assert _first_match({"verb": "delete", "resource": ("", "pods")}) == "Request"
    assert _first_match({"verb": "patch", "resource": ("", "nodes"), "user": "admin"}) == "Request"
    assert _first_match({"verb": "get", "resource": ("", "pods")}) == "Metadata"


def test_health_probes_and_control_loop_noise_are_dropped() -> None:
    assert _first_match({"url": "/readyz"}) == "None"
    assert _first_match({"url": "/livez/etcd"}) == "None"
    assert _first_match({"verb": "watch", "user": "system:kube-proxy", "resource": ("", "services")}) == "None"
    assert _first_match({"verb": "get", "groups": ["system:nodes"], "resource": ("", "nodes")}) == "None"
    lease = {"verb": "update", "user": "system:kube-scheduler", "namespace": "kube-system",
             "resource": ("coordination.k8s.io", "leases")}  # fmt: skip
    assert _first_match(lease) == "None"
    # ... but the same user changing anything else is still recorded.
    assert _first_match({"verb": "create", "user": "system:kube-proxy", "resource": ("", "services")}) == "Request"
    assert "RequestReceived" in audit_policy()["omitStages"]
