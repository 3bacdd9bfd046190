"""A launch lifecycle action with Auto Scaling's timing, for tests of the agent's heartbeats.

moto 5.2.5 raises NotImplementedError for CompleteLifecycleAction and RecordLifecycleActionHeartbeat, so this
stands in for the two calls, answering as Auto Scaling does (as unkind, never kinder):

* the instance waits in Pending:Wait until the hook is completed or its heartbeat timeout elapses; then the
  hook's default result applies (ABANDON for the launch hooks this project creates: stages/nodes.py).
  "If the lifecycle hook times out, Amazon EC2 Auto Scaling performs the action that you specified in the
  DefaultResult property" (Amazon EC2 Auto Scaling API Reference, LifecycleHook,
  https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_LifecycleHook.html);
* RecordLifecycleActionHeartbeat "extends the timeout by the length of time defined using the PutLifecycleHook
  API call" (API Reference, RecordLifecycleActionHeartbeat), but never past the global timeout: "The maximum
  time, in seconds, that an instance can remain in a wait state. The maximum is 172800 seconds (48 hours) or 100
  times HeartbeatTimeout, whichever is smaller" (API Reference, LifecycleHook, GlobalTimeout);
* a call for an instance with no active action (never had one, completed, or timed out) fails with
  ``ValidationError`` "No active Lifecycle Action found with instance ID i-..." (HTTP 400), the answer seen from
  AWS in convox/rack#2432 ("An error occurred (ValidationError) when calling the CompleteLifecycleAction
  operation: No active Lifecycle Action found with instance ID i-09c7205a117f0d09a"). This stand-in looks the
  action up by group, hook and instance, and refuses a call that names another hook or group the same way.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

GLOBAL_TIMEOUT_CAP_SECONDS = 172800.0  # 48 h


def no_active_action(instance_id: str, operation: str) -> ClientError:
    """The error botocore raises for Auto Scaling's answer (Query protocol, ``Sender`` fault, HTTP 400)."""
    message = f"No active Lifecycle Action found with instance ID {instance_id}"
    return ClientError(
        {"Error": {"Code": "ValidationError", "Message": message, "Type": "Sender"},
         "ResponseMetadata": {"HTTPStatusCode": 400}},
        operation,
    )  # fmt: skip


@dataclass
class PendingLaunch:
    group: str
    hook: str
    instance_id: str
    heartbeat_timeout: float
    default_result: str = "ABANDON"
    started: float = field(default_factory=time.monotonic)
    deadline: float = 0.0
    result: str | None = None  # CONTINUE/ABANDON once decided
    decided_by: str = ""  # "complete" | "heartbeat-timeout" | "global-timeout"
    heartbeats: int = 0

    def __post_init__(self) -> None:
        self.deadline = self.started + self.heartbeat_timeout

    @property
    def global_deadline(self) -> float:
        return self.started + min(GLOBAL_TIMEOUT_CAP_SECONDS, 100 * self.heartbeat_timeout)


class TimedAutoScaling:
    """The two lifecycle calls of a boto3 ``autoscaling`` client, for one instance in Pending:Wait."""

    def __init__(self, action: PendingLaunch) -> None:
        self.action = action
        self.lock = threading.Lock()
        self.calls: list[tuple[float, str]] = []

    def _active(self, group: str, hook: str, instance_id: str, operation: str) -> PendingLaunch:
        a, now = self.action, time.monotonic()
        if a.result is None and now >= min(a.deadline, a.global_deadline):
            a.result = a.default_result
            a.decided_by = "heartbeat-timeout" if a.deadline <= a.global_deadline else "global-timeout"
        if a.result is not None or (group, hook, instance_id) != (a.group, a.hook, a.instance_id):
            raise no_active_action(instance_id, operation)
        return a

    def describe_auto_scaling_instances(self, InstanceIds: list[str]) -> dict[str, Any]:  # noqa: N803 (boto3 names)
        wanted = [i for i in InstanceIds if i == self.action.instance_id]
        return {"AutoScalingInstances": [{"InstanceId": i, "AutoScalingGroupName": self.action.group} for i in wanted]}

    def record_lifecycle_action_heartbeat(self, **kw: str) -> dict[str, Any]:
        with self.lock:
            self.calls.append((time.monotonic(), "heartbeat"))
            a = self._active(kw["AutoScalingGroupName"], kw["LifecycleHookName"], kw["InstanceId"],
                             "RecordLifecycleActionHeartbeat")  # fmt: skip
            a.deadline = time.monotonic() + a.heartbeat_timeout
            a.heartbeats += 1
        return {}

    def complete_lifecycle_action(self, **kw: str) -> dict[str, Any]:
        with self.lock:
            self.calls.append((time.monotonic(), "complete"))
            a = self._active(kw["AutoScalingGroupName"], kw["LifecycleHookName"], kw["InstanceId"],
                             "CompleteLifecycleAction")  # fmt: skip
            if kw["LifecycleActionResult"] not in ("CONTINUE", "ABANDON"):
                raise ClientError({"Error": {"Code": "ValidationError", "Message": "Invalid LifecycleActionResult"}},
                                  "CompleteLifecycleAction")  # fmt: skip
            a.result, a.decided_by = kw["LifecycleActionResult"], "complete"
        return {}
