"""The twin's AWS endpoint: moto for everything, the twin's state machine for the lifecycle calls moto lacks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from twin.aws import LifecycleRefusedError, MotoAws


class RecordingBackend:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def complete_action(self, group: str, hook: str, instance_id: str, token: str, result: str) -> None:
        if instance_id == "i-unknown":
            raise LifecycleRefusedError(f"No active Lifecycle Action found with instance ID {instance_id}")
        self.calls.append(("complete", group, hook, instance_id, token, result))

    def heartbeat(self, group: str, hook: str, instance_id: str, token: str) -> None:
        self.calls.append(("heartbeat", group, hook, instance_id, token))

    def terminate_in_group(self, instance_id: str, decrement: bool) -> str:
        self.calls.append(("terminate", instance_id, decrement))
        return "grp"


@pytest.fixture
def aws(tmp_path: Path) -> Iterator[tuple[MotoAws, RecordingBackend]]:
    backend = RecordingBackend()
    server = MotoAws(tmp_path, backend).start()
    try:
        yield server, backend
    finally:
        server.stop()


def test_lifecycle_calls_reach_the_state_machine_with_every_field(aws: tuple[MotoAws, RecordingBackend]) -> None:
    server, backend = aws
    asg = server.client("autoscaling")
    asg.complete_lifecycle_action(
        LifecycleHookName="h",
        AutoScalingGroupName="g",
        InstanceId="i-1",
        LifecycleActionToken="0b8e8b7e-7f0c-4a7c-9d61-5d1c8f2e7a10",
        LifecycleActionResult="ABANDON",
    )
    asg.record_lifecycle_action_heartbeat(
        LifecycleHookName="h",
        AutoScalingGroupName="g",
        InstanceId="i-1",
        LifecycleActionToken="0b8e8b7e-7f0c-4a7c-9d61-5d1c8f2e7a10",
    )
    resp = asg.terminate_instance_in_auto_scaling_group(InstanceId="i-2", ShouldDecrementDesiredCapacity=False)
    assert backend.calls == [
        ("complete", "g", "h", "i-1", "0b8e8b7e-7f0c-4a7c-9d61-5d1c8f2e7a10", "ABANDON"),
        ("heartbeat", "g", "h", "i-1", "0b8e8b7e-7f0c-4a7c-9d61-5d1c8f2e7a10"),
        ("terminate", "i-2", False),
    ]
    assert resp["Activity"]["AutoScalingGroupName"] == "grp" and "i-2" in resp["Activity"]["Description"]


def test_a_refused_completion_is_the_validation_error_aws_returns(aws: tuple[MotoAws, RecordingBackend]) -> None:
    server, _ = aws
    with pytest.raises(ClientError) as err:
        server.client("autoscaling").complete_lifecycle_action(
            LifecycleHookName="h", AutoScalingGroupName="g", InstanceId="i-unknown", LifecycleActionResult="CONTINUE"
        )
    assert err.value.response["Error"]["Code"] == "ValidationError"
    assert "No active Lifecycle Action" in err.value.response["Error"]["Message"]


def test_everything_else_is_moto(aws: tuple[MotoAws, RecordingBackend]) -> None:
    server, backend = aws
    s3 = server.client("s3")
    s3.create_bucket(Bucket="b-twin", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3.put_object(Bucket="b-twin", Key="k", Body=b"x" * 70000)
    assert s3.get_object(Bucket="b-twin", Key="k")["Body"].read() == b"x" * 70000
    ddb = server.client("dynamodb")
    ddb.create_table(
        TableName="t",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    ddb.put_item(TableName="t", Item={"pk": {"S": "a"}}, ConditionExpression="attribute_not_exists(pk)")
    with pytest.raises(ClientError) as err:
        ddb.put_item(TableName="t", Item={"pk": {"S": "a"}}, ConditionExpression="attribute_not_exists(pk)")
    assert err.value.response["Error"]["Code"] == "ConditionalCheckFailedException"
    assert server.client("autoscaling").describe_auto_scaling_groups()["AutoScalingGroups"] == []
    assert backend.calls == []
