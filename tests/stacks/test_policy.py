"""cfn-lint, checkov and cdk-nag find nothing unexplained in any template of the app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.synth_and_check import Synthesis, run_cfn_lint, run_checkov, synthesize

pytestmark = [pytest.mark.policy, pytest.mark.xdist_group("policy")]

STACKS = ("IamStack", "K8sClusterStack")
# stages/irsa.py (irsa: true, opt-in): the IRSA issuer bucket's two anonymously readable objects are inherent (STS
# reads them without credentials): CKV_AWS_54, CKV_AWS_56 and CKV_AWS_70 (public policy) and CKV_AWS_145 (SSE-S3: an
# anonymous reader cannot use KMS), skipped with that reason in each of the three cluster stacks (app, Staging,
# Production): at most these 4 per stack. The default app has IRSA off, so none of them; the IRSA-on app is checked
# below.
IRSA_SKIPS = 4 * 3


@pytest.fixture(scope="module")
def synthesis(tmp_path_factory: pytest.TempPathFactory) -> Synthesis:
    return synthesize(tmp_path_factory.mktemp("cdk.out"))


def test_every_stack_is_synthesized(synthesis: Synthesis) -> None:
    stage_stacks = {f"PipelineStack/{stage}/{stack}" for stage in ("Staging", "Production") for stack in STACKS}
    # The pipeline deploys its own image stack (ImageStage "Ami") before the AMI build and the cluster stages.
    assert set(synthesis.templates) == {
        *STACKS,
        "ImageStack",
        "PipelineStack",
        "PipelineStack/Ami/ImageStack",
        *stage_stacks,
    }


def test_cdk_nag_ran_on_every_stack_including_the_pipeline_stages(synthesis: Synthesis) -> None:
    # Aspects added at the app stop at a Stage boundary; ClusterStage adds the pack itself. One report per stack.
    reports = list(Path(synthesis.outdir).glob("AwsSolutions-*-NagReport.csv"))
    assert len(reports) == len(synthesis.templates)


def test_cfn_lint_reports_nothing(synthesis: Synthesis) -> None:
    findings = run_cfn_lint(list(synthesis.templates.values()))
    assert findings == []


def test_checkov_fails_nothing(synthesis: Synthesis) -> None:
    passed, skipped, failed = run_checkov(Path(synthesis.outdir))
    assert failed == []
    assert passed > 100
    # every skip carries its reason in the resource's metadata; 9 of them are CKV_AWS_115 (no reserved
    # concurrency, stages/etcd_lifecycle.py) on the three Lambdas of each of the three cluster stacks. A budget, so
    # that a new skip is a deliberate change: 50 on 2026-12-02 (the cluster-ops function's own role added one per
    # cluster stack).
    assert skipped <= 50


@pytest.fixture(scope="module")
def irsa_synthesis(tmp_path_factory: pytest.TempPathFactory) -> Synthesis:
    context = {**json.loads((Path(__file__).resolve().parents[2] / "cdk.json").read_text())["context"], "irsa": True}
    return synthesize(tmp_path_factory.mktemp("cdk.out-irsa"), context)


def test_the_irsa_app_passes_cfn_lint_cdk_nag_and_checkov_with_only_the_issuers_skips(
    synthesis: Synthesis, irsa_synthesis: Synthesis
) -> None:
    assert run_cfn_lint(list(irsa_synthesis.templates.values())) == []
    assert irsa_synthesis.nag_findings == []
    _, default_skipped, _ = run_checkov(Path(synthesis.outdir))
    passed, skipped, failed = run_checkov(Path(irsa_synthesis.outdir))
    assert failed == []
    assert passed > 100
    # The issuer's skips appear (checkov counts a skip only where the check applies) and nothing else is skipped.
    assert default_skipped < skipped <= default_skipped + IRSA_SKIPS


def test_cdk_nag_has_no_unsuppressed_finding(synthesis: Synthesis) -> None:
    assert synthesis.nag_findings == []


def test_cdk_nag_would_report_an_unsuppressed_wildcard(tmp_path: Path) -> None:
    # Proves the check is live: an app with a deliberately unjustified wildcard policy is flagged.
    import aws_cdk as cdk
    from aws_cdk import aws_iam as iam

    from stages.nag import apply_policy_checks

    app = cdk.App(outdir=str(tmp_path))
    stack = cdk.Stack(app, "Probe")
    role = iam.Role(stack, "Role", assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"))
    role.add_to_policy(iam.PolicyStatement(actions=["s3:GetObject"], resources=["*"]))
    apply_policy_checks(app)
    messages = app.synth().get_stack_by_name("Probe").messages
    assert any("AwsSolutions-IAM5" in str(m.entry.data) for m in messages)
