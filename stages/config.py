"""The cluster configuration: one typed object, read from ``cdk.json`` context once and validated.

Every construct receives what it needs from :class:`ClusterConfig` as props; no construct reads
context itself. Context values come from ``cdk.json`` or from ``cdk synth -c key=value``; values
given on the command line arrive as strings, so lists, objects and numbers are parsed here.

Validation collects every problem and raises one :class:`ConfigError` whose lines each name the
key, the value and what is allowed, so an operator fixes everything in one round.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lambdas.common.version_skew import VersionSkewError, check_upgrade

VERSIONS_FILE = Path(__file__).resolve().parent.parent / "imagebuilder" / "versions.json"

CONTEXT_KEYS = (
    "clusterName",
    "kubernetesVersion",
    "ami",
    "controlPlaneInstanceType",
    "controlPlaneCount",
    "workerGroups",
    "tenancy",
    "vpcCidr",
    "vpcId",
    "privateSubnetIds",
    "privateRouteTableIds",
    "availabilityZones",
    "apiAccessCidrs",
    "allowPublicApiAccessCidrs",
    "snapshotIntervalMinutes",
    "snapshotRetentionDays",
    "alarmEmails",
    "account",
    "region",
    "vpcEndpoints",
    "retainNetworkOnDelete",
    "deployedKubernetesVersion",
    "auditLogRetentionDays",
    "createAutoScalingServiceLinkedRole",
    "irsa",
    "clusterAutoscaler",
    "apiLoadBalancerDeletionProtection",
)

# The pipeline's own context keys: pipeline/config.py (PipelineSettings) reads and validates them, so they are
# not unknown here (tests/stacks/test_config_refusals.py records every key PipelineSettings reads against this).
PIPELINE_CONTEXT_KEYS = (
    "pipelineSource",
    "pipelineConnectionArn",
    "pipelineRepository",
    "pipelineBranch",
    "pipelineCodeCommitRepository",
    "pipelineS3Bucket",
    "pipelineS3Key",
    "pipelineAccount",
    "pipelineRegion",
    "pipelineNotificationEmails",
    "stagingAccount",
    "stagingRegion",
    "stagingOverrides",
    "stagingClusterName",
    "productionAccount",
    "productionRegion",
    "productionOverrides",
    "productionClusterName",
    "codeArtifactDomain",
    "codeArtifactRepository",
    "codeArtifactOwner",
    "imageBuildVpcId",
    "imageBuildSubnetId",
)
# Our keys (and the pipeline's) are lowerCamelCase words. Every key CDK itself puts in the context has a character
# no key of ours has: feature flags '@aws-cdk/...', the CLI's switches 'aws:cdk:...', the lookup cache of
# cdk.context.json 'availability-zones:account=...:region=...', 'acknowledged-issue-numbers' (cdk acknowledge).
_OUR_KEY_SHAPE = re.compile(r"^[a-z][A-Za-z0-9]*$")

# kubeadm's podSubnet (Calico's IP pool) and serviceSubnet (kubeadm's default): the VPC must not overlap either,
# or a node cannot tell a pod or service address from a VPC address (the agent config carries both).
POD_CIDR = "192.168.0.0/16"
SERVICE_CIDR = "10.96.0.0/12"
# The ranges that are private to a network: RFC 1918 and RFC 6598's shared address space (carrier-grade NAT,
# often a corporate or VPN range). Python's is_private is wider (it includes documentation and benchmark ranges).
PRIVATE_RANGES = tuple(
    ipaddress.IPv4Network(cidr) for cidr in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)

TENANCIES = ("dedicated", "default")
# "create": this stack creates the VPC endpoints; "existing": an imported VPC already has them (a blue/green
# twin reusing the first cluster's endpoints: a second private-DNS endpoint for the same service would clash).
VPC_ENDPOINT_MODES = ("create", "existing")
# Families that cannot be launched as Dedicated Instances (burstable and Mac instances need
# Dedicated Hosts or shared tenancy), per the EC2 Dedicated Instances documentation.
NO_DEDICATED_FAMILIES = frozenset({"t1", "t2", "t3", "t3a", "t4g", "mac1", "mac2", "mac2-m2", "mac2-m2pro"})
# kubeadm's preflight needs 2 vCPUs and 1700 MiB for a control-plane node; these sizes have less.
TOO_SMALL_FOR_CONTROL_PLANE = frozenset({"nano", "micro", "small", "medium"})

_CLUSTER_NAME = re.compile(r"^[a-z][a-z0-9-]{1,22}[a-z0-9]$")
_K8S_VERSION = re.compile(r"^1\.(\d{2})\.(\d{1,3})$")
S3_BUCKET_NAME_MAX = 63
_AMI_ID = re.compile(r"^ami-[0-9a-f]{8}([0-9a-f]{9})?$")
_SSM_NAME = re.compile(r"^/[A-Za-z0-9_.\-/]{1,1010}$")
_INSTANCE_TYPE = re.compile(r"^([a-z][a-z0-9-]*)\.([0-9a-z]+)$")
_VPC_ID = re.compile(r"^vpc-[0-9a-f]{8}([0-9a-f]{9})?$")
_SUBNET_ID = re.compile(r"^subnet-[0-9a-f]{8}([0-9a-f]{9})?$")
_ROUTE_TABLE_ID = re.compile(r"^rtb-[0-9a-f]{8}([0-9a-f]{9})?$")
_ACCOUNT = re.compile(r"^\d{12}$")
_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d$")
_GROUP_NAME = re.compile(r"^[a-z][a-z0-9-]{0,20}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

# IAM Roles for Service Accounts: the two objects of the service-account issuer (OIDC discovery document and JWKS)
# and the audience the pod identity webhook requests and the IAM OIDC provider accepts as client ID.
IRSA_DISCOVERY_KEY = ".well-known/openid-configuration"
IRSA_JWKS_KEY = "keys.json"
IRSA_AUDIENCE = "sts.amazonaws.com"


def url_suffix_for_region(region: str) -> str:
    """The regional endpoints' domain: ``amazonaws.com.cn`` in the China partition, else ``amazonaws.com``.
    (Inside a stack, use the stack's ``url_suffix`` token instead: it resolves the same way at deploy.)"""
    return "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"


def bucket_name_problem(name: str, cluster_name: str) -> str | None:
    """None if ``name`` (with a 12-digit account in it) fits S3's limit, else what to do about it."""
    if len(name) <= S3_BUCKET_NAME_MAX:
        return None
    room = len(cluster_name) - (len(name) - S3_BUCKET_NAME_MAX)
    shown = name.replace("0" * 12, "<account>")
    return (
        f"the bucket '{shown}' would be {len(name)} characters (S3 allows {S3_BUCKET_NAME_MAX}); "
        f"use at most {room} characters"
    )


# The values CloudWatch Logs accepts for a log group's retention.
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922,
                      3288, 3653)  # fmt: skip


class ConfigError(ValueError):
    """One or more context values are invalid; each line names the key, the value and what is allowed."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("Invalid dedicated-k8s configuration (cdk.json context):\n  - " + "\n  - ".join(problems))


def _spelling(key: str) -> str:
    """A key without case or separators: 'vpc-cidr', 'VPC_CIDR' and 'vpcCidr' are one spelling."""
    return re.sub(r"[^a-z0-9]", "", key.lower())


def _unknown_key_hint(key: str) -> str:
    """What to say about a context key nothing reads: the nearest known key (a misspelling), else all of them."""
    known = CONTEXT_KEYS + PIPELINE_CONTEXT_KEYS
    same = [k for k in known if _spelling(k) == _spelling(key)]
    nearest = same or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if nearest:
        return f"is not a known key; did you mean '{nearest[0]}'?"
    return f"is not a known key; known keys: {', '.join(CONTEXT_KEYS)}"


def private_range_of(network: ipaddress.IPv4Network) -> ipaddress.IPv4Network | None:
    """The private range (RFC 1918 or RFC 6598) that holds all of ``network``, if one does."""
    return next((r for r in PRIVATE_RANGES if network.subnet_of(r)), None)


def default_kubernetes_version() -> str:
    """The pinned Kubernetes version from the versions file that the AMI build also reads."""
    return str(json.loads(VERSIONS_FILE.read_text())["kubernetes"])


@dataclass(frozen=True)
class WorkerGroupConfig:
    name: str
    instance_type: str
    min_size: int
    max_size: int
    desired_capacity: int


@dataclass(frozen=True)
class VpcConfig:
    """Either a new VPC (``cidr``) or an imported one (``vpc_id`` with its private subnets)."""

    cidr: str | None
    vpc_id: str | None
    private_subnet_ids: tuple[str, ...]
    private_route_table_ids: tuple[str, ...]
    # False only for an imported VPC whose endpoints exist already ("vpcEndpoints": "existing").
    create_endpoints: bool = True
    # The VPC (if this stack creates it), its endpoints and their security group outlive the stack, so a
    # blue cluster that created the network can be deleted while the green one still uses it.
    retain_on_delete: bool = False

    @property
    def imported(self) -> bool:
        return self.vpc_id is not None


@dataclass(frozen=True)
class ClusterConfig:
    CLUSTER_TAG_KEY = "dedicated-k8s:cluster"
    ROLE_TAG_KEY = "dedicated-k8s:role"

    cluster_name: str
    kubernetes_version: str
    ami: str
    control_plane_instance_type: str
    control_plane_count: int
    worker_groups: tuple[WorkerGroupConfig, ...]
    tenancy: str
    vpc: VpcConfig
    availability_zones: tuple[str, ...]
    api_access_cidrs: tuple[str, ...]
    snapshot_interval_minutes: int
    snapshot_retention_days: int
    alarm_emails: tuple[str, ...] = field(default=())
    # API server audit log and node metrics log groups (CloudWatch Logs' allowed retention values only).
    audit_log_retention_days: int = 365
    account: str | None = None
    region: str = "us-east-1"
    # The version the deployed cluster runs, if the operator or pipeline states it: synth then refuses a
    # kubernetesVersion this cluster may not move to (lambdas/common/version_skew.py).
    deployed_kubernetes_version: str | None = None
    # IAM Roles for Service Accounts (stages/irsa.py, node_agent/irsa.py): the issuer bucket, the IAM OIDC
    # provider, the API server's issuer flags and the pod identity webhook. False (the default): none of it. Opt-in
    # because the issuer bucket needs a public bucket policy, which account-level S3 Block Public Access (standard
    # in restricted landing zones) refuses: a first deploy must not depend on public S3 (docs/irsa.md).
    irsa: bool = False
    # Optional cluster-autoscaler: auto-discovery tags on the worker groups, IAM scoped to them, the add-on.
    cluster_autoscaler: bool = False
    # IamStack creates AWSServiceRoleForAutoScaling (the KMS key policy names it, and KMS refuses a key policy
    # whose principal does not exist). Off by default: the role exists in every account that ever used Auto
    # Scaling, and AWS::IAM::ServiceLinkedRole fails when it already exists.
    create_auto_scaling_service_linked_role: bool = False
    # ELB deletion protection on the API load balancer: off for `cdk deploy K8sClusterStack` development use (a
    # dev cluster can be deleted), on in the pipeline's production stage (pipeline/config.py: STAGE_DEFAULTS).
    api_load_balancer_deletion_protection: bool = False

    @property
    def ami_is_ssm_parameter(self) -> bool:
        return self.ami.startswith("/")

    @property
    def kubernetes_minor(self) -> str:
        """``1.34`` for ``1.34.2``: names that must stay stable across patch upgrades use this."""
        return ".".join(self.kubernetes_version.split(".")[:2])

    @property
    def resource_prefix(self) -> str:
        """Prefix of every named resource, so two clusters (blue/green) never clash."""
        return f"dk8s-{self.cluster_name}"

    @property
    def secrets_prefix(self) -> str:
        return f"dedicated-k8s/{self.cluster_name}"

    @property
    def ssm_prefix(self) -> str:
        return f"/dedicated-k8s/{self.cluster_name}"

    @property
    def node_log_group_prefix(self) -> str:
        """The nodes' CloudWatch log groups (audit, metrics) are named ``<prefix><kind>``."""
        return f"/dedicated-k8s/{self.cluster_name}/"

    @property
    def cluster_state_table_name(self) -> str:
        return f"{self.resource_prefix}-cluster-state"

    # Names shared by IamStack (which scopes policies to them before the resources exist) and
    # K8sClusterStack (which creates the resources): one place, so the two never drift apart.
    @property
    def control_plane_role_name(self) -> str:
        return f"{self.resource_prefix}-control-plane-node"

    @property
    def worker_role_name(self) -> str:
        return f"{self.resource_prefix}-worker-node"

    @property
    def etcd_lifecycle_role_name(self) -> str:
        return f"{self.resource_prefix}-etcd-lifecycle"

    @property
    def reconciler_role_name(self) -> str:
        return f"{self.resource_prefix}-etcd-reconciler"

    @property
    def image_builder_role_name(self) -> str:
        return f"{self.resource_prefix}-image-builder"

    @property
    def etcd_lifecycle_function_name(self) -> str:
        return f"{self.resource_prefix}-etcd-lifecycle"

    @property
    def reconciler_function_name(self) -> str:
        return f"{self.resource_prefix}-etcd-reconciler"

    @property
    def cluster_ops_function_name(self) -> str:
        """Read-only status and the canary's sentinel key (runs with the reconciler's role)."""
        return f"{self.resource_prefix}-cluster-ops"

    @property
    def termination_handler_queue_name(self) -> str:
        """The SQS queue of aws-node-termination-handler (EC2 interruption/health events, never ASG hooks)."""
        return f"{self.resource_prefix}-termination-handler"

    @property
    def pki_secret_name(self) -> str:
        return f"{self.secrets_prefix}/pki"

    @property
    def etcd_client_secret_name(self) -> str:
        return f"{self.secrets_prefix}/etcd-client"

    @property
    def kube_client_secret_name(self) -> str:
        return f"{self.secrets_prefix}/lifecycle-kube-client"

    @property
    def join_secret_name(self) -> str:
        return f"{self.secrets_prefix}/worker-join"

    def snapshot_bucket_name(self, account: str, region: str) -> str:
        return self.bucket_names(self.resource_prefix, account, region)[0]

    def image_logs_bucket_name(self, account: str, region: str) -> str:
        return self.bucket_names(self.resource_prefix, account, region)[1]

    def irsa_issuer_bucket_name(self, account: str, region: str) -> str:
        """The bucket that serves the service-account issuer's discovery document and JWKS."""
        return f"{self.resource_prefix}-irsa-oidc-{account}-{region}"

    def irsa_issuer_url(self, account: str, region: str, url_suffix: str | None = None) -> str:
        """The service-account issuer: the bucket's virtual-hosted-style HTTPS URL (no trailing slash), which is
        what STS fetches ``/.well-known/openid-configuration`` from; ``url_suffix`` defaults to the region's."""
        suffix = url_suffix or url_suffix_for_region(region)
        return f"https://{self.irsa_issuer_bucket_name(account, region)}.s3.{region}.{suffix}"

    @staticmethod
    def bucket_names(prefix: str, account: str, region: str) -> tuple[str, str]:
        """Every bucket name the stacks create: (etcd snapshots, Image Builder logs)."""
        return f"{prefix}-etcd-snapshots-{account}-{region}", f"{prefix}-imagebuilder-logs-{account}-{region}"

    @property
    def control_plane_group_names(self) -> tuple[str, ...]:
        return tuple(f"{self.resource_prefix}-control-plane-{i}" for i in range(self.control_plane_count))

    def worker_group_name(self, group: WorkerGroupConfig) -> str:
        return f"{self.resource_prefix}-workers-{group.name}"

    def control_plane_zone(self, index: int) -> str:
        """Control-plane node ``index`` lives in this AZ: round-robin, so 3 nodes use 3 AZs."""
        return self.availability_zones[index % len(self.availability_zones)]

    @classmethod
    def from_context(cls, get: Callable[[str], Any], given_keys: Iterable[str] | None = None) -> ClusterConfig:
        """Build and validate from a context getter (``app.node.try_get_context``). With ``given_keys`` (the app's
        ``app.node.get_all_context()``) a key that looks like ours but that nothing reads is an error too."""
        return _Parser(get, given_keys=list(given_keys or ())).parse()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ClusterConfig:
        """Build and validate from a plain mapping; here unknown (misspelt) keys are errors too."""
        return _Parser(values.get, given_keys=list(values)).parse()


class _Parser:
    """Reads every key, records each problem, and builds the config only if there is none."""

    def __init__(self, get: Callable[[str], Any], given_keys: list[str] | None = None) -> None:
        self._get = get
        self._given_keys = given_keys or []
        self.problems: list[str] = []

    def bad(self, key: str, value: Any, allowed: str) -> None:
        self.problems.append(f"'{key}' = {json.dumps(value, default=str)}: {allowed}")

    def raw(self, key: str) -> Any:
        value = self._get(key)
        # `-c key=value` gives strings; lists, objects, numbers and booleans are parsed as JSON.
        if isinstance(value, str) and value[:1] in "[{0123456789-" and value not in ("",):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return value

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self._get(key)  # never JSON-parsed: "1.34" stays a string
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            self.bad(key, value, "must be a non-empty string")
            return default
        return value

    def integer(self, key: str, default: int, minimum: int, maximum: int) -> int:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(key, value, f"must be a whole number between {minimum} and {maximum}")
            return default
        if not minimum <= value <= maximum:
            self.bad(key, value, f"must be between {minimum} and {maximum}")
        return value

    def string_list(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.bad(key, value, "must be a list of strings (JSON list or comma-separated)")
            return default
        return tuple(value)

    def instance_type(self, key: str, value: str, tenancy: str, control_plane: bool) -> None:
        match = _INSTANCE_TYPE.match(value)
        if not match:
            self.bad(key, value, "must be an EC2 instance type such as 'm6i.large'")
            return
        family, size = match.groups()
        if tenancy == "dedicated" and family in NO_DEDICATED_FAMILIES:
            self.bad(
                key,
                value,
                f"instance family '{family}' cannot run as a Dedicated Instance; "
                "choose a non-burstable family such as m6i, m7i, c6i or r6i",
            )
        if control_plane and size in TOO_SMALL_FOR_CONTROL_PLANE:
            self.bad(key, value, "a control-plane node needs at least 2 vCPUs and 2 GiB (size 'large' or bigger)")

    def cidr(self, key: str, value: str) -> ipaddress.IPv4Network | None:
        try:
            return ipaddress.IPv4Network(value, strict=True)
        except ValueError as err:
            self.bad(key, value, f"must be an IPv4 CIDR with no host bits set, such as '10.0.0.0/8' ({err})")
            return None

    def parse(self) -> ClusterConfig:
        cluster_name = self.string("clusterName", "dedicated-k8s") or "dedicated-k8s"
        if not _CLUSTER_NAME.match(cluster_name):
            self.bad(
                "clusterName",
                cluster_name,
                "must be 3-24 characters of lowercase letters, digits and '-', starting with a letter",
            )

        version = self.string("kubernetesVersion") or default_kubernetes_version()
        if not _K8S_VERSION.match(version):
            self.bad("kubernetesVersion", version, "must be a full Kubernetes version such as '1.34.2'")
        deployed = self.string("deployedKubernetesVersion")
        if deployed is not None:
            if not _K8S_VERSION.match(deployed):
                self.bad(
                    "deployedKubernetesVersion", deployed, "must be the running cluster's version such as '1.34.2'"
                )
            elif _K8S_VERSION.match(version):
                try:
                    check_upgrade(deployed, version)
                except VersionSkewError as err:
                    self.bad("kubernetesVersion", version, f"refused by the version skew guard: {err}")

        ami = self.string("ami", f"/dedicated-k8s/ami/kubernetes-{'-'.join(version.split('.')[:2])}")
        assert ami is not None
        if not (_AMI_ID.match(ami) or _SSM_NAME.match(ami)):
            self.bad(
                "ami", ami, "must be an AMI ID ('ami-0123456789abcdef0') or an SSM parameter name starting with '/'"
            )

        tenancy = self.string("tenancy", "dedicated") or "dedicated"
        if tenancy not in TENANCIES:
            hint = (
                " ('host' needs a host resource group that this product does not manage)" if tenancy == "host" else ""
            )
            self.bad("tenancy", tenancy, f"must be one of {', '.join(TENANCIES)}{hint}")

        cp_type = self.string("controlPlaneInstanceType", "m6i.large") or "m6i.large"
        self.instance_type("controlPlaneInstanceType", cp_type, tenancy, control_plane=True)

        cp_count = self.integer("controlPlaneCount", 3, 1, 7)
        if cp_count < 3 or cp_count % 2 == 0:
            self.bad(
                "controlPlaneCount",
                cp_count,
                "must be an odd number, 3, 5 or 7: etcd needs an odd member count of at least 3 to survive a node loss",
            )

        region = self.string("region", "us-east-1") or "us-east-1"
        if not _REGION.match(region):
            self.bad("region", region, "must be an AWS region name such as 'us-east-1'")
        account = self.string("account")
        irsa = self.boolean("irsa", False)
        cluster_autoscaler = self.boolean("clusterAutoscaler", False)
        create_auto_scaling_slr = self.boolean("createAutoScalingServiceLinkedRole", False)
        api_deletion_protection = self.boolean("apiLoadBalancerDeletionProtection", False)
        if account is not None and not _ACCOUNT.match(account):
            self.bad("account", account, "must be a 12-digit AWS account ID")
        if _CLUSTER_NAME.match(cluster_name) and _REGION.match(region):
            # The snapshot bucket's name embeds the account and region and S3 allows 63 characters: say so at
            # synth, not at deploy. (ImageStack checks its own logs bucket the same way: only it creates one.)
            names = [f"dk8s-{cluster_name}-etcd-snapshots-{'0' * 12}-{region}"]
            if irsa:
                names.append(f"dk8s-{cluster_name}-irsa-oidc-{'0' * 12}-{region}")
            problem = next((p for p in (bucket_name_problem(n, cluster_name) for n in names) if p), None)
            if problem:
                self.bad("clusterName", cluster_name, f"too long for region {region}: {problem}")

        zones = self.string_list("availabilityZones", tuple(f"{region}{suffix}" for suffix in "abc"))
        if len(set(zones)) < 3:
            self.bad(
                "availabilityZones",
                list(zones),
                "must name at least 3 distinct availability zones: one control-plane node per AZ",
            )
        zone_name = re.compile(rf"^{re.escape(region)}[a-z]$")
        for zone in zones:
            if not zone_name.match(zone):
                self.bad(
                    "availabilityZones",
                    zone,
                    f"must be an availability zone of region '{region}': the region's name and one letter "
                    f"such as '{region}a'",
                )
        for zone in sorted({z for z in zones if zones.count(z) > 1}):
            self.bad(
                "availabilityZones",
                zone,
                f"is listed {zones.count(zone)} times: each zone gets one subnet (under the API load balancer "
                "and every VPC endpoint), so name each zone once",
            )

        vpc = self._vpc(zones)
        worker_groups = self._worker_groups(tenancy)

        api_cidrs = self._api_access_cidrs()

        interval = self.integer("snapshotIntervalMinutes", 30, 5, 1440)
        retention = self.integer("snapshotRetentionDays", 14, 1, 3650)

        emails = self.string_list("alarmEmails", ())
        for email in emails:
            if not _EMAIL.match(email):
                self.bad("alarmEmails", email, "must be an e-mail address")

        audit_retention = self.raw("auditLogRetentionDays")
        if audit_retention is None:
            audit_retention = 365
        elif isinstance(audit_retention, bool) or audit_retention not in LOG_RETENTION_DAYS:
            allowed = ", ".join(map(str, LOG_RETENTION_DAYS))
            self.bad("auditLogRetentionDays", audit_retention, f"must be one of CloudWatch Logs' periods: {allowed}")
            audit_retention = 365

        for key in self._unknown_keys():
            self.bad(key, self._get(key), _unknown_key_hint(key))

        if self.problems:
            raise ConfigError(self.problems)
        return ClusterConfig(
            cluster_name=cluster_name,
            kubernetes_version=version,
            ami=ami,
            control_plane_instance_type=cp_type,
            control_plane_count=cp_count,
            worker_groups=worker_groups,
            tenancy=tenancy,
            vpc=vpc,
            availability_zones=zones,
            api_access_cidrs=api_cidrs,
            snapshot_interval_minutes=interval,
            snapshot_retention_days=retention,
            alarm_emails=emails,
            audit_log_retention_days=audit_retention,
            account=account,
            region=region,
            deployed_kubernetes_version=deployed,
            irsa=irsa,
            cluster_autoscaler=cluster_autoscaler,
            create_auto_scaling_service_linked_role=create_auto_scaling_slr,
            api_load_balancer_deletion_protection=api_deletion_protection,
        )

    def _unknown_keys(self) -> list[str]:
        # CDK's context also carries its own keys (feature flags, CLI switches, the lookup cache); those are not
        # ours, unless one is ours in another spelling ('vpc-cidr'), and the pipeline's keys are PipelineSettings'.
        known = CONTEXT_KEYS + PIPELINE_CONTEXT_KEYS
        spellings = {_spelling(k) for k in known}
        return [
            k for k in self._given_keys if k not in known and (_OUR_KEY_SHAPE.match(k) or _spelling(k) in spellings)
        ]

    def _api_access_cidrs(self) -> tuple[str, ...]:
        """The networks that may reach the API server on 6443: private ranges only, unless the operator opts in
        to public ones with ``allowPublicApiAccessCidrs``; never all of IPv4, in one range or in several."""
        api_cidrs = self.string_list("apiAccessCidrs", ())
        allow_public = self.boolean("allowPublicApiAccessCidrs", False)
        networks = [n for n in (self.cidr("apiAccessCidrs", value) for value in api_cidrs) if n is not None]
        for network in networks:
            if network.prefixlen == 0:
                self.bad(
                    "apiAccessCidrs",
                    str(network),
                    "the API server is internal; open it to named networks, never 0.0.0.0/0",
                )
            elif private_range_of(network) is None and not allow_public:
                self.bad(
                    "apiAccessCidrs",
                    str(network),
                    "is not a private range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10); "
                    "to open the API server to a public network, set allowPublicApiAccessCidrs=true",
                )
        everything = ipaddress.IPv4Network("0.0.0.0/0")
        if all(n.prefixlen > 0 for n in networks) and everything in ipaddress.collapse_addresses(networks):
            self.bad(
                "apiAccessCidrs",
                list(api_cidrs),
                "together these ranges are all of IPv4 (0.0.0.0/0); open the API server to named networks",
            )
        return api_cidrs

    def vpc_cidr_conflicts(self, cidr: str, network: ipaddress.IPv4Network) -> None:
        """Refuse a VPC range that overlaps the cluster's pod or service range, naming both."""
        for name, other in (
            ("pod CIDR (kubeadm podSubnet)", POD_CIDR),
            ("service CIDR (kubeadm serviceSubnet)", SERVICE_CIDR),
        ):
            if network.overlaps(ipaddress.IPv4Network(other)):
                self.bad(
                    "vpcCidr",
                    cidr,
                    f"overlaps the cluster's {name} {other}: a node could not tell a VPC address from a pod or "
                    "service address; choose a range outside it",
                )

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            self.bad(key, value, "must be true or false")
            return default
        return value

    def _vpc(self, zones: tuple[str, ...]) -> VpcConfig:
        vpc_id = self.string("vpcId")
        endpoints = self.string("vpcEndpoints", "create") or "create"
        if endpoints not in VPC_ENDPOINT_MODES:
            self.bad("vpcEndpoints", endpoints, f"must be one of {', '.join(VPC_ENDPOINT_MODES)}")
        elif endpoints == "existing" and vpc_id is None:
            self.bad(
                "vpcEndpoints",
                endpoints,
                "'existing' is only valid with 'vpcId' (an imported VPC that already has the endpoints); "
                "a new VPC gets its own",
            )
        retain = self.boolean("retainNetworkOnDelete", False)
        if retain and endpoints == "existing":
            self.bad(
                "retainNetworkOnDelete",
                retain,
                "this stack creates no network resources with 'vpcEndpoints' = 'existing': nothing to retain",
            )
        create_endpoints = endpoints != "existing"
        cidr = self.string("vpcCidr", None if vpc_id else "10.40.0.0/16")
        subnets = self.string_list("privateSubnetIds", ())
        route_tables = self.string_list("privateRouteTableIds", ())
        if vpc_id is None:
            if subnets or route_tables:
                self.bad("privateSubnetIds", list(subnets), "is only used with 'vpcId' (importing an existing VPC)")
            if cidr is not None:
                network = self.cidr("vpcCidr", cidr)
                if network is not None and not 16 <= network.prefixlen <= 22:
                    self.bad("vpcCidr", cidr, "must be between /16 and /22 so each AZ gets a usable private subnet")
                if network is not None and not network.is_private:
                    self.bad("vpcCidr", cidr, "must be a private (RFC 1918) range")
                if network is not None:
                    self.vpc_cidr_conflicts(cidr, network)
            return VpcConfig(
                cidr=cidr,
                vpc_id=None,
                private_subnet_ids=(),
                private_route_table_ids=(),
                create_endpoints=create_endpoints,
                retain_on_delete=retain,
            )
        if not _VPC_ID.match(vpc_id):
            self.bad("vpcId", vpc_id, "must be a VPC ID such as 'vpc-0123456789abcdef0'")
        if cidr is None:
            self.bad("vpcCidr", None, "is required with 'vpcId': the security groups admit the cluster's own network")
        else:
            network = self.cidr("vpcCidr", cidr)
            if network is not None:
                self.vpc_cidr_conflicts(cidr, network)
        if len(subnets) != len(zones) or len(subnets) < 3:
            self.bad(
                "privateSubnetIds",
                list(subnets),
                f"must list one private subnet per availability zone ({len(zones)} zones, at least 3): "
                "the control plane needs a subnet in each of 3 AZs",
            )
        for subnet in subnets:
            if not _SUBNET_ID.match(subnet):
                self.bad("privateSubnetIds", subnet, "must be a subnet ID such as 'subnet-0123456789abcdef0'")
        if len(route_tables) != len(subnets):
            self.bad(
                "privateRouteTableIds",
                list(route_tables),
                "must list the route table of each private subnet, in the same order "
                "(for the S3 and DynamoDB gateway endpoints)",
            )
        for table in route_tables:
            if not _ROUTE_TABLE_ID.match(table):
                self.bad("privateRouteTableIds", table, "must be a route table ID such as 'rtb-0123456789abcdef0'")
        return VpcConfig(
            cidr=cidr,
            vpc_id=vpc_id,
            private_subnet_ids=subnets,
            private_route_table_ids=route_tables,
            create_endpoints=create_endpoints,
            retain_on_delete=retain,
        )

    def _worker_groups(self, tenancy: str) -> tuple[WorkerGroupConfig, ...]:
        value = self.raw("workerGroups")
        if value is None:
            value = [{"name": "general", "instanceType": "m6i.large", "minSize": 2, "maxSize": 6, "desiredCapacity": 2}]
        if not isinstance(value, list) or not value:
            self.bad(
                "workerGroups",
                value,
                "must be a non-empty list of {name, instanceType, minSize, maxSize, desiredCapacity}",
            )
            return ()
        groups: list[WorkerGroupConfig] = []
        names: set[str] = set()
        for index, item in enumerate(value):
            key = f"workerGroups[{index}]"
            if not isinstance(item, dict):
                self.bad(key, item, "must be an object {name, instanceType, minSize, maxSize, desiredCapacity}")
                continue
            name = item.get("name")
            if not isinstance(name, str) or not _GROUP_NAME.match(name):
                self.bad(f"{key}.name", name, "must be 1-21 lowercase letters, digits or '-', starting with a letter")
                name = f"group{index}"
            if name in names:
                self.bad(f"{key}.name", name, "must be unique among worker groups")
            names.add(name)
            instance_type = item.get("instanceType", "m6i.large")
            if not isinstance(instance_type, str):
                self.bad(f"{key}.instanceType", instance_type, "must be an EC2 instance type such as 'm6i.large'")
                instance_type = "m6i.large"
            else:
                self.instance_type(f"{key}.instanceType", instance_type, tenancy, control_plane=False)
            sizes: dict[str, int] = {}
            for size_key, default in (("minSize", 1), ("maxSize", 3), ("desiredCapacity", None)):
                raw = item.get(size_key, default if default is not None else item.get("minSize", 1))
                if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 1000:
                    self.bad(f"{key}.{size_key}", raw, "must be a whole number between 0 and 1000")
                    raw = 0
                sizes[size_key] = raw
            if sizes["minSize"] > sizes["maxSize"]:
                self.bad(f"{key}.minSize", sizes["minSize"], f"must not exceed maxSize ({sizes['maxSize']})")
            elif not sizes["minSize"] <= sizes["desiredCapacity"] <= sizes["maxSize"]:
                self.bad(
                    f"{key}.desiredCapacity",
                    sizes["desiredCapacity"],
                    f"must be between minSize ({sizes['minSize']}) and maxSize ({sizes['maxSize']})",
                )
            unknown = set(item) - {"name", "instanceType", "minSize", "maxSize", "desiredCapacity"}
            for extra in sorted(unknown):
                self.bad(f"{key}.{extra}", item[extra], "is not a known worker group key")
            groups.append(
                WorkerGroupConfig(
                    name=name,
                    instance_type=instance_type,
                    min_size=sizes["minSize"],
                    max_size=sizes["maxSize"],
                    desired_capacity=sizes["desiredCapacity"],
                )
            )
        return tuple(groups)
