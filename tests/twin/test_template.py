"""twin/template.py: the twin's cloud is the synthesized K8sClusterStack template, created in moto in
CloudFormation's order (no instance processes here: a recording receiver and the real lifecycle machine)."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.twin.test_lifecycle_machine import FakeProvider
from twin.aws import LifecycleRefusedError, MotoAws
from twin.cluster import AMI, TwinOptions
from twin.lifecycle import IN_SERVICE, PENDING_WAIT, Group, Hook, LifecycleMachine
from twin.template import (
    CLUSTER_STACK,
    AddressMap,
    GroupSpec,
    HookSpec,
    TemplateCloud,
    TemplateError,
    creation_order,
    synthesized_templates,
)

SCALE = 0.05


class NoLifecycle:
    """No lifecycle call reaches the proxy in these tests (the receiver's machine is driven directly)."""

    def complete_action(self, group: str, hook: str, instance_id: str, token: str, result: str) -> None:
        raise AssertionError("unexpected CompleteLifecycleAction")

    def heartbeat(self, group: str, hook: str, instance_id: str, token: str) -> None:
        raise AssertionError("unexpected RecordLifecycleActionHeartbeat")

    def terminate_in_group(self, instance_id: str, decrement: bool) -> str:
        raise AssertionError("unexpected TerminateInstanceInAutoScalingGroup")

    def lifecycle_state(self, instance_id: str) -> str | None:
        return None


class Receiver:
    """Records the creation order and drives the real lifecycle machine as the twin does."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.provider = FakeProvider()
        self.machine = LifecycleMachine([], self.provider)
        self.first: dict[str, list[str]] = {}

    def group_created(self, group: GroupSpec) -> None:
        self.order.append(f"group {group.name}")
        hooks = {h.launching: Hook(h.name, h.heartbeat_timeout * SCALE, h.default_result) for h in group.hooks}
        g = Group(group.name, group.role, tuple(group.subnets), group.desired, hooks.get(True), hooks.get(False), False)
        self.first[group.name] = [i.instance_id for i in self.machine.add_group(g)]

    def hook_created(self, group_name: str, hook: HookSpec) -> None:
        self.order.append(f"hook {group_name}/{hook.name}")
        h = Hook(hook.name, hook.heartbeat_timeout * SCALE, hook.default_result)
        self.machine.put_hook(group_name, h, launching=hook.launching)


@pytest.fixture
def aws(tmp_path: Path) -> Iterator[MotoAws]:
    server = MotoAws(tmp_path, NoLifecycle()).start()
    server.client("ssm").put_parameter(Name="/ami", Value=AMI, Type="String")
    try:
        yield server
    finally:
        server.stop()


def user_data(agent: dict[str, Any]) -> str:
    # As stages/user_data.py writes it: the agent JSON in a quoted heredoc.
    text = (
        f"#!/bin/bash\ncat > /etc/dedicated-k8s/agent.json <<'DK8S_AGENT_JSON'\n{json.dumps(agent)}\nDK8S_AGENT_JSON\n"
    )
    return base64.b64encode(text.encode()).decode()


def fragment(*, hooks_in_group: bool) -> dict[str, Any]:
    """A group with a launch and a terminate hook, in either form the stack has used."""
    hooks = [
        {"LifecycleHookName": "dk8s-launch", "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
         "HeartbeatTimeout": 900, "DefaultResult": "ABANDON"},
        {"LifecycleHookName": "dk8s-terminate", "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
         "HeartbeatTimeout": 300, "DefaultResult": "ABANDON"},
    ]  # fmt: skip
    group: dict[str, Any] = {
        "AutoScalingGroupName": "cp-0",
        "MinSize": "1",
        "MaxSize": "2",
        "DesiredCapacity": "1",
        "LaunchTemplate": {"LaunchTemplateId": {"Ref": "Lt"}, "Version": {"Fn::GetAtt": ["Lt", "LatestVersionNumber"]}},
        "VPCZoneIdentifier": [{"Ref": "Subnet"}],
        "Tags": [{"Key": "dedicated-k8s:role", "Value": "control-plane", "PropagateAtLaunch": True}],
    }
    resources: dict[str, Any] = {
        # Listed first on purpose: the creation order must come from the references, not the listing.
        "Group": {"Type": "AWS::AutoScaling::AutoScalingGroup", "Properties": group},
        "Vpc": {"Type": "AWS::EC2::VPC", "Properties": {"CidrBlock": "10.40.0.0/16"}},
        "Subnet": {"Type": "AWS::EC2::Subnet", "Properties": {"VpcId": {"Ref": "Vpc"}, "CidrBlock": "10.40.32.0/19",
                                                              "AvailabilityZone": "eu-west-1a"}},
        "Lt": {"Type": "AWS::EC2::LaunchTemplate", "Properties": {"LaunchTemplateName": "lt", "LaunchTemplateData": {
            "ImageId": {"Ref": "Ami"},
            "UserData": user_data({"vpcCidr": "10.40.0.0/16", "podCidr": "192.168.0.0/16"}),
        }}},
    }  # fmt: skip
    if hooks_in_group:
        group["LifecycleHookSpecificationList"] = hooks
    else:
        for i, hook in enumerate(hooks):
            resources[f"Hook{i}"] = {
                "Type": "AWS::AutoScaling::LifecycleHook",
                "Properties": {**hook, "AutoScalingGroupName": {"Ref": "Group"}},
            }
    return {"Parameters": {"Ami": {"Type": "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>", "Default": "/ami"}},
            "Resources": resources}  # fmt: skip


def test_a_separate_lifecycle_hook_resource_misses_the_groups_first_instance(aws: MotoAws) -> None:
    """CloudFormation creates a resource after the resources it references (AWS CloudFormation User Guide,
    "DependsOn attribute": a Ref is an implicit dependency), so AWS::AutoScaling::LifecycleHook (Ref: the group)
    comes after the group, which has already launched its desired capacity: the first instance goes straight to
    InService and the agent's CompleteLifecycleAction is refused ("No active Lifecycle Action found"). Hooks added
    after creation "will not be added until the autoscaling group has been created ... after the initial
    instances have been launched" (Terraform/Pulumi aws autoscaling LifecycleHook notes, same API)."""
    receiver = Receiver()
    cloud = TemplateCloud(fragment(hooks_in_group=False), octet=90, time_scale=SCALE).create(aws, receiver)
    assert receiver.order == ["group cp-0", "hook cp-0/dk8s-launch", "hook cp-0/dk8s-terminate"]
    (first,) = receiver.first["cp-0"]
    assert receiver.machine.get(first).state == IN_SERVICE
    with pytest.raises(LifecycleRefusedError, match="No active Lifecycle Action found"):
        receiver.machine.complete_action("cp-0", "dk8s-launch", first, "", "CONTINUE")
    assert [h.form for _, h in cloud.separate_hooks] == ["resource", "resource"]
    # moto holds the hooks too (DescribeLifecycleHooks answers as AWS would after the stack is created).
    names = {h["LifecycleHookName"] for h in aws.client("autoscaling").describe_lifecycle_hooks(
        AutoScalingGroupName="cp-0")["LifecycleHooks"]}  # fmt: skip
    assert names == {"dk8s-launch", "dk8s-terminate"}


def test_hooks_in_the_groups_specification_list_apply_from_the_first_instance(aws: MotoAws) -> None:
    """LifecycleHookSpecificationList: "One or more lifecycle hooks to add to the Auto Scaling group before
    instances are launched" (Amazon EC2 Auto Scaling API Reference, CreateAutoScalingGroup)."""
    receiver = Receiver()
    cloud = TemplateCloud(fragment(hooks_in_group=True), octet=90, time_scale=SCALE).create(aws, receiver)
    (first,) = receiver.first["cp-0"]
    assert receiver.machine.get(first).state == PENDING_WAIT
    receiver.machine.complete_action("cp-0", "dk8s-launch", first, "", "CONTINUE")
    assert receiver.machine.get(first).state == IN_SERVICE
    described = aws.client("autoscaling").describe_lifecycle_hooks(AutoScalingGroupName="cp-0")["LifecycleHooks"]
    assert {(h["LifecycleHookName"], h["HeartbeatTimeout"]) for h in described} == {
        ("dk8s-launch", 900),
        ("dk8s-terminate", 300),
    }, "DescribeLifecycleHooks (the reconciler reads it) shows the specification list's hooks"
    spec = cloud.groups["cp-0"]
    assert (spec.min_size, spec.max_size, spec.desired) == (1, 2, 1)
    assert spec.agent_config["vpcCidr"] == "127.90.0.0/16", "the one address translation"
    assert spec.agent_config["podCidr"] == "192.168.0.0/16", "outside the VPC: unchanged"
    subnet = aws.client("ec2").describe_subnets(SubnetIds=[spec.subnets[0][1]])["Subnets"][0]
    assert subnet["CidrBlock"] == "127.90.32.0/19" and subnet["AvailabilityZone"] == "eu-west-1a"


def test_creation_order_follows_references_and_refuses_cycles_and_unknown_names() -> None:
    resources = fragment(hooks_in_group=False)["Resources"]
    order = creation_order(resources, {"Ami": {}})
    assert order.index("Vpc") < order.index("Subnet") < order.index("Group") < order.index("Hook0")
    assert order.index("Lt") < order.index("Group")
    cyclic: dict[str, dict[str, Any]] = {
        "A": {"Properties": {"X": {"Ref": "B"}}},
        "B": {"DependsOn": "A", "Properties": {}},
    }
    cyclic["A"]["DependsOn"] = ["B"]
    with pytest.raises(TemplateError, match="circular dependency"):
        creation_order(cyclic, {})
    with pytest.raises(TemplateError, match=r"A refers to \['Nope'\]"):
        creation_order({"A": {"Properties": {"X": {"Fn::GetAtt": ["Nope", "Arn"]}}}}, {})


def test_the_address_translation_is_one_mapping_both_ways_and_rejects_what_it_cannot_map() -> None:
    m = AddressMap("10.40.0.0/16", 77)
    assert m.to_twin("10.40.33.7") == "127.77.33.7" and m.to_twin("10.40.64.0/19") == "127.77.64.0/19"
    assert m.to_template("127.77.33.7") == "10.40.33.7"
    assert m.to_twin("10.0.0.0/8") == "10.0.0.0/8", "a CIDR outside the VPC (apiAccessCidrs) is kept"
    with pytest.raises(TemplateError, match=r"127\.77"):
        m.to_template("127.78.1.1")
    with pytest.raises(TemplateError, match="private /16 or longer"):
        AddressMap("10.0.0.0/8", 77)


def test_intrinsics_resolve_to_the_created_resources_and_an_unknown_one_is_named(aws: MotoAws) -> None:
    cloud = TemplateCloud(fragment(hooks_in_group=True), octet=90, time_scale=SCALE).create(aws, Receiver())
    lt = cloud.made["Lt"].ref
    assert cloud.resolve({"Fn::Sub": "${Lt}/${Lt.LatestVersionNumber}/${AWS::Region}"}) == f"{lt}/1/eu-west-1"
    assert cloud.resolve({"Fn::Join": ["-", [{"Ref": "AWS::AccountId"}, {"Ref": "Group"}]]}) == "123456789012-cp-0"
    assert cloud.resolve({"Ref": "Ami"}) == AMI, "the SSM-typed AMI parameter is read from SSM"
    with pytest.raises(TemplateError, match="Fn::FindInMap"):
        cloud.resolve({"Fn::FindInMap": ["M", "a", "b"]})
    with pytest.raises(TemplateError, match=r"Fn::GetAtt Lt.Nope"):
        cloud.resolve({"Fn::GetAtt": ["Lt", "Nope"]})


# -- the synthesized stack ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster_template() -> dict[str, Any]:
    return synthesized_templates(TwinOptions().app_context())[CLUSTER_STACK]


def test_every_resource_type_of_the_stack_is_modelled_or_listed_with_its_reason(
    cluster_template: dict[str, Any],
) -> None:
    assert TemplateCloud.unmodelled_types(cluster_template) == set()
    grown = copy.deepcopy(cluster_template)
    grown["Resources"]["New"] = {"Type": "AWS::Foo::Bar", "Properties": {}}
    assert TemplateCloud.unmodelled_types(grown) == {"AWS::Foo::Bar"}


def test_the_stack_created_in_moto_is_the_templates(aws: MotoAws, cluster_template: dict[str, Any]) -> None:
    aws.client("ssm").put_parameter(Name="/dedicated-k8s/ami/kubernetes-1-34", Value=AMI, Type="String")
    aws.client("ssm").put_parameter(Name="/cdk-bootstrap/hnb659fds/version", Value="30", Type="String")
    receiver = Receiver()
    cloud = TemplateCloud(cluster_template, octet=91, time_scale=SCALE).create(aws, receiver)
    res = cluster_template["Resources"]
    by_type = lambda t: {k: r["Properties"] for k, r in res.items() if r["Type"] == t}  # noqa: E731
    # Queues: visibility timeout scaled (whole seconds, up), KMS key, redrive to the DLQ.
    sqs = aws.client("sqs")
    for lid, props in by_type("AWS::SQS::Queue").items():
        attrs = sqs.get_queue_attributes(QueueUrl=cloud.queues[lid]["url"], AttributeNames=["All"])["Attributes"]
        assert attrs["KmsMasterKeyId"] == cloud.resolve(props["KmsMasterKeyId"])
        if "VisibilityTimeout" in props:
            assert int(attrs["VisibilityTimeout"]) == -(-props["VisibilityTimeout"] * SCALE // 1)
        if "RedrivePolicy" in props:
            redrive = json.loads(attrs["RedrivePolicy"])
            assert redrive["deadLetterTargetArn"] == cloud.resolve(props["RedrivePolicy"]["deadLetterTargetArn"])
            assert int(redrive["maxReceiveCount"]) == props["RedrivePolicy"]["maxReceiveCount"]
    # Secrets exist as the stack creates them: with no SecretString, EMPTY (no value until the agent puts one).
    sm = aws.client("secretsmanager")
    for props in by_type("AWS::SecretsManager::Secret").values():
        assert "SecretString" not in props and "GenerateSecretString" not in props
        with pytest.raises(ClientError) as err:
            sm.get_secret_value(SecretId=props["Name"])
        assert err.value.response["Error"]["Code"] == "ResourceNotFoundException"
    # The table, the versioned buckets, the endpoints.
    (table,) = by_type("AWS::DynamoDB::Table").values()
    assert (
        aws.client("dynamodb").describe_table(TableName=table["TableName"])["Table"]["KeySchema"] == table["KeySchema"]
    )
    s3 = aws.client("s3")
    for lid, props in by_type("AWS::S3::Bucket").items():
        if "VersioningConfiguration" in props:
            assert s3.get_bucket_versioning(Bucket=cloud.made[lid].ref)["Status"] == "Enabled"
    assert sorted(cloud.endpoint_services) == sorted(
        cloud.resolve(p["ServiceName"]) for p in by_type("AWS::EC2::VPCEndpoint").values()
    )
    # Groups: sizes, subnets and hooks from the template; each launched its desired capacity on creation.
    for props in by_type("AWS::AutoScaling::AutoScalingGroup").values():
        spec = cloud.groups[props["AutoScalingGroupName"]]
        assert (spec.min_size, spec.max_size, spec.desired) == tuple(
            int(props[k]) for k in ("MinSize", "MaxSize", "DesiredCapacity")
        )
        assert len(receiver.first[spec.name]) == spec.desired
        assert [s for _, s in spec.subnets] == [cloud.resolve(s) for s in props["VPCZoneIdentifier"]]
        assert spec.agent_config["vpcCidr"] == "127.91.0.0/16"
    # The Lambda's environment resolved to the created resources.
    (esm,) = cloud.event_sources
    env = cloud.lambdas[esm.function].environment
    assert env["RETRY_QUEUE_URL"] == esm.queue_url and esm.queue_url.startswith("https://sqs.eu-west-1.")
