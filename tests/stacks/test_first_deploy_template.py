"""The cluster template as a first deploy meets it (issue 13): AWS behaviours that would stop a real first
deploy from forming a cluster, or a failed one from being retried, read off the synthesized template.

Each test names the AWS behaviour it guards and the AWS page that documents it.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Template

from app import build_app
from stages.cluster_stack import K8sClusterStack
from stages.cluster_state import LOGS_KEY_ACTIONS, VOLUME_KEY_ACTIONS
from stages.config import ClusterConfig
from stages.control_plane import CONTROL_PLANE_LAUNCH_TIMEOUT, CONTROL_PLANE_TERMINATE_TIMEOUT
from stages.nodes import LAUNCH_HOOK_NAME, TERMINATE_HOOK_NAME
from stages.workers import WORKER_LAUNCH_TIMEOUT, WORKER_TERMINATE_TIMEOUT
from tests.stacks.conftest import default_context

Synth = Callable[[dict[str, Any]], dict[str, Template]]
PSEUDO = {"AWS::Partition": "aws", "AWS::AccountId": "111122223333", "AWS::Region": "us-east-1"}
PSEUDO["AWS::URLSuffix"] = "amazonaws.com"
AUTOSCALING_ROLE = (
    "arn:aws:iam::111122223333:role/aws-service-role/autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling"
)


def resources(template: Template, kind: str) -> dict[str, dict[str, Any]]:
    return {logical_id: dict(resource) for logical_id, resource in template.find_resources(kind).items()}


def render(value: Any) -> Any:
    """Fn::Join of literals and pseudo parameters as deployed in account 111122223333, us-east-1."""
    if isinstance(value, dict) and "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return separator.join(str(render(part)) for part in parts)
    if isinstance(value, dict) and set(value) == {"Ref"} and value["Ref"] in PSEUDO:
        return PSEUDO[value["Ref"]]
    if isinstance(value, list):
        return [render(item) for item in value]
    return value


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def only(items: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    assert len(items) == 1, sorted(items)
    return next(iter(items.items()))


# -- 1. the API target group: client IP preservation off ------------------------------------------------


def test_the_api_target_group_registers_instances_without_client_ip_preservation(cluster_template: Template) -> None:
    """ELB: an instance-type target group preserves client IPs by default, and an internal NLB does not support
    hairpinning: a target that connects to the NLB and is routed to itself times out (source = destination).
    Every control-plane node is a client of its own NLB, so preservation must be off.
    https://docs.aws.amazon.com/elasticloadbalancing/latest/network/edit-target-group-attributes.html#client-ip-preservation
    ("Default settings: Instance type target groups: Enabled") and
    https://docs.aws.amazon.com/elasticloadbalancing/latest/network/load-balancer-troubleshooting.html#loopback-timeout
    ("Requests from a target to its load balancer time out")."""
    _, group = only(resources(cluster_template, "AWS::ElasticLoadBalancingV2::TargetGroup"))
    props = group["Properties"]
    assert props["TargetType"] == "instance"
    attributes = {a["Key"]: a["Value"] for a in props["TargetGroupAttributes"]}
    assert attributes["preserve_client_ip.enabled"] == "false"


def test_the_control_plane_admits_the_nlbs_security_group_on_6443(cluster_template: Template) -> None:
    """ELB: with client IP preservation off the target sees the load balancer's private IP as the source, and a
    target's security group admits traffic from a Network Load Balancer that has security groups by referencing the
    load balancer's security group (health checks come from it too).
    https://docs.aws.amazon.com/elasticloadbalancing/latest/network/load-balancer-security-groups.html
    ("Security groups for your Network Load Balancer": target security group rules)."""
    (_, nlb) = only(resources(cluster_template, "AWS::ElasticLoadBalancingV2::LoadBalancer"))
    (nlb_group,) = [ref["Fn::GetAtt"][0] for ref in nlb["Properties"]["SecurityGroups"]]
    (_, group) = only(resources(cluster_template, "AWS::ElasticLoadBalancingV2::TargetGroup"))
    assert group["Properties"]["Port"] == 6443
    control_plane_group = next(
        logical_id
        for logical_id, sg in resources(cluster_template, "AWS::EC2::SecurityGroup").items()
        if sg["Properties"]["GroupDescription"].endswith("control-plane nodes")
    )
    ingress = [r["Properties"] for r in resources(cluster_template, "AWS::EC2::SecurityGroupIngress").values()]
    from_nlb = [
        rule
        for rule in ingress
        if rule["GroupId"] == {"Fn::GetAtt": [control_plane_group, "GroupId"]}
        and rule.get("SourceSecurityGroupId") == {"Fn::GetAtt": [nlb_group, "GroupId"]}
    ]
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in from_nlb] == [("tcp", 6443, 6443)]
    egress = [r["Properties"] for r in resources(cluster_template, "AWS::EC2::SecurityGroupEgress").values()]
    assert any(
        r["GroupId"] == {"Fn::GetAtt": [nlb_group, "GroupId"]}
        and r.get("DestinationSecurityGroupId") == {"Fn::GetAtt": [control_plane_group, "GroupId"]}
        and (r["FromPort"], r["ToPort"]) == (6443, 6443)
        for r in egress
    ), "the NLB's group may send to the API servers"


# -- 2. lifecycle hooks exist before the first instance ---------------------------------------------------


def test_no_lifecycle_hook_is_a_separate_resource(cluster_template: Template) -> None:
    """CloudFormation creates an ``AWS::AutoScaling::LifecycleHook`` only after its group exists, when the group's
    first instances are already launching; hooks meant for every instance are added as the group is created
    (CreateAutoScalingGroup ``LifecycleHookSpecificationList``: "One or more lifecycle hooks to add to the Auto
    Scaling group before instances are launched").
    https://docs.aws.amazon.com/autoscaling/ec2/userguide/adding-lifecycle-hooks.html ("you can also use ...
    CloudFormation ... to add lifecycle hooks to an Auto Scaling group as you are creating it") and
    https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_CreateAutoScalingGroup.html."""
    cluster_template.resource_count_is("AWS::AutoScaling::LifecycleHook", 0)
    assert resources(cluster_template, "AWS::AutoScaling::AutoScalingGroup")


@pytest.mark.parametrize(
    ("group_name", "launch", "terminate"),
    [
        *(
            (f"dk8s-dedicated-k8s-control-plane-{i}", CONTROL_PLANE_LAUNCH_TIMEOUT, CONTROL_PLANE_TERMINATE_TIMEOUT)
            for i in range(3)
        ),
        ("dk8s-dedicated-k8s-workers-general", WORKER_LAUNCH_TIMEOUT, WORKER_TERMINATE_TIMEOUT),
    ],
)
def test_every_group_is_created_with_both_hooks(
    cluster_template: Template, group_name: str, launch: int, terminate: int
) -> None:
    """AWS::AutoScaling::AutoScalingGroup ``LifecycleHookSpecificationList`` (LifecycleHookSpecification:
    LifecycleHookName, LifecycleTransition ``autoscaling:EC2_INSTANCE_LAUNCHING`` / ``..._TERMINATING``,
    HeartbeatTimeout, DefaultResult ABANDON | CONTINUE).
    https://docs.aws.amazon.com/AWSCloudFormation/latest/TemplateReference/aws-properties-autoscaling-autoscalinggroup-lifecyclehookspecification.html
    The control plane abandons a terminate hook that nobody answered (retained on abandon, architecture.md 4b); a
    worker continues (it holds no quorum)."""
    (group,) = [
        g
        for g in resources(cluster_template, "AWS::AutoScaling::AutoScalingGroup").values()
        if g["Properties"]["AutoScalingGroupName"] == group_name
    ]
    hooks = {h["LifecycleHookName"]: h for h in group["Properties"]["LifecycleHookSpecificationList"]}
    terminate_default = "CONTINUE" if "workers" in group_name else "ABANDON"
    assert hooks == {
        LAUNCH_HOOK_NAME: {
            "LifecycleHookName": "dk8s-launch",
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
            "HeartbeatTimeout": launch,
            "DefaultResult": "ABANDON",
        },
        TERMINATE_HOOK_NAME: {
            "LifecycleHookName": "dk8s-terminate",
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
            "HeartbeatTimeout": terminate,
            "DefaultResult": terminate_default,
        },
    }


# -- 3. no NLB access logs for a TCP listener -----------------------------------------------------------


def test_the_tcp_api_load_balancer_asks_for_no_access_logs(cluster_template: Template) -> None:
    """ELB writes Network Load Balancer access logs only for TLS listeners ("Access logs are created only if the
    load balancer has a TLS listener, and the logs contain information about TLS requests only"): on this TCP
    listener they would never be written, so neither the attribute nor a log-delivery grant for it exists.
    https://docs.aws.amazon.com/elasticloadbalancing/latest/network/load-balancer-access-logs.html"""
    (_, nlb) = only(resources(cluster_template, "AWS::ElasticLoadBalancingV2::LoadBalancer"))
    keys = {a["Key"] for a in nlb["Properties"]["LoadBalancerAttributes"]}
    assert not {k for k in keys if k.startswith("access_logs.")}, keys
    listeners = resources(cluster_template, "AWS::ElasticLoadBalancingV2::Listener").values()
    assert [listener["Properties"]["Protocol"] for listener in listeners] == ["TCP"]
    policies = json.dumps([p["Properties"] for p in resources(cluster_template, "AWS::S3::BucketPolicy").values()])
    assert "api-nlb" not in policies


# -- 4. deletion protection on in production --------------------------------------------------------------


def nlb_deletion_protection(template: Template) -> str:
    (_, nlb) = only(resources(template, "AWS::ElasticLoadBalancingV2::LoadBalancer"))
    return {a["Key"]: a["Value"] for a in nlb["Properties"]["LoadBalancerAttributes"]}["deletion_protection.enabled"]


def cluster_stacks(overrides: dict[str, Any]) -> dict[str, Template]:
    """Every K8sClusterStack of the app by its path: the dev stack and the pipeline stages' (inside Stages, which
    the top-level cloud assembly does not list)."""
    app = cdk.App(context={**default_context(), **overrides})
    build_app(app)
    return {
        stack.node.path: Template.from_stack(stack)
        for stack in app.node.find_all()
        if isinstance(stack, K8sClusterStack)
    }


@pytest.fixture(scope="module")
def default_cluster_stacks() -> dict[str, Template]:
    return cluster_stacks({})


def test_deletion_protection_is_off_for_the_dev_stack_and_on_in_production(
    default_cluster_stacks: dict[str, Template],
) -> None:
    """ELB load balancer attribute ``deletion_protection.enabled``: while true, the load balancer cannot be deleted
    (neither by DeleteLoadBalancer nor by a stack deletion) until it is turned off.
    https://docs.aws.amazon.com/elasticloadbalancing/latest/network/edit-load-balancer-attributes.html#deletion-protection
    The dev stack (`cdk deploy K8sClusterStack`) and staging stay deletable; the pipeline's production stage
    turns it on without any configuration."""
    assert {path: nlb_deletion_protection(t) for path, t in default_cluster_stacks.items()} == {
        "K8sClusterStack": "false",
        "PipelineStack/Staging/K8sClusterStack": "false",
        "PipelineStack/Production/K8sClusterStack": "true",
    }


def test_the_setting_is_per_stage_and_production_may_still_say_otherwise() -> None:
    """The same ELB attribute, from the typed key: ``apiLoadBalancerDeletionProtection`` on the dev stack, and an
    explicit ``productionOverrides`` value over production's default."""
    turned = cluster_stacks(
        {"apiLoadBalancerDeletionProtection": True, "productionOverrides": {"apiLoadBalancerDeletionProtection": False}}
    )
    assert nlb_deletion_protection(turned["K8sClusterStack"]) == "true"
    assert nlb_deletion_protection(turned["PipelineStack/Production/K8sClusterStack"]) == "false"


# -- 5. retained, except when the create that made them rolls back -----------------------------------------

# Fixed-name stateful resources: left behind by a rolled-back create, each would fail the retry with AlreadyExists.
FIXED_NAMES = {
    "AWS::DynamoDB::Table": "TableName",
    "AWS::S3::Bucket": "BucketName",
    "AWS::SecretsManager::Secret": "Name",
    "AWS::Logs::LogGroup": "LogGroupName",
}


def retained(template: Template) -> dict[str, dict[str, Any]]:
    return {
        logical_id: resource
        for logical_id, resource in template.to_json()["Resources"].items()
        if str(resource.get("DeletionPolicy", "")).startswith("Retain")
    }


@pytest.mark.parametrize(
    "overrides", [{}, {"irsa": True}, {"retainNetworkOnDelete": True}], ids=["default", "irsa", "retained-network"]
)
def test_every_retained_resource_is_retained_except_on_create(synth: Synth, overrides: dict[str, Any]) -> None:
    """CloudFormation DeletionPolicy ``RetainExceptOnCreate``: "behaves like Retain for stack operations, except for
    the stack operation that initially created the resource. If the stack operation that created the resource is
    rolled back, CloudFormation deletes the resource." With plain ``Retain`` a rolled-back first deploy leaves the
    fixed-name table, buckets, secrets and log groups behind, and the next deploy fails with AlreadyExists.
    https://docs.aws.amazon.com/AWSCloudFormation/latest/TemplateReference/aws-attribute-deletionpolicy.html

    The rule: every resource of the cluster (and image) template that CloudFormation retains has DeletionPolicy
    RetainExceptOnCreate and UpdateReplacePolicy Retain, and every fixed-name stateful resource is retained."""
    templates = synth(overrides)
    for stack in ("K8sClusterStack", "ImageStack"):
        template = templates[stack]
        kept = retained(template)
        assert kept, stack
        for logical_id, resource in kept.items():
            assert resource["UpdateReplacePolicy"] == "Retain", logical_id
            assert resource["DeletionPolicy"] == "RetainExceptOnCreate", (stack, logical_id)
        for kind, name_property in FIXED_NAMES.items():
            for logical_id, resource in resources(template, kind).items():
                if name_property in resource.get("Properties", {}):
                    assert logical_id in kept, f"{stack} {logical_id}: a fixed-name {kind} must be retained"
    for logical_id, table in resources(templates["K8sClusterStack"], "AWS::DynamoDB::Table").items():
        # DeleteTable is refused while deletion protection is on: the rollback could not delete the table.
        # https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/WorkingWithTables.Basics.html#WorkingWithTables.Basics.DeletionProtection
        assert not table["Properties"].get("DeletionProtectionEnabled"), logical_id
    if "irsa" in overrides:
        assert any(k.startswith("IrsaBucket") for k in retained(templates["K8sClusterStack"]))
    if "retainNetworkOnDelete" in overrides:
        kinds = {r["Type"] for r in retained(templates["K8sClusterStack"]).values()}
        assert {"AWS::EC2::VPC", "AWS::EC2::Subnet", "AWS::EC2::VPCEndpoint"} <= kinds


# -- 6. the KMS key policy: each service principal as its documentation gives it -------------------------------


def key_statements(template: Template) -> list[dict[str, Any]]:
    (_, key) = only(resources(template, "AWS::KMS::Key"))
    return list(key["Properties"]["KeyPolicy"]["Statement"])


def statement(template: Template, sid: str) -> dict[str, Any]:
    (found,) = [s for s in key_statements(template) if s.get("Sid") == sid]
    return found


def test_cloudwatch_logs_may_use_the_key_only_for_this_clusters_log_groups(cluster_template: Template) -> None:
    """CloudWatch Logs: the regional service principal ``logs.<region>.amazonaws.com`` gets kms:Encrypt*,
    Decrypt*, ReEncrypt*, GenerateDataKey*, Describe*, conditioned with ``ArnLike`` (or ArnEquals) on
    ``kms:EncryptionContext:aws:logs:arn``, the log group's ARN, which CloudWatch Logs passes as encryption context.
    https://docs.aws.amazon.com/AmazonCloudWatch/latest/logs/encrypt-log-data-kms.html ("Encrypt log data in
    CloudWatch Logs using AWS KMS", step 2: set permissions on the key). Every log group the template encrypts with
    the key must match, or CreateLogGroup fails; another cluster's group must not."""
    logs = statement(cluster_template, "CloudWatchLogs")
    assert render(logs["Principal"]["Service"]) == "logs.us-east-1.amazonaws.com"
    assert sorted(as_list(logs["Action"])) == sorted(LOGS_KEY_ACTIONS)
    assert set(logs["Condition"]) == {"ArnLike"}
    patterns = as_list(render(logs["Condition"]["ArnLike"]["kms:EncryptionContext:aws:logs:arn"]))
    assert all(p.startswith("arn:aws:logs:us-east-1:111122223333:log-group:") for p in patterns)
    encrypted = [
        g["Properties"]["LogGroupName"]
        for g in resources(cluster_template, "AWS::Logs::LogGroup").values()
        if "KmsKeyId" in g["Properties"]
    ]
    assert len(encrypted) >= 5
    for name in encrypted:
        arn = f"arn:aws:logs:us-east-1:111122223333:log-group:{name}"
        assert any(fnmatch.fnmatchcase(arn, p) for p in patterns), name
    for foreign in ("/dedicated-k8s/other-cluster/audit", "/aws/lambda/dk8s-other-etcd-lifecycle", "/aws/lambda/x"):
        arn = f"arn:aws:logs:us-east-1:111122223333:log-group:{foreign}"
        assert not any(fnmatch.fnmatchcase(arn, p) for p in patterns), foreign


def test_cloudwatch_alarms_may_publish_to_the_encrypted_alarm_topic(cluster_template: Template) -> None:
    """SNS, "Enable compatibility between event sources from AWS services and encrypted topics": the publishing
    service's principal (CloudWatch: ``cloudwatch.amazonaws.com``) needs kms:GenerateDataKey* and kms:Decrypt on the
    topic's customer managed key, in the statement SNS documents (no condition).
    https://docs.aws.amazon.com/sns/latest/dg/sns-key-management.html#compatibility-with-aws-services"""
    alarms = statement(cluster_template, "CloudWatchAlarms")
    assert alarms["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
    assert sorted(as_list(alarms["Action"])) == ["kms:Decrypt", "kms:GenerateDataKey*"]
    assert "Condition" not in alarms
    (key_id, _) = only(resources(cluster_template, "AWS::KMS::Key"))
    (topic_id, topic) = only(resources(cluster_template, "AWS::SNS::Topic"))
    assert topic["Properties"]["KmsMasterKeyId"] == {"Fn::GetAtt": [key_id, "Arn"]}
    assert all(a["Properties"]["AlarmActions"] == [{"Ref": topic_id}]
               for a in resources(cluster_template, "AWS::CloudWatch::Alarm").values())  # fmt: skip


def test_eventbridge_may_deliver_to_the_encrypted_queues_with_no_source_condition(cluster_template: Template) -> None:
    """SQS, "Configure KMS permissions for AWS services": an AWS event source sending to an encrypted queue needs
    kms:GenerateDataKey and kms:Decrypt in the key policy for its principal (EventBridge: ``events.amazonaws.com``).
    https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-key-management.html#compatibility-with-aws-services
    No aws:SourceAccount / aws:SourceArn: "Adding the aws:SourceAccount and aws:SourceArn to a AWS KMS policy is not
    supported for EventBridge-to-encrypted topics"
    (https://docs.aws.amazon.com/sns/latest/dg/sns-key-management.html), so a conditioned statement alone could
    drop every event. Every queue an EventBridge rule targets is encrypted with this key."""
    events = statement(cluster_template, "EventBridge")
    assert events["Principal"] == {"Service": "events.amazonaws.com"}
    assert sorted(as_list(events["Action"])) == ["kms:Decrypt", "kms:GenerateDataKey"]
    assert "Condition" not in events
    (key_id, _) = only(resources(cluster_template, "AWS::KMS::Key"))
    queues = resources(cluster_template, "AWS::SQS::Queue")
    targeted = {
        target["Arn"]["Fn::GetAtt"][0]
        for rule in resources(cluster_template, "AWS::Events::Rule").values()
        for target in rule["Properties"].get("Targets", [])
        if "Fn::GetAtt" in target["Arn"] and target["Arn"]["Fn::GetAtt"][0] in queues
    }
    assert len(targeted) >= 2  # the lifecycle queue and the termination handler's queue
    for queue_id in targeted:
        assert queues[queue_id]["Properties"]["KmsMasterKeyId"] == {"Fn::GetAtt": [key_id, "Arn"]}, queue_id


def test_auto_scalings_service_linked_role_may_use_the_key_for_volumes_and_grants(cluster_template: Template) -> None:
    """EC2 Auto Scaling, "Required AWS KMS key policy for use with encrypted volumes": two statements for the
    service-linked role ``AWSServiceRoleForAutoScaling``, one with kms:Encrypt, Decrypt, ReEncrypt*,
    GenerateDataKey*, DescribeKey, one with kms:CreateGrant conditioned on ``kms:GrantIsForAWSResource`` true.
    https://docs.aws.amazon.com/autoscaling/ec2/userguide/key-policy-requirements-EBS-encryption.html
    (The same role publishes the groups' notifications to the encrypted topic: SNS names Auto Scaling among the
    event sources given by role, https://docs.aws.amazon.com/sns/latest/dg/sns-key-management.html.)"""
    use, grants = (
        statement(cluster_template, "AutoScalingEncryptedVolumes"),
        statement(cluster_template, "AutoScalingGrants"),
    )
    for found in (use, grants):
        assert render(found["Principal"]["AWS"]) == AUTOSCALING_ROLE
    assert sorted(as_list(use["Action"])) == sorted(VOLUME_KEY_ACTIONS)
    assert "Condition" not in use
    assert as_list(grants["Action"]) == ["kms:CreateGrant"]
    assert grants["Condition"] == {"Bool": {"kms:GrantIsForAWSResource": "true"}}


def test_no_other_service_principal_is_in_the_key_policy(cluster_template: Template) -> None:
    """Every service principal the key policy names is one of the statements above (the account root statement is
    KMS's default key policy, https://docs.aws.amazon.com/kms/latest/developerguide/key-policy-default.html). CDK's
    own EventBridge-target grant (aws-events-targets SqsQueue) is a second events.amazonaws.com statement; a new
    service needs its own documented statement and test."""
    services = {
        json.dumps(render(s["Principal"]["Service"]))
        for s in key_statements(cluster_template)
        if "Service" in s["Principal"]
    }
    assert services == {'"logs.us-east-1.amazonaws.com"', '"cloudwatch.amazonaws.com"', '"events.amazonaws.com"'}
    roles = {render(s["Principal"]["AWS"]) for s in key_statements(cluster_template) if "AWS" in s["Principal"]}
    assert roles == {"arn:aws:iam::111122223333:root", AUTOSCALING_ROLE}


# -- 7. IRSA is opt-in: no public S3 on a first deploy ---------------------------------------------------


def test_the_default_cluster_has_no_issuer_bucket_no_oidc_provider_and_no_public_policy(
    cluster_template: Template, iam_template: Template
) -> None:
    """S3 Block Public Access: with the account-level ``BlockPublicPolicy`` setting (standard in restricted landing
    zones), S3 rejects a PutBucketPolicy call whose policy grants public access, and ``RestrictPublicBuckets`` makes
    an already public bucket unreadable anonymously. IRSA's issuer bucket needs exactly such a policy (STS reads the
    discovery document and JWKS without credentials), so IRSA is opt-in (``irsa: true``, docs/irsa.md).
    https://docs.aws.amazon.com/AmazonS3/latest/userguide/access-control-block-public-access.html"""
    assert ClusterConfig.from_mapping({}).irsa is False
    cluster_template.resource_count_is("AWS::IAM::OIDCProvider", 0)
    assert not [b for b in resources(cluster_template, "AWS::S3::Bucket") if b.startswith("Irsa")]
    for policy in resources(cluster_template, "AWS::S3::BucketPolicy").values():
        for found in policy["Properties"]["PolicyDocument"]["Statement"]:
            assert not (found["Effect"] == "Allow" and found["Principal"] in ("*", {"AWS": "*"})), found
    assert "irsa" not in json.dumps(cluster_template.to_json()).lower()
    assert "IrsaIssuerDocuments" not in json.dumps(iam_template.to_json())
