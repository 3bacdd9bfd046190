"""PipelineStack: the self-mutating pipeline's stages, steps, roles and sources, asserted on its templates."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Match, Template

from app import build_app
from pipeline.config import PipelineSettings
from pipeline.pipeline_stack import image_stage
from stages.config import ClusterConfig, ConfigError

ROOT = Path(__file__).resolve().parents[2]
ACCOUNT_LITERAL = re.compile(r"(?<![0-9A-Za-z])\d{12}(?![0-9A-Za-z])")
# AWS's own accounts that CDK writes from its region tables: Elastic Load Balancing's log delivery
# account for us-east-1 (the NLB access-log bucket policy). Not an account of ours.
AWS_SERVICE_ACCOUNTS = {"127311923021"}


def cdk_json_context() -> dict[str, Any]:
    return dict(json.loads((ROOT / "cdk.json").read_text())["context"])


@dataclass
class Synthesized:
    context: dict[str, Any]
    templates: dict[str, dict[str, Any]]  # hierarchical id -> template JSON

    @property
    def pipeline_json(self) -> dict[str, Any]:
        return self.templates["PipelineStack"]

    @property
    def pipeline(self) -> Template:
        return Template.from_json(self.pipeline_json)

    def resources(self, kind: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.pipeline_json["Resources"].items() if v["Type"] == kind}

    def stages(self) -> list[dict[str, Any]]:
        (codepipeline,) = self.resources("AWS::CodePipeline::Pipeline").values()
        return list(codepipeline["Properties"]["Stages"])

    def stage(self, name: str) -> list[dict[str, Any]]:
        (stage,) = [s for s in self.stages() if s["Name"] == name]
        return sorted(stage["Actions"], key=lambda a: a["RunOrder"])

    def project(self, logical_id: str) -> dict[str, Any]:
        return dict(self.pipeline_json["Resources"][logical_id]["Properties"])

    def buildspec(self, action: dict[str, Any]) -> dict[str, Any]:
        project = self.project(action["Configuration"]["ProjectName"]["Ref"])
        return dict(json.loads(project["Source"]["BuildSpec"]))

    def role_statements(self, action: dict[str, Any]) -> list[dict[str, Any]]:
        """Every statement of every policy attached to the CodeBuild project's role."""
        project = self.project(action["Configuration"]["ProjectName"]["Ref"])
        role = project["ServiceRole"]["Fn::GetAtt"][0]
        statements: list[dict[str, Any]] = []
        for policy in self.resources("AWS::IAM::Policy").values():
            if {"Ref": role} in policy["Properties"]["Roles"]:
                statements.extend(policy["Properties"]["PolicyDocument"]["Statement"])
        return statements


def synthesize(overrides: dict[str, Any] | None = None, tmp: Path | None = None) -> Synthesized:
    context = {**cdk_json_context(), **(overrides or {})}
    app = cdk.App(context=context, outdir=str(tmp) if tmp else None)
    build_app(app)
    assembly = app.synth()
    templates: dict[str, dict[str, Any]] = {}

    def collect(assembly: cdk.cx_api.CloudAssembly) -> None:
        for stack in assembly.stacks:
            templates[stack.hierarchical_id] = dict(stack.template)
        for nested in assembly.nested_assemblies:
            collect(nested.nested_assembly)

    collect(assembly)
    return Synthesized(context, templates)


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    return synthesize(tmp=tmp_path_factory.mktemp("default"))


CROSS_ACCOUNT = {
    "pipelineSource": "codecommit",
    "pipelineCodeCommitRepository": "dedicated-k8s",
    "pipelineAccount": "111111111111",
    "stagingAccount": "222222222222",
    "productionAccount": "333333333333",
    "codeArtifactDomain": "mirror",
    "codeArtifactRepository": "pypi-npm",
    "pipelineNotificationEmails": ["ops@example.com"],
}


@pytest.fixture(scope="module")
def cross_account(tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    return synthesize(CROSS_ACCOUNT, tmp=tmp_path_factory.mktemp("cross"))


@pytest.fixture(scope="module")
def s3_source(tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    return synthesize(
        {"pipelineSource": "s3", "pipelineS3Bucket": "dk8s-source-bucket"}, tmp=tmp_path_factory.mktemp("s3")
    )


# --- the app ------------------------------------------------------------------------------------


def test_pipeline_is_a_top_level_stack_beside_the_manual_ones(default: Synthesized) -> None:
    top_level = {name for name in default.templates if "/" not in name}
    assert top_level == {"IamStack", "ImageStack", "K8sClusterStack", "PipelineStack"}
    assert {"PipelineStack/Staging/IamStack", "PipelineStack/Staging/K8sClusterStack"} <= set(default.templates)
    assert "PipelineStack/Ami/ImageStack" in default.templates
    assert {"PipelineStack/Production/IamStack", "PipelineStack/Production/K8sClusterStack"} <= set(default.templates)


# --- stage order --------------------------------------------------------------------------------


def test_stages_run_source_build_selfmutation_ami_staging_production(default: Synthesized) -> None:
    names = [stage["Name"] for stage in default.stages()]
    # "Assets" (CDK Pipelines publishing the Lambda code) sits wherever CDK puts it before the deployments.
    assert [n for n in names if n != "Assets"] == ["Source", "Build", "UpdatePipeline", "Ami", "Staging", "Production"]
    # The image stack's node-agent bundle is an asset too: published before the Ami stage deploys it.
    assert names.index("Assets") < names.index("Ami")


def test_ami_stage_deploys_the_image_stack_then_builds_the_ami_before_staging(default: Synthesized) -> None:
    actions = default.stage("Ami")
    prefix = ClusterConfig.from_context(default.context.get).resource_prefix
    deploys = _deploys(actions)
    assert [a["Configuration"]["StackName"] for a in deploys if a["Name"].endswith(".Deploy")] == [f"{prefix}-image"]
    (build,) = [a for a in actions if a["Name"] == "BuildAmi"]
    assert build["ActionTypeId"]["Provider"] == "CodeBuild"
    # The AMI build starts only once the image pipeline (ImageStack) is deployed ...
    assert build["RunOrder"] > max(a["RunOrder"] for a in deploys)
    assert actions[-1] is build
    # ... and the whole Ami stage (one build, one AMI) precedes both cluster stages.
    names = [stage["Name"] for stage in default.stages()]
    assert names.index("Ami") < names.index("Staging") < names.index("Production")
    assert not any(a["Name"] == "BuildAmi" for s in ("Staging", "Production") for a in default.stage(s))


def test_pipelines_image_stack_owns_its_build_role_so_no_iam_stack_is_needed_first(default: Synthesized) -> None:
    image = default.templates["PipelineStack/Ami/ImageStack"]
    config = ClusterConfig.from_context(default.context.get)
    profiles = {k for k, r in image["Resources"].items() if r["Type"] == "AWS::IAM::InstanceProfile"}
    (infra,) = [r for r in image["Resources"].values() if r["Type"] == "AWS::ImageBuilder::InfrastructureConfiguration"]
    assert len(profiles) == 1 and infra["Properties"]["InstanceProfileName"] == {"Ref": profiles.pop()}
    assert config.image_builder_role_name not in json.dumps(image)
    # The pipeline the AMI step starts is the one this stack creates.
    (pipeline,) = [r for r in image["Resources"].values() if r["Type"] == "AWS::ImageBuilder::ImagePipeline"]
    assert pipeline["Properties"]["Name"] == f"{config.resource_prefix}-kubernetes-ami"


def synthesize_image_only(overrides: dict[str, Any], outdir: Path) -> dict[str, Any]:
    """The pipeline's ImageStage as PipelineStack builds it, without synthesizing the cluster stages."""
    app = cdk.App(context={**cdk_json_context(), **overrides}, outdir=str(outdir))
    config = ClusterConfig.from_context(app.node.try_get_context)
    settings = PipelineSettings.from_context(app.node.try_get_context)
    stage = image_stage(app, "Ami", config=config, settings=settings, env=cdk.Environment(region=config.region))
    return dict(stage.synth().get_stack_by_name(stage.image.stack_name).template)


def test_image_build_network_comes_from_ssm_unless_context_names_it(tmp_path: Path) -> None:
    config = ClusterConfig.from_context(cdk_json_context().get)
    parameters = synthesize_image_only({}, tmp_path / "ssm")["Parameters"]
    assert parameters["BuildSubnetId"]["Default"] == f"{config.ssm_prefix}/pipeline/image-build-subnet-id"
    assert parameters["BuildVpcId"]["Default"] == f"{config.ssm_prefix}/pipeline/image-build-vpc-id"
    given = synthesize_image_only(
        {"imageBuildVpcId": "vpc-0a1b2c3d", "imageBuildSubnetId": "subnet-0a1b2c3d4e5f60718"}, tmp_path / "ctx"
    )
    assert not {"BuildVpcId", "BuildSubnetId"} & set(given.get("Parameters", {}))
    (infra,) = [r for r in given["Resources"].values() if r["Type"] == "AWS::ImageBuilder::InfrastructureConfiguration"]
    assert infra["Properties"]["SubnetId"] == "subnet-0a1b2c3d4e5f60718"


def test_pipeline_mutates_itself_before_anything_is_deployed(default: Synthesized) -> None:
    (mutate,) = default.stage("UpdatePipeline")
    commands = default.buildspec(mutate)["phases"]["build"]["commands"]
    assert any(re.search(r"cdk -a \. deploy PipelineStack .*--require-approval=never", c) for c in commands)


def test_synth_runs_every_check_before_cdk_synth(default: Synthesized) -> None:
    (synth,) = default.stage("Build")
    spec = default.buildspec(synth)
    assert "make setup" in spec["phases"]["install"]["commands"]  # pinned requirements + npm ci
    commands = spec["phases"]["build"]["commands"]
    assert commands.index("make test") < commands.index("npx cdk synth")
    assert spec["env"]["shell"] == "bash"
    assert spec["phases"]["install"]["runtime-versions"] == {"python": "3.11", "nodejs": "20"}
    assert not any("codeartifact" in c for c in spec["phases"]["install"]["commands"])


def _deploys(actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [a for a in actions if a["ActionTypeId"]["Provider"] == "CloudFormation"]


@pytest.mark.parametrize("stage_name", ["Staging", "Production"])
def test_each_stage_deploys_iam_then_cluster_then_runs_the_canary(default: Synthesized, stage_name: str) -> None:
    actions = default.stage(stage_name)
    deploys = _deploys(actions)
    stacks = [a["Configuration"]["StackName"] for a in deploys if a["Name"].endswith(".Deploy")]
    assert stacks == [
        f"dk8s-{default.context[f'{stage_name.lower()}ClusterName']}-iam",
        f"dk8s-{default.context[f'{stage_name.lower()}ClusterName']}-cluster",
    ]
    canary = actions[-1]
    assert canary["Name"] == f"{stage_name}Canary"
    assert canary["ActionTypeId"]["Provider"] == "CodeBuild"
    assert canary["RunOrder"] > max(a["RunOrder"] for a in deploys)


def test_production_starts_with_the_manual_approval(default: Synthesized) -> None:
    actions = default.stage("Production")
    first, *rest = actions
    assert first["ActionTypeId"] == {"Category": "Approval", "Owner": "AWS", "Provider": "Manual", "Version": "1"}
    assert all(a["RunOrder"] > first["RunOrder"] for a in rest)
    assert not any(a["ActionTypeId"]["Provider"] == "Manual" for a in default.stage("Staging"))


# --- AMI --------------------------------------------------------------------------------------


def test_ami_step_builds_the_image_and_publishes_its_id_for_the_stages(default: Synthesized) -> None:
    (build,) = [a for a in default.stage("Ami") if a["Name"] == "BuildAmi"]
    commands = default.buildspec(build)["phases"]["build"]["commands"]
    assert any("./build-k8s-ami-imagebuilder.sh --region" in c and "pipefail" in c for c in commands)
    parameter = ClusterConfig.from_context(default.context.get).ami
    assert parameter.startswith("/")
    (publish,) = [c for c in commands if "ssm put-parameter" in c]
    assert f"--name {parameter}" in publish and '"$AMI_ID"' in publish and "aws:ec2:image" in publish
    assert default.buildspec(build)["env"]["exported-variables"] == ["AMI_ID"]
    # The stages read the same parameter at deploy time (CloudFormation SSM parameter type).
    cluster = default.templates["PipelineStack/Staging/K8sClusterStack"]
    defaults = [p.get("Default") for p in cluster.get("Parameters", {}).values()]
    assert parameter in defaults
    put = [s for s in default.role_statements(build) if "ssm:PutParameter" in _as_list(s["Action"])]
    assert len(put) == 1 and parameter[1:] in json.dumps(put[0]["Resource"])


# --- the canary ---------------------------------------------------------------------------------


def _env(action: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v["value"] for v in json.loads(action["Configuration"]["EnvironmentVariables"])}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


@pytest.mark.parametrize("stage_name", ["Staging", "Production"])
def test_canary_environment_comes_from_the_cluster_stack_outputs(default: Synthesized, stage_name: str) -> None:
    actions = default.stage(stage_name)
    (cluster_deploy,) = [a for a in actions if a["Name"].endswith("-cluster.Deploy")]
    namespace = cluster_deploy["Namespace"]
    outputs = default.templates[f"PipelineStack/{stage_name}/K8sClusterStack"]["Outputs"]
    env = _env(actions[-1])
    for variable, output in (
        ("CONTROL_PLANE_GROUP_NAMES", "ControlPlaneGroupNames"),
        ("CLUSTER_OPS_FUNCTION_NAME", "ClusterOpsFunctionName"),
        ("CLUSTER_NAME", "ClusterName"),
    ):
        assert env[variable] == f"#{{{namespace}.{output}}}"
        assert output in outputs
    assert env["AMI_ID"] == "#{Ami@BuildAmi.AMI_ID}"
    commands = default.buildspec(actions[-1])["phases"]["build"]["commands"]
    (run,) = [c for c in commands if c.startswith("python -m pipeline.canary")]
    assert "--region us-east-1" in run and "--expected-voters 3" in run and "--report canary/" in run


@pytest.mark.parametrize("stage_name", ["Staging", "Production"])
def test_canary_role_is_least_privilege(default: Synthesized, stage_name: str) -> None:
    canary = default.stage(stage_name)[-1]
    cluster = default.context[f"{stage_name.lower()}ClusterName"]
    statements = default.role_statements(canary)
    actions = [a for s in statements for a in _as_list(s["Action"])]
    assert all(a != "*" and not a.endswith(":*") for a in actions)
    by_sid = {s.get("Sid"): s for s in statements}
    invoke = by_sid["ClusterOps"]
    assert invoke["Action"] == "lambda:InvokeFunction"
    assert f"function:dk8s-{cluster}-cluster-ops" in json.dumps(invoke["Resource"])
    terminate = by_sid["ReplaceControlPlaneNodes"]
    assert terminate["Action"] == "autoscaling:TerminateInstanceInAutoScalingGroup"
    assert terminate["Condition"] == {"StringEquals": {"autoscaling:ResourceTag/dedicated-k8s:cluster": cluster}}
    assert f"autoScalingGroupName/dk8s-{cluster}-control-plane-*" in json.dumps(terminate["Resource"])
    assert by_sid["ReadGroups"]["Action"] == "autoscaling:DescribeAutoScalingGroups"


def test_stages_get_their_own_cluster_configuration(default: Synthesized) -> None:
    staging = Template.from_json(default.templates["PipelineStack/Staging/K8sClusterStack"])
    staging.has_resource_properties(
        "AWS::AutoScaling::AutoScalingGroup",
        {"AutoScalingGroupName": "dk8s-k8s-staging-workers-general", "MinSize": "1", "MaxSize": "3"},
    )
    production = Template.from_json(default.templates["PipelineStack/Production/K8sClusterStack"])
    production.has_resource_properties(
        "AWS::AutoScaling::AutoScalingGroup",
        {"AutoScalingGroupName": "dk8s-k8s-production-workers-general", "MinSize": "2", "MaxSize": "6"},
    )


# --- notifications, encryption, accounts ----------------------------------------------------------


def test_failures_and_approval_waits_are_notified_on_an_encrypted_topic(default: Synthesized) -> None:
    template = default.pipeline
    topics = template.find_resources(
        "AWS::SNS::Topic", {"Properties": {"TopicName": "dk8s-dedicated-k8s-pipeline-notifications"}}
    )
    assert len(topics) == 1 and "KmsMasterKeyId" in next(iter(topics.values()))["Properties"]
    (topic_id,) = topics
    # EventBridge, not CodeStar Notifications (which GovCloud and China do not have).
    template.resource_count_is("AWS::CodeStarNotifications::NotificationRule", 0)
    rules = [r["Properties"] for r in template.find_resources("AWS::Events::Rule").values()]
    notified = {}
    for rule in rules:
        if [t["Arn"] for t in rule.get("Targets", [])] == [{"Ref": topic_id}]:
            pattern = rule["EventPattern"]
            assert pattern["source"] == ["aws.codepipeline"]
            assert "Ref" in pattern["detail"]["pipeline"][0], "only this pipeline's events"
            notified[pattern["detail-type"][0]] = {k: v for k, v in pattern["detail"].items() if k != "pipeline"}
    assert notified == {
        "CodePipeline Pipeline Execution State Change": {"state": ["FAILED"]},
        "CodePipeline Action Execution State Change": {"state": ["STARTED"], "type": {"category": ["Approval"]}},
    }
    key_policies = [k["Properties"]["KeyPolicy"] for k in template.find_resources("AWS::KMS::Key").values()]
    principals = [s.get("Principal", {}).get("Service") for p in key_policies for s in p["Statement"]]
    assert "events.amazonaws.com" in principals, "EventBridge may encrypt for the topic"


def test_single_account_pipeline_has_no_cross_account_key(default: Synthesized) -> None:
    default.pipeline.resource_count_is("AWS::KMS::Key", 1)  # the notifications key only
    default.pipeline.has_resource_properties(
        "AWS::S3::Bucket",
        {
            "BucketEncryption": {
                "ServerSideEncryptionConfiguration": [{"ServerSideEncryptionByDefault": Match.any_value()}]
            }
        },
    )


def test_cross_account_stages_turn_on_the_pipeline_kms_key(cross_account: Synthesized) -> None:
    template = cross_account.pipeline
    template.resource_count_is("AWS::KMS::Key", 2)
    template.has_resource_properties("AWS::KMS::Key", {"EnableKeyRotation": True, "Description": Match.absent()})
    for project in cross_account.resources("AWS::CodeBuild::Project").values():
        assert "EncryptionKey" in project["Properties"]


def test_no_account_id_is_hard_coded(default: Synthesized, cross_account: Synthesized) -> None:
    for name, template in default.templates.items():
        assert set(ACCOUNT_LITERAL.findall(json.dumps(template))) <= AWS_SERVICE_ACCOUNTS, name
    assert ACCOUNT_LITERAL.findall(json.dumps(default.pipeline_json)) == []
    # Accounts given in context are the only ones that appear.
    given = {CROSS_ACCOUNT[k] for k in ("pipelineAccount", "stagingAccount", "productionAccount")}
    assert set(ACCOUNT_LITERAL.findall(json.dumps(cross_account.pipeline_json))) <= given


# --- sources --------------------------------------------------------------------------------------


def test_codeconnections_is_the_default_source_and_its_arn_comes_from_ssm(default: Synthesized) -> None:
    (source,) = default.stage("Source")
    assert source["ActionTypeId"]["Provider"] == "CodeStarSourceConnection"
    config = source["Configuration"]
    assert config["FullRepositoryId"] == default.context["pipelineRepository"]
    assert config["BranchName"] == "main"
    (parameter,) = [
        k for k, p in default.pipeline_json["Parameters"].items() if p.get("Default", "").endswith("/connection-arn")
    ]
    assert config["ConnectionArn"] == {"Ref": parameter}


def test_connection_arn_from_context_is_used_as_given() -> None:
    arn = "arn:aws:codeconnections:us-east-1:444444444444:connection/abc-123"
    settings = PipelineSettings.from_context({**cdk_json_context(), "pipelineConnectionArn": arn}.get)
    assert settings.source == "codeconnections" and settings.connection_arn == arn


def test_codecommit_source_with_codeartifact_mirror(cross_account: Synthesized) -> None:
    (source,) = cross_account.stage("Source")
    assert source["ActionTypeId"]["Provider"] == "CodeCommit"
    assert source["Configuration"]["RepositoryName"] == "dedicated-k8s"
    (synth,) = cross_account.stage("Build")
    install = cross_account.buildspec(synth)["phases"]["install"]["commands"]
    assert [c.split(" --tool ")[1].split()[0] for c in install if "codeartifact login" in c] == ["pip", "npm"]
    assert install.index("make setup") > max(i for i, c in enumerate(install) if "codeartifact login" in c)
    actions = [a for s in cross_account.role_statements(synth) for a in _as_list(s["Action"])]
    assert "codeartifact:GetAuthorizationToken" in actions and "sts:GetServiceBearerToken" in actions


def test_s3_source(s3_source: Synthesized) -> None:
    (source,) = s3_source.stage("Source")
    assert source["ActionTypeId"]["Provider"] == "S3"
    assert source["Configuration"]["S3Bucket"] == "dk8s-source-bucket"
    assert source["Configuration"]["S3ObjectKey"] == "dedicated-k8s/source.zip"


# --- configuration errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"pipelineSource": "github"}, "'pipelineSource'"),
        ({"pipelineRepository": None}, "'pipelineRepository'"),
        ({"pipelineSource": "codecommit"}, "'pipelineCodeCommitRepository'"),
        ({"pipelineConnectionArn": "arn:aws:s3:::bucket"}, "'pipelineConnectionArn'"),
        ({"stagingAccount": "12345"}, "'stagingAccount'"),
        ({"productionRegion": "moon-1"}, "'productionRegion'"),
        ({"stagingOverrides": {"controlPlaneCount": 4}}, "staging stage (stagingClusterName, stagingOverrides)"),
        ({"productionOverrides": {"bogus": 1}}, "'productionOverrides.bogus'"),
        ({"productionOverrides": "[1]"}, "'productionOverrides'"),
        ({"stagingClusterName": "a-very-long-staging-name"}, "'stagingClusterName'"),
        ({"codeArtifactDomain": "mirror"}, "'codeArtifactRepository'"),
        ({"imageBuildVpcId": "vpc-12", "imageBuildSubnetId": "subnet-0a1b2c3d"}, "'imageBuildVpcId'"),
        ({"imageBuildVpcId": "vpc-0a1b2c3d", "imageBuildSubnetId": "sg-0a1b2c3d"}, "'imageBuildSubnetId'"),
        ({"imageBuildSubnetId": "subnet-0a1b2c3d"}, "'imageBuildVpcId'"),
        ({"imageBuildVpcId": "vpc-0a1b2c3d"}, "'imageBuildSubnetId'"),
    ],
)
def test_bad_pipeline_context_names_the_key(overrides: dict[str, Any], named: str) -> None:
    context = {**cdk_json_context(), **overrides}
    with pytest.raises(ConfigError) as err:
        PipelineSettings.from_context(context.get)
    assert named in str(err.value)


def test_bad_pipeline_context_stops_the_app_before_any_stack() -> None:
    app = cdk.App(context={**cdk_json_context(), "stagingAccount": "not-an-account"})
    with pytest.raises(ConfigError, match="'stagingAccount'"):
        build_app(app)
    assert app.node.children == []


def test_stage_clusters_are_named_after_the_cluster_unless_named_explicitly() -> None:
    context = {k: v for k, v in cdk_json_context().items() if not k.endswith("ClusterName")}
    settings = PipelineSettings.from_context({**context, "clusterName": "blue"}.get)
    assert settings.staging.config is not None and settings.production.config is not None
    assert settings.staging.config.cluster_name == "blue-staging"
    assert settings.production.config.cluster_name == "blue-production"
    assert settings.staging.config.control_plane_group_names[0] == "dk8s-blue-staging-control-plane-0"


def test_stage_in_another_region_gets_that_regions_zones() -> None:
    settings = PipelineSettings.from_context({**cdk_json_context(), "productionRegion": "eu-west-1"}.get)
    assert settings.production.config is not None
    assert settings.production.config.availability_zones == ("eu-west-1a", "eu-west-1b", "eu-west-1c")
    assert settings.staging.config is not None and settings.staging.config.region == "us-east-1"


def test_pipeline_keys_are_not_unknown_cluster_keys() -> None:
    context = cdk_json_context()
    assert any(k.startswith(("pipeline", "staging", "production")) for k in context)
    ClusterConfig.from_mapping(context)  # accepted: the pipeline's keys belong to PipelineSettings
    with pytest.raises(ConfigError, match="'clusterNmae'"):
        ClusterConfig.from_mapping({**context, "clusterNmae": "x"})


# --- the rollout of a new AMI (before the canary) ------------------------------------------------


@pytest.mark.parametrize("stage_name", ["Staging", "Production"])
def test_each_stage_rolls_the_new_ami_out_after_its_deploy_and_before_its_canary(
    default: Synthesized, stage_name: str
) -> None:
    actions = default.stage(stage_name)
    by_name = {a["Name"]: a for a in actions}
    rollout, canary = by_name[f"{stage_name}Rollout"], by_name[f"{stage_name}Canary"]
    assert rollout["ActionTypeId"]["Provider"] == "CodeBuild"
    assert max(a["RunOrder"] for a in _deploys(actions)) < rollout["RunOrder"] < canary["RunOrder"]
    (cluster_deploy,) = [a for a in actions if a["Name"].endswith("-cluster.Deploy")]
    namespace = cluster_deploy["Namespace"]
    env = _env(rollout)
    for variable, output in (
        ("CONTROL_PLANE_GROUP_NAMES", "ControlPlaneGroupNames"),
        ("WORKER_GROUP_NAMES", "WorkerGroupNames"),
        ("CLUSTER_OPS_FUNCTION_NAME", "ClusterOpsFunctionName"),
    ):
        assert env[variable] == f"#{{{namespace}.{output}}}"
    commands = default.buildspec(rollout)["phases"]["build"]["commands"]
    (run,) = [c for c in commands if c.startswith("python -m pipeline.rollout")]
    assert "--region us-east-1" in run and "--report rollout/" in run


@pytest.mark.parametrize("stage_name", ["Staging", "Production"])
def test_rollout_role_may_refresh_only_this_clusters_groups(default: Synthesized, stage_name: str) -> None:
    rollout = {a["Name"]: a for a in default.stage(stage_name)}[f"{stage_name}Rollout"]
    cluster = default.context[f"{stage_name.lower()}ClusterName"]
    statements = default.role_statements(rollout)
    actions = {a for s in statements for a in _as_list(s["Action"])}
    assert "autoscaling:TerminateInstanceInAutoScalingGroup" not in actions
    assert not any(a == "*" or a.endswith(":*") or a.startswith("ec2:") for a in actions)
    by_sid = {s.get("Sid"): s for s in statements}
    assert by_sid["ClusterOps"]["Action"] == "lambda:InvokeFunction"
    assert f"function:dk8s-{cluster}-cluster-ops" in json.dumps(by_sid["ClusterOps"]["Resource"])
    assert by_sid["ReadInstanceRefreshes"]["Action"] == "autoscaling:DescribeInstanceRefreshes"
    refresh = by_sid["RefreshClusterGroups"]
    assert sorted(refresh["Action"]) == ["autoscaling:CancelInstanceRefresh", "autoscaling:StartInstanceRefresh"]
    assert refresh["Condition"] == {"StringEquals": {"autoscaling:ResourceTag/dedicated-k8s:cluster": cluster}}
    resources = [json.dumps(r) for r in _as_list(refresh["Resource"])]
    assert sum(f"autoScalingGroupName/dk8s-{cluster}-control-plane-" in r for r in resources) == 3
    assert sum(f"autoScalingGroupName/dk8s-{cluster}-workers-general" in r for r in resources) == 1
    assert len(resources) == 4
    resources_text = " ".join(resources)
    assert "autoScalingGroupName/*" not in resources_text and f"dk8s-{cluster}-*" not in resources_text


# --- the preflight before each stage's deploy ------------------------------------------------------


@pytest.mark.parametrize("stage_name", ["Staging", "Production"])
def test_each_stage_deploy_is_preceded_by_a_read_only_preflight(default: Synthesized, stage_name: str) -> None:
    """``python -m pipeline.preflight`` runs before the stage's first CloudFormation action (after production's
    approval), on the stage's configuration and the synth step's assembly of that stage, with a role that may make
    exactly the preflight's reads (pipeline/preflight.py READ_ACTIONS) and nothing else beyond CodeBuild's own."""
    from pipeline.preflight import READ_ACTIONS

    actions = default.stage(stage_name)
    (preflight,) = [a for a in actions if a["Name"] == f"{stage_name}Preflight"]
    assert preflight["ActionTypeId"]["Provider"] == "CodeBuild"
    assert preflight["RunOrder"] < min(a["RunOrder"] for a in _deploys(actions))
    if stage_name == "Production":
        (approval,) = [a for a in actions if a["ActionTypeId"]["Category"] == "Approval"]
        assert approval["RunOrder"] < preflight["RunOrder"]
    commands = default.buildspec(preflight)["phases"]["build"]["commands"]
    (run,) = [c for c in commands if c.startswith("python -m pipeline.preflight")]
    assert run == (
        f"python -m pipeline.preflight --stage {stage_name.lower()} --region us-east-1 "
        f"--assembly cdk.out/assembly-PipelineStack-{stage_name}"
    )
    statements = default.role_statements(preflight)
    preflight_actions = {
        a for s in statements if s.get("Sid", "").startswith("Preflight") for a in _as_list(s["Action"])
    }
    assert preflight_actions == set(READ_ACTIONS)
    # Everything else on the role is CodeBuild's plumbing: its logs, its reports, the pipeline's artifacts.
    others = [s for s in statements if not s.get("Sid", "").startswith("Preflight")]
    plumbing = ("PipelineArtifactsBucket", "log-group:/aws/codebuild/", ":report-group/")
    for statement in others:
        assert any(p in json.dumps(statement["Resource"]) for p in plumbing), statement
    reads = ("Describe", "Get", "List")
    writes = {a for s in statements for a in _as_list(s["Action"]) if not a.split(":")[1].startswith(reads)}
    allowed_plumbing_writes = {
        "logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "codebuild:CreateReportGroup",
        "codebuild:CreateReport", "codebuild:UpdateReport", "codebuild:BatchPutTestCases",
        "codebuild:BatchPutCodeCoverages", "kms:Decrypt", "kms:Encrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*",
        "s3:Abort*", "s3:DeleteObject*", "s3:PutObject", "s3:PutObjectLegalHold", "s3:PutObjectRetention",
        "s3:PutObjectTagging", "s3:PutObjectVersionTagging",
    }  # fmt: skip
    assert writes <= allowed_plumbing_writes, writes - allowed_plumbing_writes
    cluster = default.context[f"{stage_name.lower()}ClusterName"]
    by_action = {a: s for s in statements if s.get("Sid", "").startswith("Preflight") for a in _as_list(s["Action"])}
    assert f"table/dk8s-{cluster}-cluster-state" in json.dumps(by_action["dynamodb:DescribeTable"]["Resource"])
    assert f"secret:dedicated-k8s/{cluster}/*" in json.dumps(by_action["secretsmanager:DescribeSecret"]["Resource"])
    assert by_action["ec2:DescribeInstanceTypeOfferings"]["Resource"] == "*"
