"""K8sClusterStack's synthesized template has the properties the issue asks for."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aws_cdk.assertions import Match, Template

from stages.network import GATEWAY_ENDPOINTS, INTERFACE_ENDPOINTS

CONTROL_PLANE_GROUPS = [
    "dk8s-dedicated-k8s-control-plane-0",
    "dk8s-dedicated-k8s-control-plane-1",
    "dk8s-dedicated-k8s-control-plane-2",
]


def resources(template: Template, kind: str) -> dict[str, dict[str, Any]]:
    return {key: dict(value) for key, value in template.find_resources(kind).items()}


def control_plane_groups(template: Template) -> dict[str, dict[str, Any]]:
    return {
        logical_id: group
        for logical_id, group in resources(template, "AWS::AutoScaling::AutoScalingGroup").items()
        if "control-plane" in group["Properties"]["AutoScalingGroupName"]
    }


def test_every_launch_template_is_dedicated_imdsv2_and_encrypted(cluster_template: Template) -> None:
    templates = resources(cluster_template, "AWS::EC2::LaunchTemplate")
    assert len(templates) == 2  # control plane + one worker group
    for template in templates.values():
        data = template["Properties"]["LaunchTemplateData"]
        assert data["Placement"]["Tenancy"] == "dedicated"
        assert data["MetadataOptions"]["HttpTokens"] == "required"
        assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
        assert data["Monitoring"]["Enabled"] is True
        assert "KeyName" not in data
        # The private DNS name is the node name (resource-name hostnames), for the CCM and the serving certificate.
        assert data["PrivateDnsNameOptions"]["HostnameType"] == "resource-name"
        assert data["PrivateDnsNameOptions"]["EnableResourceNameDnsARecord"] is True
        (root,) = data["BlockDeviceMappings"]
        assert root["Ebs"]["Encrypted"] is True
        assert root["Ebs"]["VolumeType"] == "gp3"
        assert "Fn::GetAtt" in root["Ebs"]["KmsKeyId"]


def test_one_control_plane_group_per_zone(cluster_template: Template) -> None:
    groups = control_plane_groups(cluster_template)
    assert sorted(g["Properties"]["AutoScalingGroupName"] for g in groups.values()) == CONTROL_PLANE_GROUPS
    subnets = set()
    for group in groups.values():
        props = group["Properties"]
        # max 2: room for the instance refresh's launch-before-terminate replacement; desired stays 1
        assert (props["MinSize"], props["MaxSize"], props["DesiredCapacity"]) == ("1", "2", "1")
        (subnet,) = props["VPCZoneIdentifier"]
        subnets.add(subnet["Ref"])
    zones = {cluster_template.to_json()["Resources"][subnet]["Properties"]["AvailabilityZone"] for subnet in subnets}
    assert zones == {"us-east-1a", "us-east-1b", "us-east-1c"}


def test_control_plane_groups_retain_instances_on_terminate_hook_abandon(cluster_template: Template) -> None:
    for group in control_plane_groups(cluster_template).values():
        policy = group["Properties"]["InstanceLifecyclePolicy"]
        assert policy == {"RetentionTriggers": {"TerminateHookAbandon": "retain"}}


def test_lifecycle_hooks_have_deliberate_timeouts_and_defaults(cluster_template: Template) -> None:
    # The hooks live in each group's LifecycleHookSpecificationList (created with the group, before its first
    # instance: tests/stacks/test_first_deploy_template.py).
    by_kind: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for group in resources(cluster_template, "AWS::AutoScaling::AutoScalingGroup").values():
        group_name = group["Properties"]["AutoScalingGroupName"]
        role = "control-plane" if "control-plane" in group_name else "worker"
        for props in group["Properties"]["LifecycleHookSpecificationList"]:
            by_kind.setdefault((role, props["LifecycleTransition"]), []).append(props)
    launching, terminating = "autoscaling:EC2_INSTANCE_LAUNCHING", "autoscaling:EC2_INSTANCE_TERMINATING"
    assert {(p["HeartbeatTimeout"], p["DefaultResult"]) for p in by_kind[("control-plane", launching)]} == {
        (900, "ABANDON")
    }
    assert {(p["HeartbeatTimeout"], p["DefaultResult"]) for p in by_kind[("control-plane", terminating)]} == {
        (300, "ABANDON")
    }
    assert {(p["HeartbeatTimeout"], p["DefaultResult"]) for p in by_kind[("worker", launching)]} == {(600, "ABANDON")}
    assert {(p["HeartbeatTimeout"], p["DefaultResult"]) for p in by_kind[("worker", terminating)]} == {
        (300, "CONTINUE")
    }
    assert len(by_kind[("control-plane", terminating)]) == 3


def test_no_security_group_admits_the_internet(cluster_template: Template) -> None:
    rules = []
    for group in resources(cluster_template, "AWS::EC2::SecurityGroup").values():
        rules.extend(group["Properties"].get("SecurityGroupIngress", []))
    rules.extend(rule["Properties"] for rule in resources(cluster_template, "AWS::EC2::SecurityGroupIngress").values())
    assert rules, "expected ingress rules"
    for rule in rules:
        assert rule.get("CidrIp") != "0.0.0.0/0"
        assert rule.get("CidrIpv6") != "::/0"
        assert rule.get("Description")


def test_etcd_ports_open_only_to_control_plane_and_lambdas(cluster_template: Template) -> None:
    etcd_rules = [
        rule["Properties"]
        for rule in resources(cluster_template, "AWS::EC2::SecurityGroupIngress").values()
        if rule["Properties"]["FromPort"] in (2379, 2380)
    ]
    sources = {rule["SourceSecurityGroupId"]["Fn::GetAtt"][0] for rule in etcd_rules}
    assert all("CidrIp" not in rule for rule in etcd_rules)
    assert len(sources) == 2
    assert any("ControlPlane" in source for source in sources)
    assert any("EtcdLambda" in source for source in sources)


def test_every_required_endpoint_exists_and_there_is_no_internet_path(cluster_template: Template) -> None:
    endpoints = resources(cluster_template, "AWS::EC2::VPCEndpoint")
    interface = [e for e in endpoints.values() if e["Properties"].get("VpcEndpointType") == "Interface"]
    gateway = [e for e in endpoints.values() if e["Properties"].get("VpcEndpointType", "Gateway") == "Gateway"]
    assert len(interface) == len(INTERFACE_ENDPOINTS) >= 13
    assert len(gateway) == len(GATEWAY_ENDPOINTS) == 2
    assert all(e["Properties"]["PrivateDnsEnabled"] for e in interface)
    for kind in ("AWS::EC2::NatGateway", "AWS::EC2::InternetGateway", "AWS::EC2::EIP"):
        cluster_template.resource_count_is(kind, 0)
    cluster_template.resource_count_is("AWS::EC2::FlowLog", 1)


def test_api_load_balancer_is_internal_tcp_6443_with_tcp_health_checks(cluster_template: Template) -> None:
    cluster_template.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::LoadBalancer", {"Scheme": "internal", "Type": "network"}
    )
    cluster_template.has_resource_properties("AWS::ElasticLoadBalancingV2::Listener", {"Port": 6443, "Protocol": "TCP"})
    cluster_template.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::TargetGroup",
        {"Port": 6443, "Protocol": "TCP", "HealthCheckProtocol": "TCP", "TargetType": "instance"},
    )
    for group in control_plane_groups(cluster_template).values():
        assert group["Properties"]["TargetGroupARNs"]


def test_state_is_encrypted_versioned_and_retained(cluster_template: Template) -> None:
    cluster_template.has_resource_properties("AWS::KMS::Key", {"EnableKeyRotation": True})
    cluster_template.has_resource(
        "AWS::S3::Bucket",
        {
            "Properties": Match.object_like(
                {
                    "BucketEncryption": {
                        "ServerSideEncryptionConfiguration": [
                            Match.object_like(
                                {"ServerSideEncryptionByDefault": Match.object_like({"SSEAlgorithm": "aws:kms"})}
                            )
                        ]
                    },
                    "VersioningConfiguration": {"Status": "Enabled"},
                    "PublicAccessBlockConfiguration": Match.object_like({"BlockPublicPolicy": True}),
                    "LoggingConfiguration": Match.any_value(),
                }
            ),
            "DeletionPolicy": "RetainExceptOnCreate",
            "UpdateReplacePolicy": "Retain",
        },
    )
    cluster_template.has_resource_properties(
        "AWS::DynamoDB::Table",
        {
            "TableName": "dk8s-dedicated-k8s-cluster-state",
            "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True},
            "SSESpecification": Match.object_like({"SSEEnabled": True, "SSEType": "KMS"}),
            "DeletionProtectionEnabled": False,
        },
    )
    secrets = resources(cluster_template, "AWS::SecretsManager::Secret")
    assert sorted(s["Properties"]["Name"] for s in secrets.values()) == [
        "dedicated-k8s/dedicated-k8s/etcd-client",
        "dedicated-k8s/dedicated-k8s/lifecycle-kube-client",
        "dedicated-k8s/dedicated-k8s/pki",
        "dedicated-k8s/dedicated-k8s/worker-join",
    ]
    for secret in secrets.values():
        assert "KmsKeyId" in secret["Properties"]
        assert "SecretString" not in secret["Properties"]  # written by nodes, never by CloudFormation
        assert "GenerateSecretString" not in secret["Properties"]


def test_terminate_events_reach_the_lifecycle_lambda_through_a_queue_with_a_dlq(cluster_template: Template) -> None:
    cluster_template.has_resource_properties(
        "AWS::Events::Rule",
        {
            "EventPattern": {
                "source": ["aws.autoscaling"],
                "detail-type": ["EC2 Instance-terminate Lifecycle Action"],
                "detail": {"AutoScalingGroupName": CONTROL_PLANE_GROUPS},
            }
        },
    )
    cluster_template.has_resource_properties(
        "AWS::SQS::Queue",
        {"QueueName": "dk8s-dedicated-k8s-etcd-lifecycle", "RedrivePolicy": Match.object_like({"maxReceiveCount": 5})},
    )
    cluster_template.has_resource_properties(
        "AWS::Lambda::EventSourceMapping", {"BatchSize": 1, "FunctionResponseTypes": ["ReportBatchItemFailures"]}
    )
    cluster_template.has_resource_properties(
        "AWS::Lambda::Function",
        {
            "FunctionName": "dk8s-dedicated-k8s-etcd-lifecycle",
            "Handler": "lambdas.etcd_lifecycle.handler.handle",
            "ReservedConcurrentExecutions": Match.absent(),  # the writer lease (test_etcd_lifecycle_template.py)
            "VpcConfig": Match.any_value(),
            "KmsKeyArn": Match.any_value(),
            "Environment": {
                "Variables": Match.object_like(
                    {"CONTROL_PLANE_GROUP_NAMES": ",".join(CONTROL_PLANE_GROUPS), "DESIRED_MEMBERS": "3"}
                )
            },
        },
    )
    cluster_template.has_resource_properties("AWS::Events::Rule", {"ScheduleExpression": "rate(1 minute)"})


def test_worker_terminate_hooks_reach_the_lifecycle_queue_and_the_lambda_can_drain(cluster_template: Template) -> None:
    """Worker terminate hooks go to the same lifecycle queue (drain, delete the Node, CONTINUE); the Lambda gets
    the API URL (the NLB, port 6443), its client-certificate secret (created empty) and a way to the NLB."""
    rules = resources(cluster_template, "AWS::Events::Rule")
    (worker_rule,) = [
        rule
        for rule in rules.values()
        if rule["Properties"].get("EventPattern", {}).get("detail", {}).get("AutoScalingGroupName")
        == ["dk8s-dedicated-k8s-workers-general"]
    ]
    pattern = worker_rule["Properties"]["EventPattern"]
    assert pattern["source"] == ["aws.autoscaling"]
    assert pattern["detail-type"] == ["EC2 Instance-terminate Lifecycle Action"]
    (queue_id,) = [k for k, q in resources(cluster_template, "AWS::SQS::Queue").items()
                   if q["Properties"].get("QueueName") == "dk8s-dedicated-k8s-etcd-lifecycle"]  # fmt: skip
    assert [t["Arn"] for t in worker_rule["Properties"]["Targets"]] == [{"Fn::GetAtt": [queue_id, "Arn"]}]

    (function,) = [f for f in resources(cluster_template, "AWS::Lambda::Function").values()
                   if f["Properties"].get("FunctionName") == "dk8s-dedicated-k8s-etcd-lifecycle"]  # fmt: skip
    variables = function["Properties"]["Environment"]["Variables"]
    assert variables["DRAIN_NODES"] == "true"
    assert variables["WORKER_GROUP_NAMES"] == "dk8s-dedicated-k8s-workers-general"
    assert variables["KUBE_CLIENT_SECRET_NAME"] == "dedicated-k8s/dedicated-k8s/lifecycle-kube-client"
    assert int(variables["DRAIN_DEADLINE_SECONDS"]) < int(variables["REMOVAL_DEADLINE_SECONDS"])
    (nlb_id,) = resources(cluster_template, "AWS::ElasticLoadBalancingV2::LoadBalancer")
    assert variables["KUBE_API_URL"] == {"Fn::Join": ["", ["https://", {"Fn::GetAtt": [nlb_id, "DNSName"]}, ":6443"]]}
    cluster_template.has_resource_properties(
        "AWS::SecretsManager::Secret", {"Name": "dedicated-k8s/dedicated-k8s/lifecycle-kube-client"}
    )

    (lambda_sg,) = [function["Properties"]["VpcConfig"]["SecurityGroupIds"][0]["Fn::GetAtt"][0]]
    egress = resources(cluster_template, "AWS::EC2::SecurityGroupEgress").values()
    to_api = [
        e["Properties"]
        for e in egress
        if e["Properties"]["GroupId"] == {"Fn::GetAtt": [lambda_sg, "GroupId"]} and e["Properties"]["FromPort"] == 6443
    ]
    assert len(to_api) == 1 and to_api[0]["ToPort"] == 6443
    assert "ApiLoadBalancer" in to_api[0]["DestinationSecurityGroupId"]["Fn::GetAtt"][0]


def test_cluster_stack_creates_no_iam(cluster_template: Template) -> None:
    for kind in ("AWS::IAM::Role", "AWS::IAM::Policy", "AWS::IAM::InstanceProfile"):
        cluster_template.resource_count_is(kind, 0)


def test_user_data_starts_the_agent_and_fetches_nothing(cluster_template: Template) -> None:
    for template in resources(cluster_template, "AWS::EC2::LaunchTemplate").values():
        user_data = str(template["Properties"]["LaunchTemplateData"]["UserData"])
        assert "systemctl start dedicated-k8s-agent.service" in user_data
        assert "/etc/dedicated-k8s/agent.json" in user_data
        for fetcher in ("curl ", "wget ", "pip install", "dnf ", "yum ", "apt-get"):
            assert fetcher not in user_data


@pytest.mark.parametrize("count", [5])
def test_five_node_control_plane_spreads_round_robin(synth: Callable[..., dict[str, Template]], count: int) -> None:
    template = synth({"controlPlaneCount": count})["K8sClusterStack"]
    groups = control_plane_groups(template)
    assert len(groups) == count
    subnet_refs = [g["Properties"]["VPCZoneIdentifier"][0]["Ref"] for g in groups.values()]
    zones = sorted(template.to_json()["Resources"][ref]["Properties"]["AvailabilityZone"] for ref in subnet_refs)
    assert zones == ["us-east-1a", "us-east-1a", "us-east-1b", "us-east-1b", "us-east-1c"]


def test_imported_vpc_uses_the_given_subnets(synth: Callable[..., dict[str, Template]]) -> None:
    subnets = [f"subnet-0123456789abcdef{i}" for i in range(3)]
    template = synth(
        {
            "vpcId": "vpc-0123456789abcdef0",
            "privateSubnetIds": subnets,
            "privateRouteTableIds": [f"rtb-0123456789abcdef{i}" for i in range(3)],
        }
    )["K8sClusterStack"]
    template.resource_count_is("AWS::EC2::VPC", 0)
    used = {g["Properties"]["VPCZoneIdentifier"][0] for g in control_plane_groups(template).values()}
    assert used == set(subnets)


def test_alarms_watch_lambda_errors_dead_letters_abandoned_or_timed_out_hooks_member_count_and_quorum(
    cluster_template: Template,
) -> None:
    alarms = resources(cluster_template, "AWS::CloudWatch::Alarm")
    metric_names = set()
    for alarm in alarms.values():
        props = alarm["Properties"]
        assert props.get("AlarmActions"), "every alarm notifies the alarm topic"
        if "MetricName" in props:
            metric_names.add(props["MetricName"])
        for query in props.get("Metrics", []):
            stat = query.get("MetricStat")
            if stat:
                metric_names.add(stat["Metric"]["MetricName"])
    assert {"Errors", "ApproximateNumberOfMessagesVisible", "RemovalAbandoned", "RetainedInstances"} <= metric_names
    assert {"EtcdMembers", "QuorumMargin"} <= metric_names


def test_cluster_autoscaler_tags_and_scales_only_this_clusters_worker_groups(synth: Any) -> None:
    templates = synth({"clusterAutoscaler": True})
    cluster, iam_template = templates["K8sClusterStack"], templates["IamStack"]
    for logical_id, group in resources(cluster, "AWS::AutoScaling::AutoScalingGroup").items():
        tags = {t["Key"]: (t["Value"], t["PropagateAtLaunch"]) for t in group["Properties"].get("Tags", [])}
        if "control-plane" in group["Properties"]["AutoScalingGroupName"]:
            assert not any(k.startswith("k8s.io/cluster-autoscaler") for k in tags), logical_id
        else:
            assert tags["k8s.io/cluster-autoscaler/enabled"] == ("true", False)
            assert tags["k8s.io/cluster-autoscaler/dedicated-k8s"] == ("owned", False)
    statements = [
        s
        for p in resources(iam_template, "AWS::IAM::Policy").values()
        for s in p["Properties"]["PolicyDocument"]["Statement"]
        if s.get("Sid") == "ClusterAutoscalerScaleWorkers"
    ]
    (scale,) = statements
    assert sorted(scale["Action"]) == [
        "autoscaling:SetDesiredCapacity",
        "autoscaling:TerminateInstanceInAutoScalingGroup",
    ]
    arns = str(scale["Resource"])
    assert "workers-general" in arns and "control-plane" not in arns


def test_cluster_autoscaler_is_off_by_default(cluster_template: Template, iam_template: Template) -> None:
    for group in resources(cluster_template, "AWS::AutoScaling::AutoScalingGroup").values():
        assert not any(t["Key"].startswith("k8s.io/cluster-autoscaler") for t in group["Properties"].get("Tags", []))
    assert "ClusterAutoscaler" not in str(iam_template.to_json())
