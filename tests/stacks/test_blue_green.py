"""Blue/green: a second cluster (green) deploys into the first one's VPC and subnets (blue) beside it.

Blue creates the VPC and its endpoints (and retains them on delete); green imports the same VPC, subnets
and route tables with ``vpcEndpoints: existing``. Both are synthesized as two separate apps (as two
``cdk deploy`` runs with different ``clusterName``), then compared: no physical name in common, no
security-group rule that admits the other cluster's nodes to etcd or the kubelet, no second private-DNS
endpoint for any service, and both clean under cfn-lint and cdk-nag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import pytest

from scripts.synth_and_check import offline_environment, run_cfn_lint
from stages.compose import add_cluster_stacks
from stages.config import ClusterConfig, ConfigError
from stages.nag import apply_policy_checks
from stages.network import GATEWAY_ENDPOINTS, INTERFACE_ENDPOINTS
from tests.stacks.conftest import default_context

VPC_ID = "vpc-0a1b2c3d4e5f60718"
SUBNETS = ["subnet-0aaaaaaaaaaaaaaa1", "subnet-0bbbbbbbbbbbbbbb2", "subnet-0ccccccccccccccc3"]
ROUTE_TABLES = ["rtb-0aaaaaaaaaaaaaaa1", "rtb-0bbbbbbbbbbbbbbb2", "rtb-0ccccccccccccccc3"]
CIDR = "10.40.0.0/16"

BLUE = {"clusterName": "blue", "vpcCidr": CIDR, "retainNetworkOnDelete": True}
GREEN = {
    "clusterName": "green",
    "vpcId": VPC_ID,
    "vpcCidr": CIDR,
    "privateSubnetIds": SUBNETS,
    "privateRouteTableIds": ROUTE_TABLES,
    "vpcEndpoints": "existing",
}

# Resource type -> the property that holds its physical name (every named resource these stacks create).
NAME_PROPERTIES = {
    "AWS::IAM::Role": "RoleName",
    "AWS::IAM::InstanceProfile": "InstanceProfileName",
    "AWS::IAM::ManagedPolicy": "ManagedPolicyName",
    "AWS::Lambda::Function": "FunctionName",
    "AWS::SQS::Queue": "QueueName",
    "AWS::S3::Bucket": "BucketName",
    "AWS::DynamoDB::Table": "TableName",
    "AWS::SecretsManager::Secret": "Name",
    "AWS::AutoScaling::AutoScalingGroup": "AutoScalingGroupName",
    "AWS::Logs::LogGroup": "LogGroupName",
    "AWS::ElasticLoadBalancingV2::LoadBalancer": "Name",
    "AWS::ElasticLoadBalancingV2::TargetGroup": "Name",
    "AWS::SSM::Parameter": "Name",
    "AWS::CloudWatch::Alarm": "AlarmName",
    "AWS::CloudWatch::Dashboard": "DashboardName",
    "AWS::EC2::LaunchTemplate": "LaunchTemplateName",
    "AWS::EC2::SecurityGroup": "GroupName",
    "AWS::EC2::VPC": "Tags",  # the Name tag, for readability only (VPC names need not be unique)
    "AWS::SNS::Topic": "TopicName",
    "AWS::Events::Rule": "Name",
    "AWS::KMS::Alias": "AliasName",
    "AWS::Scheduler::Schedule": "Name",
}
# Kinds the issue lists, which must actually be found (so the comparison below cannot pass vacuously).
MUST_BE_NAMED = (
    "AWS::IAM::Role",
    "AWS::Lambda::Function",
    "AWS::SQS::Queue",
    "AWS::S3::Bucket",
    "AWS::DynamoDB::Table",
    "AWS::SecretsManager::Secret",
    "AWS::AutoScaling::AutoScalingGroup",
    "AWS::Logs::LogGroup",
    "AWS::ElasticLoadBalancingV2::LoadBalancer",
)
ETCD_AND_KUBELET_PORTS = {2379, 2380, 10250}


@dataclass
class Cluster:
    config: ClusterConfig
    templates: dict[str, dict[str, Any]]  # stack id -> template
    paths: list[Path]
    nag_findings: list[str]

    def resources(self, kind: str) -> list[tuple[str, str, dict[str, Any]]]:
        """(stack, logical id, properties) of every resource of ``kind`` in the cluster's stacks."""
        return [
            (stack, logical_id, resource.get("Properties", {}))
            for stack, template in self.templates.items()
            for logical_id, resource in template.get("Resources", {}).items()
            if resource["Type"] == kind
        ]


def synthesize_cluster(outdir: Path, overrides: dict[str, Any]) -> Cluster:
    offline_environment()
    app = cdk.App(outdir=str(outdir), context={**default_context(), **overrides})
    config = ClusterConfig.from_context(app.node.try_get_context)
    add_cluster_stacks(app, config)
    apply_policy_checks(app)
    assembly = app.synth()
    templates, paths, findings = {}, [], []
    for stack in assembly.stacks:
        paths.append(Path(stack.template_full_path))
        templates[stack.stack_name] = json.loads(Path(stack.template_full_path).read_text())
        for message in stack.messages:
            is_nag = "AwsSolutions" in str(message.entry.data) or "CdkNag" in str(message.entry.data)
            if is_nag and message.level in (
                cdk.cx_api.SynthesisMessageLevel.ERROR,
                cdk.cx_api.SynthesisMessageLevel.WARNING,
            ):
                findings.append(f"{stack.stack_name} {message.id}: {str(message.entry.data)[:300]}")
    return Cluster(config, templates, paths, findings)


@pytest.fixture(scope="module")
def blue(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    return synthesize_cluster(tmp_path_factory.mktemp("blue"), BLUE)


@pytest.fixture(scope="module")
def green(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    return synthesize_cluster(tmp_path_factory.mktemp("green"), GREEN)


def _resolve(value: Any, stack: str, template: dict[str, Any]) -> Any:
    """A name value with references made comparable across stacks.

    A Ref to a resource of the same template becomes that resource's own physical name (if it has one) or
    ``<stack>/<logical id>`` (a generated name, unique per stack); pseudo parameters stay as they are, since
    both clusters deploy to the same account and region.
    """
    if isinstance(value, dict):
        if set(value) == {"Ref"} and not str(value["Ref"]).startswith("AWS::"):
            target = template.get("Resources", {}).get(value["Ref"])
            if target is not None:
                prop = NAME_PROPERTIES.get(target["Type"])
                if prop and prop in target.get("Properties", {}):
                    return _resolve(target["Properties"][prop], stack, template)
            return f"{stack}/{value['Ref']}"
        if set(value) == {"Fn::GetAtt"}:  # e.g. a queue's QueueName: its physical name, as above
            return _resolve({"Ref": value["Fn::GetAtt"][0]}, stack, template)
        return {key: _resolve(item, stack, template) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, stack, template) for item in value]
    return value


def physical_names(cluster: Cluster) -> dict[tuple[str, str], str]:
    """(resource type, canonical name) -> where it is defined, for every explicitly named resource."""
    names: dict[tuple[str, str], str] = {}
    for stack, template in cluster.templates.items():
        for logical_id, resource in template.get("Resources", {}).items():
            kind, props = resource["Type"], resource.get("Properties", {})
            # (Lifecycle hooks live inside their group's LifecycleHookSpecificationList: scoped by the group name.)
            if kind in NAME_PROPERTIES and NAME_PROPERTIES[kind] in props and kind != "AWS::EC2::VPC":
                value: Any = props[NAME_PROPERTIES[kind]]
            else:
                continue
            canonical = json.dumps(_resolve(value, stack, template), sort_keys=True)
            names[(kind, canonical)] = f"{stack}/{logical_id}"
    return names


# -- names --------------------------------------------------------------------------------------------


def test_the_two_clusters_share_no_physical_name(blue: Cluster, green: Cluster) -> None:
    blue_names, green_names = physical_names(blue), physical_names(green)
    found = {kind for kind, _ in blue_names} & {kind for kind, _ in green_names}
    missing = set(MUST_BE_NAMED) - found
    assert not missing, f"kinds not found, the comparison would be vacuous: {missing}"
    clashes = {key: (blue_names[key], green_names[key]) for key in blue_names.keys() & green_names.keys()}
    assert clashes == {}


def test_the_name_comparison_detects_a_clash(blue: Cluster) -> None:
    # Liveness of the check above: one cluster compared with itself clashes on every name it collected.
    names = physical_names(blue)
    assert len(names) > 40
    assert names.keys() & physical_names(blue).keys() == names.keys()


def test_every_stack_name_carries_the_cluster_name(blue: Cluster, green: Cluster) -> None:
    assert set(blue.templates) == {"dk8s-blue-iam", "dk8s-blue-cluster"}
    assert set(green.templates) == {"dk8s-green-iam", "dk8s-green-cluster"}


@pytest.mark.parametrize("kind", ["AWS::Lambda::Function", "AWS::SQS::Queue", "AWS::AutoScaling::AutoScalingGroup"])
def test_names_are_prefixed_with_the_cluster_name(blue: Cluster, green: Cluster, kind: str) -> None:
    for cluster in (blue, green):
        prop = NAME_PROPERTIES[kind]
        names = [props[prop] for _, _, props in cluster.resources(kind)]
        assert names and all(name.startswith(f"dk8s-{cluster.config.cluster_name}-") for name in names)


def test_alarms_get_generated_names_and_watch_only_their_own_cluster(blue: Cluster, green: Cluster) -> None:
    # No AlarmName: CloudFormation generates one per stack, so alarms cannot clash. Both clusters publish to
    # the same metric namespace, so each alarm must select its own cluster by its dimensions.
    for cluster in (blue, green):
        alarms = [(stack, props) for stack, _, props in cluster.resources("AWS::CloudWatch::Alarm")]
        assert len(alarms) >= 5
        for stack, props in alarms:
            assert "AlarmName" not in props
            metrics = [m.get("MetricStat", {}).get("Metric", {}) for m in props.get("Metrics", [])]
            dimensions = props.get("Dimensions", []) + [d for m in metrics for d in m.get("Dimensions", [])]
            assert dimensions, props
            name = cluster.config.cluster_name
            for dimension in dimensions:
                if dimension["Name"] == "Role":  # narrows within a cluster (with ClusterName beside it)
                    assert any(d["Name"] == "ClusterName" for d in dimensions), props
                    continue
                value = _resolve(dimension["Value"], stack, cluster.templates[stack])
                assert value == name or str(value).startswith(f"dk8s-{name}-"), (dimension, value)


# -- network: the same VPC and subnets, one set of endpoints -------------------------------------------


def test_green_uses_blues_vpc_and_subnets_and_creates_no_network(green: Cluster) -> None:
    for kind in ("AWS::EC2::VPC", "AWS::EC2::Subnet", "AWS::EC2::RouteTable", "AWS::EC2::VPCEndpoint"):
        assert green.resources(kind) == [], kind
    groups = green.resources("AWS::EC2::SecurityGroup")
    assert groups and all(props["VpcId"] == VPC_ID for _, _, props in groups)
    asgs = green.resources("AWS::AutoScaling::AutoScalingGroup")
    used = {subnet for _, _, props in asgs for subnet in props["VPCZoneIdentifier"]}
    assert used == set(SUBNETS)
    (nlb,) = green.resources("AWS::ElasticLoadBalancingV2::LoadBalancer")
    assert sorted(nlb[2]["Subnets"]) == sorted(SUBNETS)
    assert nlb[2]["Scheme"] == "internal"


def test_only_one_private_dns_endpoint_per_service_in_the_shared_vpc(blue: Cluster, green: Cluster) -> None:
    interface: list[str] = []
    gateway: list[str] = []
    for cluster in (blue, green):
        for _, _, props in cluster.resources("AWS::EC2::VPCEndpoint"):
            service = json.dumps(props["ServiceName"], sort_keys=True)
            if props.get("VpcEndpointType") == "Interface":
                assert props["PrivateDnsEnabled"] is True
                interface.append(service)
            else:
                gateway.append(service)
    assert len(interface) == len(set(interface)) == len(INTERFACE_ENDPOINTS)
    assert len(gateway) == len(set(gateway)) == len(GATEWAY_ENDPOINTS)


def test_blue_retains_the_shared_network_when_it_is_deleted(blue: Cluster) -> None:
    # RetainExceptOnCreate: kept when blue is deleted or replaced, deleted only if blue's own create rolls back
    # (then no green can be using it yet): CloudFormation's DeletionPolicy attribute documentation.
    (template,) = [t for name, t in blue.templates.items() if name.endswith("-cluster")]
    retained = {"AWS::EC2::VPC", "AWS::EC2::Subnet", "AWS::EC2::RouteTable", "AWS::EC2::VPCEndpoint"}
    seen: set[str] = set()
    for logical_id, resource in template["Resources"].items():
        if resource["Type"] in retained:
            seen.add(resource["Type"])
            assert resource.get("DeletionPolicy") == "RetainExceptOnCreate", logical_id
            assert resource.get("UpdateReplacePolicy") == "Retain", logical_id
        if resource["Type"] == "AWS::EC2::FlowLog":
            assert "DeletionPolicy" not in resource, "the flow log writes to blue's own bucket and goes with it"
        if resource["Type"] == "AWS::EC2::SecurityGroup" and "endpoint" in resource["Properties"]["GroupDescription"]:
            assert resource.get("DeletionPolicy") == "RetainExceptOnCreate"
    assert seen == retained


def test_a_plain_cluster_does_not_retain_its_network(synth: Any) -> None:
    template = synth({})["K8sClusterStack"].to_json()
    vpcs = [r for r in template["Resources"].values() if r["Type"] == "AWS::EC2::VPC"]
    assert vpcs and all("DeletionPolicy" not in r for r in vpcs)


# -- security groups: each cluster admits only its own groups to etcd and the kubelet --------------------


def _rules(cluster: Cluster) -> list[tuple[str, dict[str, Any]]]:
    """(direction, rule) for every ingress/egress rule, inline or standalone."""
    rules: list[tuple[str, dict[str, Any]]] = []
    for _, logical_id, props in cluster.resources("AWS::EC2::SecurityGroup"):
        rules += [("ingress", {**r, "GroupId": {"Ref": logical_id}}) for r in props.get("SecurityGroupIngress", [])]
        rules += [("egress", {**r, "GroupId": {"Ref": logical_id}}) for r in props.get("SecurityGroupEgress", [])]
    rules += [("ingress", props) for _, _, props in cluster.resources("AWS::EC2::SecurityGroupIngress")]
    rules += [("egress", props) for _, _, props in cluster.resources("AWS::EC2::SecurityGroupEgress")]
    return rules


def _ports(rule: dict[str, Any]) -> set[int]:
    if str(rule.get("IpProtocol")) == "-1":
        return set(range(0, 65536))
    return set(range(int(rule["FromPort"]), int(rule["ToPort"]) + 1))


def test_every_group_reference_stays_inside_its_own_cluster(blue: Cluster, green: Cluster) -> None:
    for cluster in (blue, green):
        own = {logical_id for _, logical_id, _ in cluster.resources("AWS::EC2::SecurityGroup")}
        rules = _rules(cluster)
        assert len(rules) > 15
        for _, rule in rules:
            for key in ("GroupId", "SourceSecurityGroupId", "DestinationSecurityGroupId"):
                if key in rule:
                    ref = rule[key].get("Ref") or rule[key].get("Fn::GetAtt", [None])[0]
                    assert ref in own, f"{cluster.config.cluster_name}: {key} {rule[key]} is not its own group"


def test_etcd_and_kubelet_admit_only_the_clusters_own_groups_never_a_cidr(blue: Cluster, green: Cluster) -> None:
    # Both clusters live in one CIDR, so a CIDR rule on these ports would admit the other cluster's nodes.
    for cluster in (blue, green):
        sensitive = [
            rule
            for direction, rule in _rules(cluster)
            if direction == "ingress" and _ports(rule) & ETCD_AND_KUBELET_PORTS
        ]
        assert sensitive, "the etcd and kubelet rules were found"
        for rule in sensitive:
            assert "SourceSecurityGroupId" in rule and "CidrIp" not in rule, rule


def test_each_cluster_has_its_own_api_load_balancer_on_6443(blue: Cluster, green: Cluster) -> None:
    names = []
    for cluster in (blue, green):
        (nlb,) = cluster.resources("AWS::ElasticLoadBalancingV2::LoadBalancer")
        names.append(nlb[2]["Name"])
        listeners = cluster.resources("AWS::ElasticLoadBalancingV2::Listener")
        assert [props["Port"] for _, _, props in listeners] == [6443]
        assert all(props["LoadBalancerArn"] == {"Ref": nlb[1]} for _, _, props in listeners)
    assert names == ["dk8s-blue-api", "dk8s-green-api"]


# -- policy --------------------------------------------------------------------------------------------


def test_both_clusters_pass_cfn_lint(blue: Cluster, green: Cluster) -> None:
    assert run_cfn_lint([*blue.paths, *green.paths]) == []


def test_both_clusters_pass_cdk_nag(blue: Cluster, green: Cluster) -> None:
    assert blue.nag_findings == [] and green.nag_findings == []


# -- configuration --------------------------------------------------------------------------------------


def _config(**overrides: Any) -> ClusterConfig:
    base = {k: v for k, v in default_context().items() if k in {"clusterName", "vpcCidr", "region"}}
    return ClusterConfig.from_mapping({**base, **overrides})


def test_green_config_reads_the_endpoint_mode() -> None:
    config = _config(**GREEN)
    assert config.vpc.imported and not config.vpc.create_endpoints and not config.vpc.retain_on_delete
    assert _config(**BLUE).vpc.retain_on_delete and _config(**BLUE).vpc.create_endpoints
    assert _config(retainNetworkOnDelete="true").vpc.retain_on_delete, "-c key=true arrives as a string"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"vpcEndpoints": "existing"}, "'existing' is only valid with 'vpcId'", id="existing needs vpcId"),
        pytest.param({"vpcEndpoints": "none"}, "must be one of create, existing", id="unknown mode"),
        pytest.param({**GREEN, "retainNetworkOnDelete": True}, "nothing to retain", id="retain with no network"),
        pytest.param({"retainNetworkOnDelete": "yes"}, "must be true or false", id="retain not a boolean"),
    ],
)
def test_invalid_blue_green_settings_are_refused_with_the_reason(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(**overrides)
