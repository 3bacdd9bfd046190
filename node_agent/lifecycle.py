"""The launch lifecycle hook: heartbeats while the node works, then the one call that makes it InService (invariant 5).

moto 5.2.5 raises ``NotImplementedError`` for ``complete_lifecycle_action`` (docs/facts), so the hook is
a small seam: production uses :class:`AutoScalingLaunchHook`; tests and the twin pass a recorder.

**No active lifecycle action.** An instance that launched before its group's launch hook existed (a new
group whose first instances start while CloudFormation is still adding the hook), or one attached to the
group outside a hook, has no wait to complete: Auto Scaling answers ``CompleteLifecycleAction`` and
``RecordLifecycleActionHeartbeat`` with ``ValidationError`` "No active Lifecycle Action found with instance
ID i-...". That is not a failed launch: the instance is already InService. The hook logs a warning and
returns, so the agent exits 0 and its unit enables the node's timers (snapshots, token rotation,
certificates, add-on upgrade); crashing there left a control plane without them and, after 24 h, an
expired worker join token. Any other error still raises.

**Heartbeats.** The hook's heartbeat timeout (600 s workers, 900 s control plane) is shorter than the
agent's own launch deadline, so :class:`LaunchHookHeartbeat` records a heartbeat every
``heartbeat_interval_seconds`` while the launch runs: each one restarts the hook's timeout, up to Auto
Scaling's global timeout (48 h or 100 heartbeat timeouts, whichever is smaller). A failed heartbeat is
logged and retried at the next interval, never fatal; "no active lifecycle action" ends the heartbeats; they
also end at the agent's launch deadline, so an agent that hangs past it cannot hold the hook open: the
hook then times out to its default result (ABANDON) and the group replaces the instance.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Literal, Protocol

from botocore.exceptions import ClientError

from node_agent.log import get_logger, log

LOG = get_logger("lifecycle")
Result = Literal["CONTINUE", "ABANDON"]
# Auto Scaling's answer when the instance is in no lifecycle wait for that hook (code ValidationError, HTTP 400).
NO_ACTIVE_ACTION_CODE = "ValidationError"
NO_ACTIVE_ACTION_MESSAGE = "No active Lifecycle Action found with instance ID"


class LaunchHook(Protocol):
    def complete(self, result: Result, reason: str) -> None: ...

    def heartbeat(self) -> bool:
        """Restart the hook's timeout; False when there is no active lifecycle action (stop heartbeating)."""
        ...


def is_no_active_lifecycle_action(err: BaseException) -> bool:
    """True only for Auto Scaling's "No active Lifecycle Action found with instance ID ..." ValidationError."""
    if not isinstance(err, ClientError):
        return False
    error = err.response.get("Error", {})
    return error.get("Code") == NO_ACTIVE_ACTION_CODE and str(error.get("Message", "")).startswith(
        NO_ACTIVE_ACTION_MESSAGE
    )


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

    def _no_active_action(self, err: ClientError, call: str, **fields: Any) -> None:
        log(LOG, 30, f"{call}: no active lifecycle action for this instance (launched or attached outside the hook)",
            instance_id=self.instance_id, hook=self.hook_name, group=self._group or "", **fields,
            aws_error=str(err.response.get("Error", {}).get("Message", "")))  # fmt: skip

    def complete(self, result: Result, reason: str) -> None:
        log(LOG, 20 if result == "CONTINUE" else 40, "completing launch hook", result=result, reason=reason)
        try:
            self.client.complete_lifecycle_action(
                LifecycleHookName=self.hook_name,
                AutoScalingGroupName=self.group_name(),
                InstanceId=self.instance_id,
                LifecycleActionResult=result,
            )
        except ClientError as err:
            if not is_no_active_lifecycle_action(err):
                raise
            self._no_active_action(err, "CompleteLifecycleAction", result=result)

    def heartbeat(self) -> bool:
        try:
            self.client.record_lifecycle_action_heartbeat(
                LifecycleHookName=self.hook_name,
                AutoScalingGroupName=self.group_name(),
                InstanceId=self.instance_id,
            )
        except ClientError as err:
            if not is_no_active_lifecycle_action(err):
                raise
            self._no_active_action(err, "RecordLifecycleActionHeartbeat")
            return False
        return True


class RecordingLaunchHook:
    """Records the decision (and heartbeats) instead of calling Auto Scaling (tests, the local twin).

    As Auto Scaling does, a completed hook has no active action: later heartbeats answer False.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Result, str]] = []
        self.heartbeats: list[float] = []  # time.monotonic() of each heartbeat recorded while the wait was active

    def complete(self, result: Result, reason: str) -> None:
        log(LOG, 20 if result == "CONTINUE" else 40, "completing launch hook", result=result, reason=reason)
        self.calls.append((result, reason))

    def heartbeat(self) -> bool:
        if self.calls:
            return False
        self.heartbeats.append(time.monotonic())
        return True

    @property
    def result(self) -> Result | None:
        return self.calls[-1][0] if self.calls else None


class LaunchHookHeartbeat:
    """A background thread that heartbeats ``hook`` every ``interval_seconds`` until stopped (a context manager).

    The first heartbeat is one interval after start (the hook's timeout started with the launch). It stops on
    :meth:`stop`, when the hook reports no active lifecycle action, or ``stop_after_seconds`` after start
    (the launch deadline: past it the hook's own timeout takes over). Errors are logged and counted, never raised.
    """

    def __init__(self, hook: LaunchHook, interval_seconds: float, *, stop_after_seconds: float) -> None:
        if not interval_seconds > 0:
            raise ValueError(f"heartbeat_interval_seconds = {interval_seconds!r}: must be a positive number of seconds")
        if not stop_after_seconds > 0:
            raise ValueError(f"stop_after_seconds = {stop_after_seconds!r}: must be a positive number of seconds")
        self.hook = hook
        self.interval_seconds = interval_seconds
        self.stop_after_seconds = stop_after_seconds
        self.sent = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="launch-hook-heartbeat", daemon=True)

    def __enter__(self) -> LaunchHookHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop heartbeating; waits briefly for a heartbeat in flight (a later one only logs "no active action")."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self.interval_seconds):
            if time.monotonic() - started >= self.stop_after_seconds:
                log(LOG, 30, "launch deadline passed: no more launch hook heartbeats", sent=self.sent)
                return
            try:
                alive = self.hook.heartbeat()
            except Exception as err:  # throttling, an endpoint hiccup: the next interval tries again
                self.failures += 1
                log(LOG, 30, "launch hook heartbeat failed; retrying at the next interval",
                    error=f"{type(err).__name__}: {err}", failures=self.failures)  # fmt: skip
                continue
            if not alive:
                return
            self.sent += 1
            log(LOG, 10, "launch hook heartbeat recorded", sent=self.sent)
