"""Benchmark (not a test): the etcd lifecycle Lambda's handler latency per event against a real 3-member
TLS etcd cluster (AWS through moto in-process), and the handler module's import (cold-start) time.

Each event is a real removal: an instance is launched in moto, its etcd member is added as a learner (as
kubeadm join does) and the instance is then terminated, so the handler observes the cluster, matches the
member, checks quorum, removes it and completes the hook. Run: ``make benchmark`` (or
``.venv/bin/python -m scripts.benchmark_lifecycle --events 50``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moto import mock_aws

REPO = Path(__file__).resolve().parent.parent


def import_time_ms(module: str, runs: int = 5) -> float:
    """Median wall time of a fresh interpreter importing ``module`` (minus a bare interpreter's start)."""

    def once(code: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        return (time.perf_counter() - started) * 1000

    bare = statistics.median(once("pass") for _ in range(runs))
    loaded = statistics.median(once(f"import {module}") for _ in range(runs))
    return loaded - bare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50, help="number of lifecycle events (>= 50 for the figures)")
    args = parser.parse_args(argv)
    for key, value in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(key, value)
    from lambdas.etcd_lifecycle import handler as lifecycle
    from tests.lambdas.conftest import lambda_env, sqs_event

    class Ctx:
        aws_request_id = "benchmark"

    latencies: list[float] = []
    with tempfile.TemporaryDirectory(prefix="dk8s-bench-") as tmp, mock_aws(), lambda_env(Path(tmp)) as env:
        lifecycle.cluster_aws = lambda: env.aws  # the harness seam, as in tests
        group = env.group_of[env.instance_ids[0]]
        for n in range(args.events):
            iid, ip = env.launch_instance(group)
            env.etcd.add_learner_node(iid, ip, start=False)
            event = sqs_event(env.begin_termination(iid))
            started = time.perf_counter()
            with open(os.devnull, "w") as quiet:
                stdout, sys.stdout = sys.stdout, quiet
                try:
                    result = lifecycle.handle(event, Ctx())
                finally:
                    sys.stdout = stdout
            latencies.append((time.perf_counter() - started) * 1000)
            assert result == {"batchItemFailures": []} and env.hooks.results(iid) == ["CONTINUE"], result
            env.terminate_in_ec2(iid)  # the hook completed: Auto Scaling terminates the instance
            if (n + 1) % 10 == 0:
                print(f"  {n + 1}/{args.events} events, last {latencies[-1]:.1f} ms", flush=True)
        assert len(env.etcd.member_names()) == 3
    cold = import_time_ms("lambdas.etcd_lifecycle.handler")
    ordered = sorted(latencies)
    figures = {
        "events": len(latencies),
        "median_ms": round(statistics.median(ordered), 1),
        "p95_ms": round(ordered[max(0, int(0.95 * len(ordered)) - 1)], 1),
        "max_ms": round(ordered[-1], 1),
        "import_ms": round(cold, 1),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
