"""The twin's Auto Scaling lifecycle stand-in, transition by transition (no processes, no moto)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from twin.aws import LifecycleRefusedError
from twin.lifecycle import (
    IN_SERVICE,
    PENDING_WAIT,
    RETAINED,
    TERMINATED,
    TERMINATING_WAIT,
    Group,
    Hook,
    Instance,
    LifecycleMachine,
)


class FakeProvider:
    def __init__(self) -> None:
        self.launched: list[str] = []
        self.events: list[str] = []
        self.destroyed: list[str] = []

    def launch(self, group: Group) -> tuple[str, str]:
        iid = f"i-{len(self.launched):017x}"
        self.launched.append(iid)
        return iid, f"127.9.0.{len(self.launched)}"

    def terminating(self, inst: Instance, group: Group, hook: Hook) -> None:
        self.events.append(inst.instance_id)

    def destroy(self, inst: Instance) -> None:
        self.destroyed.append(inst.instance_id)

    def retained(self, inst: Instance) -> None:
        self.events.append(f"retained {inst.instance_id}")


def machine(
    *, term_timeout: float = 60, default: str = "CONTINUE", retain: bool = True, launch_timeout: float = 60
) -> tuple[LifecycleMachine, FakeProvider]:
    g = Group(
        "cp-0",
        "control-plane",
        (("a", "subnet-1"),),
        1,
        Hook("launch", launch_timeout, "ABANDON"),
        Hook("term", term_timeout, default),
        retain,
    )
    p = FakeProvider()
    m = LifecycleMachine([g], p)
    m.tick()
    return m, p


def in_service(m: LifecycleMachine) -> Instance:
    inst = m.snapshot()[0]
    m.complete_action("cp-0", "launch", inst.instance_id, "", "CONTINUE")
    return inst


def test_launch_waits_in_pending_wait_until_the_agent_continues() -> None:
    m, p = machine()
    inst = m.snapshot()[0]
    assert inst.state == PENDING_WAIT and len(p.launched) == 1
    m.tick()
    assert len(p.launched) == 1, "an instance in Pending:Wait holds the group's capacity"
    m.complete_action("cp-0", "launch", inst.instance_id, inst.hook_token, "CONTINUE")
    assert inst.state == IN_SERVICE


def test_terminate_waits_for_the_hook_then_terminates_and_replaces() -> None:
    m, p = machine()
    inst = in_service(m)
    m.terminate_in_group(inst.instance_id)
    assert inst.state == TERMINATING_WAIT and p.events == [inst.instance_id] and not p.destroyed
    m.tick()
    assert len(p.launched) == 1, "no replacement while the old instance is in Terminating:Wait"
    m.complete_action("cp-0", "term", inst.instance_id, inst.hook_token, "CONTINUE")
    assert inst.state == TERMINATED and p.destroyed == [inst.instance_id]
    m.tick()
    assert len(p.launched) == 2


def test_abandon_with_retain_on_abandon_leaves_the_instance_running_and_replaces_it() -> None:
    m, p = machine(retain=True)
    inst = in_service(m)
    m.terminate_in_group(inst.instance_id)
    m.complete_action("cp-0", "term", inst.instance_id, "", "ABANDON")
    assert inst.state == RETAINED and not p.destroyed and p.events[-1] == f"retained {inst.instance_id}"
    m.tick()
    assert len(p.launched) == 2


def test_abandon_without_retention_still_terminates() -> None:
    m, p = machine(retain=False)
    inst = in_service(m)
    m.terminate_in_group(inst.instance_id)
    m.complete_action("cp-0", "term", inst.instance_id, "", "ABANDON")
    assert inst.state == TERMINATED and p.destroyed == [inst.instance_id]


def test_an_abandoned_launch_goes_through_the_terminate_hook() -> None:
    m, p = machine()
    inst = m.snapshot()[0]
    m.complete_action("cp-0", "launch", inst.instance_id, "", "ABANDON")
    assert inst.state == TERMINATING_WAIT and p.events == [inst.instance_id]


def test_heartbeat_timeout_applies_the_default_result_and_heartbeats_extend_it() -> None:
    m, p = machine(term_timeout=0.3, default="CONTINUE")
    inst = in_service(m)
    m.terminate_in_group(inst.instance_id)
    time.sleep(0.2)
    m.heartbeat("cp-0", "term", inst.instance_id, inst.hook_token)
    time.sleep(0.2)
    m.tick()
    assert inst.state == TERMINATING_WAIT, "the heartbeat restarted the timeout"
    time.sleep(0.25)
    m.tick()
    assert inst.state == TERMINATED and inst.terminate_result == "CONTINUE" and p.destroyed == [inst.instance_id]


def test_launch_hook_timeout_abandons() -> None:
    m, _ = machine(launch_timeout=0.05)
    inst = m.snapshot()[0]
    time.sleep(0.1)
    m.tick()
    assert inst.launch_result == "ABANDON" and inst.state == TERMINATING_WAIT


@pytest.mark.parametrize(
    ("hook", "token", "why"),
    [("term", "", "no terminate action is pending"), ("launch", "bad-token", "wrong token")],
)
def test_completing_an_action_that_is_not_pending_is_refused(hook: str, token: str, why: Any) -> None:
    m, _ = machine()
    inst = m.snapshot()[0]
    with pytest.raises(LifecycleRefusedError, match="No active Lifecycle Action"):
        m.complete_action("cp-0", hook, inst.instance_id, token, "CONTINUE")
    assert inst.state == PENDING_WAIT, why


def test_a_second_completion_after_termination_is_refused() -> None:
    m, _ = machine()
    inst = in_service(m)
    m.terminate_in_group(inst.instance_id)
    m.complete_action("cp-0", "term", inst.instance_id, "", "CONTINUE")
    with pytest.raises(LifecycleRefusedError):
        m.complete_action("cp-0", "term", inst.instance_id, "", "CONTINUE")
    with pytest.raises(LifecycleRefusedError):
        m.terminate_in_group(inst.instance_id)


def test_a_group_without_a_launch_hook_goes_in_service_and_a_later_hook_applies_from_the_next_transition() -> None:
    """A separate AWS::AutoScaling::LifecycleHook is created after its group (CloudFormation orders by reference),
    so the group's first instances launch without it: no Pending:Wait, and completing a launch action is refused
    with Auto Scaling's "No active Lifecycle Action found" (CompleteLifecycleAction, Amazon EC2 Auto Scaling
    API Reference). Hooks in LifecycleHookSpecificationList exist "before instances are launched"
    (CreateAutoScalingGroup)."""
    p = FakeProvider()
    m = LifecycleMachine([], p)
    group = Group("cp-0", "control-plane", (("a", "subnet-1"),), 1, None, None, True)
    (first,) = m.add_group(group)
    assert first.state == IN_SERVICE and first.launch_result == ""
    with pytest.raises(LifecycleRefusedError, match="No active Lifecycle Action"):
        m.complete_action("cp-0", "launch", first.instance_id, "", "CONTINUE")
    m.put_hook("cp-0", Hook("launch", 60, "ABANDON"), launching=True)
    m.put_hook("cp-0", Hook("term", 60, "ABANDON"), launching=False)
    assert first.state == IN_SERVICE, "a hook added later never pulls an instance back into a wait state"
    m.terminate_in_group(first.instance_id)
    assert first.state == TERMINATING_WAIT, "the terminate hook applies from the next transition on"
    m.complete_action("cp-0", "term", first.instance_id, "", "CONTINUE")
    m.tick()
    second = m.get(p.launched[1])
    assert second.state == PENDING_WAIT, "the replacement launches with the hook"
    with pytest.raises(LifecycleRefusedError, match="AlreadyExists"):
        m.add_group(group)
