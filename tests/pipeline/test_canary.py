"""The canary passes a clean rolling replacement and fails, naming the check, on each kind of trouble.

These tests drive the canary with a small scripted cluster (the canary's ClusterApi seam); the same
canary runs end to end against the local cluster twin in tests/twin/.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber
from moto import mock_aws

from pipeline.canary import Boto3ClusterApi, CanaryOptions, run
from pipeline.canary.__main__ import main as canary_main


@dataclass
class ScriptedCluster:
    """Three control-plane instances; a terminated one leaves etcd, its replacement joins as a learner
    and is promoted a few polls later. Knobs make one thing go wrong."""

    instances: list[str] = field(
        default_factory=lambda: ["i-00000000000000001", "i-00000000000000002", "i-00000000000000003"]
    )
    kv: dict[str, str] = field(default_factory=dict)
    polls: int = 0
    pending: list[dict[str, Any]] = field(default_factory=list)
    next_id: int = 100
    drop_quorum_at_poll: int | None = None
    lose_sentinel: bool = False
    leave_stale_member: bool = False
    never_replace: bool = False
    status_fails_from_poll: int | None = None
    terminated: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.members: list[dict[str, Any]] = [
            {"name": f"{i}.ec2.internal", "is_learner": False, "healthy": True} for i in self.instances
        ]

    def status(self) -> Any:
        self.polls += 1
        if self.status_fails_from_poll is not None and self.polls >= self.status_fails_from_poll:
            raise RuntimeError("ops function timed out")
        for event in list(self.pending):
            event["in"] -= 1
            if event["in"] <= 0:
                self.pending.remove(event)
                event["do"]()
        members = [dict(m) for m in self.members]
        if self.drop_quorum_at_poll is not None and self.polls == self.drop_quorum_at_poll:
            for member in members[:2]:
                member["healthy"] = False
        return {"members": members}

    def put(self, key: str, value: str) -> Any:
        self.kv[key] = value
        return {"ok": True}

    def get(self, key: str) -> Any:
        return {"value": None if self.lose_sentinel else self.kv.get(key)}

    def in_service_instances(self) -> list[str]:
        return list(self.instances)

    def terminate(self, instance_id: str) -> None:
        self.terminated.append(instance_id)
        self.instances.remove(instance_id)
        if self.leave_stale_member:  # the member stays, down with its instance
            for member in self.members:
                if instance_id in member["name"]:
                    member["healthy"] = False
        else:
            self.members = [m for m in self.members if instance_id not in m["name"]]
        if self.never_replace:
            return
        new = f"i-{self.next_id:017d}"
        self.next_id += 1

        def launch() -> None:
            self.instances.append(new)
            self.members.append({"name": f"{new}.ec2.internal", "is_learner": True, "healthy": True})

        def promote() -> None:
            for member in self.members:
                if new in member["name"]:
                    member["is_learner"] = False

        self.pending += [{"in": 2, "do": launch}, {"in": 4, "do": promote}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def run_canary(cluster: ScriptedCluster, tmp_path: Path, **options: Any) -> Any:
    clock = FakeClock()
    lines: list[str] = []
    result = run(
        cluster,
        options=CanaryOptions(**{"replacement_timeout_s": 60.0, "poll_interval_s": 1.0, **options}),
        report_path=tmp_path / "report.json",
        log=lines.append,
        clock=clock,
        sleep=clock.sleep,
    )
    return result, "\n".join(lines)


def test_a_clean_rolling_replacement_passes_and_reports_each_replacement(tmp_path: Path) -> None:
    cluster = ScriptedCluster()
    result, output = run_canary(cluster, tmp_path)
    assert result.ok, output
    assert cluster.terminated == ["i-00000000000000001", "i-00000000000000002", "i-00000000000000003"]
    assert [r.min_healthy_voters for r in result.replacements] == [2, 2, 2]
    assert all(r.new_instance for r in result.replacements)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is True
    assert report["sentinel_intact"] is True
    assert report["quorum_lost_samples"] == 0
    assert len(report["replacements"]) == 3
    assert "result: PASS" in output


def test_one_sample_without_quorum_fails_the_canary(tmp_path: Path) -> None:
    result, output = run_canary(ScriptedCluster(drop_quorum_at_poll=5), tmp_path)
    assert not result.ok
    assert result.failed_check == "quorum lost"
    assert "only 1 of" in output


def test_a_missing_sentinel_fails_the_canary(tmp_path: Path) -> None:
    result, _ = run_canary(ScriptedCluster(lose_sentinel=True), tmp_path)
    assert not result.ok
    assert result.failed_check == "sentinel missing"
    assert result.sentinel_intact is False


def test_a_stale_member_left_behind_fails_as_a_timeout_naming_it(tmp_path: Path) -> None:
    result, output = run_canary(ScriptedCluster(leave_stale_member=True), tmp_path, replacement_timeout_s=20.0)
    assert not result.ok
    assert result.failed_check == "replacement timeout"
    assert "stale member(s) i-00000000000000001.ec2.internal" in output


def test_a_replacement_that_never_comes_fails_with_a_timeout(tmp_path: Path) -> None:
    result, output = run_canary(ScriptedCluster(never_replace=True), tmp_path, replacement_timeout_s=15.0)
    assert not result.ok
    assert result.failed_check == "replacement timeout"
    assert "waiting for a replacement instance InService" in output


def test_status_unavailable_past_the_grace_fails_the_canary(tmp_path: Path) -> None:
    result, _ = run_canary(ScriptedCluster(status_fails_from_poll=4), tmp_path, status_grace_s=3.0)
    assert not result.ok
    assert result.failed_check == "status unavailable"


def test_an_unhealthy_cluster_is_not_touched(tmp_path: Path) -> None:
    cluster = ScriptedCluster()
    cluster.members[0]["healthy"] = False
    cluster.members.append({"name": "i-0000000000000abcd.ec2.internal", "is_learner": True, "healthy": True})
    result, _ = run_canary(cluster, tmp_path)
    assert not result.ok
    assert result.failed_check == "unhealthy before start"
    assert cluster.terminated == []


def _payload(document: Any) -> StreamingBody:
    raw = json.dumps(document).encode()
    return StreamingBody(io.BytesIO(raw), len(raw))


@mock_aws
def test_boto3_api_terminates_keeping_capacity_and_invokes_the_ops_function() -> None:
    region = "us-east-1"
    ec2 = boto3.client("ec2", region_name=region)
    autoscaling = boto3.client("autoscaling", region_name=region)
    image = ec2.describe_images()["Images"][0]["ImageId"]
    autoscaling.create_launch_configuration(LaunchConfigurationName="lc", ImageId=image, InstanceType="m6i.large")
    for name in ("cp-0", "cp-1"):
        autoscaling.create_auto_scaling_group(
            AutoScalingGroupName=name,
            LaunchConfigurationName="lc",
            MinSize=1,
            MaxSize=1,
            DesiredCapacity=1,
            AvailabilityZones=[f"{region}a"],
        )
    lambda_client = boto3.client("lambda", region_name=region)
    stubber = Stubber(lambda_client)
    stubber.add_response(
        "invoke",
        {"StatusCode": 200, "Payload": _payload({"members": []})},
        {
            "FunctionName": "ops",
            "InvocationType": "RequestResponse",
            "Payload": json.dumps({"action": "status"}).encode(),
        },
    )
    api = Boto3ClusterApi(
        function_name="ops", group_names=["cp-0", "cp-1"], lambda_client=lambda_client, autoscaling_client=autoscaling
    )
    before = api.in_service_instances()
    assert len(before) == 2
    with stubber:
        assert api.status() == {"members": []}
    api.terminate(before[0])
    groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["cp-0", "cp-1"])["AutoScalingGroups"]
    assert [g["DesiredCapacity"] for g in groups] == [1, 1]  # capacity kept, so the group replaces the node
    after = api.in_service_instances()
    assert before[0] not in after
    assert len(after) == 2


def test_cli_refuses_to_run_without_stack_outputs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CONTROL_PLANE_GROUP_NAMES", raising=False)
    monkeypatch.delenv("CLUSTER_OPS_FUNCTION_NAME", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        canary_main([])
    assert exit_info.value.code == 2
    assert "ControlPlaneGroupNames" in capsys.readouterr().err


def test_cli_rejects_a_poll_interval_above_one_second(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        canary_main(["--poll-interval", "5"])
    assert "argument --poll-interval: 5 is out of range: must be more than 0 and at most 1" in capsys.readouterr().err
