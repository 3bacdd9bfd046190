"""``python -m pipeline.canary``: run the canary against a deployed cluster.

Inputs come from the K8sClusterStack outputs: a ``cdk deploy --outputs-file`` JSON file
(``--outputs``), or the environment the pipeline's canary step sets from the stack outputs
(CONTROL_PLANE_GROUP_NAMES, CLUSTER_OPS_FUNCTION_NAME).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.canary.api import Boto3ClusterApi
from pipeline.canary.runner import CanaryOptions, run
from pipeline.cli_args import bounded_int, positive_seconds, stack_outputs_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.canary", description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=stack_outputs_file, help="stack outputs JSON (cdk deploy --outputs-file)")
    parser.add_argument("--report", type=Path, default=Path("canary-report.json"))
    parser.add_argument("--replacement-timeout", type=positive_seconds(86400), default=1200.0,
                        help="seconds per replacement")  # fmt: skip
    parser.add_argument("--poll-interval", type=positive_seconds(1.0), default=1.0,
                        help="seconds between status samples (<= 1)")  # fmt: skip
    # The control plane's allowed sizes (stages/config.py: controlPlaneCount 3, 5 or 7).
    parser.add_argument("--expected-voters", type=bounded_int(3, 7), default=None)
    parser.add_argument("--region", default=os.environ.get("AWS_REGION"))
    args = parser.parse_args(argv)
    if args.expected_voters is not None and args.expected_voters % 2 == 0:
        parser.error(f"argument --expected-voters: {args.expected_voters} is even: the control plane has 3, 5 or 7")

    outputs: dict[str, str] = args.outputs or {}
    groups = outputs.get("ControlPlaneGroupNames") or os.environ.get("CONTROL_PLANE_GROUP_NAMES", "")
    function = outputs.get("ClusterOpsFunctionName") or os.environ.get("CLUSTER_OPS_FUNCTION_NAME", "")
    if not groups or not function:
        parser.error(
            "need the stack outputs ControlPlaneGroupNames and ClusterOpsFunctionName "
            "(--outputs FILE, or CONTROL_PLANE_GROUP_NAMES and CLUSTER_OPS_FUNCTION_NAME in the environment)"
        )
    api = Boto3ClusterApi(function_name=function, group_names=groups.split(","), region=args.region)
    options = CanaryOptions(
        replacement_timeout_s=args.replacement_timeout,
        poll_interval_s=args.poll_interval,
        expected_voters=args.expected_voters,
    )
    result = run(api, options=options, report_path=args.report, log=lambda line: print(line, flush=True))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
