"""Synthesize every stack offline and run the policy checks: cfn-lint, checkov and cdk-nag.

Every stack means the app's top-level stacks (IamStack, K8sClusterStack, PipelineStack) and the stacks
of the pipeline's stages (PipelineStack/Staging/..., PipelineStack/Production/...), which CDK writes
as nested cloud assemblies.

    .venv/bin/python -m scripts.synth_and_check [--synth-only] [--outdir cdk.out]

Prints progress and a summary table; exits non-zero on any finding. The same functions back
tests/stacks/test_policy.py, so the test suite and `make demo` judge the templates identically.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aws_cdk as cdk

ROOT = Path(__file__).resolve().parent.parent
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
CFN_LINT = Path(sys.executable).parent / "cfn-lint"


@dataclass
class Synthesis:
    outdir: Path
    seconds: float
    templates: dict[str, Path]  # stack display name -> template file
    resources: dict[str, int]
    nag_findings: list[str] = field(default_factory=list)


def offline_environment() -> None:
    """No credentials, no metadata service, no network: synth must not need any of them."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(name, None)
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
    os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")


def synthesize(outdir: Path, context: dict[str, object] | None = None) -> Synthesis:
    """Build the app in-process exactly as ``app.py`` does and collect cdk-nag's unsuppressed findings."""
    offline_environment()
    sys.path.insert(0, str(ROOT))
    from app import build_app

    started = time.monotonic()
    app = cdk.App(outdir=str(outdir), context=context or _cdk_json_context())
    build_app(app)
    assembly = app.synth()
    seconds = time.monotonic() - started
    templates: dict[str, Path] = {}
    resources: dict[str, int] = {}
    findings: list[str] = []
    for stack in _all_stacks(assembly):
        path = Path(stack.template_full_path)
        templates[stack.hierarchical_id] = path
        resources[stack.hierarchical_id] = len(json.loads(path.read_text()).get("Resources", {}))
        for message in stack.messages:
            is_nag = "AwsSolutions" in str(message.entry.data) or "CdkNag" in str(message.entry.data)
            if is_nag and message.level in (
                cdk.cx_api.SynthesisMessageLevel.ERROR,
                cdk.cx_api.SynthesisMessageLevel.WARNING,
            ):
                findings.append(f"{message.id}: {str(message.entry.data)[:400]}")
    return Synthesis(outdir=outdir, seconds=seconds, templates=templates, resources=resources, nag_findings=findings)


def _all_stacks(assembly: cdk.cx_api.CloudAssembly) -> list[cdk.cx_api.CloudFormationStackArtifact]:
    stacks = list(assembly.stacks)
    for artifact in assembly.nested_assemblies:
        stacks.extend(_all_stacks(artifact.nested_assembly))
    return stacks


def _cdk_json_context() -> dict[str, object]:
    return dict(json.loads((ROOT / "cdk.json").read_text())["context"])


def run_cfn_lint(templates: list[Path]) -> list[str]:
    """cfn-lint findings (errors and warnings) as lines; an empty list means clean."""
    result = subprocess.run(
        [str(CFN_LINT), "--format", "parseable", *map(str, templates)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    return [line for line in result.stdout.splitlines() if line.strip()]


def run_checkov(directory: Path) -> tuple[int, int, list[str]]:
    """(passed, skipped, failed findings) for every template under ``directory``."""
    result = subprocess.run(
        [
            str(CHECKOV),
            "--directory",
            str(directory),
            "--framework",
            "cloudformation",
            "--output",
            "json",
            "--quiet",
            "--compact",
            "--skip-download",
            "--config-file",
            str(ROOT / ".checkov.yaml"),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    if not result.stdout.strip():
        raise RuntimeError(f"checkov produced no output: {result.stderr[-2000:]}")
    reports = json.loads(result.stdout)
    if isinstance(reports, dict):
        reports = [reports]
    passed = skipped = 0
    failed: list[str] = []
    for report in reports:
        summary = report.get("summary", {})
        passed += int(summary.get("passed", 0))
        skipped += int(summary.get("skipped", 0))
        for check in report.get("results", {}).get("failed_checks", []):
            failed.append(f"{check['check_id']} {check['resource']} ({check['file_path']}): {check['check_name']}")
    return passed, skipped, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synth-only", action="store_true", help="only synthesize and list the stacks")
    parser.add_argument("--outdir", default=str(ROOT / "cdk.out"))
    args = parser.parse_args(argv)

    print("==> synthesizing every stack offline (no AWS credentials, no network)", flush=True)
    synthesis = synthesize(Path(args.outdir))
    width = max(map(len, synthesis.resources), default=0)
    for name, count in synthesis.resources.items():
        print(f"    {name:<{width}} {count:>4} resources  {synthesis.templates[name].name}")
    print(f"    synth took {synthesis.seconds:.1f} s", flush=True)
    if args.synth_only:
        return 0

    templates = list(synthesis.templates.values())
    print("==> cfn-lint", flush=True)
    lint = run_cfn_lint(templates)
    print("==> checkov", flush=True)
    passed, skipped, failed = run_checkov(Path(args.outdir))
    print("==> cdk-nag (AwsSolutions)", flush=True)
    for line in [*lint, *failed, *synthesis.nag_findings]:
        print(f"    FINDING {line}")

    rows = [
        ("stacks", str(len(templates))),
        ("resources", str(sum(synthesis.resources.values()))),
        ("synth seconds", f"{synthesis.seconds:.1f}"),
        ("cfn-lint findings", str(len(lint))),
        ("checkov passed / skipped / failed", f"{passed} / {skipped} / {len(failed)}"),
        ("cdk-nag unsuppressed", str(len(synthesis.nag_findings))),
    ]
    width = max(len(label) for label, _ in rows)
    print("\nPolicy summary")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    clean = not lint and not failed and not synthesis.nag_findings
    print("  result: " + ("clean" if clean else "FINDINGS (see above)"))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
