"""Completing the launch lifecycle hook: the one call that makes an instance InService (invariant 5).

moto 5.2.5 raises ``NotImplementedError`` for ``complete_lifecycle_action`` (docs/facts), so the hook is
a small seam: production uses :class:`AutoScalingLaunchHook`; tests and the twin pass a recorder.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

from node_agent.log import get_logger, log

LOG = get_logger("lifecycle")
Result = Literal["CONTINUE", "ABANDON"]


class LaunchHook(Protocol):
    def complete(self, result: Result, reason: str) -> None: ...


class AutoScalingLaunchHook:
    def __init__(self, client: Any, hook_name: str, instance_id: str, group_name: str | None = None) -> None:
        self.client = client
        self.hook_name = hook_name
        self.instance_id = instance_id
        self._group = group_name

    def group_name(self) -> str:
        if self._group is None:
            resp = self.client.describe_auto_scaling_instances(InstanceIds=[self.instance_id])
            instances = resp.get("AutoScalingInstances", [])
            if not instances:
                raise RuntimeError(f"{self.instance_id} is not in an Auto Scaling group")
            self._group = str(instances[0]["AutoScalingGroupName"])
        return self._group

    def complete(self, result: Result, reason: str) -> None:
        log(LOG, 20 if result == "CONTINUE" else 40, "completing launch hook", result=result, reason=reason)
        self.client.complete_lifecycle_action(
            LifecycleHookName=self.hook_name,
            AutoScalingGroupName=self.group_name(),
            InstanceId=self.instance_id,
            LifecycleActionResult=result,
        )


class RecordingLaunchHook:
    """Records the decision instead of calling Auto Scaling (tests, the local twin)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Result, str]] = []

    def complete(self, result: Result, reason: str) -> None:
        log(LOG, 20 if result == "CONTINUE" else 40, "completing launch hook", result=result, reason=reason)
        self.calls.append((result, reason))

    @property
    def result(self) -> Result | None:
        return self.calls[-1][0] if self.calls else None
