"""``python -m pipeline.smoke``: check that a deployed cluster is usable, print a table, exit non-zero on failure.

Runs by hand with any kubeconfig that may list nodes and pods, read DaemonSets, Services and EndpointSlices,
and create/delete pods and ServiceAccounts in ``--namespace``. The pipeline's smoke step writes a short-lived
one (``pipeline/smoke/kubeconfig.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from pipeline.smoke.checks import (
    DEFAULT_CNI_DAEMONSET,
    DEFAULT_POD_CIDR,
    CheckResult,
    Cluster,
    SmokeOptions,
    run_checks,
)
from pipeline.table import format_table as table


def format_table(results: Sequence[CheckResult]) -> str:
    return table([("CHECK", "RESULT", "DETAIL"), *((r.name, r.status, r.detail) for r in results)])


def main(argv: list[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    parser = argparse.ArgumentParser(prog="python -m pipeline.smoke", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--kubeconfig", required=True, help="kubeconfig file")
    parser.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    parser.add_argument("--expect-control-plane", type=int, default=3, help="control-plane nodes (exactly)")
    parser.add_argument("--expect-workers", type=int, default=1, help="Ready worker nodes (at least)")
    parser.add_argument("--namespace", default="default", help="where the test pods run")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for a pod to run or go")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="seconds between pod reads")
    parser.add_argument("--pod-cidr", default=DEFAULT_POD_CIDR, help="the cluster's pod CIDR")
    parser.add_argument("--cni-daemonset", default=DEFAULT_CNI_DAEMONSET, help="NAMESPACE/NAME of the CNI agent")
    parser.add_argument("--image", default=None, help="test pod image (default: the pause image the AMI pre-pulls)")
    irsa = parser.add_mutually_exclusive_group(required=True)
    irsa.add_argument("--irsa-role-arn", help="role the IRSA test pod's ServiceAccount is annotated with")
    irsa.add_argument("--skip-irsa", action="store_true", help="skip the IRSA check (a 'skipped' row)")
    args = parser.parse_args(argv)
    if args.expect_control_plane < 1 or args.expect_workers < 0 or args.timeout <= 0 or args.poll_interval <= 0:
        parser.error("--expect-control-plane >= 1, --expect-workers >= 0, --timeout and --poll-interval > 0")

    options = SmokeOptions(
        expect_control_plane=args.expect_control_plane,
        expect_workers=args.expect_workers,
        namespace=args.namespace,
        timeout_s=args.timeout,
        poll_interval_s=args.poll_interval,
        pod_cidr=args.pod_cidr,
        cni_daemonset=args.cni_daemonset,
        irsa_role_arn=None if args.skip_irsa else args.irsa_role_arn,
        **({"image": args.image} if args.image else {}),
    )

    def log(line: str) -> None:
        print(f"[smoke] {line}", file=out, flush=True)

    try:
        cluster = Cluster.from_kubeconfig(args.kubeconfig, args.context)
    except Exception as error:
        print(f"smoke test FAILED: kubeconfig {args.kubeconfig}: {error}", file=err)
        return 2
    results = run_checks(cluster, options, log)
    print(format_table(results), file=out, flush=True)
    failed = [r for r in results if not r.ok and not r.skipped]
    if failed:
        print(f"smoke test FAILED: {', '.join(r.name for r in failed)}", file=err)
        for result in failed:
            print(f"  {result.name}: {result.detail}", file=err)
        return 1
    print(f"smoke test passed: {len(results)} checks", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
