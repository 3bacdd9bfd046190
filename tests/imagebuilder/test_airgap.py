"""The air-gapped proof: nothing that runs when a node boots fetches from the internet, and every AWS
service the in-VPC code calls has a VPC endpoint in the cluster stack.

"At node boot" is: the user data K8sClusterStack gives its launch templates (stages/user_data.py), the
node agent's boot path (node_agent/, lambdas/common/ installed beside it), the systemd units and scripts
the AMI carries (imagebuilder/systemd/), and the files the components write for run time (CreateFile).
The components' *build* phases do download (at image build time, from the build subnet); they are
checked separately (HTTPS, checksums) in test_components.py and never run on a cluster node.
"""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

import aws_cdk as cdk
import pytest

from imagebuilder.aws_clients import IN_VPC_CODE, REPO_ROOT, boto3_client_calls, python_files
from imagebuilder.versions import IMAGEBUILDER_DIR, load_versions
from node_agent.config import AgentConfig, AgentSettings
from node_agent.instance import InstanceIdentity
from node_agent.kubeadm import cluster_configuration, init_configuration_yaml
from stages.config import ClusterConfig
from stages.network import GATEWAY_ENDPOINTS, INTERFACE_ENDPOINTS
from stages.user_data import agent_user_data
from tests.imagebuilder.components import created_files

# A fetch from the network, as a shell command or as an argv[0] (a subprocess argv list).
FETCH_COMMAND = re.compile(
    r"(^|[\s;&|(`$'\"])(curl|wget|pip3?|python3?(\.\d+)? -m pip|dnf|yum|apt(-get)?|"
    r"(crictl|ctr|nerdctl|docker|podman)( [-\w=.]+)* pull|skopeo|git clone)(\s|$)"
)
FETCH_ARGV0 = {"curl", "wget", "pip", "pip3", "dnf", "yum", "apt", "apt-get", "docker", "podman", "nerdctl", "skopeo"}
URL = re.compile(r"\b(https?|s3|oci)://([^/\s\"'`]+)")
# Hosts a node may reach: IMDS, itself, AWS APIs (through the VPC endpoints) and in-cluster Service names (the
# service-account issuer https://kubernetes.default.svc.cluster.local is such a name, and is never fetched).
ALLOWED_HOST = re.compile(
    r"^(169\.254\.169\.254|127\.0\.0\.1|localhost|\[::1\]|\{[^}]*\}|[\w.-]*amazonaws\.com(\.cn)?|"
    r"[\w-]+(\.[\w-]+)*\.svc(\.cluster\.local)?)(:\d+)?$"
)
IMAGE_REFERENCE = re.compile(
    r"\b((?:registry\.k8s\.io|quay\.io|public\.ecr\.aws|docker\.io|ghcr\.io)/[\w./-]+:[\w.-]+)"
)
# What the agent may run: binaries the components install, plus the base OS's.
AMI_BINARIES = {"kubeadm", "kubelet", "kubectl", "etcdctl", "etcdutl", "crictl", "ctr", "containerd", "runc"}
BASE_OS_BINARIES = {"openssl", "systemctl", "journalctl", "iptables", "ip", "mount", "umount", "sh", "bash"}


def fetches(text: str) -> list[str]:
    """Every line of ``text`` that downloads something or names a host a node may not reach."""
    found = []
    for line in text.splitlines():
        if FETCH_COMMAND.search(line):
            found.append(line.strip())
            continue
        for _, host in URL.findall(line):
            if not (ALLOWED_HOST.match(host) or _in_vpc(host)):
                found.append(line.strip())
    return found


def _in_vpc(host: str) -> bool:
    """A private address (a peer etcd member, the API endpoint's IP) is inside the VPC."""
    try:
        return ipaddress.ip_address(host.rsplit(":", 1)[0] if host.count(":") == 1 else host).is_private
    except ValueError:
        return False


def test_the_detector_catches_what_it_must() -> None:
    # Without this, a detector that finds nothing would make every test below pass.
    for bad in (
        "curl -fsSL https://get.example.com | sh",
        "wget https://dl.k8s.io/release/v1.34.2/bin/linux/amd64/kubelet",
        "dnf install -y socat",
        "pip install boto3",
        "crictl pull registry.k8s.io/pause:3.10.1",
        "ctr -n k8s.io images pull quay.io/calico/node:v3.30.3",
        "url = 'https://raw.githubusercontent.com/projectcalico/calico/v3.30.3/manifests/calico.yaml'",
        "https://8.8.8.8/",
        "issuer = 'https://kubernetes.default.svc.evil.example.com'",
    ):
        assert fetches(bad) == [bad], bad
    for fine in (
        "ExecStart=/usr/local/bin/dedicated-k8s-agent run --config /etc/dedicated-k8s/agent.json",
        "url = f'https://{self.endpoint}/v3/cluster/member/list'",
        "TOKEN_URL = 'http://169.254.169.254/latest/api/token'",
        "https://sts.us-east-1.amazonaws.com/",
        "peer https://10.0.1.5:2380",
        "issuer = 'https://kubernetes.default.svc.cluster.local'",
        "https://dk8s-demo-irsa-oidc-123456789012-cn-north-1.s3.cn-north-1.amazonaws.com.cn",
    ):
        assert fetches(fine) == [], fine


# ---- what runs at boot ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_template(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from stages.cluster_stack import K8sClusterStack

    context = dict(json.loads((REPO_ROOT / "cdk.json").read_text())["context"])
    app = cdk.App(outdir=str(tmp_path_factory.mktemp("cluster-cdk.out")), context=context)
    config = ClusterConfig.from_context(app.node.try_get_context)
    stack = K8sClusterStack(app, "K8sClusterStack", config=config, env=cdk.Environment(region=config.region))
    return dict(app.synth().get_stack_by_name(stack.stack_name).template)


# Pseudo parameters inside Fn::Join parts, as deployed: a host built from them (the IRSA issuer,
# https://<bucket>.s3.<region>.<url suffix>) is then checked whole instead of cut at the first token.
PSEUDO_PARAMETERS = {
    "AccountId": "123456789012",
    "Region": "us-east-1",
    "URLSuffix": "amazonaws.com",
    "Partition": "aws",
}
PSEUDO_REF = re.compile(r'", \{"Ref": "AWS::(' + "|".join(PSEUDO_PARAMETERS) + r')"\}, "')


def _user_data(template: dict[str, Any]) -> list[str]:
    return [
        PSEUDO_REF.sub(
            lambda m: PSEUDO_PARAMETERS[m.group(1)],
            json.dumps(resource["Properties"]["LaunchTemplateData"]["UserData"]),
        )
        for resource in template["Resources"].values()
        if resource["Type"] == "AWS::EC2::LaunchTemplate"
    ]


def test_cluster_user_data_fetches_nothing(cluster_template: dict[str, Any]) -> None:
    scripts = _user_data(cluster_template)
    assert len(scripts) >= 2  # control plane and workers
    for script in scripts:
        assert "systemctl start dedicated-k8s-agent.service" in script
        assert fetches(script.replace("\\n", "\n").replace('\\"', '"')) == []  # the script, unescaped


def test_user_data_module_fetches_nothing() -> None:
    stack = cdk.Stack(cdk.App(), "Probe")
    rendered = agent_user_data(stack, {"clusterName": "demo", "role": "worker"}).render()
    assert "systemctl start dedicated-k8s-agent.service" in rendered
    assert fetches(rendered) == []


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """Every string the code uses (docstrings, which never run, excluded)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    ]


def _argv_heads(path: Path) -> list[tuple[int, str]]:
    """The first element of every list literal that starts with a string: the agent's argv lists."""
    tree = ast.parse(path.read_text(), filename=str(path))
    heads = []
    for node in ast.walk(tree):
        if isinstance(node, ast.List) and node.elts:
            first = node.elts[0]
            if (
                isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and re.fullmatch(r"[a-z][\w-]*", first.value)
            ):
                heads.append((node.lineno, first.value))
    return heads


def test_node_agent_boot_path_fetches_nothing_from_the_internet() -> None:
    files = python_files(IN_VPC_CODE)
    assert any(p.name == "bootstrap.py" for p in files)
    problems = []
    for path in files:
        for line, value in _string_constants(path):
            if value in FETCH_ARGV0 or fetches(value):
                problems.append(f"{path.relative_to(REPO_ROOT)}:{line}: {value[:100]!r}")
    assert problems == []


def test_every_command_the_agent_runs_is_on_the_ami() -> None:
    runs = {
        (f"{path.relative_to(REPO_ROOT)}:{line}", head)
        for path in python_files([REPO_ROOT / "node_agent"])
        for line, head in _argv_heads(path)
        if head in AMI_BINARIES | BASE_OS_BINARIES | FETCH_ARGV0 or head.endswith(("ctl", "adm", "utl"))
    }
    assert {head for _, head in runs} >= {"kubeadm", "kubectl", "etcdctl", "openssl"}
    not_on_ami = sorted(f"{where}: {head}" for where, head in runs if head not in AMI_BINARIES | BASE_OS_BINARIES)
    assert not_on_ami == []


def test_units_and_node_scripts_fetch_nothing() -> None:
    files = sorted((IMAGEBUILDER_DIR / "systemd").iterdir())
    assert len(files) >= 7
    for path in files:
        assert fetches(path.read_text()) == [], path.name


def test_run_time_files_written_by_components_fetch_nothing() -> None:
    files = created_files(load_versions())
    assert files
    for path, content in files:
        assert fetches(content) == [], path


# ---- images: only pre-pulled ones are ever referenced ---------------------------------------------


def test_every_image_referenced_by_boot_code_is_pre_pulled(cluster_template: dict[str, Any]) -> None:
    pre_pulled = set(load_versions().images)
    sources = {str(p.relative_to(REPO_ROOT)): p.read_text() for p in python_files([*IN_VPC_CODE, REPO_ROOT / "stages"])}
    sources.update({p.name: p.read_text() for p in (IMAGEBUILDER_DIR / "systemd").iterdir()})
    sources["K8sClusterStack user data"] = "\n".join(_user_data(cluster_template))
    sources.update(dict(created_files(load_versions())))
    unknown = sorted(
        f"{where}: {ref}"
        for where, text in sources.items()
        for ref in IMAGE_REFERENCE.findall(text)
        if ref not in pre_pulled
    )
    assert unknown == []


def _agent_config(version: str) -> AgentConfig:
    return AgentConfig.from_mapping(
        {
            "clusterName": "demo",
            "role": "control-plane",
            "region": "us-east-1",
            "kubernetesVersion": version,
            "apiEndpoint": "dk8s-demo-api-0123456789.elb.us-east-1.amazonaws.com",
            "apiPort": 6443,
            "clusterStateTable": "dk8s-demo-cluster-state",
            "snapshotBucket": "dk8s-demo-etcd-snapshots-123456789012-us-east-1",
            "kmsKeyId": "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555",
            "pkiSecretName": "dedicated-k8s/demo/pki",
            "etcdClientSecretName": "dedicated-k8s/demo/etcd-client",
            "joinSecretName": "dedicated-k8s/demo/worker-join",
            "snapshotIntervalMinutes": 30,
            "snapshotRetentionDays": 7,
            "launchHookName": "dk8s-demo-launch",
            "podCidr": "10.244.0.0/16",
            "serviceCidr": "10.96.0.0/12",
            "kubeClientSecretName": "dedicated-k8s/demo/lifecycle-kube-client",
            "terminationHandlerQueueUrl": "https://sqs.us-east-1.amazonaws.com/123456789012/dk8s-demo-termination-handler",
            "vpcCidr": "10.40.0.0/16",
        }
    )


def test_kubeadm_asks_for_exactly_the_pre_pulled_control_plane_images() -> None:
    # The agent's kubernetesVersion comes from ClusterConfig, whose default is versions.json; kubeadm then
    # uses registry.k8s.io and its own etcd/CoreDNS/pause tags unless the configuration overrides them.
    versions = load_versions()
    config = ClusterConfig.from_mapping({})
    assert config.kubernetes_version == versions.kubernetes
    ident = InstanceIdentity(instance_id="i-0123456789abcdef0", private_ip="10.40.0.10", region="us-east-1")
    document = cluster_configuration(_agent_config(config.kubernetes_version), ident, AgentSettings())
    assert document["kubernetesVersion"] == f"v{versions.kubernetes}"
    assert "imageRepository" not in document  # registry.k8s.io, as in versions.kubeadm_images
    assert "imageRepository" not in document["etcd"]["local"] and "imageTag" not in document["etcd"]["local"]
    assert "dns" not in document or "imageTag" not in document["dns"]
    text = init_configuration_yaml(
        _agent_config(config.kubernetes_version), ident, AgentSettings(), "abcdef.0123456789abcdef"
    )
    assert f'kubernetesVersion: "v{versions.kubernetes}"' in text
    assert "imageRepository" not in text
    assert "imagePullPolicy: Always" not in text


# ---- VPC endpoints ----------------------------------------------------------------------------------

# boto3 service name -> the endpoint service name in network.py (where they differ).
ENDPOINT_NAME = {"cloudwatch": "monitoring", "elbv2": "elasticloadbalancing", "elb": "elasticloadbalancing"}


def test_the_client_scan_finds_the_agents_clients() -> None:
    calls = boto3_client_calls()
    assert {"dynamodb", "secretsmanager", "autoscaling", "ec2", "s3"} <= set(calls)
    assert all(locations for locations in calls.values())


def test_every_service_the_node_agent_and_lambdas_call_has_a_vpc_endpoint(cluster_template: dict[str, Any]) -> None:
    endpoints = set(INTERFACE_ENDPOINTS) | set(GATEWAY_ENDPOINTS)
    in_template = {
        json.dumps(resource["Properties"]["ServiceName"])
        for resource in cluster_template["Resources"].values()
        if resource["Type"] == "AWS::EC2::VPCEndpoint"
    }
    missing = {}
    for service, locations in boto3_client_calls().items():
        name = ENDPOINT_NAME.get(service, service)
        in_stack = any(f".{name}" in text or f'"{name}' in text for text in in_template)
        if name not in endpoints or not in_stack:
            missing[service] = locations
    assert missing == {}, f"no VPC endpoint for: {missing}"
