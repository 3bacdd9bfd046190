"""The twin part of ``make demo``: ``python -m scripts.demo`` (also ``make twin-demo``).

Starts the local cluster twin with 3 control-plane and 2 worker instances (moto, the real node agent in
processes, real TLS etcd on loopback, the real Lambda handlers), lets them bootstrap (exactly one
initialiser), runs the pipeline's canary (``pipeline/canary``) -- a rolling replacement of every
control-plane node -- against it, and prints a summary. Writes ``reports/demo-report.json`` and
``reports/timeline.png``. Exit 0 only if the canary passed and the twin's own checks agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from twin.canary_api import twin_cluster_api
from twin.cluster import Twin, TwinError, TwinOptions
from twin.measure import summarize
from twin.replacements import replacements_from_timeline, table


def run_canary(twin: Twin, say: Any, report_path: Path) -> tuple[bool, dict[str, Any]]:
    """The pipeline's canary, unchanged, with its production ClusterApi pointed at the twin."""
    from pipeline.canary import CanaryOptions, run

    options = CanaryOptions(replacement_timeout_s=150.0, poll_interval_s=0.5)
    result = run(
        twin_cluster_api(twin), options=options, report_path=report_path, log=lambda line: say(f"[canary] {line}")
    )
    doc = result.to_json()
    doc.pop("samples", None)
    return bool(result.ok), doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    parser.add_argument("--control-planes", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    t0 = time.monotonic()

    def say(line: str) -> None:
        print(f"[twin {time.monotonic() - t0:6.1f}s] {line}", flush=True)

    args.reports.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    options = TwinOptions(control_planes=args.control_planes, workers=args.workers)
    say(f"starting the twin: {args.control_planes} control-plane + {args.workers} worker instances")
    with Twin(options, progress=say) as twin:
        try:
            took = twin.wait_bootstrapped(150)
        except TwinError as err:
            say(f"!! bootstrap failed: {err}")
            return 1
        inits = twin.initialisers()
        say(f"bootstrapped in {took:.1f}s; initialisers: {inits} (exactly one: {len(inits) == 1})")
        if len(inits) != 1:
            problems.append(f"{len(inits)} initialisers")
        say("running the pipeline's canary (rolling replacement of every control-plane node)")
        canary_ok, canary = run_canary(twin, say, args.reports / "canary-report.json")
        if not canary_ok:
            problems.append("the canary failed")
        try:
            twin.wait_converged(60)
        except TwinError as err:
            problems.append(f"not converged at the end: {err}")
        reps = replacements_from_timeline(twin.timeline, args.control_planes)
        obs = twin.observer()
        members = obs.members(twin.etcd_endpoints()) if obs else []
        rows = [
            {
                "#": n,
                "terminated": r.label,
                "healthy again after": f"{r.seconds:.1f}s" if r.seconds else "never",
                "fewest healthy voters": r.min_healthy_voters,
                "quorum lost samples": r.quorum_lost_samples,
                "samples": r.samples,
            }
            for n, r in enumerate(reps, 1)
        ]
        summary = summarize(reps)
        if len(reps) < args.control_planes:
            problems.append(f"only {len(reps)} control-plane replacements observed")
        if summary["quorum_lost_samples"]:
            problems.append(f"{summary['quorum_lost_samples']} samples without quorum")
        final_ids = {i.instance_id for i in twin.control_plane_instances("InService")}
        stale = [m.name for m in members if m.name.split(".", 1)[0] not in final_ids]
        if stale or len(members) != args.control_planes:
            problems.append(f"members at the end: {[m.name for m in members]} (stale: {stale})")
        twin.timeline.plot(args.reports / "timeline.png", title="twin demo: rolling replacement of the control plane")
        elapsed = time.monotonic() - t0
        report = {
            "ok": not problems,
            "problems": problems,
            "runtime_s": round(elapsed, 1),
            "bootstrap_s": round(took, 1),
            "initialisers": inits,
            "canary": canary,
            "replacements": rows,
            "summary": summary,
            "members_at_end": [{"name": m.name, "learner": m.is_learner, "healthy": m.healthy} for m in members],
            "twin": twin.report(),
            "timeline": twin.timeline.to_json(),
        }
        (args.reports / "demo-report.json").write_text(json.dumps(report, indent=2, default=str))
    print()
    print("Rolling replacement of the control plane (measured by the twin, independently of the canary):")
    print(
        table(
            rows,
            [
                ("#", "#"),
                ("terminated", "terminated instance"),
                ("healthy again after", "healthy again after"),
                ("fewest healthy voters", "fewest healthy voters"),
                ("quorum lost samples", "samples w/o quorum"),
            ],
        )
    )
    print()
    print(f"sentinel intact (canary): {canary.get('sentinel_intact')}")
    listed = ", ".join(f"{m.name} ({'healthy' if m.healthy else 'DOWN'})" for m in members)
    print(f"members at the end: {listed}")
    print(
        f"time to healthy: median {summary['time_to_healthy_median_s']}s, p95 {summary['time_to_healthy_p95_s']}s; "
        f"fewest healthy voters {summary['min_healthy_voters']}; demo runtime {elapsed:.0f}s"
    )
    print(f"reports: {args.reports / 'demo-report.json'}, {args.reports / 'timeline.png'}")
    for p in problems:
        print(f"PROBLEM: {p}")
    print("DEMO PASSED" if not problems else "DEMO FAILED")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
