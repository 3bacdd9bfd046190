"""The first-deploy defects, re-introduced one at a time: which test catches each (issue "The twin runs the
synthesized stack", acceptance).

Each mutation below puts back, in a throw-away git worktree of HEAD, exactly one defect that a real first deploy
hit before it was fixed; then the tests that are meant to see it run against that worktree. A mutation that no test
fails is a hole in the proof, and the run says so (exit 1).

    python -m scripts.mutation_check            # every mutation, its tests, a table (reports/mutation-check.json)
    python -m scripts.mutation_check --only M2  # one

The worktree shares this checkout's .venv, .tools (etcd) and node_modules by symlink; nothing in this checkout is
changed. Each test runs with ``-x`` (the first failure is enough) and its failing test ids are reported.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Edit:
    path: str
    pattern: str  # a regular expression that must match exactly once
    replacement: str


@dataclass(frozen=True)
class Mutation:
    key: str
    defect: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # pytest node ids or paths, each run on its own


SEPARATE_HOOKS = """    _hooks = ["""
SEPARATE_HOOKS_TAIL = r"""\1
    for spec in _hooks:  # mutation: separate AWS::AutoScaling::LifecycleHook resources, created after the group
        group.add_lifecycle_hook(
            spec.lifecycle_hook_name,
            lifecycle_hook_name=spec.lifecycle_hook_name,
            lifecycle_transition=autoscaling.LifecycleTransition(spec.lifecycle_transition.split("EC2_")[1]),
            heartbeat_timeout=cdk.Duration.seconds(spec.heartbeat_timeout),
            default_result=autoscaling.DefaultResult(spec.default_result),
        )
"""

MUTATIONS = (
    Mutation(
        "M1",
        "lifecycle hooks as separate resources (created after their group: its first instances launch hookless)",
        (
            Edit("stages/nodes.py", r"    cfn_group\.lifecycle_hook_specification_list = \[", SEPARATE_HOOKS),
            Edit(
                "stages/nodes.py",
                r"(            default_result=terminate_default,\n        \),\n    \])\n",
                SEPARATE_HOOKS_TAIL,
            ),
        ),
        (
            "tests/stacks/test_first_deploy_template.py",
            "tests/stacks/test_launch_timeouts.py",
            "tests/twin/test_twin_bootstrap.py",
        ),
    ),
    Mutation(
        "M2",
        "client IP preservation on, and the initialiser's kubeadm init through the API endpoint (no hosts mapping)",
        (
            Edit("stages/control_plane.py", r"preserve_client_ip=False,", "preserve_client_ip=True,"),
            Edit(
                "node_agent/bootstrap.py",
                r"        if map_endpoint\(self\.settings\.hosts_file,",
                "        if False and map_endpoint(self.settings.hosts_file,",
            ),
        ),
        (
            "tests/stacks/test_first_deploy_template.py",
            "tests/agent/test_api_endpoint.py",
            "tests/twin/test_twin_bootstrap.py",
        ),
    ),
    Mutation(
        "M3",
        "no launch-hook heartbeat while the agent works (hook timeout shorter than the agent's deadlines)",
        (
            Edit(
                "node_agent/lifecycle.py",
                r"        self\._thread\.start\(\)\n",
                "        pass  # mutation: no heartbeat\n",
            ),
        ),
        (
            "tests/agent/test_launch_hook.py",
            "tests/stacks/test_launch_timeouts.py",
            "tests/twin/test_twin_bootstrap.py",
        ),
    ),
    Mutation(
        "M4",
        "the lifecycle Lambda may not CompleteLifecycleAction (one IAM permission missing)",
        (
            Edit(
                "stages/iam_stack.py",
                r'(sid="TerminateHooks",\n\s+actions=\[)"autoscaling:CompleteLifecycleAction", ',
                r"\1",
            ),
        ),
        (
            "tests/stacks/test_iam_stack.py",
            "tests/twin/test_iam_twin.py",
            "tests/twin/test_twin_replacement.py",
        ),
    ),
    Mutation(
        "M5",
        "no Auto Scaling interface endpoint in the VPC",
        (Edit("stages/network.py", r'    "autoscaling": ec2\.InterfaceVpcEndpointAwsService\.AUTOSCALING,\n', ""),),
        (
            "tests/stacks/test_cluster_stack.py",
            "tests/twin/test_endpoints_model.py",
            "tests/twin/test_twin_bootstrap.py",
        ),
    ),
)


def apply(worktree: Path, edit: Edit) -> None:
    path = worktree / edit.path
    text = path.read_text()
    found = len(re.findall(edit.pattern, text))
    if found != 1:
        raise SystemExit(f"mutation pattern {edit.pattern!r} matches {found} times in {edit.path} (wanted 1)")
    path.write_text(re.sub(edit.pattern, edit.replacement, text))


def make_worktree() -> Path:
    where = Path(tempfile.mkdtemp(prefix="dk8s-mutant-"))
    shutil.rmtree(where)
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(where), "HEAD"], cwd=ROOT, check=True)
    for shared in (".venv", ".tools", "node_modules"):
        if (ROOT / shared).exists():
            (where / shared).symlink_to(ROOT / shared)
    return where


def drop_worktree(where: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, check=False)
    shutil.rmtree(where, ignore_errors=True)


def run_test(worktree: Path, test: str) -> dict[str, Any]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-m", "pytest", test, "-x", "-q", "-p", "no:cacheprovider", "-rf"],
        cwd=worktree,
        capture_output=True,
        text=True,
        check=False,
    )
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.MULTILINE)
    errors = re.findall(r"^ERROR (\S+)", proc.stdout, flags=re.MULTILINE)
    return {
        "test": test,
        "rc": proc.returncode,
        "failed": failed + errors,
        "seconds": round(time.monotonic() - t0, 1),
        "tail": proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else proc.stderr.strip()[-300:],
    }


def check(mutation: Mutation) -> dict[str, Any]:
    worktree = make_worktree()
    try:
        for edit in mutation.edits:
            apply(worktree, edit)
        results = []
        for test in mutation.tests:
            result = run_test(worktree, test)
            print(f"  {mutation.key} {test}: rc={result['rc']} {result['failed'][:2]} ({result['seconds']}s)",
                  flush=True)  # fmt: skip
            results.append(result)
    finally:
        drop_worktree(worktree)
    return {"key": mutation.key, "defect": mutation.defect, "caught": any(r["rc"] == 1 for r in results),
            "results": results}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="mutation key (M1..M5); repeatable")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.key in args.only]
    unknown = set(args.only) - {m.key for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation {sorted(unknown)}; known: {[m.key for m in MUTATIONS]}")
    report = []
    for mutation in chosen:
        print(f"==> {mutation.key}: {mutation.defect}", flush=True)
        report.append(check(mutation))
    print("\n| mutation | defect | failing tests |\n| --- | --- | --- |")
    for row in report:
        failing = [f for r in row["results"] for f in r["failed"]] or ["NONE: not caught"]
        print(f"| {row['key']} | {row['defect']} | {'; '.join(failing)} |")
    out = ROOT / "reports" / "mutation-check.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return 0 if all(row["caught"] for row in report) else 1


if __name__ == "__main__":
    sys.exit(main())
