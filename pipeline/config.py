"""The pipeline's own settings, read from context once and validated (errors name the key).

pipelineSource                 codeconnections (default) | codecommit | s3
pipelineConnectionArn          CodeConnections (CodeStar) connection ARN; when absent the pipeline reads it at
                               deploy time from the SSM parameter <ssmPrefix>/pipeline/connection-arn, so no
                               ARN has to live in cdk.json
pipelineRepository             "owner/repo" for the connection (required with codeconnections)
pipelineBranch                 default "main"
pipelineCodeCommitRepository   repository name (codecommit)
pipelineS3Bucket, pipelineS3Key  source archive (s3; default bucket dk8s-<cluster>-pipeline-source-<account>-<region>)
pipelineAccount, pipelineRegion  where the pipeline lives (default: the cluster's)
stagingAccount, stagingRegion, productionAccount, productionRegion
stagingOverrides, productionOverrides   cluster config keys for that stage (JSON object), e.g. sizes
stagingClusterName, productionClusterName   the stage's cluster name (default <clusterName>-staging /
                               <clusterName>-production); must leave the snapshot bucket name (which embeds
                               account and region) within S3's 63 characters
codeArtifactDomain, codeArtifactRepository, codeArtifactOwner   optional pip/npm mirror
imageBuildVpcId, imageBuildSubnetId   the private subnet (and its VPC) where the pipeline's image stack runs the
                               AMI build (both or neither); when absent, CloudFormation reads them at deploy time
                               from the SSM parameters <ssmPrefix>/pipeline/image-build-vpc-id and
                               <ssmPrefix>/pipeline/image-build-subnet-id, so no account's IDs live in cdk.json
pipelineNotificationEmails     who hears about failures and approval waits
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

# The ID and region formats are the cluster config's, so both accept exactly the same values.
from stages.config import _ACCOUNT, _REGION, _SUBNET_ID, _VPC_ID, CONTEXT_KEYS, ClusterConfig, ConfigError

SOURCES = ("codeconnections", "codecommit", "s3")
_CONNECTION_ARN = re.compile(
    r"^arn:aws[a-z-]*:(codeconnections|codestar-connections):[a-z0-9-]+:\d{12}:connection/[\w-]+$"
)
_REPOSITORY = re.compile(r"^[\w.-]+/[\w.-]+$")
_NAME = re.compile(r"^[\w.-]{1,100}$")

# Keys a stage may override; the cluster name is derived (<clusterName>-<stage>), never overridden.
STAGE_OVERRIDE_KEYS = tuple(k for k in CONTEXT_KEYS if k != "clusterName")
# What a stage gets unless its <stage>Overrides say otherwise: production's API load balancer cannot be deleted
# by accident (ELB deletion protection); staging, like `cdk deploy K8sClusterStack`, stays deletable.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {"production": {"apiLoadBalancerDeletionProtection": True}}


@dataclass(frozen=True)
class StageTarget:
    name: str
    account: str | None
    region: str | None
    overrides: dict[str, Any]
    cluster_name: str | None = None  # default <clusterName>-<stage>
    config: ClusterConfig | None = None  # the stage's validated cluster configuration


def stage_cluster_config(get: Callable[[str], Any], target: StageTarget) -> ClusterConfig:
    """The cluster configuration of one pipeline stage: the base context, the stage's overrides on top.

    The cluster is named ``<clusterName>-<stage>``; account and region come from ``<stage>Account`` /
    ``<stage>Region`` (or the overrides, or the base). When the region changes and the overrides name no
    zones, the zones default to the new region's a/b/c. Problems name the stage's context key.
    """
    base_name = get("clusterName") or "dedicated-k8s"
    name_key = f"{target.name}ClusterName"
    values: dict[str, Any] = {**STAGE_DEFAULTS.get(target.name, {}), **target.overrides}
    values["clusterName"] = target.cluster_name or f"{base_name}-{target.name}"
    if target.account is not None:
        values["account"] = target.account
    if target.region is not None:
        values["region"] = target.region
    region_changed = "region" in values and values["region"] != (get("region") or "us-east-1")
    if region_changed and "availabilityZones" not in values:
        values["availabilityZones"] = None

    def lookup(key: str) -> Any:
        return values[key] if key in values else get(key)

    try:
        config = ClusterConfig.from_context(lookup)
    except ConfigError as err:
        # The stage's cluster name is set by <stage>ClusterName (never by clusterName): name that key.
        raise ConfigError(
            [
                f"{target.name} stage ({name_key}, {target.name}Overrides): "
                + p.replace("'clusterName' = ", f"'{name_key}' = ", 1)
                for p in err.problems
            ]
        ) from err
    # ClusterConfig already refuses a cluster name too long for the region's bucket names (named above).
    return config


@dataclass(frozen=True)
class PipelineSettings:
    source: str
    branch: str
    connection_arn: str | None = None
    repository: str | None = None
    codecommit_repository: str | None = None
    s3_bucket: str | None = None
    s3_key: str = "dedicated-k8s/source.zip"
    account: str | None = None
    region: str | None = None
    staging: StageTarget = field(default_factory=lambda: StageTarget("staging", None, None, {}))
    production: StageTarget = field(default_factory=lambda: StageTarget("production", None, None, {}))
    code_artifact_domain: str | None = None
    code_artifact_repository: str | None = None
    code_artifact_owner: str | None = None
    notification_emails: tuple[str, ...] = ()
    image_build_vpc_id: str | None = None
    image_build_subnet_id: str | None = None

    @classmethod
    def from_context(cls, get: Callable[[str], Any]) -> PipelineSettings:
        problems: list[str] = []

        def bad(key: str, value: Any, allowed: str) -> None:
            problems.append(f"'{key}' = {json.dumps(value, default=str)}: {allowed}")

        def text(key: str, pattern: re.Pattern[str] | None = None, allowed: str = "") -> str | None:
            value = get(key)
            if value is None:
                return None
            if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
                bad(key, value, allowed or "must be a string")
                return None
            return value

        def overrides(key: str) -> dict[str, Any]:
            value = get(key)
            if value is None:
                return {}
            if isinstance(value, str):
                with contextlib.suppress(json.JSONDecodeError):
                    value = json.loads(value)
            if not isinstance(value, dict):
                bad(key, value, "must be an object of cluster configuration keys")
                return {}
            for unknown in sorted(set(value) - set(STAGE_OVERRIDE_KEYS)):
                allowed = ", ".join(STAGE_OVERRIDE_KEYS)
                bad(f"{key}.{unknown}", value[unknown], f"is not a stage override key; allowed: {allowed}")
            return dict(value)

        connection = text("pipelineConnectionArn", _CONNECTION_ARN, "must be a CodeConnections connection ARN")
        source = text("pipelineSource") or "codeconnections"
        if source not in SOURCES:
            bad("pipelineSource", source, f"must be one of {', '.join(SOURCES)}")
        repository = text("pipelineRepository", _REPOSITORY, "must be 'owner/repository'")
        codecommit = text("pipelineCodeCommitRepository", _NAME, "must be a CodeCommit repository name")
        if source == "codeconnections" and repository is None:
            bad("pipelineRepository", None, "is required with pipelineSource=codeconnections ('owner/repo')")
        if source == "codecommit" and codecommit is None:
            bad("pipelineCodeCommitRepository", None, "is required with pipelineSource=codecommit")
        accounts = {
            k: text(k, _ACCOUNT, "must be a 12-digit AWS account ID")
            for k in ("pipelineAccount", "stagingAccount", "productionAccount")
        }
        regions = {
            k: text(k, _REGION, "must be an AWS region name")
            for k in ("pipelineRegion", "stagingRegion", "productionRegion")
        }
        emails_raw = get("pipelineNotificationEmails") or []
        if isinstance(emails_raw, str):
            emails_raw = [e.strip() for e in emails_raw.split(",") if e.strip()]
        emails = tuple(str(e) for e in emails_raw)
        for email in emails:
            if "@" not in email:
                bad("pipelineNotificationEmails", email, "must be an e-mail address")
        domain = text("codeArtifactDomain", _NAME, "must be a CodeArtifact domain name")
        mirror = text("codeArtifactRepository", _NAME, "must be a CodeArtifact repository name")
        if (domain is None) != (mirror is None):
            bad(
                "codeArtifactRepository" if mirror is None else "codeArtifactDomain",
                None,
                "set both codeArtifactDomain and codeArtifactRepository, or neither",
            )
        build_vpc = text("imageBuildVpcId", _VPC_ID, "must be a VPC ID (vpc-...)")
        build_subnet = text("imageBuildSubnetId", _SUBNET_ID, "must be a subnet ID (subnet-...)")
        for key, value, other in (
            ("imageBuildVpcId", get("imageBuildVpcId"), get("imageBuildSubnetId")),
            ("imageBuildSubnetId", get("imageBuildSubnetId"), get("imageBuildVpcId")),
        ):
            if value is None and other is not None:
                bad(key, None, "set both imageBuildVpcId and imageBuildSubnetId, or neither (then both come from SSM)")
        settings = cls(
            source=source,
            branch=text("pipelineBranch", _NAME, "must be a branch name") or "main",
            connection_arn=connection,
            repository=repository,
            codecommit_repository=codecommit,
            s3_bucket=text("pipelineS3Bucket", re.compile(r"^[a-z0-9.-]{3,63}$"), "must be an S3 bucket name"),
            s3_key=text("pipelineS3Key") or "dedicated-k8s/source.zip",
            account=accounts["pipelineAccount"],
            region=regions["pipelineRegion"],
            staging=StageTarget(
                "staging",
                accounts["stagingAccount"],
                regions["stagingRegion"],
                overrides("stagingOverrides"),
                cluster_name=text("stagingClusterName"),
            ),
            production=StageTarget(
                "production",
                accounts["productionAccount"],
                regions["productionRegion"],
                overrides("productionOverrides"),
                cluster_name=text("productionClusterName"),
            ),
            code_artifact_domain=domain,
            code_artifact_repository=mirror,
            code_artifact_owner=text("codeArtifactOwner", _ACCOUNT, "must be a 12-digit AWS account ID"),
            notification_emails=emails,
            image_build_vpc_id=build_vpc,
            image_build_subnet_id=build_subnet,
        )
        if problems:
            raise ConfigError(problems)
        stages: dict[str, StageTarget] = {}
        for target in (settings.staging, settings.production):
            try:
                stages[target.name] = replace(target, config=stage_cluster_config(get, target))
            except ConfigError as err:
                problems.extend(err.problems)
        if problems:
            raise ConfigError(problems)
        return replace(settings, staging=stages["staging"], production=stages["production"])

    @property
    def stage_accounts(self) -> set[str | None]:
        return {t.config.account if t.config else t.account for t in (self.staging, self.production)}

    @property
    def cross_account(self) -> bool:
        """True when a stage deploys into an account other than the pipeline's (needs cross-account KMS keys)."""
        accounts = self.stage_accounts - {None}
        return bool(accounts) and accounts != {self.account}
