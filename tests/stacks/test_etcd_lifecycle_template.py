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
