"""Time in the twin: every timeout and interval is production's value times ONE scale factor.

Production's values come from where production takes them: the synthesized template (lifecycle hook heartbeat
timeouts, the Lambdas' ``*_SECONDS`` settings and timeouts, the reconciler's schedule expression, the queue's
visibility timeout, the NLB target group's health-check interval and deregistration delay), the node agent's
defaults (``node_agent.config.AgentSettings``: lease, renew, poll, join and health deadlines, and any further
``*_seconds`` setting) and the AMI's systemd timers (``imagebuilder/systemd``: the add-on upgrade timer; the
snapshot timer runs every ``snapshotIntervalMinutes`` of the agent config, as dedicated-k8s-enable-timers sets
it). Scaled by one factor, their ORDER is production's order: a defect that comes from two durations in the
wrong order (a launch hook shorter than the agent's deadline) shows in the twin as it would in production.

Rounding: where AWS takes whole seconds (SQS ``VisibilityTimeout`` and ``DelaySeconds`` are integers; the
Lambda reads its ``*_SECONDS`` settings as positive integers) the scaled value is rounded UP to a whole second,
at least 1 (:meth:`TemplateCloud.whole_seconds`): never shorter than its share, so no two durations swap.
Health-check thresholds are counts, not durations: unscaled.

Not scaled, on purpose: etcd's own election timing in the emulator (``FAST_ETCD`` in the agent's kubeadm
emulator) is etcd's, not the stack's; the twin's own sampling and polling (its observer, the state machine's
tick, the event source's receive loop) measure the twin and are not part of the deployed configuration.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_agent.config import AgentSettings
from twin.template import LambdaSpec, TemplateCloud, TemplateError, schedule_seconds

# 1 production minute = 6 twin seconds. The twin's own work (process starts, openssl, moto behind one proxy) is not
# scaled: at 0.05 a 60 s bootstrap lease is 3 s and a 600 s health wait 30 s, and a CI run on two busy cores once
# failed a bootstrap (cause not captured: those are the tightest); at 0.1 they are 6 s and 60 s, and make demo's
# canary still takes about a minute.
DEFAULT_TIME_SCALE = 0.1
SYSTEMD = Path(__file__).resolve().parent.parent / "imagebuilder" / "systemd"
_SPAN = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Duration:
    name: str
    production: float  # seconds
    twin: float  # seconds
    source: str  # where production's value comes from


def systemd_timer_seconds(unit: str) -> int:
    """``OnUnitActiveSec=5min`` of ``imagebuilder/systemd/<unit>`` in seconds (systemd.time spans)."""
    text = (SYSTEMD / unit).read_text()
    spans = [v for v in re.findall(r"^OnUnitActiveSec=(.*)$", text, flags=re.M) if v.strip()]
    if len(spans) != 1:
        raise TemplateError(f"{unit}: expected one OnUnitActiveSec, found {spans}")
    m = re.fullmatch(r"(\d+)\s*(s|sec|min|m|h|d)", spans[0].strip())
    if not m:
        raise TemplateError(f"{unit}: OnUnitActiveSec={spans[0]!r} is not a span the twin reads")
    return int(m.group(1)) * _SPAN[m.group(2)]


class TwinTiming:
    """The scaled durations of one synthesized stack; :attr:`durations` lists every one the twin hands out."""

    def __init__(self, cloud: TemplateCloud) -> None:
        self.cloud = cloud
        self.scale = cloud.time_scale
        self.durations: list[Duration] = []

    def _use(self, name: str, production: float, source: str, *, whole: bool = False) -> float:
        twin = float(self.cloud.whole_seconds(production)) if whole else production * self.scale
        self.durations.append(Duration(name, float(production), twin, source))
        return twin

    def hook_timeout(self, group: str, hook: str, production: int) -> float:
        return self._use(f"hook {group}/{hook} HeartbeatTimeout", production, "template")

    def lambda_environment(self, spec: LambdaSpec) -> dict[str, str]:
        """The function's environment, every ``*_SECONDS`` value scaled (whole seconds, rounded up)."""
        env = dict(spec.environment)
        for key, value in spec.environment.items():
            if key.endswith("_SECONDS"):
                if not value.isdigit():
                    raise TemplateError(f"{spec.name}: {key}={value!r} is not a whole number of seconds")
                env[key] = str(int(self._use(f"{spec.name} {key}", int(value), "template", whole=True)))
        return env

    def lambda_timeout(self, spec: LambdaSpec) -> float:
        return self._use(f"{spec.name} Timeout", spec.timeout, "template")

    def schedule(self, rule: str, expression: str) -> float:
        return self._use(f"rule {rule} {expression}", schedule_seconds(expression), "template")

    def queue_visibility(self) -> None:
        """Recorded only: the queue was created with it (twin/template_resources.py)."""
        for lid, q in self.cloud.queues.items():
            production = self.cloud.resources[lid]["Properties"].get("VisibilityTimeout")
            if production is not None:
                self.durations.append(
                    Duration(f"queue {lid} VisibilityTimeout", float(production),
                             float(q["attributes"]["VisibilityTimeout"]), "template")
                )  # fmt: skip

    def agent_settings(self) -> dict[str, float]:
        """Every ``*_seconds`` default of AgentSettings, scaled (the agent's production defaults)."""
        out: dict[str, float] = {}
        for f in dataclasses.fields(AgentSettings):
            if f.name.endswith("_seconds") and isinstance(f.default, int | float):
                out[f.name] = self._use(f"agent {f.name}", float(f.default), "node_agent/config.py AgentSettings")
        return out

    def timer(self, name: str, production: float, source: str) -> float:
        return self._use(f"timer {name}", production, source)

    def target_group(self, logical_id: str) -> dict[str, Any]:
        tg = self.cloud.target_groups[logical_id]
        return {
            "interval_seconds": self._use(f"target group {logical_id} HealthCheckIntervalSeconds", tg.interval,
                                          "template"),
            "healthy_threshold": tg.healthy_threshold,
            "unhealthy_threshold": tg.unhealthy_threshold,
            "deregistration_delay_seconds": self._use(f"target group {logical_id} deregistration_delay",
                                                      tg.deregistration_delay, "template"),
            "preserve_client_ip": tg.preserve_client_ip,
            "port": tg.port,
        }  # fmt: skip
