"""``python -m pipeline.canary``: run the canary against a deployed cluster.

Inputs come from the K8sClusterStack outputs: a ``cdk deploy --outputs-file`` JSON file
(``--outputs``), or the environment the pipeline's canary step sets from the stack outputs
(CONTROL_PLANE_GROUP_NAMES, CLUSTER_OPS_FUNCTION_NAME).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline.canary.api import Boto3ClusterApi
from pipeline.canary.runner import CanaryOptions, run


def _from_outputs(path: Path) -> dict[str, str]:
    document = json.loads(path.read_text())
    # `cdk deploy --outputs-file` nests outputs under the stack name; accept either shape.
    for value in document.values():
        if isinstance(value, dict) and "ControlPlaneGroupNames" in value:
            return {k: str(v) for k, v in value.items()}
    return {k: str(v) for k, v in document.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.canary", description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, help="stack outputs JSON (cdk deploy --outputs-file)")
    parser.add_argument("--report", type=Path, default=Path("canary-report.json"))
    parser.add_argument("--replacement-timeout", type=float, default=1200.0, help="seconds per replacement")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between status samples (<= 1)")
    parser.add_argument("--expected-voters", type=int, default=None)
    parser.add_argument("--region", default=os.environ.get("AWS_REGION"))
    args = parser.parse_args(argv)
    if args.poll_interval > 1.0:
        parser.error("--poll-interval must be at most 1 second")

    outputs = _from_outputs(args.outputs) if args.outputs else {}
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
