"""Chaos on the twin: ``python -m twin.chaos --count N --seed S`` (``make chaos N=500 SEED=7``).

Random control-plane replacements, each one of the scenarios below, while a writer writes and records every
acknowledged key (etcd's robustness tests in miniature: record the history, then check it). Invariants are
checked at every timeline sample and after every scenario; any violation is reported with its time.

Scenarios (``SCENARIOS``): a single termination; two at once; a termination during a join (while the
replacement's learner is in); a Lambda "crash" after the removal and before the completion (the completion
call is dropped once, the event is redelivered); a lost lifecycle event (the hook times out and the
reconciler removes the member); a node that fails to join (ABANDON, terminated, replaced); and, by design
destroying quorum, every control-plane instance lost at once (disaster recovery from the latest snapshot:
only writes acknowledged before that snapshot are required).

Not here: a replacement that reuses its predecessor's private IP. moto 5.2.5 never frees a terminated
instance's private IP ("IP already in use"), so the twin cannot mirror a reused IP into EC2 honestly; the
agent's real-etcd tests cover the stale member with the same peer URL.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from node_agent.snapshots import SnapshotObject
from pipeline.cli_args import bounded_int
from twin.cluster import Twin, TwinError, TwinOptions
from twin.lifecycle import IN_SERVICE, PENDING_WAIT, WAIT_STATES
from twin.measure import Replacement, Write, Writer, summarize
from twin.observe import Sample

SCENARIOS = {  # name -> weight
    "single": 4,
    "double": 2,
    "during-join": 2,
    "lambda-crash": 2,
    "lost-event": 2,
    "failed-join": 2,
    "all-lost-dr": 0,  # opt in with --dr (or the default of the long run): it takes the longest
}


@dataclass
class ChaosResult:
    seed: int
    count: int
    replacements: list[Replacement] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    acked_writes: int = 0
    failed_writes: int = 0
    lost_writes: int = 0
    lost_by_design: int = 0  # acknowledged after the snapshot a disaster recovery restored (allowed to be lost)
    dr_restores: int = 0
    scenarios: dict[str, int] = field(default_factory=dict)
    runtime_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "requested": self.count,
            **summarize(self.replacements),
            "violations": len(self.violations),
            "acked_writes": self.acked_writes,
            "failed_writes": self.failed_writes,
            "lost_writes": self.lost_writes,
            "lost_by_design_after_dr": self.lost_by_design,
            "dr_restores": self.dr_restores,
            "scenarios": self.scenarios,
            "runtime_s": round(self.runtime_s, 1),
        }


class Chaos:
    def __init__(self, twin: Twin, seed: int, progress: Any = print, dr: bool = False, timeout: float = 150) -> None:
        self.twin = twin
        self.rng = random.Random(seed)  # noqa: S311 (reproducible chaos, not cryptography)
        self.progress = progress
        self.weights = dict(SCENARIOS)
        if dr:
            self.weights["all-lost-dr"] = 1
        self.timeout = timeout
        self.result = ChaosResult(seed, 0)
        self.quorum_exempt_until = 0.0
        self.quorum_exempt_from = float("inf")
        self.writer: Writer | None = None
        self.required_after_dr: list[tuple[float, int]] = []  # (loss time, snapshot revision) per DR
        twin.timeline.on_sample = self._check_sample

    # -- per-sample invariants ---------------------------------------------------------------------------
    def _check_sample(self, s: Sample) -> None:
        self.twin._on_sample(s)
        if not s.quorum and not (self.quorum_exempt_from <= s.t <= self.quorum_exempt_until):
            self.result.violations.append(
                f"{s.t:.2f}: quorum lost: {s.healthy_voters}/{s.voters} healthy, leader={s.leader or 'none'}"
            )
        limit = self.twin.removal_deadline() + self.twin.terminate_hook_timeout("control-plane") + 15
        for inst in self.twin.machine.snapshot():
            if inst.state in WAIT_STATES and inst.history and s.t - inst.history[-1][0] > limit:
                self.result.violations.append(f"{s.t:.2f}: {inst.instance_id} stuck in {inst.state}")

    # -- helpers --------------------------------------------------------------------------------------------
    def _in_service(self) -> list[str]:
        return sorted(i.instance_id for i in self.twin.control_plane_instances(IN_SERVICE))

    def _pick(self, n: int = 1) -> list[str]:
        return self.rng.sample(self._in_service(), n)

    def _converge(self, rep: Replacement) -> None:
        try:
            self.twin.wait_converged(self.timeout)
            rep.healthy_at = time.time()
            rep.ok = True
        except TwinError as err:
            rep.note = str(err)[:400]
            self.result.violations.append(f"{rep.label}: did not converge: {err}")
        rep.measure(self.twin.timeline.samples_between(rep.started, time.time()))
        inits = self.twin.initialisers()
        if len(inits) != 1:
            self.result.violations.append(f"{rep.label}: {len(inits)} initialisers: {inits}")

    # -- scenarios --------------------------------------------------------------------------------------------
    def single(self, rep: Replacement) -> None:
        self.twin.terminate(rep.terminated[0])

    def double(self, rep: Replacement) -> None:
        for iid in rep.terminated:
            self.twin.terminate(iid)

    def during_join(self, rep: Replacement) -> None:
        first = rep.terminated[0]
        self.twin.terminate(first)
        before = {i.instance_id for i in self.twin.control_plane_instances()}

        def joining() -> bool:
            """The replacement is launched and not InService yet: its join (learner add, catch-up, promotion)
            is under way. Decided on the lifecycle state alone, which is cheap to poll: etcd's learner phase can
            fall between two samples of a slow observer, and a missed window used to stall the run."""
            return any(i.instance_id not in before for i in self.twin.control_plane_instances(PENDING_WAIT))

        self.twin.wait_for("a replacement's join", joining, self.timeout, interval=0.02)
        second = self.rng.choice(self._in_service())
        rep.terminated.append(second)
        self.twin.terminate(second)

    def lambda_crash(self, rep: Replacement) -> None:
        iid = rep.terminated[0]
        faults = self.twin.aws.faults
        delivery = self.twin.delivery
        assert delivery is not None
        faults.drop_completion[iid] = "chaos: the Lambda crashes after the removal, before the completion"

        def after(body: dict[str, Any], ok: bool) -> None:
            if body.get("detail", {}).get("EC2InstanceId") == iid and any(d[1] == iid for d in faults.dropped):
                faults.drop_completion.pop(iid, None)

        delivery.after_invoke = after
        self.twin.terminate(iid)

    def lost_event(self, rep: Replacement) -> None:
        self.twin.lose_events_for.add(rep.terminated[0])
        self.twin.terminate(rep.terminated[0])

    def failed_join(self, rep: Replacement) -> None:
        self.twin.next_launch_fail["control-plane"] = {"kubeadm join": "chaos: simulated kubeadm join failure"}
        self.twin.terminate(rep.terminated[0])

    def all_lost_dr(self, rep: Replacement) -> None:
        snaps = self._snapshots()
        if not snaps:
            raise TwinError("no snapshot yet: disaster recovery cannot be tested")
        latest = max(snaps, key=lambda o: (o.generation, o.revision))
        rep.terminated = self._in_service()
        self.quorum_exempt_from = time.time()
        self.quorum_exempt_until = float("inf")
        for iid in rep.terminated:
            self.twin.machine.fail_instance(iid)
        # Only writes up to the latest snapshot's revision are required from now on. The boundary is taken once
        # every old member is dead (fail_instance kills synchronously): the dying cluster may still acknowledge
        # writes while the instances go one by one, and those are in no snapshot (lost by design).
        self.required_after_dr.append((time.time(), latest.revision))

    def _snapshots(self) -> list[SnapshotObject]:
        s3 = self.twin.aws.client("s3")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=self.twin.snapshot_bucket).get("Contents", [])]
        return [o for k in keys if (o := SnapshotObject.parse(k)) is not None]

    # -- the run ------------------------------------------------------------------------------------------------
    def run(self, count: int) -> ChaosResult:
        t0 = time.monotonic()
        self.result.count = count
        self.twin.wait_bootstrapped(120)
        obs = self.twin.observer()
        assert obs is not None
        self.writer = Writer(
            obs, lambda: [f"https://{i.ip}:2379" for i in self.twin.control_plane_instances(IN_SERVICE)]
        )
        self.writer.start()
        done = 0
        names = [n for n, w in self.weights.items() if w > 0]
        while done < count:
            name = self.rng.choices(names, weights=[self.weights[n] for n in names])[0]
            if name == "all-lost-dr" and not self._snapshots():
                name = "single"
            n = 2 if name == "double" else 1
            rep = Replacement(f"#{len(self.result.replacements) + 1} {name}", self._pick(n), time.time())
            try:
                getattr(self, name.replace("-", "_"))(rep)
            except TwinError as err:
                self.result.violations.append(f"{rep.label}: {err}")
            self.progress(f"[chaos] {rep.label}: terminated {', '.join(rep.terminated)}")
            self._converge(rep)
            if name == "all-lost-dr":
                self.quorum_exempt_until = time.time()
                self.result.dr_restores = len(self.twin.restorers())
            self.result.replacements.append(rep)
            self.result.scenarios[name] = self.result.scenarios.get(name, 0) + 1
            done += len(rep.terminated)
            self.progress(
                f"[chaos] {rep.label}: {'healthy' if rep.ok else 'NOT CONVERGED'} after "
                f"{rep.seconds or -1:.1f}s, fewest healthy voters {rep.min_healthy_voters}, "
                f"{done}/{count} replaced, {len(self.writer.acked)} writes acked"
            )
            if not rep.ok:
                break
        self.writer.stop()
        self._check_history()
        self.result.runtime_s = time.monotonic() - t0
        return self.result

    def _required(self, w: Write) -> bool:
        for loss_time, revision in self.required_after_dr:
            if w.acked_at <= loss_time and w.revision > revision:
                return False  # acknowledged after the snapshot that the restore used: may be lost by design
        return True

    def _check_history(self) -> None:
        assert self.writer is not None
        obs = self.twin.observer()
        assert obs is not None
        read = obs.get_prefix(self.twin.etcd_endpoints(), self.writer.prefix)
        problems = self.writer.check(read, self._required)
        self.result.acked_writes = len(self.writer.acked)
        self.result.failed_writes = self.writer.failed
        self.result.lost_writes = sum(1 for p in problems if p.startswith("lost"))
        self.result.lost_by_design = sum(
            1 for w in self.writer.acked if not self._required(w) and read.get(w.key) != w.value
        )
        self.result.violations.extend(problems[:50])


def run_chaos(
    count: int, seed: int, *, dr: bool = False, progress: Any = print, report: Path | None = None
) -> ChaosResult:
    # snapshotIntervalMinutes 5 (the smallest the stack allows) for DR runs: a snapshot every 15 s at the default scale.
    options = TwinOptions(workers=0, snapshots=dr, snapshot_interval_minutes=5 if dr else 30)
    with Twin(options, progress=lambda line: None) as twin:
        result = Chaos(twin, seed, progress=progress, dr=dr).run(count)
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(
                json.dumps(
                    {
                        "summary": result.summary(),
                        "violations": result.violations,
                        "replacements": [asdict(r) for r in result.replacements],
                        "twin": twin.report(),
                    },
                    indent=2,
                    default=str,
                )
            )
            twin.timeline.plot(report.with_suffix(".png"), title=f"chaos seed={seed}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twin.chaos", description=__doc__.split("\n\n")[0])
    # At least one replacement: zero or fewer would "survive" with nothing exercised.
    parser.add_argument("--count", type=bounded_int(1, 1000), default=20, help="control-plane replacements to perform")
    parser.add_argument("--seed", type=bounded_int(0), default=int(time.time()) % 100000)
    parser.add_argument("--dr", action="store_true", help="include the all-instances-lost disaster recovery scenario")
    parser.add_argument("--report", type=Path, default=Path("reports/chaos-report.json"))
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    result = run_chaos(
        args.count,
        args.seed,
        dr=args.dr,
        progress=lambda line: print(f"{time.monotonic() - t0:7.1f}s {line}", flush=True),
        report=args.report,
    )
    print(json.dumps(result.summary(), indent=2))
    for v in result.violations:
        print(f"VIOLATION {v}")
    return 0 if not result.violations and result.summary()["survived"] == len(result.replacements) else 1


if __name__ == "__main__":
    sys.exit(main())
