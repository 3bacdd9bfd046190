"""The rollout (pipeline/rollout.py) on moto's groups and launch templates; the instance refresh itself is
driven explicitly by tests/pipeline/instance_refresh.py because moto 5.2.5 does not implement it.

etcd's status comes from a small scripted cluster: every InService control-plane instance is a healthy voter
unless a test says otherwise, so quorum follows the group's real instances.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.response import StreamingBody
from moto import mock_aws

from pipeline.rollout import RolloutOptions, main, run
from tests.pipeline.instance_refresh import DrivenInstanceRefresh, Refresh

REGION = "us-east-1"
OLD_AMI, NEW_AMI = "ami-12c6146b", "ami-0000000000000beef"
CP = [f"dk8s-demo-control-plane-{i}" for i in range(3)]
WORKERS = ["dk8s-demo-workers-general"]
FAST = RolloutOptions(poll_interval_s=0, status_grace_s=0, settle_timeout_s=0)


class Cluster:
    """moto groups (3 one-instance control-plane groups, one worker group of 4) on launch template v1, then v2."""

    def __init__(self) -> None:
        self.ec2 = boto3.client("ec2", region_name=REGION)
        moto_asg = boto3.client("autoscaling", region_name=REGION)
        subnet = self.ec2.describe_subnets()["Subnets"][0]["SubnetId"]
        for name in ("dk8s-demo-control-plane", "dk8s-demo-workers"):
            self.ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData={"ImageId": OLD_AMI})
        for group in CP:
            moto_asg.create_auto_scaling_group(
                AutoScalingGroupName=group, MinSize=1, MaxSize=1, DesiredCapacity=1, VPCZoneIdentifier=subnet,
                LaunchTemplate={"LaunchTemplateName": "dk8s-demo-control-plane", "Version": "$Latest"},
            )  # fmt: skip
        moto_asg.create_auto_scaling_group(
            AutoScalingGroupName=WORKERS[0], MinSize=2, MaxSize=6, DesiredCapacity=4, VPCZoneIdentifier=subnet,
            LaunchTemplate={"LaunchTemplateName": "dk8s-demo-workers", "Version": "$Latest"},
        )  # fmt: skip
        self.unhealthy = 0  # how many voters answer unhealthy
        self.status_error: str | None = None
        self.voter_counts: list[int] = []
        self.asg = DrivenInstanceRefresh(moto_asg, self.ec2, on_step=self.on_step)
        self.step_hook: Any = None

    def new_ami(self) -> None:
        """What the stage's deploy does: a new launch template version with the new AMI; nothing is replaced."""
        for name in ("dk8s-demo-control-plane", "dk8s-demo-workers"):
            self.ec2.create_launch_template_version(
                LaunchTemplateName=name, SourceVersion="1", LaunchTemplateData={"ImageId": NEW_AMI}
            )

    def on_step(self, refresh: Refresh) -> None:
        if self.step_hook is not None:
            self.step_hook(refresh)

    def instances(self, groups: list[str]) -> list[str]:
        out = []
        for page in self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=groups)["AutoScalingGroups"]:
            out += [i["InstanceId"] for i in page["Instances"] if i["LifecycleState"] == "InService"]
        return sorted(out)

    def amis(self, groups: list[str]) -> set[str]:
        reservations = self.ec2.describe_instances(InstanceIds=self.instances(groups))["Reservations"]
        return {i["ImageId"] for r in reservations for i in r["Instances"]}

    def status(self) -> dict[str, Any]:
        if self.status_error:
            raise RuntimeError(self.status_error)
        voters = self.instances(CP)
        self.voter_counts.append(len(voters))
        return {"members": [
            {"name": f"{i}.ec2.internal", "is_learner": False, "healthy": n >= self.unhealthy}
            for n, i in enumerate(voters)
        ]}  # fmt: skip


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with mock_aws():
        yield Cluster()


def test_control_plane_one_group_at_a_time_launch_before_terminate_then_workers_in_batches(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.new_ami()
    before = cluster.instances(CP)
    lines: list[str] = []
    result = run(cluster.asg, cluster.status, control_plane_groups=CP, worker_groups=WORKERS, options=FAST,
                 report_path=tmp_path / "r.json", log=lines.append)  # fmt: skip
    assert result.ok, result.failure
    assert [(r.group, r.status) for r in cluster.asg.refreshes] == [(g, "Successful") for g in [*CP, *WORKERS]]
    prefs = [r.preferences for r in cluster.asg.refreshes]
    assert all(p["MinHealthyPercentage"] == 100 and p["MaxHealthyPercentage"] == 200 for p in prefs[:3])
    assert prefs[3]["MinHealthyPercentage"] == 90 and prefs[3]["MaxHealthyPercentage"] == 110
    assert all(p["SkipMatching"] is True and "InstanceWarmup" in p for p in prefs)
    assert cluster.amis(CP) == {NEW_AMI} and cluster.amis(WORKERS) == {NEW_AMI}
    assert not set(before) & set(cluster.instances(CP)), "every control-plane instance was replaced"
    assert min(cluster.voter_counts) >= 3 and max(cluster.voter_counts) == 4, "launch before terminate, one at a time"
    assert len(cluster.instances(WORKERS)) == 4
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and report["quorum_lost_samples"] == 0 and report["min_quorum_margin"] >= 1
    assert "result: PASS" in lines[-1] and any("instance refresh refresh-" in line for line in lines)


def test_a_rerun_skips_what_is_already_new(cluster: Cluster) -> None:
    cluster.new_ami()
    assert run(cluster.asg, cluster.status, control_plane_groups=CP, options=FAST, log=lambda _: None).ok
    replaced = cluster.instances(CP)
    assert run(cluster.asg, cluster.status, control_plane_groups=CP, options=FAST, log=lambda _: None).ok
    assert cluster.instances(CP) == replaced, "SkipMatching: nothing replaced twice"


def test_quorum_margin_below_the_minimum_cancels_the_refresh_and_names_the_group(cluster: Cluster) -> None:
    cluster.new_ami()

    def fail_two_voters(refresh: Refresh) -> None:
        if refresh.group == CP[1] and refresh.phase == "terminate":
            cluster.unhealthy = 3  # 4 voters, 1 healthy: quorum (3) lost

    cluster.step_hook = fail_two_voters
    lines: list[str] = []
    result = run(cluster.asg, cluster.status, control_plane_groups=CP, worker_groups=WORKERS, options=FAST,
                 log=lines.append)  # fmt: skip
    assert not result.ok and result.failed_step == f"control-plane {CP[1]}"
    assert "quorum margin" in str(result.failure) and "below the allowed 0" in str(result.failure)
    assert cluster.asg.cancelled == [CP[1]]
    assert [r.group for r in cluster.asg.refreshes] == CP[:2], "no later group was started"
    assert "result: FAIL" in lines[-1] and CP[1] in lines[-1]


def test_a_control_plane_group_waits_for_the_start_margin_and_fails_if_it_never_comes(cluster: Cluster) -> None:
    cluster.new_ami()
    cluster.unhealthy = 1  # 3 voters, 2 healthy: quorum held, margin 0 < start margin 1
    result = run(cluster.asg, cluster.status, control_plane_groups=CP, options=FAST, log=lambda _: None)
    assert not result.ok and result.failed_step == f"control-plane {CP[0]}"
    assert "not ready for the next control-plane replacement" in str(result.failure)
    assert cluster.asg.refreshes == [], "no refresh starts without the margin"


def test_a_failed_refresh_fails_the_step(cluster: Cluster) -> None:
    cluster.new_ami()

    def refresh_fails(refresh: Refresh) -> None:
        if refresh.group == WORKERS[0]:
            refresh.status, refresh.reason = "Failed", "launch failed: InsufficientInstanceCapacity"

    cluster.step_hook = refresh_fails
    result = run(cluster.asg, cluster.status, control_plane_groups=CP, worker_groups=WORKERS, options=FAST,
                 log=lambda _: None)  # fmt: skip
    assert not result.ok and result.failed_step == f"worker {WORKERS[0]}"
    assert "Failed" in str(result.failure) and "InsufficientInstanceCapacity" in str(result.failure)


def test_status_silent_during_a_refresh_past_the_grace_cancels_it(cluster: Cluster) -> None:
    cluster.new_ami()

    def ops_function_times_out(refresh: Refresh) -> None:
        if refresh.phase == "terminate":
            cluster.status_error = "ops function timed out"

    cluster.step_hook = ops_function_times_out
    result = run(cluster.asg, cluster.status, control_plane_groups=CP, options=FAST, log=lambda _: None)
    assert not result.ok and result.failed_step == f"control-plane {CP[0]}"
    assert "no etcd status" in str(result.failure) and "ops function timed out" in str(result.failure)
    assert cluster.asg.cancelled == [CP[0]]


def test_the_program_reads_the_stack_outputs_and_invokes_the_ops_function(cluster: Cluster, tmp_path: Path) -> None:
    cluster.new_ami()
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({"dk8s-demo-cluster": {
        "ControlPlaneGroupNames": ",".join(CP), "WorkerGroupNames": ",".join(WORKERS),
        "ClusterOpsFunctionName": "dk8s-demo-cluster-ops",
    }}))  # fmt: skip

    class OpsFunction:  # the cluster-ops Lambda's invoke (moto's needs Docker)
        def __init__(self) -> None:
            self.calls: list[str] = []

        def invoke(self, *, FunctionName: str, InvocationType: str, Payload: bytes) -> Any:  # noqa: N803
            self.calls.append(json.loads(Payload)["action"])
            body = json.dumps(cluster.status()).encode()
            return {"StatusCode": 200, "Payload": StreamingBody(io.BytesIO(body), len(body))}

    ops = OpsFunction()
    args = ["--outputs", str(outputs), "--report", str(tmp_path / "report.json"), "--poll-interval", "0.001",
            "--region", REGION]  # fmt: skip
    assert main(args, autoscaling=cluster.asg, lambda_client=ops) == 0
    assert set(ops.calls) == {"status"} and cluster.amis(WORKERS) == {NEW_AMI}
    assert json.loads((tmp_path / "report.json").read_text())["ok"]
    with pytest.raises(SystemExit):
        main(["--worker-min-healthy", "50", "--worker-max-healthy", "200"])


def test_a_refresh_already_running_on_a_group_fails_the_step_without_touching_it(cluster: Cluster) -> None:
    cluster.new_ami()
    cluster.asg.start_instance_refresh(AutoScalingGroupName=CP[0], Preferences={})  # an operator's, still running
    result = run(cluster.asg, cluster.status, control_plane_groups=CP, options=FAST, log=lambda _: None)
    assert not result.ok and result.failed_step == f"control-plane {CP[0]}"
    assert "could not start an instance refresh" in str(result.failure) and "InProgress" in str(result.failure)
    assert cluster.asg.cancelled == [] and len(cluster.asg.refreshes) == 1


def test_a_crash_while_watching_a_refresh_cancels_it_and_still_writes_the_report(
    cluster: Cluster, tmp_path: Path
) -> None:
    """``time.sleep(-1)`` raises ValueError ("sleep length must be non-negative", Python's time.sleep): before
    the parse-time ranges, ``--poll-interval -1`` crashed here and left the refresh replacing nodes unwatched."""
    cluster.new_ami()

    def sleep(seconds: float) -> None:
        if cluster.asg.refreshes:
            raise ValueError("sleep length must be non-negative")

    report = tmp_path / "rollout" / "report.json"
    result = run(cluster.asg, cluster.status, control_plane_groups=CP, options=FAST, report_path=report,
                 log=lambda _: None, sleep=sleep)  # fmt: skip
    assert not result.ok and result.failed_step == f"control-plane {CP[0]}"
    assert "ValueError" in str(result.failure) and "sleep length" in str(result.failure)
    assert cluster.asg.cancelled == [CP[0]], "the refresh that was started is cancelled"
    written = json.loads(report.read_text())
    assert written["ok"] is False and written["failed_step"] == f"control-plane {CP[0]}"
