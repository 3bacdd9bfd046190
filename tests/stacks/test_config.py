"""Every kind of bad configuration gets one clear error naming the key, the value and what is allowed."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from stages.config import ClusterConfig, ConfigError
from tests.stacks.conftest import ROOT, default_context


def config_with(**overrides: Any) -> ClusterConfig:
    return ClusterConfig.from_mapping({**default_context(), **overrides})


def error_for(**overrides: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        config_with(**overrides)
    return str(caught.value)


def test_cdk_json_defaults_validate() -> None:
    config = config_with()
    assert config.tenancy == "dedicated"
    assert config.control_plane_count == 3
    assert len(set(config.availability_zones)) == 3
    assert config.kubernetes_version == json.loads((ROOT / "imagebuilder" / "versions.json").read_text())["kubernetes"]


@pytest.mark.parametrize(
    ("overrides", "key", "value", "allowed"),
    [
        ({"vpcCidr": "10.40.0.1/16"}, "'vpcCidr'", "10.40.0.1/16", "no host bits"),
        ({"vpcCidr": "not-a-cidr"}, "'vpcCidr'", "not-a-cidr", "IPv4 CIDR"),
        ({"vpcCidr": "8.8.0.0/16"}, "'vpcCidr'", "8.8.0.0/16", "private (RFC 1918)"),
        ({"apiAccessCidrs": ["0.0.0.0/0"]}, "'apiAccessCidrs'", "0.0.0.0/0", "never 0.0.0.0/0"),
        ({"availabilityZones": ["us-east-1a", "us-east-1b"]}, "'availabilityZones'", "us-east-1b", "at least 3"),
        ({"availabilityZones": ["us-east-1a", "us-east-1a", "us-east-1b"]}, "'availabilityZones'", "", "distinct"),
        (
            {"availabilityZones": ["us-west-2a", "us-east-1b", "us-east-1c"]},
            "'availabilityZones'",
            "us-west-2a",
            "region",
        ),
        ({"controlPlaneCount": 4}, "'controlPlaneCount'", "4", "odd number"),
        ({"controlPlaneCount": 1}, "'controlPlaneCount'", "1", "at least 3"),
        ({"controlPlaneCount": "three"}, "'controlPlaneCount'", "three", "whole number"),
        ({"tenancy": "shared"}, "'tenancy'", "shared", "dedicated, default"),
        ({"tenancy": "host"}, "'tenancy'", "host", "host resource group"),
        ({"controlPlaneInstanceType": "t3.large"}, "'controlPlaneInstanceType'", "t3.large", "Dedicated Instance"),
        ({"controlPlaneInstanceType": "m6i.medium"}, "'controlPlaneInstanceType'", "m6i.medium", "2 vCPUs"),
        ({"controlPlaneInstanceType": "bogus"}, "'controlPlaneInstanceType'", "bogus", "EC2 instance type"),
        ({"clusterName": "Bad_Name"}, "'clusterName'", "Bad_Name", "lowercase"),
        ({"kubernetesVersion": "1.34"}, "'kubernetesVersion'", "1.34", "full Kubernetes version"),
        ({"ami": "my-ami"}, "'ami'", "my-ami", "AMI ID"),
        ({"region": "mars-1"}, "'region'", "mars-1", "AWS region"),
        ({"auditLogRetentionDays": 100}, "'auditLogRetentionDays'", "100", "CloudWatch Logs' periods"),
        ({"auditLogRetentionDays": True}, "'auditLogRetentionDays'", "true", "CloudWatch Logs' periods"),
        ({"account": "12345"}, "'account'", "12345", "12-digit"),
        ({"snapshotIntervalMinutes": 1}, "'snapshotIntervalMinutes'", "1", "between 5 and 1440"),
        ({"alarmEmails": ["nobody"]}, "'alarmEmails'", "nobody", "e-mail"),
        ({"colour": "blue"}, "'colour'", "blue", "not a known key"),
    ],
)
def test_bad_value_is_named_with_what_is_allowed(overrides: dict[str, Any], key: str, value: str, allowed: str) -> None:
    message = error_for(**overrides)
    assert key in message
    assert value in message
    assert allowed in message


def test_worker_min_above_max_is_rejected() -> None:
    message = error_for(workerGroups=[{"name": "big", "instanceType": "m6i.large", "minSize": 5, "maxSize": 2}])
    assert "'workerGroups[0].minSize' = 5" in message
    assert "must not exceed maxSize (2)" in message


def test_worker_desired_outside_range_is_rejected() -> None:
    message = error_for(
        workerGroups=[{"name": "g", "instanceType": "m6i.large", "minSize": 1, "maxSize": 3, "desiredCapacity": 9}]
    )
    assert "'workerGroups[0].desiredCapacity' = 9" in message


def test_worker_burstable_type_cannot_run_dedicated() -> None:
    message = error_for(workerGroups=[{"name": "g", "instanceType": "t3.large", "minSize": 1, "maxSize": 2}])
    assert "'workerGroups[0].instanceType' = \"t3.large\"" in message


def test_burstable_types_are_allowed_on_default_tenancy() -> None:
    config = config_with(tenancy="default", controlPlaneInstanceType="t3.large")
    assert config.control_plane_instance_type == "t3.large"


def test_imported_vpc_needs_a_subnet_in_each_of_three_zones() -> None:
    message = error_for(
        vpcId="vpc-0123456789abcdef0",
        privateSubnetIds=["subnet-0123456789abcdef0", "subnet-0123456789abcdef1"],
        privateRouteTableIds=["rtb-0123456789abcdef0", "rtb-0123456789abcdef1"],
    )
    assert "'privateSubnetIds'" in message
    assert "one private subnet per availability zone" in message


def test_imported_vpc_with_three_subnets_validates() -> None:
    config = config_with(
        vpcId="vpc-0123456789abcdef0",
        privateSubnetIds=[f"subnet-0123456789abcdef{i}" for i in range(3)],
        privateRouteTableIds=[f"rtb-0123456789abcdef{i}" for i in range(3)],
    )
    assert config.vpc.imported
    assert config.vpc.private_subnet_ids[2] == "subnet-0123456789abcdef2"


def test_command_line_strings_are_parsed_like_cdk_json_values() -> None:
    config = config_with(controlPlaneCount="5", apiAccessCidrs='["10.1.0.0/16","10.2.0.0/16"]')
    assert config.control_plane_count == 5
    assert config.api_access_cidrs == ("10.1.0.0/16", "10.2.0.0/16")
    assert config_with(apiAccessCidrs="10.1.0.0/16,10.2.0.0/16").api_access_cidrs == ("10.1.0.0/16", "10.2.0.0/16")


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        config_with(controlPlaneCount=4, tenancy="shared", vpcCidr="nope")
    assert len(caught.value.problems) == 3


def test_five_control_plane_nodes_spread_round_robin_over_three_zones() -> None:
    config = config_with(controlPlaneCount=5)
    assert [config.control_plane_zone(i) for i in range(5)] == [
        "us-east-1a",
        "us-east-1b",
        "us-east-1c",
        "us-east-1a",
        "us-east-1b",
    ]


def test_app_exits_2_with_the_message_on_bad_context() -> None:
    result = subprocess.run(
        [sys.executable, "app.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"CDK_CONTEXT_JSON": json.dumps({"controlPlaneCount": 2}), "PATH": "/usr/bin:/bin", "HOME": "/tmp"},
        check=False,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "'controlPlaneCount' = 2" in result.stderr


@pytest.mark.parametrize(("name", "region", "ok"), [
    ("dedicated-k8s", "us-east-1", True),
    ("dedicated-k8s", "eu-west-1", True),
    ("a-rather-long-name-22", "us-east-1", False),
    ("sixteen-chars-xy", "ap-southeast-2", False),
])  # fmt: skip
def test_a_cluster_name_too_long_for_the_regions_bucket_names_is_refused_naming_the_limit(
    name: str, region: str, ok: bool
) -> None:
    context = {"clusterName": name, "region": region}
    if ok:
        config = ClusterConfig.from_mapping(context)
        assert len(config.snapshot_bucket_name("1" * 12, region)) <= 63
    else:
        with pytest.raises(ConfigError) as err:
            ClusterConfig.from_mapping(context)
        assert "'clusterName'" in str(err.value) and "use at most" in str(err.value) and region in str(err.value)


def test_audit_log_retention_defaults_to_a_year_and_accepts_cloudwatch_periods() -> None:
    assert config_with().audit_log_retention_days == 365
    assert config_with(auditLogRetentionDays=731).audit_log_retention_days == 731
    assert config_with(auditLogRetentionDays="90").audit_log_retention_days == 90  # `-c key=value` gives a string


def test_irsa_is_off_by_default_and_the_switch_takes_json_or_command_line_booleans() -> None:
    # Opt-in: the issuer bucket's public policy needs an account without S3 Block Public Access (docs/irsa.md).
    assert config_with().irsa is False
    assert config_with(irsa=True).irsa is True
    assert config_with(irsa=False).irsa is False
    assert config_with(irsa="false").irsa is False  # `-c irsa=false`
    assert config_with(irsa="true").irsa is True
    message = error_for(irsa="off")
    assert "'irsa' = \"off\"" in message and "true or false" in message


@pytest.mark.parametrize(("region", "suffix"), [
    ("eu-west-1", "amazonaws.com"),
    ("us-gov-west-1", "amazonaws.com"),
    ("cn-north-1", "amazonaws.com.cn"),
])  # fmt: skip
def test_the_irsa_issuer_is_the_issuer_buckets_regional_https_url_with_the_partitions_suffix(
    region: str, suffix: str
) -> None:
    config = ClusterConfig.from_mapping({"clusterName": "blue", "region": region})
    bucket = config.irsa_issuer_bucket_name("111122223333", region)
    assert bucket == f"dk8s-blue-irsa-oidc-111122223333-{region}"
    assert config.irsa_issuer_url("111122223333", region) == f"https://{bucket}.s3.{region}.{suffix}"
    # Inside a stack the URL suffix is the stack's token; it replaces the region's default.
    assert config.irsa_issuer_url("A", "R", "${AWS::URLSuffix}").endswith(".s3.R.${AWS::URLSuffix}")
    # A second cluster (blue/green) gets its own issuer: two clusters never share signing-key documents.
    green = ClusterConfig.from_mapping({"clusterName": "green", "region": region})
    assert green.irsa_issuer_bucket_name("111122223333", region) != bucket


def test_every_accepted_cluster_name_leaves_the_irsa_issuer_bucket_within_s3s_limit() -> None:
    region = "ap-southeast-2"
    for length in range(3, 25):
        name = ("a" * length)[:length]
        try:
            config = ClusterConfig.from_mapping({"clusterName": name, "region": region, "irsa": True})
        except ConfigError as err:
            assert "use at most" in str(err)
            continue
        assert len(config.irsa_issuer_bucket_name("1" * 12, region)) <= 63, name


def test_api_load_balancer_deletion_protection_is_a_typed_per_stage_switch_off_by_default() -> None:
    assert config_with().api_load_balancer_deletion_protection is False
    assert config_with(apiLoadBalancerDeletionProtection=True).api_load_balancer_deletion_protection is True
    assert config_with(apiLoadBalancerDeletionProtection="true").api_load_balancer_deletion_protection is True
    message = error_for(apiLoadBalancerDeletionProtection="on")
    assert "'apiLoadBalancerDeletionProtection' = \"on\"" in message and "true or false" in message


def test_the_production_stage_turns_deletion_protection_on_unless_its_overrides_say_otherwise() -> None:
    from pipeline.config import PipelineSettings

    def stages(**context: Any) -> PipelineSettings:
        values = {**default_context(), **context}
        return PipelineSettings.from_context(values.get)

    default = stages()
    assert default.production.config is not None and default.staging.config is not None
    assert default.production.config.api_load_balancer_deletion_protection is True
    assert default.staging.config.api_load_balancer_deletion_protection is False
    # The base context is the dev stack's: it does not turn production's protection off.
    assert stages(apiLoadBalancerDeletionProtection=False).production.config.api_load_balancer_deletion_protection  # type: ignore[union-attr]
    off = stages(productionOverrides={"apiLoadBalancerDeletionProtection": False}).production.config
    assert off is not None and off.api_load_balancer_deletion_protection is False
    with pytest.raises(ConfigError, match="apiLoadBalancerDeletionProtection"):
        stages(productionOverrides={"apiLoadBalancerDeletionProtection": "maybe"})
