"""The pipeline's smoke step: after the canary, in the cluster VPC, least privilege, wheels from the synth step."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from pipeline.pipeline_stack import SMOKE_PACKAGES, SMOKE_WHEELS
from tests.pipeline.test_pipeline_stack import Synthesized, synthesize

ROOT = Path(__file__).resolve().parents[2]
IMPORTED_VPC = {
    "vpcId": "vpc-0123456789abcdef0",
    "vpcCidr": "10.50.0.0/16",
    "privateSubnetIds": ["subnet-0000000000000000a", "subnet-0000000000000000b", "subnet-0000000000000000c"],
    "privateRouteTableIds": ["rtb-0000000000000000a", "rtb-0000000000000000b", "rtb-0000000000000000c"],
}


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    """Both stages import their VPC (the one case where CodeBuild can join it at synth time)."""
    workers = [{"name": "general", "instanceType": "m6i.large", "minSize": 2, "maxSize": 6, "desiredCapacity": 2}]
    overrides = {
        "stagingOverrides": {**IMPORTED_VPC, "workerGroups": [{**workers[0], "minSize": 1, "desiredCapacity": 1}]},
        "productionOverrides": {**IMPORTED_VPC, "vpcCidr": "10.60.0.0/16", "workerGroups": workers},
    }
    return synthesize(overrides, tmp=tmp_path_factory.mktemp("smoke"))


def _action(synth: Synthesized, stage: str, name: str) -> dict[str, Any]:
    (action,) = [a for a in synth.stage(stage) if a["Name"] == name]
    return action


@pytest.mark.parametrize("stage_name", ["Staging", "Production"])
def test_the_smoke_step_runs_after_the_canary(imported: Synthesized, stage_name: str) -> None:
    actions = imported.stage(stage_name)
    canary = _action(imported, stage_name, f"{stage_name}Canary")
    smoke = _action(imported, stage_name, f"{stage_name}SmokeTest")
    assert smoke["ActionTypeId"]["Provider"] == "CodeBuild"
    assert smoke["RunOrder"] > canary["RunOrder"]
    assert actions[-1] is smoke


@pytest.mark.parametrize(("stage_name", "workers"), [("Staging", 1), ("Production", 2)])
def test_the_smoke_step_mints_a_kubeconfig_and_runs_the_smoke_test(
    imported: Synthesized, stage_name: str, workers: int
) -> None:
    smoke = _action(imported, stage_name, f"{stage_name}SmokeTest")
    spec = imported.buildspec(smoke)
    commands = spec["phases"]["build"]["commands"]
    assert commands[0] == 'python -m pipeline.smoke.kubeconfig --out "$HOME/.kube/smoke"'
    assert commands[1] == (
        'python -m pipeline.smoke --kubeconfig "$HOME/.kube/smoke" '
        f"--expect-control-plane 3 --expect-workers {workers} --timeout 300 --skip-irsa"
    )
    project = imported.project(smoke["Configuration"]["ProjectName"]["Ref"])
    env = {v["Name"]: v["Value"] for v in project["Environment"]["EnvironmentVariables"]}
    cluster = imported.context[f"{stage_name.lower()}ClusterName"]
    assert env["PKI_SECRET_NAME"] == f"dedicated-k8s/{cluster}/pki"
    # The API endpoint and the cluster name come from the cluster stack's outputs (pipeline variables).
    action_env = {v["name"]: v["value"] for v in json.loads(smoke["Configuration"]["EnvironmentVariables"])}
    assert re.fullmatch(r"#\{[\w.-]+\.ApiEndpoint\}", action_env["API_ENDPOINT"])
    assert re.fullmatch(r"#\{[\w.-]+\.ClusterName\}", action_env["CLUSTER_NAME"])


def test_the_smoke_step_installs_only_the_synth_steps_wheels(imported: Synthesized) -> None:
    smoke = _action(imported, "Staging", "StagingSmokeTest")
    install = imported.buildspec(smoke)["phases"]["install"]["commands"]
    assert any(f"$CODEBUILD_SRC_DIR_Synth_{SMOKE_WHEELS.replace('-', '_')}" in c for c in install)
    (pip,) = [c for c in install if "pip install" in c]
    assert f"--no-index --find-links {SMOKE_WHEELS}" in pip
    (synth,) = imported.stage("Build")
    spec = imported.buildspec(synth)
    (download,) = [c for c in spec["phases"]["build"]["commands"] if "pip download" in c]
    assert f"--dest {SMOKE_WHEELS}" in download
    assert SMOKE_WHEELS in json.dumps(spec["artifacts"]["secondary-artifacts"])
    # The package list is pinned in requirements.txt, one line each: the step installs exactly the pins.
    pins = (ROOT / "requirements.txt").read_text().splitlines()
    names = SMOKE_PACKAGES.split("|")
    assert sorted(p.split("==")[0] for p in pins if re.match(rf"^({SMOKE_PACKAGES})==", p)) == sorted(names)


def test_the_smoke_step_runs_in_the_clusters_private_subnets(imported: Synthesized) -> None:
    smoke = _action(imported, "Staging", "StagingSmokeTest")
    vpc_config = imported.project(smoke["Configuration"]["ProjectName"]["Ref"])["VpcConfig"]
    assert vpc_config["VpcId"] == IMPORTED_VPC["vpcId"]
    assert vpc_config["Subnets"] == IMPORTED_VPC["privateSubnetIds"]
    (group_ref,) = vpc_config["SecurityGroupIds"]
    group = imported.pipeline_json["Resources"][group_ref["Fn::GetAtt"][0]]["Properties"]
    egress = {(r["CidrIp"], r["FromPort"], r["ToPort"]) for r in group["SecurityGroupEgress"]}
    assert egress == {("10.50.0.0/16", 6443, 6443), ("10.50.0.0/16", 443, 443), ("0.0.0.0/0", 443, 443)}
    assert "SecurityGroupIngress" not in group


@pytest.mark.parametrize("stage_name", ["Staging", "Production"])
def test_the_smoke_role_reads_only_the_clusters_pki_secret(imported: Synthesized, stage_name: str) -> None:
    smoke = _action(imported, stage_name, f"{stage_name}SmokeTest")
    cluster = imported.context[f"{stage_name.lower()}ClusterName"]
    by_sid = {s.get("Sid"): s for s in imported.role_statements(smoke)}
    read = by_sid["ReadClusterCa"]
    assert read["Action"] == "secretsmanager:GetSecretValue"
    assert json.dumps(read["Resource"]).endswith(f':secret:dedicated-k8s/{cluster}/pki-??????"]]}}')
    decrypt = by_sid["DecryptClusterCa"]
    assert decrypt["Action"] == "kms:Decrypt"
    assert decrypt["Condition"]["StringEquals"] == {
        "kms:ViaService": {"Fn::Join": ["", ["secretsmanager.us-east-1.", {"Ref": "AWS::URLSuffix"}]]}
    }
    assert decrypt["Condition"]["StringLike"]["kms:EncryptionContext:SecretARN"] == read["Resource"]
    actions = {
        a
        for s in imported.role_statements(smoke)
        for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    }
    assert not {a for a in actions if a.startswith(("secretsmanager:", "kms:"))} - {
        "secretsmanager:GetSecretValue",
        "kms:Decrypt",
    }
    assert not any(a.startswith(("lambda:", "autoscaling:")) for a in actions)  # the canary's, not the smoke test's


# A stage that creates its VPC gets no smoke step (its VPC ID exists only once the stage has deployed, so
# CodeBuild cannot join it): test_pipeline_stack.py's default synthesis ends each stage with the canary.
