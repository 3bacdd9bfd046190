"""The agent's configuration: ``/etc/dedicated-k8s/agent.json`` parsed once into a frozen, validated object.

User data writes the file (keys are the contract in docs/TEAM.md). Every problem names the key, so a bad
launch says exactly what to fix. Run-time identity (instance ID, IP, group) is not here: it comes from
IMDSv2 (:mod:`node_agent.instance`). Timings and paths the tests and the twin change live in
:class:`AgentSettings`, not in the file.
"""

from __future__ import annotations

import ipaddress
import json
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = Path("/etc/dedicated-k8s/agent.json")

ROLES = ("control-plane", "worker")
_CLUSTER_NAME = re.compile(r"^[a-z][a-z0-9-]{1,22}[a-z0-9]$")
_K8S_VERSION = re.compile(r"^1\.\d{2}\.\d{1,3}$")
_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$)({_LABEL}\.)*{_LABEL}$")
_SQS_HOST = re.compile(r"^sqs\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$")
_QUEUE_PATH = re.compile(r"^/\d{12}/[A-Za-z0-9_-]{1,80}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")

# Keys every node needs, and keys only a control-plane node uses (a worker may omit them).
COMMON_KEYS = (
    "clusterName",
    "role",
    "region",
    "kubernetesVersion",
    "apiEndpoint",
    "apiPort",
    "clusterStateTable",
    "joinSecretName",
    "launchHookName",
    "podCidr",
    "serviceCidr",
)
CONTROL_PLANE_KEYS = (
    "snapshotBucket",
    "kmsKeyId",
    "pkiSecretName",
    "etcdClientSecretName",
    "snapshotIntervalMinutes",
    "snapshotRetentionDays",
    "kubeClientSecretName",
    "terminationHandlerQueueUrl",
    "vpcCidr",
)
# Optional, control plane only, both or neither: IRSA (node_agent/irsa.py); absent or empty = IRSA off.
IRSA_KEYS = ("irsaIssuerUrl", "irsaBucket")


class AgentConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid; each problem names its key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("Invalid node agent configuration:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class AgentConfig:
    cluster_name: str
    role: str
    region: str
    kubernetes_version: str
    api_endpoint: str
    api_port: int
    cluster_state_table: str
    join_secret_name: str
    launch_hook_name: str
    pod_cidr: str
    service_cidr: str
    snapshot_bucket: str = ""
    kms_key_id: str = ""
    pki_secret_name: str = ""
    etcd_client_secret_name: str = ""
    snapshot_interval_minutes: int = 30
    snapshot_retention_days: int = 7
    # The lifecycle drainer's Kubernetes client certificate ({ca, cert, key}), written by the initialiser.
    kube_client_secret_name: str = ""
    # The add-ons the initialiser applies (node_agent.addons): NTH's SQS queue, the CSR approver's IP prefix.
    termination_handler_queue_url: str = ""
    vpc_cidr: str = ""
    # IRSA: the service-account issuer (API server flags) and the bucket its documents are published to.
    irsa_issuer_url: str = ""
    irsa_bucket: str = ""
    # Optional: the initialiser also applies cluster-autoscaler (node_agent.addons); absent = false.
    cluster_autoscaler: bool = False

    @property
    def is_control_plane(self) -> bool:
        return self.role == "control-plane"

    @property
    def irsa_enabled(self) -> bool:
        return bool(self.irsa_issuer_url)

    @property
    def control_plane_endpoint(self) -> str:
        return f"{self.api_endpoint}:{self.api_port}"

    @classmethod
    def load(cls, path: Path | str = DEFAULT_CONFIG_PATH) -> AgentConfig:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise AgentConfigError([f"config file {path}: cannot be read ({err.strerror or err})"]) from err
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise AgentConfigError([f"config file {path}: not valid JSON ({err.msg} at line {err.lineno})"]) from err
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Any) -> AgentConfig:
        if not isinstance(values, dict):
            raise AgentConfigError(["config: the top level must be a JSON object"])
        p = _Parser(values)
        role = p.choice("role", ROLES)
        is_cp = role == "control-plane"
        parsed: dict[str, Any] = {
            "cluster_name": p.string("clusterName", pattern=_CLUSTER_NAME, what="a cluster name like 'prod-1'"),
            "role": role,
            "region": p.string("region", pattern=_REGION, what="an AWS region like 'eu-west-1'"),
            "kubernetes_version": p.string("kubernetesVersion", pattern=_K8S_VERSION, what="a version like '1.34.2'"),
            "api_endpoint": p.string("apiEndpoint", pattern=_DNS_NAME, what="a DNS name (the NLB)"),
            "api_port": p.integer("apiPort", 1, 65535),
            "cluster_state_table": p.string("clusterStateTable"),
            "join_secret_name": p.string("joinSecretName"),
            "launch_hook_name": p.string("launchHookName"),
            "pod_cidr": p.cidr("podCidr"),
            "service_cidr": p.cidr("serviceCidr"),
        }
        if is_cp:
            parsed |= {
                "snapshot_bucket": p.string("snapshotBucket"),
                "kms_key_id": p.string("kmsKeyId"),
                "pki_secret_name": p.string("pkiSecretName"),
                "etcd_client_secret_name": p.string("etcdClientSecretName"),
                "snapshot_interval_minutes": p.integer("snapshotIntervalMinutes", 5, 1440),
                "snapshot_retention_days": p.integer("snapshotRetentionDays", 1, 3650),
                "kube_client_secret_name": p.string("kubeClientSecretName"),
                "termination_handler_queue_url": p.queue_url("terminationHandlerQueueUrl"),
                "vpc_cidr": p.cidr("vpcCidr"),
                **p.irsa(),
                "cluster_autoscaler": p.flag("clusterAutoscaler"),
            }
        if p.problems:
            raise AgentConfigError(p.problems)
        return cls(**parsed)


class _Parser:
    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.problems: list[str] = []

    def _get(self, key: str) -> Any:
        if key not in self.values or self.values[key] is None:
            self.problems.append(f"'{key}': missing (required)")
            return None
        return self.values[key]

    def _bad(self, key: str, value: Any, allowed: str) -> None:
        self.problems.append(f"'{key}' = {json.dumps(value, default=str)}: must be {allowed}")

    def string(self, key: str, pattern: re.Pattern[str] | None = None, what: str = "a non-empty string") -> str:
        value = self._get(key)
        if value is None:
            return ""
        if not isinstance(value, str) or not value.strip():
            self._bad(key, value, "a non-empty string")
            return ""
        if pattern is not None and not pattern.match(value):
            self._bad(key, value, what)
        return value

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self._get(key)
        if value is None:
            return ""
        if value not in allowed:
            self._bad(key, value, "one of " + ", ".join(allowed))
            return ""
        return str(value)

    def integer(self, key: str, minimum: int, maximum: int) -> int:
        value = self._get(key)
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            self._bad(key, value, f"a whole number between {minimum} and {maximum}")
            return 0
        return value

    def flag(self, key: str) -> bool:
        """An optional boolean: absent is false; a string or number is refused (no "false" that means true)."""
        value = self.values.get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            self._bad(key, value, "true or false")
            return False
        return value

    def queue_url(self, key: str) -> str:
        value = self.string(key)
        parts = urllib.parse.urlsplit(value)
        if value and not (parts.scheme == "https" and _SQS_HOST.match(parts.netloc) and _QUEUE_PATH.match(parts.path)):
            self._bad(key, value, "an SQS queue URL like 'https://sqs.eu-west-1.amazonaws.com/123456789012/name'")
        return value

    def irsa(self) -> dict[str, str]:
        """``irsaIssuerUrl`` (https, no path, query or trailing slash) and ``irsaBucket``: both set, or neither."""
        url, bucket = (self.values.get(key) or "" for key in IRSA_KEYS)
        if not isinstance(url, str) or not isinstance(bucket, str):
            self._bad("irsaIssuerUrl", [url, bucket], "strings (irsaIssuerUrl and irsaBucket)")
            return {}
        if bool(url) != bool(bucket):
            missing = "irsaBucket" if url else "irsaIssuerUrl"
            self.problems.append(f"'{missing}': missing (irsaIssuerUrl and irsaBucket go together; both empty = off)")
            return {}
        parts = urllib.parse.urlsplit(url)
        if url and not (parts.scheme == "https" and parts.netloc and not parts.path and not parts.query):
            self._bad("irsaIssuerUrl", url, "an https URL with no path, query or trailing slash (the issuer bucket's)")
        if bucket and not _BUCKET.match(bucket):
            self._bad("irsaBucket", bucket, "an S3 bucket name (3-63 lowercase letters, digits and '-')")
        return {"irsa_issuer_url": url, "irsa_bucket": bucket}

    def cidr(self, key: str) -> str:
        value = self.string(key)
        if value:
            try:
                ipaddress.ip_network(value, strict=True)
            except ValueError:
                self._bad(key, value, "a network in CIDR notation like '10.244.0.0/16'")
        return value


@dataclass(frozen=True)
class AgentSettings:
    """Paths and timings with production defaults; tests and the local twin shrink them."""

    kubernetes_dir: Path = Path("/etc/kubernetes")
    state_dir: Path = Path("/var/lib/dedicated-k8s")
    etcd_data_dir: Path = Path("/var/lib/etcd")
    etcd_client_port: int = 2379
    etcd_peer_port: int = 2380
    # Bootstrap lock: the holder renews every renew_interval; others may take over after the lease.
    lease_seconds: float = 60.0
    renew_interval_seconds: float = 15.0
    poll_interval_seconds: float = 5.0
    # How long a node may wait/try before it abandons its launch. It covers kubeadm join's worst case
    # (node_agent/kubeadm.py JOIN_TIMEOUTS_SECONDS, 31 min) plus one health wait (10 min): 2460 s < 2700 s. It is longer
    # than the launch hook's heartbeat timeout (600/900 s), so the launch heartbeats the hook (lifecycle.py).
    join_deadline_seconds: float = 2700.0
    health_timeout_seconds: float = 600.0
    # Launch hook heartbeats: at most a third of the shortest hook timeout (workers' 600 s), so two lost heartbeats
    # in a row still leave the third in time (tests/stacks/test_launch_timeouts.py reads both from the template).
    heartbeat_interval_seconds: float = 150.0
    # Snapshots: always keep this many newest objects, whatever their age.
    snapshot_keep_newest: int = 3
    bootstrap_token_ttl: str = "24h"  # noqa: S105 (a duration, not a secret)
    # A control-plane node maps the API endpoint name to itself here (node_agent.hosts, invariant 9).
    hosts_file: Path = Path("/etc/hosts")

    @property
    def pki_dir(self) -> Path:
        return self.kubernetes_dir / "pki"
