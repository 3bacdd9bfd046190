"""One time scale: every duration the twin hands to the lifecycle machine, the agents, the Lambdas, the queue and
the load balancer is the template's or the agent's production value times TwinOptions.time_scale (twin/timing.py).

Production's values are read here straight from the raw synthesized template and AgentSettings, independently
of twin/template.py, over the whole configuration a started twin built (its instances are not started: the
twin's launch is replaced by a recorder, so the test needs no processes).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest

from node_agent.config import AgentSettings
from twin.cluster import Twin, TwinOptions
from twin.lifecycle import Group
from twin.timing import systemd_timer_seconds

SCALE = 0.05
DURATION_WORDS = re.compile(r"timeout|interval|seconds|delay|deadline|every|lease")


@pytest.fixture(scope="module")
def twin() -> Iterator[Twin]:
    ids = itertools.count(1)
    mp = pytest.MonkeyPatch()

    def launch(self: Twin, group: Group) -> tuple[str, str]:
        return f"i-{next(ids):017x}", f"127.{self.second_octet}.0.{next(ids) % 250 + 4}"

    mp.setattr(Twin, "launch", launch)
    t = Twin(TwinOptions(workers=1, time_scale=SCALE, snapshot_interval_minutes=5)).start()
    try:
        yield t
    finally:
        t.stop()
        mp.undo()


def whole(seconds: float) -> int:
    return max(1, math.ceil(seconds * SCALE - 1e-9))


def raw(twin: Twin, kind: str) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in twin.template()["Resources"].items() if r["Type"] == kind}


def test_twin_options_hold_no_duration_of_their_own() -> None:
    """The only duration-like options are the twin's own sampling (measurement, not the deployed stack) and a
    cdk.json context key (snapshotIntervalMinutes: it goes into the template's agent config and is scaled from
    there, checked below)."""
    names = [f.name for f in dataclasses.fields(TwinOptions) if DURATION_WORDS.search(f.name)]
    assert names == ["sample_interval", "snapshot_interval_minutes"]


def test_every_hook_timeout_is_the_templates_times_the_scale(twin: Twin) -> None:
    seen = 0
    groups = raw(twin, "AWS::AutoScaling::AutoScalingGroup")
    separate = raw(twin, "AWS::AutoScaling::LifecycleHook")
    for lid, res in groups.items():
        props = res["Properties"]
        hooks = list(props.get("LifecycleHookSpecificationList", []))
        hooks += [h["Properties"] for h in separate.values() if h["Properties"]["AutoScalingGroupName"] == {"Ref": lid}]
        group = twin.machine.groups[props["AutoScalingGroupName"]]
        for hook in hooks:
            launching = hook["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_LAUNCHING"
            got = group.launch_hook if launching else group.terminate_hook
            assert got is not None and got.name == hook["LifecycleHookName"]
            assert got.heartbeat_timeout == pytest.approx(hook["HeartbeatTimeout"] * SCALE)
            assert got.default_result == hook["DefaultResult"]
            seen += 1
    assert seen == 2 * len(groups)


def test_the_lambdas_run_with_the_templates_durations_scaled(twin: Twin) -> None:
    functions = {r["Properties"]["FunctionName"]: r["Properties"] for r in raw(twin, "AWS::Lambda::Function").values()}
    env = functions[twin.cfg.etcd_lifecycle_function_name]["Environment"]["Variables"]
    durations = {k: v for k, v in env.items() if k.endswith("_SECONDS")}
    assert durations, "the lifecycle Lambda has duration settings"
    for key, value in durations.items():
        assert os.environ[key] == str(whole(int(value))), key  # whole seconds, rounded up (SQS DelaySeconds)
    assert twin.lambda_timeouts == {name: p["Timeout"] * SCALE for name, p in functions.items()}
    assert twin.delivery is not None and twin.delivery.timeout_s == functions[twin.cfg.etcd_lifecycle_function_name][
        "Timeout"] * SCALE  # fmt: skip
    (schedule,) = [r["Properties"]["ScheduleExpression"] for r in raw(twin, "AWS::Events::Rule").values()
                   if "ScheduleExpression" in r["Properties"]]  # fmt: skip
    n, unit = re.fullmatch(r"rate\((\d+) (\w+?)s?\)", schedule).groups()  # type: ignore[union-attr]
    assert twin.reconciler is not None
    assert twin.reconciler.interval == pytest.approx(int(n) * {"minute": 60, "hour": 3600}[unit] * SCALE)


def test_the_queue_and_the_load_balancer_run_on_the_templates_durations_scaled(twin: Twin) -> None:
    sqs = twin.aws.client("sqs")
    for props in raw(twin, "AWS::SQS::Queue").values():
        if "VisibilityTimeout" in props["Properties"]:
            url = sqs.get_queue_url(QueueName=props["Properties"]["QueueName"])["QueueUrl"]
            got = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["VisibilityTimeout"])["Attributes"]
            assert int(got["VisibilityTimeout"]) == whole(props["Properties"]["VisibilityTimeout"])
    (tg,) = [r["Properties"] for r in raw(twin, "AWS::ElasticLoadBalancingV2::TargetGroup").values()]
    attrs = {a["Key"]: a["Value"] for a in tg.get("TargetGroupAttributes", [])}
    assert twin.load_balancer is not None
    lb = twin.load_balancer.settings
    assert lb.interval_seconds == pytest.approx(tg["HealthCheckIntervalSeconds"] * SCALE)
    assert lb.deregistration_delay_seconds == pytest.approx(int(attrs["deregistration_delay.timeout_seconds"]) * SCALE)
    assert (lb.healthy_threshold, lb.unhealthy_threshold) == (
        tg["HealthyThresholdCount"],
        tg["UnhealthyThresholdCount"],
    )


def test_the_agents_settings_and_timers_are_its_production_defaults_scaled(twin: Twin) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(AgentSettings) if f.name.endswith("_seconds")}
    assert twin.agent_settings == {k: pytest.approx(float(v) * SCALE) for k, v in defaults.items()}  # type: ignore[arg-type]
    assert twin.timers == {
        "snapshot": pytest.approx(5 * 60 * SCALE),  # the context's snapshotIntervalMinutes
        "upgrade-addons": pytest.approx(systemd_timer_seconds("dedicated-k8s-upgrade-addons.timer") * SCALE),
    }


def test_every_duration_the_twin_recorded_is_production_times_the_scale(twin: Twin) -> None:
    assert twin.timing is not None
    assert len(twin.timing.durations) >= 20
    for d in twin.timing.durations:
        assert d.twin in (pytest.approx(d.production * SCALE), whole(d.production)), d
