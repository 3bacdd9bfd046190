"""The kubeadm documents are valid v1beta4 and carry the cluster's contract; the argv lists are exact."""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from node_agent.config import AgentConfig, AgentSettings
from node_agent.instance import InstanceIdentity
from node_agent.kubeadm import (
    JOIN_TIMEOUTS_SECONDS,
    KUBEADM_JOIN_WORST_CASE_SECONDS,
    Kubeadm,
    ca_cert_hash_from_public_key_pem,
    generate_bootstrap_token,
    init_configuration_yaml,
    join_configuration_yaml,
)
from node_agent.runner import CommandResult

IDENT = InstanceIdentity(instance_id="i-0abc1234def567890", private_ip="10.0.1.23", region="eu-west-1")
TOKEN = "abcdef.0123456789abcdef"


def _docs(text: str) -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(text) if d]
    kinds = [d["kind"] for d in docs]
    assert len(set(kinds)) == len(kinds)
    return {d["kind"]: d for d in docs}


def test_init_configuration_is_three_valid_documents(agent_config: AgentConfig) -> None:
    docs = _docs(init_configuration_yaml(agent_config, IDENT, AgentSettings(), TOKEN))
    assert set(docs) == {"InitConfiguration", "ClusterConfiguration", "KubeletConfiguration"}
    init, cluster, kubelet = docs["InitConfiguration"], docs["ClusterConfiguration"], docs["KubeletConfiguration"]
    assert init["apiVersion"] == cluster["apiVersion"] == "kubeadm.k8s.io/v1beta4"
    assert kubelet["apiVersion"] == "kubelet.config.k8s.io/v1beta1"

    assert init["nodeRegistration"]["name"] == "i-0abc1234def567890.eu-west-1.compute.internal"
    assert init["nodeRegistration"]["kubeletExtraArgs"] == [
        {"name": "cloud-provider", "value": "external"},
        {"name": "node-ip", "value": "10.0.1.23"},
    ]
    assert init["localAPIEndpoint"] == {"advertiseAddress": "10.0.1.23", "bindPort": 6443}
    assert init["bootstrapTokens"][0]["token"] == TOKEN
    assert init["bootstrapTokens"][0]["ttl"] == "24h"

    assert cluster["kubernetesVersion"] == "v1.34.2"
    assert cluster["controlPlaneEndpoint"] == "dk8s-demo-api-0123456789.elb.eu-west-1.amazonaws.com:6443"
    assert cluster["networking"] == {
        "podSubnet": "10.244.0.0/16",
        "serviceSubnet": "10.96.0.0/12",
        "dnsDomain": "cluster.local",
    }
    assert agent_config.api_endpoint in cluster["apiServer"]["certSANs"]
    etcd = cluster["etcd"]["local"]
    assert etcd["dataDir"] == "/var/lib/etcd"
    assert all(set(a) == {"name", "value"} and isinstance(a["value"], str) for a in etcd["extraArgs"])
    assert {"name": "election-timeout", "value": "2500"} in etcd["extraArgs"]
    assert cluster["controllerManager"]["extraArgs"] == [{"name": "cloud-provider", "value": "external"}]

    assert kubelet["cgroupDriver"] == "systemd"
    assert kubelet["rotateCertificates"] is True
    assert kubelet["serverTLSBootstrap"] is True


def test_us_east_1_node_names_use_the_ec2_internal_domain() -> None:
    ident = InstanceIdentity(instance_id="i-0abc123", private_ip="10.0.0.5", region="us-east-1")
    assert ident.node_name == "i-0abc123.ec2.internal"


@pytest.mark.parametrize("control_plane", [True, False])
def test_join_configuration_discovers_by_token_and_ca_hash(agent_config: AgentConfig, control_plane: bool) -> None:
    text = join_configuration_yaml(agent_config, IDENT, TOKEN, "sha256:" + "a" * 64, control_plane=control_plane)
    docs = _docs(text)
    assert set(docs) == {"JoinConfiguration"}
    join = docs["JoinConfiguration"]
    assert join["apiVersion"] == "kubeadm.k8s.io/v1beta4"
    assert join["discovery"]["bootstrapToken"] == {
        "apiServerEndpoint": "dk8s-demo-api-0123456789.elb.eu-west-1.amazonaws.com:6443",
        "token": TOKEN,
        "caCertHashes": ["sha256:" + "a" * 64],
    }
    assert join["nodeRegistration"]["name"] == IDENT.node_name
    assert {"name": "cloud-provider", "value": "external"} in join["nodeRegistration"]["kubeletExtraArgs"]
    if control_plane:
        assert join["controlPlane"] == {"localAPIEndpoint": {"advertiseAddress": "10.0.1.23", "bindPort": 6443}}
        assert "certificateKey" not in join["controlPlane"], "control-plane joins use the PKI placed on disk"
    else:
        assert "controlPlane" not in join


def test_bootstrap_tokens_have_kubeadms_shape_and_are_random(agent_config: AgentConfig) -> None:
    tokens = {generate_bootstrap_token() for _ in range(20)}
    assert len(tokens) == 20
    assert all(len(t) == 23 and t[6] == "." for t in tokens)
    init_configuration_yaml(agent_config, IDENT, AgentSettings(), tokens.pop())
    with pytest.raises(ValueError, match="bootstrap token"):
        init_configuration_yaml(agent_config, IDENT, AgentSettings(), "NOT-A-TOKEN")


def test_ca_cert_hash_matches_kubeadms_recipe_on_a_real_certificate(tmp_path: Path) -> None:
    key, crt = tmp_path / "ca.key", tmp_path / "ca.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
         "-subj", "/CN=kubernetes", "-days", "1"],
        check=True, capture_output=True,
    )  # fmt: skip
    # kubeadm's documented recipe: openssl x509 -pubkey | openssl rsa -pubin -outform der | sha256sum
    pub = subprocess.run(["openssl", "x509", "-in", str(crt), "-noout", "-pubkey"], check=True, capture_output=True)
    der = subprocess.run(
        ["openssl", "rsa", "-pubin", "-outform", "der"], input=pub.stdout, capture_output=True, check=True
    )
    expected = "sha256:" + hashlib.sha256(der.stdout).hexdigest()
    assert ca_cert_hash_from_public_key_pem(pub.stdout.decode()) == expected
    assert base64.b64decode(pub.stdout.decode().splitlines()[1])  # a PEM body, not empty


class Recorder:
    def __init__(self, stdout: str = "") -> None:
        self.calls: list[list[str]] = []
        self.stdout = stdout

    def run(self, argv: Any, *, env: Any = None, timeout: Any = None) -> CommandResult:
        self.calls.append(list(argv))
        return CommandResult(tuple(argv), 0, self.stdout, "")


def test_the_exact_commands(tmp_path: Path) -> None:
    rec = Recorder(stdout="ok")
    k = Kubeadm(rec, AgentSettings(kubernetes_dir=Path("/etc/kubernetes")))
    k.init(Path("/run/dk8s/init.yaml"))
    k.join(Path("/run/dk8s/join.yaml"))
    k.token_create(TOKEN, "24h")
    k.token_delete("abcdef")
    assert k.api_server_ready("10.0.0.7", 6443)
    assert rec.calls == [
        ["kubeadm", "init", "--config", "/run/dk8s/init.yaml", "--skip-token-print"],
        ["kubeadm", "join", "--config", "/run/dk8s/join.yaml"],
        ["kubeadm", "token", "create", TOKEN, "--ttl", "24h", "--description",
         "dedicated-k8s worker join token (rotated by the node agent)", "--kubeconfig", "/etc/kubernetes/admin.conf"],
        ["kubeadm", "token", "delete", "abcdef", "--kubeconfig", "/etc/kubernetes/admin.conf"],
        ["kubectl", "--kubeconfig", "/etc/kubernetes/admin.conf", "--server", "https://10.0.0.7:6443",
         "get", "--raw", "/readyz"],
    ]  # fmt: skip


# -- JoinConfiguration timeouts: a large database's learner has time to catch up ---------------------------------
# kubeadm.k8s.io/v1beta4 Timeouts ("kubeadm Configuration (v1beta4)",
# https://kubernetes.io/docs/reference/config-api/kubeadm-config.v1beta4/#kubeadm-k8s-io-v1beta4-Timeouts);
# defaults from kubeadm's SetDefaultTimeouts (kubernetes/kubernetes#122529, cmd/kubeadm/app/constants).
V1BETA4_TIMEOUT_DEFAULTS = {
    "controlPlaneComponentHealthCheck": 240,
    "kubeletHealthCheck": 240,
    "kubernetesAPICall": 60,
    "etcdAPICall": 120,
    "tlsBootstrap": 300,
    "discovery": 300,
    "upgradeManifests": 300,
}
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def _seconds(duration: str) -> int:
    """A metav1.Duration string (Go's time.ParseDuration subset kubeadm prints: 1h2m3s, 10m0s, 45s)."""
    match = _DURATION.match(duration)
    assert match and duration, f"not a duration kubeadm parses: {duration!r}"
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds


@pytest.mark.parametrize("control_plane", [True, False])
def test_join_timeouts_let_a_large_database_catch_up_within_the_join_deadline(
    agent_config: AgentConfig, control_plane: bool
) -> None:
    """kubeadm promotes a joining member's etcd learner only once it has caught up, retrying for at most
    ``timeouts.etcdAPICall`` (2m by default in v1beta4): too short for a multi-GB database, so the rendered
    document must raise it. Every other field must be a real v1beta4 Timeouts field, and the worst case of the
    whole join (each wait to its timeout, the API-call timeout once per call) plus the agent's health wait must
    fit the agent's launch deadline, or the agent would abandon a join kubeadm was still allowed to finish."""
    text = join_configuration_yaml(agent_config, IDENT, TOKEN, "sha256:" + "a" * 64, control_plane=control_plane)
    rendered = {name: _seconds(value) for name, value in _docs(text)["JoinConfiguration"]["timeouts"].items()}
    assert set(rendered) <= set(V1BETA4_TIMEOUT_DEFAULTS), set(rendered) - set(V1BETA4_TIMEOUT_DEFAULTS)
    if control_plane:
        assert rendered["etcdAPICall"] >= 600 > V1BETA4_TIMEOUT_DEFAULTS["etcdAPICall"]
    else:  # no etcd member, no control-plane static pods: the two fields would only mislead a reader
        assert not {"etcdAPICall", "controlPlaneComponentHealthCheck"} & set(rendered)
    for name, default in V1BETA4_TIMEOUT_DEFAULTS.items():
        if name in rendered and name != "etcdAPICall":
            assert rendered[name] >= default, f"{name} shorter than kubeadm's default"
    waits = {name: count for name, _, count in JOIN_TIMEOUTS_SECONDS}
    worst = sum(seconds * waits[name] for name, seconds in rendered.items())
    assert worst <= KUBEADM_JOIN_WORST_CASE_SECONDS == 1860
    assert (worst == KUBEADM_JOIN_WORST_CASE_SECONDS) is control_plane
    settings = AgentSettings()
    assert worst + settings.health_timeout_seconds < settings.join_deadline_seconds


class TimeoutRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[Any] = []

    def run(self, argv: Any, *, env: Any = None, timeout: Any = None) -> CommandResult:
        self.timeouts.append(timeout)
        return super().run(argv, env=env, timeout=timeout)


def test_kubeadm_join_is_never_killed_before_its_own_timeouts_end_it() -> None:
    """The runner kills a command at its timeout: ``kubeadm join`` gets longer than its worst case, so a slow
    learner catch-up ends with kubeadm's own error, not a SIGKILL mid-promotion."""
    rec = TimeoutRecorder()
    Kubeadm(rec, AgentSettings()).join(Path("/run/dk8s/join.yaml"))
    assert rec.calls == [["kubeadm", "join", "--config", "/run/dk8s/join.yaml"]]
    assert rec.timeouts[0] > KUBEADM_JOIN_WORST_CASE_SECONDS
