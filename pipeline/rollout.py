"""``python -m pipeline.rollout``: roll a new launch template (a new AMI) through a deployed cluster by replacement.

The stage's deploy has already pointed every group at the new launch template version; no instance changed.
This program replaces the instances through Auto Scaling instance refreshes (``SkipMatching``: instances
already on the new version are left alone, so a re-run after a failure resumes where it stopped):

1. **Control plane first, one group at a time** (each control-plane group holds one instance). Before each
   group the cluster must have quorum with a margin (``--start-margin``, default 1: it can lose one voter),
   no learner and no unstarted member. The refresh launches before it terminates (``MinHealthyPercentage``
   100, ``MaxHealthyPercentage`` 200): the new node joins as a learner, is promoted, and only then does the
   old one leave through the terminate hook, so the voters never drop below the desired count.
2. **Then the worker groups**, each one refresh in batches (``MinHealthyPercentage`` from ``--worker-min-healthy``,
   default 90; ``MaxHealthyPercentage`` ``--worker-max-healthy``, default 110: launch before terminate).

While a refresh runs, etcd's status is read through the cluster-ops function (the canary's
:class:`~pipeline.canary.api.Boto3ClusterApi` and :func:`~pipeline.canary.checks.parse_status`, one
definition of quorum) at least every ``--poll-interval`` seconds. If the quorum margin (healthy voters minus
quorum) falls below ``--min-margin`` (default 0: quorum itself), if the status stays unavailable past
``--status-grace``, if the refresh fails or is cancelled, or if it takes longer than ``--group-timeout``, the
refresh is cancelled (``CancelInstanceRefresh``) and the program exits 1 naming the failed step.

Progress lines while it runs, a summary table at the end, and a JSON report (``--report``).
Inputs: ``--outputs`` (``cdk deploy --outputs-file``) or the environment the pipeline step sets
(CONTROL_PLANE_GROUP_NAMES, WORKER_GROUP_NAMES, CLUSTER_OPS_FUNCTION_NAME).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lambdas.common.membership import quorum
from pipeline.canary.checks import Sample, parse_status
from pipeline.cli_args import bounded_int, positive_seconds, stack_outputs_file

DONE = {"Successful"}
FAILED = {"Failed", "Cancelled", "Cancelling", "RollbackInProgress", "RollbackFailed", "RollbackSuccessful"}


class RolloutError(Exception):
    """One named step failed."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step


@dataclass(frozen=True)
class RolloutOptions:
    poll_interval_s: float = 5.0  # quorum is read at least this often while a refresh runs
    start_margin: int = 1  # quorum margin required before each control-plane group
    min_margin: int = 0  # below this during a refresh: cancel and fail
    status_grace_s: float = 30.0  # status may blip while the etcd leader moves
    settle_timeout_s: float = 600.0  # wait this long for the start margin before a control-plane group
    group_timeout_s: float = 3600.0
    control_plane_warmup_s: int = 60
    worker_warmup_s: int = 60
    worker_min_healthy: int = 90
    worker_max_healthy: int = 110

    def preferences(self, kind: str) -> dict[str, Any]:
        """StartInstanceRefresh preferences: launch before terminate, skip instances already up to date."""
        if kind == "control-plane":
            low, high, warmup = 100, 200, self.control_plane_warmup_s
        else:
            low, high, warmup = self.worker_min_healthy, self.worker_max_healthy, self.worker_warmup_s
        return {
            "MinHealthyPercentage": low,
            "MaxHealthyPercentage": high,
            "InstanceWarmup": warmup,
            "SkipMatching": True,
            "ScaleInProtectedInstances": "Wait",
            "StandbyInstances": "Wait",
        }


@dataclass
class GroupResult:
    group: str
    kind: str
    refresh_id: str = ""
    status: str = "not started"
    duration_s: float | None = None
    min_margin: int | None = None
    samples: int = 0

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "duration_s": None if self.duration_s is None else round(self.duration_s, 1)}


@dataclass
class RolloutResult:
    ok: bool
    failure: str | None
    failed_step: str | None
    groups: list[GroupResult] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failure": self.failure,
            "failed_step": self.failed_step,
            "groups": [g.to_json() for g in self.groups],
            "min_quorum_margin": min((margin(s) for s in self.samples if s.error is None), default=None),
            "quorum_lost_samples": sum(1 for s in self.samples if s.error is None and not s.has_quorum),
        }


def margin(sample: Sample) -> int:
    """Healthy voters beyond quorum (0: one more failure loses quorum; negative: lost)."""
    return sample.healthy_voters - quorum(sample.voters)


class _Rollout:
    def __init__(  # noqa: PLR0917
        self,
        autoscaling: Any,
        status: Callable[[], Any],
        options: RolloutOptions,
        log: Callable[[str], None],
        clock: Callable[[], float],
        sleep: Callable[[float], None],
    ) -> None:
        self.autoscaling = autoscaling
        self.status = status
        self.options = options
        self.log = log
        self.clock = clock
        self.sleep = sleep
        self.t0 = clock()
        self.samples: list[Sample] = []
        self.groups: list[GroupResult] = []
        self._unavailable_since: float | None = None

    def sample(self, step: str) -> Sample:
        now = self.clock() - self.t0
        try:
            sample = parse_status(now, self.status())
        except Exception as err:  # the ops function or etcd did not answer: judged by the grace below
            sample = Sample(at=now, members=(), error=f"{type(err).__name__}: {err}")
        self.samples.append(sample)
        if sample.error is None:
            self._unavailable_since = None
            return sample
        self._unavailable_since = self._unavailable_since if self._unavailable_since is not None else now
        if now - self._unavailable_since > self.options.status_grace_s:
            raise RolloutError(step, f"no etcd status for {now - self._unavailable_since:.0f}s ({sample.error})")
        return sample

    def wait_until_settled(self, step: str) -> None:
        """Before a control-plane group: quorum margin >= start margin, no learner, no unstarted member."""
        deadline = self.clock() + self.options.settle_timeout_s
        while True:
            sample = self.sample(step)
            why = None
            if sample.error is not None:
                why = "no status"
            elif sample.learners or any(not m.started for m in sample.members):
                why = "a membership change is in flight (learner or unstarted member)"
            elif margin(sample) < self.options.start_margin:
                why = (f"quorum margin {margin(sample)} ({sample.healthy_voters} of {sample.voters} voters healthy), "
                       f"need {self.options.start_margin}")  # fmt: skip
            if why is None:
                return
            if self.clock() > deadline:
                raise RolloutError(step, f"cluster not ready for the next control-plane replacement: {why}")
            self.sleep(self.options.poll_interval_s)

    def refresh(self, group: str, kind: str) -> GroupResult:
        result = GroupResult(group, kind)
        self.groups.append(result)
        step = f"{kind} {group}"
        if kind == "control-plane":
            self.wait_until_settled(step)
        started = self.clock()
        try:
            response = self.autoscaling.start_instance_refresh(
                AutoScalingGroupName=group, Strategy="Rolling", Preferences=self.options.preferences(kind)
            )
        except Exception as err:  # e.g. InstanceRefreshInProgress: another rollout (or an operator) is at work
            raise RolloutError(step, f"could not start an instance refresh: {err}") from err
        result.refresh_id = response["InstanceRefreshId"]
        self.log(f"{step}: instance refresh {result.refresh_id} started")
        try:
            return self._watch(group, step, result, started)
        except BaseException as err:
            # Whatever ends the watch (quorum, silence, timeout, an unexpected error, an interrupt), a refresh
            # nobody watches must not go on replacing nodes: cancel it, unless Auto Scaling already ended it.
            if result.status not in FAILED:
                self._cancel(group, result)
            if isinstance(err, Exception) and not isinstance(err, RolloutError):
                raise RolloutError(step, f"{type(err).__name__} while watching the refresh: {err}") from err
            raise

    def _watch(self, group: str, step: str, result: GroupResult, started: float) -> GroupResult:
        deadline = started + self.options.group_timeout_s
        last_progress = None
        while True:
            sample = self.sample(step)  # status silent past the grace raises: the refresh is cancelled
            result.samples += 1
            if sample.error is None:
                m = margin(sample)
                result.min_margin = m if result.min_margin is None else min(result.min_margin, m)
                if m < self.options.min_margin:
                    raise RolloutError(step, f"quorum margin {m} ({sample.healthy_voters} of {sample.voters} voters "
                                             f"healthy) is below the allowed {self.options.min_margin}")  # fmt: skip
            refresh = self._describe(group, result.refresh_id)
            result.status = str(refresh.get("Status", "unknown"))
            progress = (result.status, refresh.get("PercentageComplete"))
            if progress != last_progress:
                last_progress = progress
                self.log(f"{step}: {result.status} {refresh.get('PercentageComplete', 0)}% "
                         f"(quorum margin {'-' if sample.error else margin(sample)})")  # fmt: skip
            if result.status in DONE:
                result.duration_s = self.clock() - started
                return result
            if result.status in FAILED:
                raise RolloutError(step, f"instance refresh {result.status}: {refresh.get('StatusReason', '')}")
            if self.clock() > deadline:
                raise RolloutError(step, f"instance refresh not done within {self.options.group_timeout_s:.0f}s")
            self.sleep(self.options.poll_interval_s)

    def _describe(self, group: str, refresh_id: str) -> dict[str, Any]:
        response = self.autoscaling.describe_instance_refreshes(
            AutoScalingGroupName=group, InstanceRefreshIds=[refresh_id]
        )
        refreshes = response.get("InstanceRefreshes", [])
        return dict(refreshes[0]) if refreshes else {"Status": "unknown"}

    def _cancel(self, group: str, result: GroupResult) -> None:
        try:
            self.autoscaling.cancel_instance_refresh(AutoScalingGroupName=group)
            result.status = "Cancelled"
            self.log(f"{group}: instance refresh {result.refresh_id} cancelled")
        except Exception as err:  # report the original failure; the cancel error is logged
            self.log(f"{group}: could not cancel instance refresh {result.refresh_id}: {err}")


def run(
    autoscaling: Any,
    status: Callable[[], Any],
    *,
    control_plane_groups: Sequence[str],
    worker_groups: Sequence[str] = (),
    options: RolloutOptions | None = None,
    report_path: Path | None = None,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RolloutResult:
    """Control-plane groups one at a time (quorum checked before and during each), then the worker groups."""
    rollout = _Rollout(autoscaling, status, options or RolloutOptions(), log, clock, sleep)
    try:
        if not control_plane_groups:
            raise RolloutError("inputs", "no control-plane groups given")
        for group in control_plane_groups:
            rollout.refresh(group, "control-plane")
        for group in worker_groups:
            rollout.refresh(group, "worker")
        result = RolloutResult(True, None, None, rollout.groups, rollout.samples)
    except RolloutError as failure:
        log(f"ROLLOUT FAILED — {failure}")
        result = RolloutResult(False, str(failure), failure.step, rollout.groups, rollout.samples)
    except Exception as err:  # outside a refresh (e.g. the settle wait): still a failed step and a report
        wrapped = RolloutError("rollout", f"{type(err).__name__}: {err}")
        log(f"ROLLOUT FAILED — {wrapped}")
        result = RolloutResult(False, str(wrapped), wrapped.step, rollout.groups, rollout.samples)
    log(summary_table(result))
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(result.to_json(), indent=2))
    return result


def summary_table(result: RolloutResult) -> str:
    header = f"{'#':>2}  {'group':<40} {'kind':<13} {'status':<12} {'duration':>9} {'min margin':>10} {'samples':>8}"
    lines = [header, "-" * len(header)]
    for index, g in enumerate(result.groups, 1):
        duration = "-" if g.duration_s is None else f"{g.duration_s:.1f}s"
        low = "-" if g.min_margin is None else str(g.min_margin)
        lines.append(f"{index:>2}  {g.group:<40} {g.kind:<13} {g.status:<12} {duration:>9} {low:>10} {g.samples:>8}")
    lines.append(f"result: {'PASS' if result.ok else 'FAIL — ' + str(result.failure)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, autoscaling: Any = None, lambda_client: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.rollout", description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=stack_outputs_file, help="stack outputs JSON (cdk deploy --outputs-file)")
    parser.add_argument("--report", type=Path, default=Path("rollout-report.json"))
    parser.add_argument("--region", default=os.environ.get("AWS_REGION"))
    defaults = RolloutOptions()
    # Ranges: quorum read at least every 10 s; a start margin below 1 would replace a node of a cluster that cannot
    # lose one, a min margin below 0 is "no quorum is fine"; Auto Scaling's MinHealthyPercentage 0..100,
    # MaxHealthyPercentage 100..200 (StartInstanceRefresh RefreshPreferences); warm-ups are seconds >= 0.
    parser.add_argument("--poll-interval", type=positive_seconds(10), default=defaults.poll_interval_s)
    parser.add_argument("--start-margin", type=bounded_int(1, 3), default=defaults.start_margin)
    parser.add_argument("--min-margin", type=bounded_int(0, 3), default=defaults.min_margin)
    parser.add_argument("--status-grace", type=positive_seconds(3600), default=defaults.status_grace_s)
    parser.add_argument("--group-timeout", type=positive_seconds(86400), default=defaults.group_timeout_s)
    parser.add_argument("--control-plane-warmup", type=bounded_int(0, 3600), default=defaults.control_plane_warmup_s)
    parser.add_argument("--worker-warmup", type=bounded_int(0, 3600), default=defaults.worker_warmup_s)
    parser.add_argument("--worker-min-healthy", type=bounded_int(0, 100), default=defaults.worker_min_healthy)
    parser.add_argument("--worker-max-healthy", type=bounded_int(100, 200), default=defaults.worker_max_healthy)
    args = parser.parse_args(argv)
    if args.min_margin > args.start_margin:
        parser.error(f"--min-margin {args.min_margin} is above --start-margin {args.start_margin}: every refresh "
                     "would be cancelled at its first sample")  # fmt: skip
    if args.worker_max_healthy - args.worker_min_healthy > 100:
        parser.error("--worker-max-healthy minus --worker-min-healthy may be at most 100 (Auto Scaling's rule)")

    outputs: dict[str, str] = args.outputs or {}
    cp = outputs.get("ControlPlaneGroupNames") or os.environ.get("CONTROL_PLANE_GROUP_NAMES", "")
    workers = outputs.get("WorkerGroupNames") or os.environ.get("WORKER_GROUP_NAMES", "")
    function = outputs.get("ClusterOpsFunctionName") or os.environ.get("CLUSTER_OPS_FUNCTION_NAME", "")
    if not cp or not function:
        parser.error(
            "need the stack outputs ControlPlaneGroupNames and ClusterOpsFunctionName (--outputs FILE, or "
            "CONTROL_PLANE_GROUP_NAMES and CLUSTER_OPS_FUNCTION_NAME in the environment)"
        )
    import boto3

    from pipeline.canary.api import Boto3ClusterApi

    autoscaling = autoscaling or boto3.client("autoscaling", region_name=args.region)
    ops = Boto3ClusterApi(function_name=function, group_names=cp.split(","), lambda_client=lambda_client,
                          autoscaling_client=autoscaling, region=args.region)  # fmt: skip
    options = RolloutOptions(
        poll_interval_s=args.poll_interval,
        start_margin=args.start_margin,
        min_margin=args.min_margin,
        status_grace_s=args.status_grace,
        group_timeout_s=args.group_timeout,
        control_plane_warmup_s=args.control_plane_warmup,
        worker_warmup_s=args.worker_warmup,
        worker_min_healthy=args.worker_min_healthy,
        worker_max_healthy=args.worker_max_healthy,
    )
    result = run(
        autoscaling,
        ops.status,
        control_plane_groups=[g for g in cp.split(",") if g],
        worker_groups=[g for g in workers.split(",") if g],
        options=options,
        report_path=args.report,
        log=lambda line: print(line, flush=True),
    )
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
