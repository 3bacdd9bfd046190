"""The Auto Scaling instance lifecycle that moto 5.2.5 lacks, driven by the twin (kept small on purpose).

moto accepts lifecycle hooks but they have no effect (no Pending:Wait, no Terminating:Wait; complete and
heartbeat raise NotImplementedError: docs/facts.md). This module is the whole stand-in, per instance::

    launch -> Pending:Wait --CONTINUE--> InService --terminate--> Terminating:Wait --CONTINUE--> Terminated
                 |  ABANDON / launch-hook timeout                   |  ABANDON + retain-on-abandon
                 v                                                  v
              Terminating:Wait (terminate hook still runs)      Terminating:Retained (left running)

A group without a launch hook (its hook is a separate AWS::AutoScaling::LifecycleHook resource that
CloudFormation creates only after the group, :mod:`twin.template`) puts its instances straight into
InService: there is no lifecycle action, and completing one is refused ("No active Lifecycle Action found").
Hooks are looked up when an instance makes its transition, so a hook added later applies from the next
launch or termination on ("Amazon EC2 Auto Scaling lifecycle hooks": a hook takes effect for instances
launching or terminating after it is added). A hook whose heartbeat timeout elapses takes its default result.
After an instance is Terminated (or Retained) the group launches a replacement so it holds its desired
capacity; an instance in a wait state still counts, so the replacement comes after the old instance has left
(the order the brief and the design assume). What happens to the instance itself (start a process, kill it, mirror it
into moto's EC2, publish the EventBridge event) is the :class:`Provider`'s job (:mod:`twin.cluster`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twin.aws import LifecycleRefusedError

PENDING_WAIT = "Pending:Wait"
IN_SERVICE = "InService"
TERMINATING_WAIT = "Terminating:Wait"
RETAINED = "Terminating:Retained"
TERMINATED = "Terminated"
WAIT_STATES = (PENDING_WAIT, TERMINATING_WAIT)
COUNTED = (PENDING_WAIT, IN_SERVICE, TERMINATING_WAIT)


@dataclass(frozen=True)
class Hook:
    name: str
    heartbeat_timeout: float
    default_result: str  # CONTINUE | ABANDON


@dataclass(frozen=True)
class Group:
    name: str
    role: str  # control-plane | worker
    subnets: tuple[tuple[str, str], ...]  # (zone, subnet id): VPCZoneIdentifier
    desired: int
    launch_hook: Hook | None
    terminate_hook: Hook | None
    retain_on_abandon: bool


@dataclass
class Instance:
    instance_id: str
    group: str
    role: str
    ip: str
    state: str
    launched_at: float
    hook_token: str = ""
    hook_deadline: float = 0.0
    in_service_at: float | None = None
    terminating_at: float | None = None
    ended_at: float | None = None
    launch_result: str = ""
    terminate_result: str = ""
    history: list[tuple[float, str]] = field(default_factory=list)


class Provider(Protocol):
    def launch(self, group: Group) -> tuple[str, str]:
        """Start an instance (moto EC2 + a process); returns (instance id, private IP)."""

    def terminating(self, inst: Instance, group: Group, hook: Hook) -> None:
        """The instance entered Terminating:Wait: publish the lifecycle event (EventBridge -> SQS)."""

    def destroy(self, inst: Instance) -> None:
        """Kill the instance's processes and mark it terminated in moto's EC2."""

    def retained(self, inst: Instance) -> None:
        """The instance was retained on abandon: it keeps running but no longer counts toward capacity."""


class LifecycleMachine:
    """Instance table + transitions; thread-safe; ``tick()`` applies timeouts and holds capacity."""

    def __init__(
        self, groups: list[Group], provider: Provider, on_event: Callable[..., None] = lambda kind, **f: None
    ) -> None:
        self.groups: dict[str, Group] = {g.name: g for g in groups}
        self.provider = provider
        self.on_event = on_event
        self.instances: dict[str, Instance] = {}
        self.lock = threading.RLock()
        self._launching: dict[str, int] = {}
        self.paused = False

    # -- queries ---------------------------------------------------------------------------------------
    def snapshot(self) -> list[Instance]:
        with self.lock:
            return list(self.instances.values())

    def in_state(self, *states: str, role: str | None = None) -> list[Instance]:
        return [i for i in self.snapshot() if i.state in states and (role is None or i.role == role)]

    def get(self, instance_id: str) -> Instance:
        with self.lock:
            inst = self.instances.get(instance_id)
        if inst is None:
            raise LifecycleRefusedError(
                f"Instance Id not found - No managed instance found for instance ID: {instance_id}"
            )
        return inst

    # -- the groups (created one at a time, in the template's creation order) ---------------------------------
    def add_group(self, group: Group) -> list[Instance]:
        """CreateAutoScalingGroup: the group exists and launches its desired capacity at once."""
        with self.lock:
            if group.name in self.groups:
                raise LifecycleRefusedError(f"AlreadyExists: an Auto Scaling group named {group.name} exists")
            self.groups[group.name] = group
        return [self.launch(group.name) for _ in range(group.desired)]

    def put_hook(self, group_name: str, hook: Hook, *, launching: bool) -> None:
        """PutLifecycleHook: applies to transitions from now on, never to instances already past them."""
        with self.lock:
            group = self.groups.get(group_name)
            if group is None:
                raise LifecycleRefusedError(f"Group {group_name} not found")
            if launching:
                self.groups[group_name] = dataclasses.replace(group, launch_hook=hook)
            else:
                self.groups[group_name] = dataclasses.replace(group, terminate_hook=hook)

    # -- transitions -----------------------------------------------------------------------------------
    def _set(self, inst: Instance, state: str, **fields: Any) -> None:
        inst.state = state
        inst.history.append((time.time(), state))
        self.on_event(
            "state", instance_id=inst.instance_id, group=inst.group, role=inst.role, ip=inst.ip, state=state, **fields
        )

    def launch(self, group_name: str) -> Instance:
        group = self.groups[group_name]
        instance_id, ip = self.provider.launch(group)
        with self.lock:
            hook = self.groups[group_name].launch_hook  # as it is now: a hook added during the launch is too late
            inst = Instance(instance_id, group.name, group.role, ip, "", time.time())
            self.instances[instance_id] = inst
            if hook is None:
                inst.in_service_at = time.time()
                self._set(inst, IN_SERVICE, launch_hook="none")
            else:
                inst.hook_token = str(uuid.uuid4())
                inst.hook_deadline = time.monotonic() + hook.heartbeat_timeout
                self._set(inst, PENDING_WAIT)
        self.on_event("launch", instance_id=instance_id, group=group.name, role=group.role, ip=ip)
        return inst

    def terminate_in_group(self, instance_id: str, decrement: bool = False) -> str:
        """TerminateInstanceInAutoScalingGroup (never decrements in the twin: groups hold capacity)."""
        with self.lock:
            inst = self.get(instance_id)
            if inst.state not in (IN_SERVICE, PENDING_WAIT):
                raise LifecycleRefusedError(f"The instance {instance_id} is in state {inst.state}; cannot terminate")
            self._start_terminating(inst, cause="terminate-in-group")
            return inst.group

    def fail_instance(self, instance_id: str) -> None:
        """The instance dies out of band (hardware, an AZ, an operator's ``ec2 terminate-instances``): no hook runs;
        the group notices and replaces it (the chaos run's quorum-destroying scenario)."""
        with self.lock:
            inst = self.get(instance_id)
            if inst.state in (TERMINATED,):
                return
            inst.terminating_at = time.time()
            self.on_event(
                "termination", instance_id=inst.instance_id, group=inst.group, role=inst.role, cause="instance-failure"
            )
            self.provider.destroy(inst)
            inst.ended_at = time.time()
            self._set(inst, TERMINATED, result="instance-failure")

    def _start_terminating(self, inst: Instance, cause: str) -> None:
        group = self.groups[inst.group]
        inst.terminating_at = time.time()
        hook = group.terminate_hook
        self.on_event("termination", instance_id=inst.instance_id, group=inst.group, role=inst.role, cause=cause)
        if hook is None:
            self._finish(inst, "CONTINUE")
            return
        inst.hook_token = str(uuid.uuid4())
        inst.hook_deadline = time.monotonic() + hook.heartbeat_timeout
        self._set(inst, TERMINATING_WAIT, cause=cause)
        self.provider.terminating(inst, group, hook)

    def _finish(self, inst: Instance, result: str) -> None:
        group = self.groups[inst.group]
        inst.terminate_result = result
        if result == "ABANDON" and group.retain_on_abandon and inst.state == TERMINATING_WAIT:
            inst.ended_at = time.time()
            self.provider.retained(inst)
            self._set(inst, RETAINED)
            return
        self.provider.destroy(inst)
        inst.ended_at = time.time()
        self._set(inst, TERMINATED, result=result)

    def _check_action(self, inst: Instance, group: str, hook: str, token: str) -> Hook:
        g = self.groups.get(group)
        if g is None or inst.group != group:
            raise LifecycleRefusedError(f"Group {group} not found or {inst.instance_id} not in it")
        wanted = {PENDING_WAIT: g.launch_hook, TERMINATING_WAIT: g.terminate_hook}.get(inst.state)
        if wanted is None or wanted.name != hook or (token and token != inst.hook_token):
            raise LifecycleRefusedError(f"No active Lifecycle Action found with instance ID {inst.instance_id}")
        return wanted

    def complete_action(self, group: str, hook: str, instance_id: str, token: str, result: str) -> None:
        if result not in ("CONTINUE", "ABANDON"):
            raise LifecycleRefusedError(f"Invalid LifecycleActionResult {result!r}")
        with self.lock:
            inst = self.get(instance_id)
            self._check_action(inst, group, hook, token)
            self._complete(inst, result, source="complete")

    def _complete(self, inst: Instance, result: str, source: str) -> None:
        self.on_event("hook", instance_id=inst.instance_id, state=inst.state, result=result, source=source)
        if inst.state == PENDING_WAIT:
            inst.launch_result = result
            if result == "CONTINUE":
                inst.in_service_at = time.time()
                self._set(inst, IN_SERVICE)
            else:
                self._start_terminating(inst, cause="launch-abandoned")
        elif inst.state == TERMINATING_WAIT:
            self._finish(inst, result)

    def heartbeat(self, group: str, hook: str, instance_id: str, token: str) -> None:
        with self.lock:
            inst = self.get(instance_id)
            h = self._check_action(inst, group, hook, token)
            inst.hook_deadline = time.monotonic() + h.heartbeat_timeout
        self.on_event("heartbeat", instance_id=instance_id)

    # -- the clock ---------------------------------------------------------------------------------------
    def tick(self) -> None:
        """Apply heartbeat timeouts (default results), then launch replacements up to desired capacity."""
        now = time.monotonic()
        with self.lock:
            for inst in list(self.instances.values()):
                if inst.state in WAIT_STATES and now >= inst.hook_deadline:
                    g = self.groups[inst.group]
                    hook = g.launch_hook if inst.state == PENDING_WAIT else g.terminate_hook
                    default = hook.default_result if hook is not None else "ABANDON"
                    self._complete(inst, default, source="heartbeat-timeout")
            if self.paused:
                return
            counts = {name: 0 for name in self.groups}
            for inst in self.instances.values():
                if inst.state in COUNTED:
                    counts[inst.group] += 1
        for name, group in self.groups.items():
            for _ in range(group.desired - counts[name]):
                self.launch(name)
