"""The launch hook: Auto Scaling's "no active lifecycle action" answer is not a crash, and a slow launch heartbeats.

The AWS answers are the real wire shapes through botocore's Stubber on a real boto3 ``autoscaling`` client.
CompleteLifecycleAction and RecordLifecycleActionHeartbeat list ResourceContention (HTTP 500) as their own error
and every Auto Scaling action may answer the common errors, among them ValidationError (HTTP 400) (Amazon EC2
Auto Scaling API Reference: CompleteLifecycleAction, RecordLifecycleActionHeartbeat, Common Errors). An instance
that is in no lifecycle wait gets ValidationError "No active Lifecycle Action found with instance ID i-...", as
seen from AWS in convox/rack#2432 (an instance that launched where the group had no launch hook).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from node_agent.config import AgentConfig
from node_agent.lifecycle import (
    AutoScalingLaunchHook,
    LaunchHookHeartbeat,
    RecordingLaunchHook,
    is_no_active_lifecycle_action,
)
from node_agent.runner import CommandResult
from tests.agent.auto_scaling_hooks import PendingLaunch, TimedAutoScaling
from tests.agent.conftest import REGION, config_values
from tests.agent.harness import build_agent, fast_settings, identity

INSTANCE = "i-0abc1234def567890"
GROUP = "dk8s-demo-control-plane-a"
HOOK = "dk8s-launch"
NO_ACTIVE = f"No active Lifecycle Action found with instance ID {INSTANCE}"


@pytest.fixture
def stubbed() -> Any:
    client = boto3.session.Session(
        region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
    ).client("autoscaling")
    with Stubber(client) as stub:
        yield client, stub
        stub.assert_no_pending_responses()


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def warnings(self) -> list[logging.LogRecord]:
        return [r for r in self.records if r.levelno == logging.WARNING]


@pytest.fixture
def lifecycle_log() -> Any:
    """The lifecycle logger's records, read on the logger itself (configure_logging stops propagation)."""
    logger, handler = logging.getLogger("node_agent.lifecycle"), Records()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _params(**extra: str) -> dict[str, str]:
    return {"LifecycleHookName": HOOK, "AutoScalingGroupName": GROUP, "InstanceId": INSTANCE, **extra}


def test_complete_without_an_active_lifecycle_action_warns_and_returns(stubbed: Any, lifecycle_log: Records) -> None:
    """The group had no launch hook when the instance launched (or it was attached outside one): nothing waits."""
    client, stub = stubbed
    stub.add_client_error("complete_lifecycle_action", service_error_code="ValidationError",
                          service_message=NO_ACTIVE, http_status_code=400,
                          expected_params=_params(LifecycleActionResult="CONTINUE"))  # fmt: skip
    AutoScalingLaunchHook(client, HOOK, INSTANCE, GROUP).complete("CONTINUE", "joined")
    (warning,) = lifecycle_log.warnings()
    assert "no active lifecycle action" in warning.getMessage()
    fields = getattr(warning, "fields", {})
    assert fields["instance_id"] == INSTANCE and fields["hook"] == HOOK and fields["group"] == GROUP
    assert fields["aws_error"] == NO_ACTIVE


@pytest.mark.parametrize(
    ("code", "message", "status"),
    [
        pytest.param("ResourceContention", "You already have a pending update to an Auto Scaling resource.", 500,
                     id="ResourceContention"),
        pytest.param("ValidationError", "1 validation error detected: Value 'x' at 'lifecycleHookName' failed to "
                     "satisfy constraint", 400, id="another ValidationError"),
        pytest.param("AccessDenied", f"User is not authorized to perform: autoscaling:CompleteLifecycleAction on "
                     f"{INSTANCE}", 403, id="AccessDenied"),
    ],
)  # fmt: skip
def test_any_other_error_still_raises(stubbed: Any, code: str, message: str, status: int) -> None:
    client, stub = stubbed
    for method in ("complete_lifecycle_action", "record_lifecycle_action_heartbeat"):
        stub.add_client_error(method, service_error_code=code, service_message=message, http_status_code=status)
    hook = AutoScalingLaunchHook(client, HOOK, INSTANCE, GROUP)
    with pytest.raises(ClientError) as completing:
        hook.complete("CONTINUE", "joined")
    with pytest.raises(ClientError) as beating:
        hook.heartbeat()
    for caught in (completing, beating):
        assert caught.value.response["Error"]["Code"] == code and not is_no_active_lifecycle_action(caught.value)


def test_heartbeat_is_recorded_or_reports_that_nothing_waits(stubbed: Any) -> None:
    client, stub = stubbed
    stub.add_response("describe_auto_scaling_instances", {"AutoScalingInstances": [{
        "InstanceId": INSTANCE, "AutoScalingGroupName": GROUP, "AvailabilityZone": "eu-west-1a",
        "LifecycleState": "Pending:Wait", "HealthStatus": "HEALTHY", "ProtectedFromScaleIn": False}]},
        {"InstanceIds": [INSTANCE]})  # fmt: skip
    stub.add_response("record_lifecycle_action_heartbeat", {}, _params())
    stub.add_client_error("record_lifecycle_action_heartbeat", service_error_code="ValidationError",
                          service_message=NO_ACTIVE, http_status_code=400, expected_params=_params())  # fmt: skip
    hook = AutoScalingLaunchHook(client, HOOK, INSTANCE)  # production wiring: the group is looked up once
    assert hook.heartbeat() is True
    assert hook.heartbeat() is False


class FlakyHook(RecordingLaunchHook):
    """A hook whose first heartbeat fails the way a throttled call does, and which reports no active action
    after ``alive_for`` heartbeats (as Auto Scaling does once the wait has ended)."""

    def __init__(self, alive_for: int) -> None:
        super().__init__()
        self.alive_for = alive_for
        self.attempts = 0

    def heartbeat(self) -> bool:
        self.attempts += 1
        if self.attempts == 1:
            raise ClientError({"Error": {"Code": "Throttling", "Message": "Rate exceeded"}}, "Heartbeat")
        return len(self.heartbeats) < self.alive_for and super().heartbeat()


def _wait_for(predicate: Any, seconds: float = 5.0) -> None:
    limit = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < limit, "timed out"
        time.sleep(0.01)


def test_a_failed_heartbeat_is_not_fatal_and_no_active_action_ends_them() -> None:
    hook = FlakyHook(alive_for=2)
    with LaunchHookHeartbeat(hook, 0.02, stop_after_seconds=60) as heartbeat:
        _wait_for(lambda: not heartbeat._thread.is_alive())  # ended by itself, not by stop()
    assert heartbeat.failures == 1 and heartbeat.sent == 2 and hook.attempts == 4  # 1 failed, 2 recorded, 1 "none"


def test_heartbeats_end_at_the_launch_deadline_and_on_stop() -> None:
    past_deadline = RecordingLaunchHook()
    with LaunchHookHeartbeat(past_deadline, 0.02, stop_after_seconds=0.1) as heartbeat:
        _wait_for(lambda: not heartbeat._thread.is_alive())
    assert 2 <= len(past_deadline.heartbeats) <= 5, "a hung agent must not hold the hook open past its deadline"
    stopped = RecordingLaunchHook()
    with LaunchHookHeartbeat(stopped, 0.02, stop_after_seconds=60):
        _wait_for(lambda: len(stopped.heartbeats) >= 2)
    count = len(stopped.heartbeats)
    time.sleep(0.1)
    assert len(stopped.heartbeats) == count, "no heartbeat after stop"


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan")])
def test_a_heartbeat_interval_that_is_not_positive_is_refused_by_name(interval: float) -> None:
    with pytest.raises(ValueError, match="heartbeat_interval_seconds"):
        LaunchHookHeartbeat(RecordingLaunchHook(), interval, stop_after_seconds=60)


# -- a launch longer than the hook timeout ----------------------------------------------------------------------
class SlowJoin:
    """A worker's commands: ``kubeadm join`` takes ``join_seconds`` (a large image pull, a slow bootstrap)."""

    def __init__(self, node_name: str, join_seconds: float) -> None:
        self.node_name, self.join_seconds = node_name, join_seconds
        self.calls: list[list[str]] = []

    def run(self, argv: Any, *, env: Any = None, timeout: Any = None) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        if argv[:2] == ["kubeadm", "join"]:
            time.sleep(self.join_seconds)
            return CommandResult(tuple(argv), 0, "This node has joined the cluster", "")
        if argv[:1] == ["kubectl"] and "node" in argv:
            return CommandResult(tuple(argv), 0, f"node/{self.node_name}\n", "")
        return CommandResult(tuple(argv), 1, "", f"unexpected command {argv}")


def _slow_worker(aws: dict[str, Any], tmp_path: Path, *, heartbeat_every: float) -> tuple[Any, TimedAutoScaling]:
    cfg = AgentConfig.from_mapping(config_values(role="worker"))
    aws["secretsmanager"].put_secret_value(SecretId=cfg.join_secret_name, SecretString=json.dumps(
        {"token": "abcdef.0123456789abcdef", "caCertHash": "sha256:" + "0" * 64,
         "expiresAt": "2099-01-01T00:00:00Z", "apiEndpoint": "api:6443", "kubernetesVersion": "1.34.2"}))  # fmt: skip
    ident = identity(7)
    # Scaled down 1000x: a 600 s hook timeout is 0.6 s, a 25 min launch 1.5 s, heartbeats every 150 ms.
    asg = TimedAutoScaling(PendingLaunch(GROUP, cfg.launch_hook_name, ident.instance_id, heartbeat_timeout=0.6))
    hook = AutoScalingLaunchHook(asg, cfg.launch_hook_name, ident.instance_id)
    agent, _ = build_agent(
        aws, cfg, ident=ident, runner=SlowJoin(ident.node_name, join_seconds=1.5),
        settings=fast_settings(tmp_path, heartbeat_interval_seconds=heartbeat_every),
        etcd_for=lambda tls: None, probe=lambda url: False,  # type: ignore[arg-type,return-value]
    )  # fmt: skip
    agent.hook = hook
    return agent, asg


def test_a_launch_longer_than_the_hook_timeout_heartbeats_and_completes_continue(
    aws: dict[str, Any], tmp_path: Path
) -> None:
    agent, asg = _slow_worker(aws, tmp_path, heartbeat_every=0.15)
    started = time.monotonic()
    outcome = agent.run_launch()
    took = time.monotonic() - started
    assert outcome.ok and outcome.action == "worker-joined"
    assert took > 2 * asg.action.heartbeat_timeout, "the launch outlived the hook timeout"
    assert (asg.action.result, asg.action.decided_by) == ("CONTINUE", "complete")
    assert asg.action.heartbeats >= 5
    beats = [t for t, what in asg.calls if what == "heartbeat"]
    gaps = [b - a for a, b in zip([started, *beats], beats, strict=False)]
    assert max(gaps) < asg.action.heartbeat_timeout
    assert asg.calls[-1][1] == "complete" and all(t <= asg.calls[-1][0] for t, _ in asg.calls)


def test_without_heartbeats_the_same_launch_is_abandoned_by_the_hook_timeout(
    aws: dict[str, Any], tmp_path: Path, lifecycle_log: Records
) -> None:
    """The control: the stand-in is as unkind as Auto Scaling, so a launch that does not heartbeat loses its wait."""
    agent, asg = _slow_worker(aws, tmp_path, heartbeat_every=60.0)
    agent.run_launch()
    assert (asg.action.result, asg.action.decided_by) == ("ABANDON", "heartbeat-timeout")
    assert asg.action.heartbeats == 0
    assert any("no active lifecycle action" in r.getMessage() for r in lifecycle_log.warnings())


def test_the_heartbeat_thread_is_gone_after_the_launch(aws: dict[str, Any], tmp_path: Path) -> None:
    agent, _ = _slow_worker(aws, tmp_path, heartbeat_every=0.05)
    agent.run_launch()
    assert not [t for t in threading.enumerate() if t.name == "launch-hook-heartbeat"]
