"""The optional cluster-autoscaler add-on: off unless configured; when on, a pre-pulled image, discovery by the two
tags the stack puts on this cluster's worker groups, the control-plane role through IMDS, upstream RBAC."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from imagebuilder.versions import load_versions
from node_agent.addons import ADDON_FILES, render_addons, write_addons
from node_agent.config import AgentConfig, AgentConfigError
from stages.workers import autoscaler_discovery_tags
from tests.agent.conftest import config_values


def _rendered(tmp_path: Any, **overrides: Any) -> dict[str, list[dict[str, Any]]]:
    out = write_addons(tmp_path, render_addons(AgentConfig.from_mapping(config_values(**overrides))))
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(out.glob("*.yaml"))}


def test_off_by_default(tmp_path: Any) -> None:
    assert AgentConfig.from_mapping(config_values()).cluster_autoscaler is False
    assert tuple(_rendered(tmp_path)) == ADDON_FILES


def test_the_flag_must_be_a_boolean() -> None:
    with pytest.raises(AgentConfigError) as err:
        AgentConfig.from_mapping(config_values(clusterAutoscaler="false"))
    assert "'clusterAutoscaler'" in str(err.value) and "true or false" in str(err.value)


def test_on_it_discovers_exactly_this_clusters_tagged_worker_groups(tmp_path: Any) -> None:
    rendered = _rendered(tmp_path, clusterAutoscaler=True)
    assert tuple(rendered) == (*ADDON_FILES, "60-cluster-autoscaler.yaml")
    docs = rendered["60-cluster-autoscaler.yaml"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["image"] in load_versions().images, "pre-pulled by the AMI"
    assert container["imagePullPolicy"] == "IfNotPresent"
    flags = dict(arg.split("=", 1) for arg in container["command"][1:] if "=" in arg)
    assert flags["--cloud-provider"] == "aws"
    discovery = flags["--node-group-auto-discovery"].removeprefix("asg:tag=").split(",")
    assert discovery == list(autoscaler_discovery_tags("demo")), "the tags stages/workers.py sets"
    assert spec["hostNetwork"] is True and spec["nodeSelector"]["node-role.kubernetes.io/control-plane"] == ""
    assert {e["name"]: e["value"] for e in container["env"]}["AWS_REGION"] == "eu-west-1"


def test_its_rbac_can_scale_down_through_evictions_but_not_write_workloads(tmp_path: Any) -> None:
    docs = _rendered(tmp_path, clusterAutoscaler=True)["60-cluster-autoscaler.yaml"]
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    grants = {
        (g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert grants[("", "pods/eviction")] == {"create"}
    assert "update" in grants[("", "nodes")]
    assert not {"create", "update", "patch", "delete"} & grants[("apps", "daemonsets")]
    assert not any("delete" in verbs for (group, res), verbs in grants.items() if res in ("nodes", "pods"))
