"""The launch hooks as synthesized and the node agent's timings keep one order.

    heartbeat interval x 3  <=  every group's launch hook HeartbeatTimeout
    agent launch deadline   <   that hook's global timeout = min(48 h, 100 x HeartbeatTimeout)

The agent heartbeats its launch hook while it works (node_agent/lifecycle.py): each heartbeat restarts the
hook's timeout, so two lost heartbeats in a row still leave the third in time. Heartbeats keep an instance in
Pending:Wait only up to the global timeout: "The maximum time, in seconds, that an instance can remain in a wait
state. The maximum is 172800 seconds (48 hours) or 100 times HeartbeatTimeout, whichever is smaller" (Amazon EC2
Auto Scaling API Reference, LifecycleHook, GlobalTimeout). An omitted HeartbeatTimeout is 3600 s ("The default
value is 3600 seconds (1 hour)", PutLifecycleHook / LifecycleHookSpecification).

The hooks may be in an AWS::AutoScaling::AutoScalingGroup's ``LifecycleHookSpecificationList`` or in separate
AWS::AutoScaling::LifecycleHook resources; both forms are read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from aws_cdk.assertions import Template

from node_agent.config import AgentSettings

LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
DEFAULT_HEARTBEAT_TIMEOUT = 3600
GLOBAL_TIMEOUT_CAP = 172800


def _group_ref(value: Any) -> str | None:
    """The logical ID an ``AutoScalingGroupName`` refers to ({"Ref": id}), or None for a literal name."""
    return value.get("Ref") if isinstance(value, dict) else None


def launch_hook_timeouts(template: Mapping[str, Any]) -> dict[str, list[int]]:
    """Each Auto Scaling group's launch hooks' HeartbeatTimeout, from both forms of hook."""
    return hook_timeouts(template, LAUNCHING)


def hook_timeouts(template: Mapping[str, Any], transition: str) -> dict[str, list[int]]:
    """Each Auto Scaling group's ``transition`` hooks' HeartbeatTimeout, from both forms of hook."""
    resources = template["Resources"]
    groups = {lid: r for lid, r in resources.items() if r["Type"] == "AWS::AutoScaling::AutoScalingGroup"}
    found: dict[str, list[int]] = {lid: [] for lid in groups}
    for lid, group in groups.items():
        for spec in group.get("Properties", {}).get("LifecycleHookSpecificationList", []):
            if spec["LifecycleTransition"] == transition:
                found[lid].append(int(spec.get("HeartbeatTimeout", DEFAULT_HEARTBEAT_TIMEOUT)))
    for lid, resource in resources.items():
        if resource["Type"] != "AWS::AutoScaling::LifecycleHook":
            continue
        props = resource["Properties"]
        if props["LifecycleTransition"] != transition:
            continue
        group = _group_ref(props["AutoScalingGroupName"])
        assert group in found, f"launch hook {lid} names no group of this template: {props['AutoScalingGroupName']}"
        found[group].append(int(props.get("HeartbeatTimeout", DEFAULT_HEARTBEAT_TIMEOUT)))
    return found


def test_every_groups_launch_hook_outlives_the_agents_heartbeats_and_launch(cluster_template: Template) -> None:
    hooks = launch_hook_timeouts(cluster_template.to_json())
    assert len(hooks) >= 4, f"control-plane groups and at least one worker group expected, found {sorted(hooks)}"
    settings = AgentSettings()
    for group, timeouts in hooks.items():
        assert len(timeouts) == 1, f"{group}: {len(timeouts)} launch hooks (the agent completes exactly one)"
        (timeout,) = timeouts
        assert 3 * settings.heartbeat_interval_seconds <= timeout, (
            f"{group}: launch hook HeartbeatTimeout {timeout} s < 3 x heartbeat interval "
            f"{settings.heartbeat_interval_seconds} s"
        )
        global_timeout = min(GLOBAL_TIMEOUT_CAP, 100 * timeout)
        assert settings.join_deadline_seconds < global_timeout, (
            f"{group}: the agent's launch deadline {settings.join_deadline_seconds} s is not inside the hook's "
            f"global timeout {global_timeout} s"
        )


def test_both_forms_of_launch_hook_are_read() -> None:
    """The reader itself, on the two shapes CloudFormation accepts (so a move between them cannot hide a hook)."""
    template = {
        "Resources": {
            "Inline": {"Type": "AWS::AutoScaling::AutoScalingGroup", "Properties": {"LifecycleHookSpecificationList": [
                {"LifecycleHookName": "l", "LifecycleTransition": LAUNCHING, "HeartbeatTimeout": 600},
                {"LifecycleHookName": "t", "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
                 "HeartbeatTimeout": 300},
            ]}},
            "Separate": {"Type": "AWS::AutoScaling::AutoScalingGroup", "Properties": {}},
            "Hook": {"Type": "AWS::AutoScaling::LifecycleHook", "Properties": {
                "AutoScalingGroupName": {"Ref": "Separate"}, "LifecycleTransition": LAUNCHING}},
        }
    }  # fmt: skip
    assert launch_hook_timeouts(template) == {"Inline": [600], "Separate": [DEFAULT_HEARTBEAT_TIMEOUT]}


def _rate_seconds(expression: str) -> int:
    """EventBridge ``rate(value unit)`` in seconds (minute(s), hour(s), day(s): EventBridge "Schedule expressions")."""
    match = re.fullmatch(r"rate\((\d+) (minute|minutes|hour|hours|day|days)\)", expression)
    assert match, f"not a rate expression: {expression}"
    unit = {"minute": 60, "hour": 3600, "day": 86400}[match.group(2).rstrip("s")]
    return int(match.group(1)) * unit


def test_a_lost_terminate_event_is_repaired_before_the_control_plane_terminate_hook_times_out(
    cluster_template: Template,
) -> None:
    """EventBridge delivers events at least once but not always (a lost or failed delivery ends in no message):
    the reconciler is the repair (architecture.md invariant 6). It finds an instance in Terminating:Wait whose event
    never arrived and enqueues the removal; the lifecycle Lambda then removes the member and completes CONTINUE.
    That must happen before the terminate hook's HeartbeatTimeout, or the hook takes its default result (ABANDON)
    and the group retains a node whose member was never removed ("If the heartbeat timeout elapses, the instance
    ... takes the default action", Amazon EC2 Auto Scaling User Guide, "Amazon EC2 Auto Scaling lifecycle hooks").

    The order, read from the template: two reconciler periods (the event is lost just after one run; one more run
    may find the cluster mid-change) + the retry delay + the Lambda's timeout < the control-plane terminate hook's
    HeartbeatTimeout. The template-driven twin found this: with the reconciler every 5 minutes and a 300 s hook, a
    lost event ended with the instance retained."""
    template = cluster_template.to_json()
    resources = template["Resources"]
    schedules = [
        r["Properties"]["ScheduleExpression"]
        for r in resources.values()
        if r["Type"] == "AWS::Events::Rule" and "ScheduleExpression" in r.get("Properties", {})
    ]
    (reconcile,) = [_rate_seconds(e) for e in schedules if e.startswith("rate(")]
    # The lifecycle Lambda is the function the queue's event source mapping invokes.
    mappings = [r["Properties"] for r in resources.values() if r["Type"] == "AWS::Lambda::EventSourceMapping"]
    assert len(mappings) == 1, "exactly one queue-driven function (the lifecycle Lambda)"
    lifecycle = [resources[mappings[0]["FunctionName"]["Ref"]]["Properties"]]
    timeout = int(lifecycle[0]["Timeout"])
    retry = int(lifecycle[0]["Environment"]["Variables"]["RETRY_DELAY_SECONDS"])
    control_planes = {
        lid
        for lid, r in resources.items()
        if r["Type"] == "AWS::AutoScaling::AutoScalingGroup"
        and any(t.get("Value") == "control-plane" for t in r["Properties"].get("Tags", []))
    }
    assert len(control_planes) >= 3, control_planes
    for group, timeouts in hook_timeouts(template, TERMINATING).items():
        if group not in control_planes:
            continue
        (hook,) = timeouts
        assert 2 * reconcile + retry + timeout < hook, (
            f"{group}: terminate hook HeartbeatTimeout {hook} s <= 2 x reconcile {reconcile} s + retry {retry} s + "
            f"Lambda timeout {timeout} s: a lost event is not repaired before the hook times out"
        )
