"""The cluster add-ons the initialiser applies: pre-pulled images only, NTH in queue mode, the CSR approver's limits,
the drainer's exact RBAC, Calico's pool; and on real etcd: init applies them once and stores the drainer's
certificate, joiners never apply them, a failed apply or secret write fails the init."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagebuilder.versions import VERSIONS_FILE, load_versions
from node_agent.addons import (
    ADDON_FILES,
    DRAINER_USER,
    KUBELET_SERVING_SIGNER,
    AddonImages,
    kubectl_apply_argv,
    load_addon_images,
    node_name_regex,
    render_addons,
    write_addons,
)
from node_agent.config import AgentConfig
from node_agent.election import ClusterStateStore, Phase
from node_agent.errors import AgentError
from node_agent.instance import InstanceIdentity
from tests.agent.conftest import config_values
from tests.agent.harness import EmulatedNode
from tests.agent.kubeadm_emulator import KubeadmEmulator, SimulatedApiServer

QUEUE_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/dk8s-demo-termination-handler"


@pytest.fixture(scope="module")
def cfg() -> AgentConfig:
    return AgentConfig.from_mapping(config_values(terminationHandlerQueueUrl=QUEUE_URL))


@pytest.fixture(scope="module")
def rendered(cfg: AgentConfig, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """The documents as kubectl reads them: written to files, parsed back with a real YAML parser."""
    out = write_addons(tmp_path_factory.mktemp("addons"), render_addons(cfg))
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(out.glob("*.yaml"))}


def _all(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [doc for docs in rendered.values() for doc in docs]


def _one(rendered: dict[str, list[dict[str, Any]]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _all(rendered) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_every_document_parses_and_names_itself(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert tuple(rendered) == ADDON_FILES
    keys = []
    for doc in _all(rendered):
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc
        keys.append((doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]))
    assert len(keys) == len(set(keys)), "no object is defined twice"


def test_every_image_is_pre_pulled_and_never_pulled(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pre_pulled = set(load_versions().images)  # what imagebuilder/components/40-images.yaml pulls into the AMI
    containers = [c for doc in _all(rendered) for c in _pod_containers(doc)]
    assert len(containers) >= 9
    images = {c["image"] for c in containers}
    assert images <= pre_pulled, images - pre_pulled
    optional = {load_addon_images().cluster_autoscaler}  # rendered only with clusterAutoscaler (off here)
    assert images == set(load_addon_images().all()) - optional, "every pinned add-on image is used, none other"
    for c in containers:
        assert not c["image"].endswith(":latest") and re.search(r":[\w.-]+$", c["image"]), c["image"]
        assert c["imagePullPolicy"] == "IfNotPresent", c["name"]
    text = json.dumps(_all(rendered))
    assert "coredns" not in text.lower(), "CoreDNS is kubeadm's add-on, not duplicated here"


def test_images_come_from_the_versions_file(tmp_path: Path) -> None:
    raw = json.loads(VERSIONS_FILE.read_text())
    raw["images"]["nodeTerminationHandler"] = "public.ecr.aws/aws-ec2/aws-node-termination-handler:v9.9.9"
    path = tmp_path / "versions.json"
    path.write_text(json.dumps(raw))
    assert load_addon_images(path).node_termination_handler.endswith(":v9.9.9")
    del raw["images"]["kubeletCsrApprover"]
    with pytest.raises(AgentError, match="kubeletCsrApprover"):
        AddonImages.from_versions(raw)


def test_termination_handler_runs_in_queue_mode_on_control_plane_host_network(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    deployment = _one(rendered, "Deployment", "aws-node-termination-handler")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    assert pod["hostNetwork"] is True, "IMDS hop limit 1: only host-network pods get the instance role"
    assert pod["nodeSelector"]["node-role.kubernetes.io/control-plane"] == ""
    assert any(t["key"] == "node-role.kubernetes.io/control-plane" for t in pod["tolerations"])
    assert pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    env = _env(pod["containers"][0])
    assert env["ENABLE_SQS_TERMINATION_DRAINING"] == "true"
    assert env["QUEUE_URL"] == QUEUE_URL
    assert env["AWS_REGION"] == "eu-west-1"
    assert env["USE_PROVIDER_ID"] == "true"
    assert env["DELETE_SQS_MSG_IF_NODE_NOT_FOUND"] == "true"
    role = _one(rendered, "ClusterRole", "aws-node-termination-handler")
    verbs = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert verbs[("", "pods/eviction")] == {"create"} and {"get", "patch"} <= verbs[("", "nodes")]


def test_cloud_controller_manager_runs_on_control_plane_nodes_before_they_are_initialised(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    ds = _one(rendered, "DaemonSet", "aws-cloud-controller-manager")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["nodeSelector"]["node-role.kubernetes.io/control-plane"] == ""
    assert {"key": "node.cloudprovider.kubernetes.io/uninitialized", "value": "true", "effect": "NoSchedule"} in (
        pod["tolerations"]
    )
    args = pod["containers"][0]["args"]
    assert "--cloud-provider=aws" in args and "--cluster-name=demo" in args and "--configure-cloud-routes=false" in args
    binding = _one(rendered, "ClusterRoleBinding", "system:cloud-controller-manager")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "kube-system"}
    ]


def test_csr_approver_is_limited_to_kubelet_serving_and_our_node_names(
    rendered: dict[str, list[dict[str, Any]]], cfg: AgentConfig
) -> None:
    role = _one(rendered, "ClusterRole", "kubelet-csr-approver")
    approve = [r for r in role["rules"] if "approve" in r["verbs"]]
    assert approve == [{"apiGroups": ["certificates.k8s.io"], "resources": ["signers"],
                        "resourceNames": [KUBELET_SERVING_SIGNER], "verbs": ["approve"]}]  # fmt: skip
    env = _env(_one(rendered, "Deployment", "kubelet-csr-approver")["spec"]["template"]["spec"]["containers"][0])
    assert env["BYPASS_DNS_RESOLUTION"] == "true"
    assert env["PROVIDER_IP_PREFIXES"] == cfg.vpc_cidr == "10.40.0.0/16"
    regex = re.compile(env["PROVIDER_REGEX"])
    for ident in (
        InstanceIdentity("i-0123456789abcdef0", "10.40.1.5", "eu-west-1"),
        InstanceIdentity("i-0123abcd", "10.40.1.6", "eu-west-1"),
    ):
        assert regex.match(ident.node_name), ident.node_name
    for other in (
        "i-0123456789abcdef0.us-east-1.compute.internal",  # another region
        "ip-10-40-1-5.eu-west-1.compute.internal",  # an IP-name hostname
        "i-0123456789abcdef0.eu-west-1.compute.internal.example.com",
        "evil-i-0123456789abcdef0.eu-west-1.compute.internal",
        "i-0123456789ABCDEF0.eu-west-1.compute.internal",
        "i-0123456789abcdef.eu-west-1.compute.internal",  # 16 hex digits: not an instance ID
        "i-0123456789abcdef0xeu-west-1.compute.internal",
    ):
        assert not regex.match(other), other
    assert re.match(node_name_regex("us-east-1"), InstanceIdentity("i-0123456789abcdef0", "", "us-east-1").node_name)
    assert not re.match(node_name_regex("us-east-1"), "i-0123456789abcdef0.eu-west-1.compute.internal")


def test_drainer_rbac_has_exactly_the_listed_permissions(rendered: dict[str, list[dict[str, Any]]]) -> None:
    role = _one(rendered, "ClusterRole", DRAINER_USER)
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == {
        ("", "nodes", "get"), ("", "nodes", "list"), ("", "nodes", "patch"), ("", "nodes", "delete"),
        ("", "pods", "list"), ("", "pods/eviction", "create"), ("apps", "daemonsets", "get"),
    }  # fmt: skip
    assert not any("resourceNames" in rule for rule in role["rules"])
    binding = _one(rendered, "ClusterRoleBinding", DRAINER_USER)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": DRAINER_USER}
    assert binding["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": DRAINER_USER}]


def test_calico_pool_is_the_configured_pod_cidr(cfg: AgentConfig) -> None:
    for pod_cidr in (cfg.pod_cidr, "172.20.0.0/16"):
        docs = render_addons(replace(cfg, pod_cidr=pod_cidr))["10-calico.yaml"]
        node = next(d for d in docs if d["kind"] == "DaemonSet" and d["metadata"]["name"] == "calico-node")
        env = _env(node["spec"]["template"]["spec"]["containers"][0])
        assert env["CALICO_IPV4POOL_CIDR"] == pod_cidr
        assert env["CALICO_IPV4POOL_VXLAN"] == "Always" and env["CALICO_IPV4POOL_IPIP"] == "Never"
        config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "calico-config")
        assert config["data"]["calico_backend"] == "vxlan"
        cni = json.loads(config["data"]["cni_network_config"].replace("__CNI_MTU__", "1450"))
        assert cni["plugins"][0]["ipam"] == {"type": "calico-ipam"}
    crds = {d["metadata"]["name"] for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert {"ippools.crd.projectcalico.org", "ipamblocks.crd.projectcalico.org", "tiers.crd.projectcalico.org"} <= crds


def test_missing_queue_url_is_refused(cfg: AgentConfig) -> None:
    with pytest.raises(AgentError, match="terminationHandlerQueueUrl"):
        render_addons(replace(cfg, termination_handler_queue_url=""))


def test_config_requires_the_new_control_plane_keys() -> None:
    for key in ("kubeClientSecretName", "terminationHandlerQueueUrl", "vpcCidr"):
        values = config_values()
        del values[key]
        with pytest.raises(ValueError, match=key):
            AgentConfig.from_mapping(values)
    with pytest.raises(ValueError, match="terminationHandlerQueueUrl"):
        AgentConfig.from_mapping(config_values(terminationHandlerQueueUrl="https://example.com/queue"))
    worker = config_values(role="worker")
    for key in ("kubeClientSecretName", "terminationHandlerQueueUrl", "vpcCidr"):
        del worker[key]
    assert AgentConfig.from_mapping(worker).kube_client_secret_name == ""


# ---- on real etcd, through the agent -------------------------------------------------------------------------


def _applies(node: EmulatedNode) -> list[list[str]]:
    return [c for c in node.runner.calls if c[0] == "kubectl" and "apply" in c]


def _openssl(*args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, input=stdin, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.etcd
def test_init_applies_the_addons_once_and_stores_the_drainer_certificate(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    cfg = AgentConfig.from_mapping(config_values())
    api = SimulatedApiServer()
    first = EmulatedNode(aws, tmp_path, api, cfg)
    nodes.append(first)
    assert first.agent.run_launch().action == "initialised"
    joiner = EmulatedNode(aws, tmp_path, api, cfg)
    nodes.append(joiner)
    assert joiner.agent.run_launch().action == "joined"

    assert _applies(first) == [kubectl_apply_argv(first.agent.kubeadm.admin_conf, first.settings.state_dir / "addons")]
    assert _applies(joiner) == [] and joiner.runner.applied == [], "joiners never apply the add-ons"
    kinds = {(d["kind"], d["metadata"]["name"]) for d in first.runner.applied}
    assert {("DaemonSet", "calico-node"), ("DaemonSet", "aws-cloud-controller-manager"),
            ("Deployment", "aws-node-termination-handler"), ("Deployment", "kubelet-csr-approver"),
            ("ClusterRoleBinding", DRAINER_USER)} <= kinds  # fmt: skip

    secret = json.loads(aws["secretsmanager"].get_secret_value(SecretId=cfg.kube_client_secret_name)["SecretString"])
    assert set(secret) == {"ca", "cert", "key"}
    ca = (first.settings.pki_dir / "ca.crt").read_text()
    assert secret["ca"] == ca, "the cluster CA (not the etcd CA)"
    ca_file, cert_file = tmp_path / "ca.pem", tmp_path / "cert.pem"
    ca_file.write_text(secret["ca"])
    cert_file.write_text(secret["cert"])
    assert _openssl("verify", "-CAfile", str(ca_file), str(cert_file)).strip().endswith("OK")
    assert "CN=dedicated-k8s:lifecycle-drainer" in _openssl(
        "x509", "-in", str(cert_file), "-noout", "-subject"
    ).replace(" ", "")
    usage = _openssl("x509", "-in", str(cert_file), "-noout", "-ext", "extendedKeyUsage")
    assert "TLS Web Client Authentication" in usage and "Server" not in usage
    cert_key = _openssl("x509", "-in", str(cert_file), "-noout", "-pubkey")
    assert _openssl("pkey", "-pubout", stdin=secret["key"]) == cert_key, "the key belongs to the certificate"


class FailingApply(KubeadmEmulator):
    def _apply(self, argv: list[str]) -> str:
        raise RuntimeError('error: resource mapping not found for name: "calico-node"')


@pytest.mark.etcd
def test_a_failing_apply_fails_the_init_before_the_cluster_is_marked_initialised(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    cfg = AgentConfig.from_mapping(config_values())
    node = EmulatedNode(aws, tmp_path, SimulatedApiServer(), cfg, runner_class=FailingApply, health_timeout_seconds=1.0)
    nodes.append(node)
    outcome = node.agent.run_launch()
    assert not outcome.ok and "add-ons" in outcome.reason and "resource mapping not found" in outcome.reason
    assert node.hook.calls == [("ABANDON", outcome.reason)]
    assert ClusterStateStore(aws["dynamodb"], cfg.cluster_state_table).read().phase == Phase.INITIALISING
    assert not node.agent.secrets.holds(cfg.join_secret_name, ("token",)), "no join secret: no node joins it"


class _RefusingSecrets:
    """Secrets Manager refusing writes to one secret (an IAM or KMS denial)."""

    def __init__(self, client: Any, name: str) -> None:
        self._client, self._name = client, name

    def __getattr__(self, attr: str) -> Any:
        real = getattr(self._client, attr)
        if attr not in ("put_secret_value", "create_secret"):
            return real

        def refuse(**kwargs: Any) -> Any:
            if self._name in (kwargs.get("SecretId"), kwargs.get("Name")):
                raise RuntimeError(f"AccessDeniedException: not authorized to write {self._name}")
            return real(**kwargs)

        return refuse


@pytest.mark.etcd
def test_a_failing_drainer_secret_write_fails_the_init(aws: dict[str, Any], tmp_path: Path, nodes: list[Any]) -> None:
    cfg = AgentConfig.from_mapping(config_values())
    refusing = {**aws, "secretsmanager": _RefusingSecrets(aws["secretsmanager"], cfg.kube_client_secret_name)}
    node = EmulatedNode(refusing, tmp_path, SimulatedApiServer(), cfg)
    nodes.append(node)
    outcome = node.agent.run_launch()
    assert not outcome.ok and "not authorized to write" in outcome.reason
    assert _applies(node) == [], "nothing applied after the failure"
    assert ClusterStateStore(aws["dynamodb"], cfg.cluster_state_table).read().phase == Phase.INITIALISING
