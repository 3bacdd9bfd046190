"""The twin's AWS endpoint: moto for everything, the twin's state machine for the lifecycle calls moto lacks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from twin.aws import LifecycleRefusedError, MotoAws, _Handler, _Proxy


class RecordingBackend:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.states: dict[str, str] = {}

    def complete_action(self, group: str, hook: str, instance_id: str, token: str, result: str) -> None:
        if instance_id == "i-unknown":
            raise LifecycleRefusedError(f"No active Lifecycle Action found with instance ID {instance_id}")
        self.calls.append(("complete", group, hook, instance_id, token, result))

    def heartbeat(self, group: str, hook: str, instance_id: str, token: str) -> None:
        self.calls.append(("heartbeat", group, hook, instance_id, token))

    def terminate_in_group(self, instance_id: str, decrement: bool) -> str:
        self.calls.append(("terminate", instance_id, decrement))
        return "grp"

    def lifecycle_state(self, instance_id: str) -> str | None:
        return self.states.get(instance_id)


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


def test_moto_group_answers_carry_the_state_machines_lifecycle_states(aws: tuple[MotoAws, RecordingBackend]) -> None:
    server, backend = aws
    ec2, asg = server.client("ec2"), server.client("autoscaling")
    ec2.create_launch_template(LaunchTemplateName="ltx", LaunchTemplateData={"ImageId": "ami-12c6146b"})
    asg.create_auto_scaling_group(
        AutoScalingGroupName="g",
        MinSize=0,
        MaxSize=2,
        DesiredCapacity=0,
        LaunchTemplate={"LaunchTemplateName": "ltx"},
        AvailabilityZones=["eu-west-1a"],
    )
    ids = [i["InstanceId"] for i in ec2.run_instances(ImageId="ami-12c6146b", MinCount=2, MaxCount=2)["Instances"]]
    asg.attach_instances(InstanceIds=ids, AutoScalingGroupName="g")
    backend.states[ids[0]] = "Terminating:Wait"
    by_group = {
        i["InstanceId"]: i["LifecycleState"]
        for i in asg.describe_auto_scaling_groups(AutoScalingGroupNames=["g"])["AutoScalingGroups"][0]["Instances"]
    }
    by_instance = {
        i["InstanceId"]: i["LifecycleState"]
        for i in asg.describe_auto_scaling_instances(InstanceIds=ids)["AutoScalingInstances"]
    }
    assert by_group == by_instance == {ids[0]: "Terminating:Wait", ids[1]: "InService"}


@pytest.mark.parametrize("hang_up", [BrokenPipeError, ConnectionResetError])
def test_a_client_killed_mid_answer_is_not_reported_but_a_proxy_bug_is(
    hang_up: type[ConnectionError], capsys: pytest.CaptureFixture[str]
) -> None:
    """Chaos kills instances while their agents wait on the proxy; their hang-ups must not fill the demo's output
    with tracebacks, while any other error in the proxy still prints one."""
    proxy = _Proxy(("127.0.0.1", 0), _Handler)
    try:
        for error in (hang_up("client gone"), KeyError("proxy bug")):
            try:
                raise error
            except Exception:
                proxy.handle_error(None, ("127.0.0.1", 1))
    finally:
        proxy.server_close()
    err = capsys.readouterr().err
    assert "client gone" not in err and hang_up.__name__ not in err
    assert "KeyError: 'proxy bug'" in err
