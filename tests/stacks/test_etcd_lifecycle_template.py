"""The etcd lifecycle Lambdas as synthesized: no reserved concurrency, a capped SQS event source, the writer
lease's settings, and log groups a rolled-back create does not leave behind."""

from __future__ import annotations

import json
from typing import Any

from aws_cdk.assertions import Template

from stages.etcd_lifecycle import FUNCTION_TIMEOUT


def functions(template: Template) -> dict[str, Any]:
    return {str(r["Properties"]["FunctionName"]): r for r in template.find_resources("AWS::Lambda::Function").values()}


def test_no_function_in_any_stack_reserves_concurrency(templates: dict[str, Template]) -> None:
    """Lambda refuses a reservation that leaves the account fewer than 100 unreserved concurrent executions
    ("Configuring reserved concurrency for a function", AWS Lambda Developer Guide): in an account whose
    concurrency quota is 10, any ReservedConcurrentExecutions fails the stack's creation."""
    for name, template in templates.items():
        assert "ReservedConcurrentExecutions" not in json.dumps(template.to_json()), name


def test_the_lifecycle_event_source_runs_at_most_two_invocations_at_once(cluster_template: Template) -> None:
    """ScalingConfig.MaximumConcurrency caps how many invocations the SQS event source runs; 2 is the smallest
    value Lambda accepts (ScalingConfig, AWS Lambda API reference: valid range 2..1000)."""
    (mapping,) = cluster_template.find_resources("AWS::Lambda::EventSourceMapping").values()
    props = mapping["Properties"]
    assert props["ScalingConfig"] == {"MaximumConcurrency": 2}
    assert props["BatchSize"] == 1
    assert "LifecycleFunction" in json.dumps(props["FunctionName"])


def test_the_lifecycle_function_holds_a_lease_longer_than_its_timeout_in_the_cluster_state_table(
    cluster_template: Template,
) -> None:
    """A live writer must never have its lease taken over: an invocation ends at its timeout at the latest."""
    lifecycle = functions(cluster_template)["dk8s-dedicated-k8s-etcd-lifecycle"]["Properties"]
    variables = lifecycle["Environment"]["Variables"]
    (table,) = cluster_template.find_resources("AWS::DynamoDB::Table").values()
    assert variables["CLUSTER_STATE_TABLE"] == table["Properties"]["TableName"] == "dk8s-dedicated-k8s-cluster-state"
    assert lifecycle["Timeout"] == FUNCTION_TIMEOUT.to_seconds()
    assert int(variables["WRITER_LEASE_SECONDS"]) > lifecycle["Timeout"]


def test_function_log_groups_are_kept_on_update_and_delete_but_not_after_a_failed_create(
    cluster_template: Template,
) -> None:
    """DeletionPolicy RetainExceptOnCreate: CloudFormation deletes the resource when the operation that created
    it rolls back, and retains it otherwise (DeletionPolicy attribute, AWS CloudFormation Template Reference).
    With Retain a failed first deploy leaves /aws/lambda/<name> behind and the retry fails on "already exists"."""
    names = set(functions(cluster_template))
    groups = {
        r["Properties"]["LogGroupName"]: r
        for r in cluster_template.find_resources("AWS::Logs::LogGroup").values()
        if str(r["Properties"].get("LogGroupName", "")).removeprefix("/aws/lambda/") in names
    }
    assert set(groups) == {f"/aws/lambda/{name}" for name in names} and len(groups) == 3
    for name, group in groups.items():
        assert group["DeletionPolicy"] == "RetainExceptOnCreate", name
        assert group["UpdateReplacePolicy"] == "Retain", name


def lifecycle_queue_statements(template: Template) -> list[dict[str, Any]]:
    (policy,) = [
        p
        for logical_id, p in template.find_resources("AWS::SQS::QueuePolicy").items()
        if logical_id.startswith("EtcdLifecycleQueuePolicy")
    ]
    return list(policy["Properties"]["PolicyDocument"]["Statement"])


def arn_names(value: Any, kind: str) -> set[str]:
    """The names in ARNs built by Fn::Join (``...:rule/<name>``, ``...:role/<name>``)."""
    return {part.split(f":{kind}/")[1] for part in json.dumps(value).split('"') if f":{kind}/" in part}


def test_eventbridge_may_send_to_the_lifecycle_queue_only_for_the_stacks_own_terminate_rules(
    cluster_template: Template,
) -> None:
    """A queue policy that allows events.amazonaws.com with only ``aws:SourceAccount`` lets any rule of the
    account deliver forged terminate events; ``aws:SourceArn`` names the rules ("Amazon SQS permissions", Using
    resource-based policies for Amazon EventBridge, EventBridge User Guide). The rules are exactly the stack's
    rules whose target is the queue."""
    rules = cluster_template.find_resources("AWS::Events::Rule")
    to_queue = {
        r["Properties"]["Name"]
        for r in rules.values()
        if "EtcdLifecycleQueue" in json.dumps(r["Properties"]["Targets"])
    }
    assert to_queue == {"dk8s-dedicated-k8s-control-plane-terminate", "dk8s-dedicated-k8s-worker-terminate"}
    statements = lifecycle_queue_statements(cluster_template)
    allows = [s for s in statements if s["Effect"] == "Allow"]
    assert [s["Principal"] for s in allows] == [{"Service": "events.amazonaws.com"}], "EventBridge is the only grantee"
    (allow,) = allows
    assert list(allow["Condition"]) == ["ArnEquals"] and list(allow["Condition"]["ArnEquals"]) == ["aws:SourceArn"]
    assert arn_names(allow["Condition"], "rule") == to_queue
    assert "aws:SourceAccount" not in json.dumps(statements)


def test_every_other_sender_is_denied_but_the_reconciler_and_the_lifecycle_roles(cluster_template: Template) -> None:
    """A Deny on SendMessage for every principal unless it is one of the two sender roles (``aws:PrincipalArn``)
    or EventBridge for our rules (``aws:SourceArn``): the keys in one condition operator are ANDed and an absent
    key makes ArnNotEquals true ("IAM JSON policy elements: Condition operators", IAM User Guide), so a principal
    with a broad identity policy, or another rule, is refused. cluster-ops runs with its own role, not a sender's."""
    denies = [s for s in lifecycle_queue_statements(cluster_template) if s["Effect"] == "Deny"]
    (only_ours,) = [s for s in denies if s.get("Sid") == "OnlyTheClusterSends"]
    assert only_ours["Principal"] == {"AWS": "*"} and only_ours["Action"] == "sqs:SendMessage"
    condition = only_ours["Condition"]["ArnNotEquals"]
    assert set(condition) == {"aws:PrincipalArn", "aws:SourceArn"}
    assert arn_names(condition["aws:PrincipalArn"], "role") == {
        "dk8s-dedicated-k8s-etcd-reconciler",
        "dk8s-dedicated-k8s-etcd-lifecycle",
    }
    assert arn_names(condition["aws:SourceArn"], "rule") == {
        "dk8s-dedicated-k8s-control-plane-terminate",
        "dk8s-dedicated-k8s-worker-terminate",
    }
    roles = {name: arn_names(f["Properties"]["Role"], "role") for name, f in functions(cluster_template).items()}
    assert roles["dk8s-dedicated-k8s-cluster-ops"] == {"dk8s-dedicated-k8s-cluster-ops"}
    assert roles["dk8s-dedicated-k8s-etcd-reconciler"] == {"dk8s-dedicated-k8s-etcd-reconciler"}
