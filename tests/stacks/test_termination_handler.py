"""The termination handler's queue and rules: EC2 interruption/health events only (ASG hooks stay with the
lifecycle Lambda), KMS + TLS, and the control-plane role scoped to exactly that queue."""

from __future__ import annotations

import json
from typing import Any

from aws_cdk.assertions import Template

from stages.iam_stack import NTH_DESCRIBE_ACTIONS

QUEUE_NAME = "dk8s-dedicated-k8s-termination-handler"
EXPECTED_PATTERNS = [
    {"source": ["aws.ec2"], "detail-type": ["EC2 Spot Instance Interruption Warning"]},
    {"source": ["aws.ec2"], "detail-type": ["EC2 Instance Rebalance Recommendation"]},
    {"source": ["aws.ec2"], "detail-type": ["EC2 Instance State-change Notification"]},
    {
        "source": ["aws.health"],
        "detail-type": ["AWS Health Event"],
        "detail": {"service": ["EC2"], "eventTypeCategory": ["scheduledChange"]},
    },
]


def _queue(template: Template) -> tuple[str, dict[str, Any]]:
    queues = template.find_resources("AWS::SQS::Queue", {"Properties": {"QueueName": QUEUE_NAME}})
    assert len(queues) == 1
    queue_id, queue = next(iter(queues.items()))
    return queue_id, dict(queue)


def _rules_to(template: Template, queue_id: str) -> list[dict[str, Any]]:
    return [
        rule["Properties"]
        for rule in template.find_resources("AWS::Events::Rule").values()
        if any(t["Arn"] == {"Fn::GetAtt": [queue_id, "Arn"]} for t in rule["Properties"].get("Targets", []))
    ]


def test_queue_is_encrypted_with_the_cluster_key_and_refuses_plain_http(cluster_template: Template) -> None:
    queue_id, queue = _queue(cluster_template)
    key_ref = queue["Properties"]["KmsMasterKeyId"]
    assert key_ref["Fn::GetAtt"][1] == "Arn"
    assert cluster_template.find_resources("AWS::KMS::Key")[key_ref["Fn::GetAtt"][0]]
    assert queue["Properties"]["MessageRetentionPeriod"] == 300
    (policy,) = [
        p["Properties"]["PolicyDocument"]["Statement"]
        for p in cluster_template.find_resources("AWS::SQS::QueuePolicy").values()
        if {"Ref": queue_id} in p["Properties"]["Queues"]
    ]
    deny = [s for s in policy if s["Effect"] == "Deny"]
    assert deny and deny[0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    senders = [s for s in policy if s["Effect"] == "Allow"]
    assert senders and all(s["Principal"] == {"Service": "events.amazonaws.com"} for s in senders)
    for sender in senders:  # send only (CDK's grant adds the read-only GetQueueAttributes/GetQueueUrl)
        actions = sender["Action"] if isinstance(sender["Action"], list) else [sender["Action"]]
        assert "sqs:SendMessage" in actions and not {"sqs:ReceiveMessage", "sqs:DeleteMessage"} & set(actions)
    assert all(s["Condition"] == {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}} for s in senders)


def test_only_ec2_interruption_and_health_events_reach_the_queue(cluster_template: Template) -> None:
    queue_id, _ = _queue(cluster_template)
    rules = _rules_to(cluster_template, queue_id)
    patterns = [rule["EventPattern"] for rule in rules]
    assert sorted(json.dumps(p, sort_keys=True) for p in patterns) == sorted(
        json.dumps(p, sort_keys=True) for p in EXPECTED_PATTERNS
    )
    assert all(rule["State"] == "ENABLED" for rule in rules)
    for pattern in patterns:  # ASG lifecycle hooks belong to the lifecycle Lambda, never to NTH
        assert "aws.autoscaling" not in pattern["source"]
        assert not any("Lifecycle" in d for d in pattern["detail-type"])
    lifecycle_rules = [
        rule["Properties"]
        for rule in cluster_template.find_resources("AWS::Events::Rule").values()
        if "aws.autoscaling" in rule["Properties"].get("EventPattern", {}).get("source", [])
    ]
    assert lifecycle_rules, "the etcd lifecycle rule exists"
    for rule in lifecycle_rules:
        assert all(t["Arn"] != {"Fn::GetAtt": [queue_id, "Arn"]} for t in rule["Targets"])


def test_the_control_plane_agent_config_names_the_queue_and_the_drainer_secret(cluster_template: Template) -> None:
    queue_id, _ = _queue(cluster_template)
    templates = cluster_template.find_resources("AWS::EC2::LaunchTemplate")
    user_data = [json.dumps(t["Properties"]["LaunchTemplateData"]["UserData"]) for t in templates.values()]
    control_plane = [u for u in user_data if "control-plane" in u and "terminationHandlerQueueUrl" in u]
    assert control_plane
    for text in control_plane:
        assert queue_id in text, "the queue URL is the queue's Ref"
        assert "dedicated-k8s/dedicated-k8s/lifecycle-kube-client" in text
        assert "vpcCidr" in text


def _statements(template: Template, prefix: str) -> list[dict[str, Any]]:
    return [
        statement
        for logical_id, policy in template.find_resources("AWS::IAM::Policy").items()
        if logical_id.startswith(prefix)
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
    ]


def test_the_control_plane_role_reads_exactly_that_queue(iam_template: Template) -> None:
    statements = _statements(iam_template, "ControlPlaneNodeRolePolicy")
    (queue,) = [s for s in statements if s.get("Sid") == "TerminationHandlerQueue"]
    assert sorted(queue["Action"]) == ["sqs:DeleteMessage", "sqs:GetQueueAttributes", "sqs:ReceiveMessage"]
    assert f":{QUEUE_NAME}" in json.dumps(queue["Resource"])
    assert "*" not in json.dumps(queue["Resource"])
    (describe,) = [s for s in statements if s.get("Sid") == "TerminationHandlerDescribe"]
    assert sorted(describe["Action"]) == sorted(NTH_DESCRIBE_ACTIONS)
    assert "autoscaling:DescribeTags" in describe["Action"]
    # Only the control plane, where NTH runs, may read the queue.
    for prefix in ("WorkerNodeRolePolicy", "EtcdLifecycleRolePolicy", "EtcdReconcilerRolePolicy"):
        assert QUEUE_NAME not in json.dumps(_statements(iam_template, prefix)), prefix
