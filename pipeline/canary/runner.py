"""The rolling-replacement canary: replace every control-plane instance, one at a time, and prove
that etcd kept quorum throughout and nothing acknowledged was lost.

It fails (``CanaryResult.ok`` is False, with ``failure`` naming the check) if any sample shows lost
quorum, if status stays unavailable past a short grace, if a replacement takes longer than the limit,
if the membership does not come back to the expected healthy voters with no learners and no stale
members, or if the sentinel key written before the first replacement is missing afterwards.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.canary.api import ClusterApi
from pipeline.canary.checks import Sample, parse_status, sentinel_value

SENTINEL_PREFIX = "/dedicated-k8s/canary/"


class CanaryCheckError(Exception):
    """One named check failed."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check


@dataclass
class Replacement:
    old_instance: str
    new_instance: str | None = None
    started_at: float = 0.0
    duration_s: float | None = None
    min_healthy_voters: int | None = None
    samples: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "old_instance": self.old_instance,
            "new_instance": self.new_instance,
            "duration_s": None if self.duration_s is None else round(self.duration_s, 1),
            "min_healthy_voters": self.min_healthy_voters,
            "samples": self.samples,
        }


@dataclass
class CanaryResult:
    ok: bool
    failure: str | None
    failed_check: str | None
    sentinel_intact: bool | None
    replacements: list[Replacement] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failure": self.failure,
            "failed_check": self.failed_check,
            "sentinel_intact": self.sentinel_intact,
            "replacements": [r.to_json() for r in self.replacements],
            "min_healthy_voters": min((s.healthy_voters for s in self.samples), default=None),
            "quorum_lost_samples": sum(1 for s in self.samples if not s.has_quorum),
            "samples": [s.to_json() for s in self.samples],
        }


@dataclass
class CanaryOptions:
    replacement_timeout_s: float = 900.0
    poll_interval_s: float = 1.0
    status_grace_s: float = 5.0  # status may blip while the etcd leader moves; longer is a failure
    expected_voters: int | None = None  # default: the number of control-plane instances at the start


class _Canary:
    def __init__(
        self,
        api: ClusterApi,
        options: CanaryOptions,
        log: Callable[[str], None],
        clock: Callable[[], float],
        sleep: Callable[[float], None],
    ) -> None:
        self.api = api
        self.options = options
        self.log = log
        self.clock = clock
        self.sleep = sleep
        self.t0 = clock()
        self.samples: list[Sample] = []
        self.replacements: list[Replacement] = []
        self._unavailable_since: float | None = None

    def sample(self) -> Sample:
        now = self.clock() - self.t0
        try:
            sample = parse_status(now, self.api.status())
        except Exception as err:  # the ops function or etcd did not answer: judged by the grace below
            sample = Sample(at=now, members=(), error=f"{type(err).__name__}: {err}")
        self.samples.append(sample)
        if sample.error is not None:
            if self._unavailable_since is None:
                self._unavailable_since = now
            if now - self._unavailable_since > self.options.status_grace_s:
                raise CanaryCheckError(
                    "status unavailable",
                    f"no etcd status for {now - self._unavailable_since:.1f}s (last error: {sample.error})",
                )
            return sample
        self._unavailable_since = None
        if not sample.has_quorum:
            raise CanaryCheckError(
                "quorum lost",
                f"at +{now:.1f}s only {sample.healthy_voters} of {sample.voters} voters were healthy",
            )
        return sample

    def converged(self, sample: Sample, expected: int, live: set[str]) -> str | None:
        """None when the membership is back to normal; otherwise what is still missing."""
        if sample.error is not None:
            return "no status"
        if sample.learners:
            return f"{sample.learners} learner(s) not yet promoted"
        stale = sample.stale_members(live)
        if stale:
            return f"stale member(s) {', '.join(stale)}"
        if sample.voters != expected or sample.healthy_voters != expected:
            return f"{sample.healthy_voters}/{sample.voters} healthy voters, want {expected}"
        if any(not m.started for m in sample.members):
            return "an unstarted member"
        return None

    def replace(self, old: str, expected: int, seen: set[str]) -> Replacement:
        replacement = Replacement(old_instance=old, started_at=self.clock())
        self.replacements.append(replacement)
        self.log(f"terminating {old} (capacity kept: its group launches the replacement)")
        self.api.terminate(old)
        deadline = replacement.started_at + self.options.replacement_timeout_s
        waiting_for = "termination"
        while True:
            sample = self.sample()
            replacement.samples += 1
            if sample.error is None:
                low = replacement.min_healthy_voters
                replacement.min_healthy_voters = (
                    sample.healthy_voters if low is None else min(low, sample.healthy_voters)
                )
            live = set(self.api.in_service_instances())
            new = sorted(live - seen)
            if old in live:
                waiting_for = "termination"
            elif not new:
                waiting_for = "a replacement instance InService"
            else:
                missing = self.converged(sample, expected, live)
                if missing is None:
                    replacement.new_instance = new[0]
                    replacement.duration_s = self.clock() - replacement.started_at
                    seen.update(new)
                    self.log(
                        f"{old} -> {new[0]} healthy after {replacement.duration_s:.1f}s "
                        f"(fewest healthy voters seen: {replacement.min_healthy_voters})"
                    )
                    return replacement
                waiting_for = missing
            if self.clock() > deadline:
                raise CanaryCheckError(
                    "replacement timeout",
                    f"{old} not replaced within {self.options.replacement_timeout_s:.0f}s (waiting for {waiting_for})",
                )
            self.sleep(self.options.poll_interval_s)

    def run(self) -> tuple[bool | None, str]:
        first = self.sample()
        initial = self.api.in_service_instances()
        expected = self.options.expected_voters or len(initial)
        if first.error is not None or self.converged(first, expected, set(initial)) is not None:
            raise CanaryCheckError(
                "unhealthy before start",
                f"cluster not healthy before any replacement: {self.converged(first, expected, set(initial))}",
            )
        key = f"{SENTINEL_PREFIX}{uuid.uuid4().hex}"
        value = f"written-before-replacement-{int(time.time())}"
        self.api.put(key, value)
        self.log(f"sentinel {key} written; replacing {len(initial)} control-plane instances one at a time")
        seen = set(initial)
        for old in initial:
            self.replace(old, expected, seen)
        read = sentinel_value(self.api.get(key))
        if read != value:
            raise CanaryCheckError("sentinel missing", f"{key} read back as {read!r}, expected {value!r}")
        self.log("sentinel intact")
        return True, key


def run(
    api: ClusterApi,
    *,
    options: CanaryOptions | None = None,
    report_path: Path | None = None,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> CanaryResult:
    canary = _Canary(api, options or CanaryOptions(), log, clock, sleep)
    try:
        sentinel_ok, _ = canary.run()
        result = CanaryResult(True, None, None, sentinel_ok, canary.replacements, canary.samples)
    except CanaryCheckError as failure:
        log(f"CANARY FAILED — {failure}")
        sentinel = False if failure.check == "sentinel missing" else None
        result = CanaryResult(False, str(failure), failure.check, sentinel, canary.replacements, canary.samples)
    log(summary_table(result))
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(result.to_json(), indent=2))
    return result


def summary_table(result: CanaryResult) -> str:
    header = (
        f"{'#':>2}  {'old instance':<21} {'new instance':<21} {'duration':>9} {'min healthy voters':>19} {'samples':>8}"
    )
    lines = [header, "-" * len(header)]
    for index, r in enumerate(result.replacements, 1):
        duration = "-" if r.duration_s is None else f"{r.duration_s:.1f}s"
        lines.append(
            f"{index:>2}  {r.old_instance:<21} {r.new_instance or '-':<21} {duration:>9} "
            f"{'-' if r.min_healthy_voters is None else r.min_healthy_voters:>19} {r.samples:>8}"
        )
    lines.append(f"result: {'PASS' if result.ok else 'FAIL — ' + str(result.failure)}")
    return "\n".join(lines)
