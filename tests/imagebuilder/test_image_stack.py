"""ImageStack: synth assertions, versions flowing into names, and cfn-lint / checkov / cdk-nag clean."""

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

from imagebuilder.versions import Versions, component_files, load_versions, parse_versions
from scripts.synth_and_check import run_cfn_lint, run_checkov
from stages.config import ClusterConfig, ConfigError
from stages.iam_stack import IamStack
from stages.image_stack import PARENT_IMAGE_PARAMETER, ImageStack, ami_parameter_name, pipeline_name
from stages.image_stage import ImageStage
from stages.nag import apply_policy_checks

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Synthesized:
    outdir: Path
    template: Template
    raw: dict[str, Any]
    stack: ImageStack
    nag_findings: list[str]
    config: ClusterConfig
    iam: dict[str, Any]


def _context() -> dict[str, Any]:
    return dict(json.loads((ROOT / "cdk.json").read_text())["context"])


def synth(outdir: Path, overrides: dict[str, Any] | None = None, versions: Versions | None = None) -> Synthesized:
    app = cdk.App(outdir=str(outdir), context={**_context(), **(overrides or {})})
    config = ClusterConfig.from_context(app.node.try_get_context)
    stack = ImageStack(
        app,
        "ImageStack",
        config=config,
        versions=versions,
        env=cdk.Environment(account=config.account, region=config.region),
        stack_name=f"{config.resource_prefix}-image",
    )
    # IamStack beside it, as in the app: the build instance's profile and policy come from there.
    env = cdk.Environment(account=config.account, region=config.region)
    IamStack(app, "IamStack", config=config, env=env, stack_name=f"{config.resource_prefix}-iam")
    apply_policy_checks(app)
    assembly = app.synth()
    artifact = assembly.get_stack_by_name(stack.stack_name)
    findings = [
        f"{m.id}: {str(m.entry.data)[:300]}"
        for m in artifact.messages
        if m.level in (cdk.cx_api.SynthesisMessageLevel.ERROR, cdk.cx_api.SynthesisMessageLevel.WARNING)
    ]
    raw = json.loads(Path(artifact.template_full_path).read_text())
    iam_template = assembly.get_stack_by_name(f"{config.resource_prefix}-iam").template
    return Synthesized(outdir, Template.from_json(raw), raw, stack, findings, config, iam_template)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    return synth(tmp_path_factory.mktemp("image-cdk.out"))


def _resources(image: Synthesized, type_: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in image.raw["Resources"].items() if v["Type"] == type_}


def _only(image: Synthesized, type_: str) -> dict[str, Any]:
    (resource,) = _resources(image, type_).values()
    return dict(resource["Properties"])


def _components(image: Synthesized) -> dict[str, dict[str, Any]]:
    """name -> properties of every component."""
    return {
        c["Properties"]["Name"]: c["Properties"] for c in _resources(image, "AWS::ImageBuilder::Component").values()
    }


def _component(image: Synthesized, marker: str) -> dict[str, Any]:
    (properties,) = [p for name, p in _components(image).items() if marker in name]
    return properties


def _key_ref(image: Synthesized) -> dict[str, Any]:
    (key_id,) = _resources(image, "AWS::KMS::Key")
    return {"Fn::GetAtt": [key_id, "Arn"]}


def test_recipe_starts_from_amazon_linux_2023_public_parameter(image: Synthesized) -> None:
    recipe = _only(image, "AWS::ImageBuilder::ImageRecipe")
    assert recipe["ParentImage"] == f"ssm:{PARENT_IMAGE_PARAMETER}"
    assert "al2023" in PARENT_IMAGE_PARAMETER


def test_recipe_runs_every_component_in_file_order(image: Synthesized) -> None:
    recipe = _only(image, "AWS::ImageBuilder::ImageRecipe")
    components = _resources(image, "AWS::ImageBuilder::Component")
    order = [c["ComponentArn"]["Fn::GetAtt"][0] for c in recipe["Components"]]
    names = [components[logical]["Properties"]["Name"] for logical in order]
    expected = [path.stem.split("-", 1)[1] for path in component_files()]
    assert [n.removeprefix("dk8s-dedicated-k8s-").rsplit("-", 1)[0] for n in names] == expected


def test_recipe_root_volume_is_encrypted_with_the_stack_key(image: Synthesized) -> None:
    (mapping,) = _only(image, "AWS::ImageBuilder::ImageRecipe")["BlockDeviceMappings"]
    assert mapping["Ebs"]["Encrypted"] is True
    assert mapping["Ebs"]["KmsKeyId"] == _key_ref(image)


def test_distribution_encrypts_the_ami_and_names_it_after_the_kubernetes_version(image: Synthesized) -> None:
    (distribution,) = _only(image, "AWS::ImageBuilder::DistributionConfiguration")["Distributions"]
    ami = distribution["AmiDistributionConfiguration"]
    assert ami["KmsKeyId"] == _key_ref(image)
    assert f"kubernetes-{load_versions().kubernetes}-" in ami["Name"]
    assert "{{ imagebuilder:buildDate }}" in ami["Name"]


def test_ami_id_goes_to_exactly_the_parameter_cluster_config_reads(image: Synthesized) -> None:
    (distribution,) = _only(image, "AWS::ImageBuilder::DistributionConfiguration")["Distributions"]
    default_config = ClusterConfig.from_context(_context().get)
    assert default_config.ami.startswith("/")
    assert distribution["SsmParameterConfigurations"] == [
        {"ParameterName": default_config.ami, "DataType": "aws:ec2:image"}
    ]


def test_an_operator_pinned_ami_id_still_publishes_to_the_default_parameter() -> None:
    pinned = ClusterConfig.from_mapping({"ami": "ami-0123456789abcdef0"})
    assert ami_parameter_name(pinned) == ClusterConfig.from_mapping({}).ami


def test_infrastructure_uses_iam_stack_profile_private_subnet_and_terminates_on_failure(image: Synthesized) -> None:
    infra = _only(image, "AWS::ImageBuilder::InfrastructureConfiguration")
    assert infra["InstanceProfileName"] == image.config.image_builder_role_name
    assert infra["TerminateInstanceOnFailure"] is True
    assert infra["SubnetId"] == {"Ref": "BuildSubnetId"}
    assert image.raw["Parameters"]["BuildSubnetId"]["Type"] == "AWS::EC2::Subnet::Id"
    assert infra["InstanceMetadataOptions"]["HttpTokens"] == "required"
    (bucket_id,) = _resources(image, "AWS::S3::Bucket")
    assert infra["Logging"]["S3Logs"]["S3BucketName"] == {"Ref": bucket_id}


def test_the_build_profile_exists_in_iam_stack_with_what_the_build_needs(image: Synthesized) -> None:
    infra = _only(image, "AWS::ImageBuilder::InfrastructureConfiguration")
    profiles = [r["Properties"] for r in image.iam["Resources"].values() if r["Type"] == "AWS::IAM::InstanceProfile"]
    assert infra["InstanceProfileName"] in [p["InstanceProfileName"] for p in profiles]
    statements = [
        statement
        for r in image.iam["Resources"].values()
        if r["Type"] == "AWS::IAM::Policy"
        for statement in r["Properties"]["PolicyDocument"]["Statement"]
    ]
    text = json.dumps(statements)
    prefix = image.config.resource_prefix
    assert f"{prefix}-imagebuilder-logs-*/*" in text  # build logs into this stack's bucket
    assert "cdk-*-assets-*/*" in text  # the node agent bundle asset
    assert "imagebuilder:GetComponent" in text
    # This stack's key (components, logs bucket) is usable by the role through the cluster tag.
    assert f"aws:ResourceTag/{ClusterConfig.CLUSTER_TAG_KEY}" in text


def test_this_stack_creates_no_iam(image: Synthesized) -> None:
    # The build instance's role and instance profile live in IamStack; this stack uses them by name.
    for type_ in ("AWS::IAM::Role", "AWS::IAM::Policy", "AWS::IAM::InstanceProfile", "AWS::IAM::ManagedPolicy"):
        image.template.resource_count_is(type_, 0)


def test_logs_bucket_matches_iam_stack_build_logs_statement(image: Synthesized) -> None:
    bucket = _only(image, "AWS::S3::Bucket")
    name = bucket["BucketName"]["Fn::Join"][1][0]
    assert name.startswith(f"{image.config.resource_prefix}-imagebuilder-logs-")
    image.template.has_resource_properties(
        "AWS::S3::Bucket",
        {
            "BucketEncryption": {
                "ServerSideEncryptionConfiguration": [
                    Match.object_like({"ServerSideEncryptionByDefault": Match.object_like({"SSEAlgorithm": "aws:kms"})})
                ]
            },
            "PublicAccessBlockConfiguration": Match.object_like({"BlockPublicAcls": True}),
        },
    )


def test_the_ami_key_carries_the_cluster_tag_iam_stack_scopes_kms_by(image: Synthesized) -> None:
    key = _only(image, "AWS::KMS::Key")
    assert {"Key": ClusterConfig.CLUSTER_TAG_KEY, "Value": image.config.cluster_name} in key["Tags"]
    assert key["EnableKeyRotation"] is True


def test_pipeline_runs_image_tests_and_is_found_by_name(image: Synthesized) -> None:
    pipeline = _only(image, "AWS::ImageBuilder::ImagePipeline")
    assert pipeline["Name"] == pipeline_name(image.config) == "dk8s-dedicated-k8s-kubernetes-ami"
    assert pipeline["ImageTestsConfiguration"] == {"ImageTestsEnabled": True, "TimeoutMinutes": 90}
    assert "Schedule" not in pipeline  # the build script starts it


def test_components_are_encrypted_and_carry_the_pinned_versions(image: Synthesized) -> None:
    versions = load_versions()
    components = {
        c["Properties"]["Name"]: c["Properties"] for c in _resources(image, "AWS::ImageBuilder::Component").values()
    }
    for properties in components.values():
        assert properties["KmsKeyId"] == _key_ref(image)
        assert properties["Platform"] == "Linux"
    images = _component(image, "-images-")
    for reference in versions.images:
        assert reference in images["Data"]


def test_node_agent_component_downloads_the_bundle_asset(image: Synthesized) -> None:
    agent = _component(image, "-node-agent-")
    data = json.dumps(agent["Data"])
    assert "@@" not in data
    assert "s3://" in data and "cdk-hnb659fds-assets" in data
    manifests = list(image.outdir.glob("asset.*/MANIFEST.json"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    assert manifest["kubernetes"] == load_versions().kubernetes
    assert (manifests[0].parent / "lib" / "node_agent" / "__main__.py").is_file()
    assert (manifests[0].parent / "systemd" / "dedicated-k8s-agent.service").is_file()


def test_a_kubernetes_version_that_differs_from_versions_json_is_refused(tmp_path: Path) -> None:
    carried = re.escape(load_versions().kubernetes)
    with pytest.raises(ConfigError, match=rf"'kubernetesVersion' = \"1.33.5\": the AMI carries Kubernetes {carried}"):
        synth(tmp_path, {"kubernetesVersion": "1.33.5"})


def test_one_versions_edit_changes_recipe_name_components_and_images(image: Synthesized, tmp_path: Path) -> None:
    raw = json.loads((ROOT / "imagebuilder" / "versions.json").read_text())
    pinned = raw["kubernetes"]
    major, minor, patch = pinned.split(".")
    newer = f"{major}.{minor}.{int(patch) + 1}"
    bumped = parse_versions(raw | {"kubernetes": newer})
    after = synth(tmp_path, {"kubernetesVersion": newer}, versions=bumped)
    before_recipe = _only(image, "AWS::ImageBuilder::ImageRecipe")["Name"]
    after_recipe = _only(after, "AWS::ImageBuilder::ImageRecipe")["Name"]
    assert before_recipe.startswith(f"dk8s-dedicated-k8s-k8s-{pinned.replace('.', '-')}-")
    assert after_recipe.startswith(f"dk8s-dedicated-k8s-k8s-{newer.replace('.', '-')}-")
    before_names = {c["Properties"]["Name"] for c in _resources(image, "AWS::ImageBuilder::Component").values()}
    after_names = {c["Properties"]["Name"] for c in _resources(after, "AWS::ImageBuilder::Component").values()}
    changed = {n.rsplit("-", 1)[0] for n in after_names - before_names}
    assert changed == {"dk8s-dedicated-k8s-kubernetes", "dk8s-dedicated-k8s-images"}
    images = _component(after, "-images-")["Data"]
    assert f"registry.k8s.io/kube-apiserver:v{newer}" in images
    (distribution,) = _only(after, "AWS::ImageBuilder::DistributionConfiguration")["Distributions"]
    assert f"kubernetes-{newer}-" in distribution["AmiDistributionConfiguration"]["Name"]


@pytest.mark.policy
@pytest.mark.xdist_group("policy")
def test_image_stack_is_cfn_lint_clean(image: Synthesized) -> None:
    assert run_cfn_lint([image.outdir / "ImageStack.template.json"]) == []


@pytest.mark.policy
@pytest.mark.xdist_group("policy")
def test_image_stack_is_checkov_clean(image: Synthesized, tmp_path: Path) -> None:
    # Only the template (the asset directories hold vendored boto3, which is not ours to scan).
    (tmp_path / "ImageStack.template.json").write_text(json.dumps(image.raw))
    passed, skipped, failed = run_checkov(tmp_path)
    assert failed == []
    assert passed >= 10
    assert skipped <= 3  # each skip carries its reason in the resource's metadata


def test_image_stack_has_no_unsuppressed_cdk_nag_finding(image: Synthesized) -> None:
    assert image.nag_findings == []


def test_bundle_is_pure_python(image: Synthesized) -> None:
    (asset_dir,) = [m.parent for m in image.outdir.glob("asset.*/MANIFEST.json")]
    native = [p for p in asset_dir.rglob("*") if p.suffix in (".so", ".pyd")]
    assert native == []


# --- the pipeline's variant: ImageStage, the stack owning its build role ----------------------------


@dataclass
class StageSynthesized:
    outdir: Path
    raw: dict[str, Any]
    config: ClusterConfig
    iam_policy: dict[str, Any]  # IamStack's Image Builder role policy document
    nag_findings: list[str]


def synth_stage(outdir: Path, **network: Any) -> StageSynthesized:
    app = cdk.App(outdir=str(outdir), context=_context())
    config = ClusterConfig.from_context(app.node.try_get_context)
    env = cdk.Environment(account=config.account, region=config.region)
    stage = ImageStage(app, "Ami", config=config, env=env, **network)
    iam = IamStack(app, "IamStack", config=config, env=env, stack_name=f"{config.resource_prefix}-iam")
    assembly = app.synth()
    stage_assembly = next(a.nested_assembly for a in assembly.nested_assemblies)
    artifact = stage_assembly.get_stack_by_name(stage.image.stack_name)
    findings = [
        f"{m.id}: {str(m.entry.data)[:300]}"
        for m in artifact.messages
        if m.level in (cdk.cx_api.SynthesisMessageLevel.ERROR, cdk.cx_api.SynthesisMessageLevel.WARNING)
    ]
    iam_template = assembly.get_stack_by_name(iam.stack_name).template
    (iam_policy,) = [
        r["Properties"]["PolicyDocument"]
        for r in iam_template["Resources"].values()
        if r["Type"] == "AWS::IAM::Policy"
        and {"Ref": _logical_id_of_role(iam_template, config.image_builder_role_name)} in r["Properties"]["Roles"]
    ]
    raw = json.loads(Path(artifact.template_full_path).read_text())
    return StageSynthesized(outdir, raw, config, iam_policy, findings)


def _logical_id_of_role(template: dict[str, Any], name: str) -> str:
    (logical_id,) = [
        k
        for k, r in template["Resources"].items()
        if r["Type"] == "AWS::IAM::Role" and r["Properties"]["RoleName"] == name
    ]
    return logical_id


SSM_NETWORK = ("/dk8s/pipeline/image-build-vpc-id", "/dk8s/pipeline/image-build-subnet-id")


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> StageSynthesized:
    return synth_stage(tmp_path_factory.mktemp("image-stage"), build_network_parameters=SSM_NETWORK)


def _of_type(raw: dict[str, Any], type_: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in raw["Resources"].items() if v["Type"] == type_}


def test_own_build_role_has_exactly_iam_stacks_image_builder_statements(own: StageSynthesized) -> None:
    (policy,) = _of_type(own.raw, "AWS::IAM::Policy").values()
    assert policy["Properties"]["PolicyDocument"] == own.iam_policy
    (role_id,) = _of_type(own.raw, "AWS::IAM::Role")
    assert policy["Properties"]["Roles"] == [{"Ref": role_id}]
    role = _of_type(own.raw, "AWS::IAM::Role")[role_id]["Properties"]
    assert role["AssumeRolePolicyDocument"]["Statement"] == [
        {"Action": "sts:AssumeRole", "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}}
    ]
    assert "ManagedPolicyArns" not in role and "Policies" not in role


def test_own_build_profile_is_the_infrastructures_and_never_iam_stacks_name(own: StageSynthesized) -> None:
    (profile_id,) = _of_type(own.raw, "AWS::IAM::InstanceProfile")
    (role_id,) = _of_type(own.raw, "AWS::IAM::Role")
    profile = _of_type(own.raw, "AWS::IAM::InstanceProfile")[profile_id]["Properties"]
    assert profile["Roles"] == [{"Ref": role_id}]
    (infra,) = _of_type(own.raw, "AWS::ImageBuilder::InfrastructureConfiguration").values()
    assert infra["Properties"]["InstanceProfileName"] == {"Ref": profile_id}
    # Generated names: no clash with an IamStack's deterministic role/profile name in the same account.
    assert own.config.image_builder_role_name not in json.dumps(own.raw)


def test_build_network_is_read_from_ssm_when_not_given(own: StageSynthesized) -> None:
    parameters = own.raw["Parameters"]
    assert parameters["BuildVpcId"]["Type"] == "AWS::SSM::Parameter::Value<AWS::EC2::VPC::Id>"
    assert parameters["BuildVpcId"]["Default"] == SSM_NETWORK[0]
    assert parameters["BuildSubnetId"]["Type"] == "AWS::SSM::Parameter::Value<AWS::EC2::Subnet::Id>"
    assert parameters["BuildSubnetId"]["Default"] == SSM_NETWORK[1]
    (infra,) = _of_type(own.raw, "AWS::ImageBuilder::InfrastructureConfiguration").values()
    assert infra["Properties"]["SubnetId"] == {"Ref": "BuildSubnetId"}


def test_build_network_ids_given_are_used_as_literals(tmp_path: Path) -> None:
    given = synth_stage(
        tmp_path,
        build_vpc_id="vpc-0123456789abcdef0",
        build_subnet_id="subnet-0123456789abcdef0",
        build_network_parameters=SSM_NETWORK,
    )
    assert not {"BuildVpcId", "BuildSubnetId"} & set(given.raw.get("Parameters", {}))
    (infra,) = _of_type(given.raw, "AWS::ImageBuilder::InfrastructureConfiguration").values()
    assert infra["Properties"]["SubnetId"] == "subnet-0123456789abcdef0"
    (group,) = _of_type(given.raw, "AWS::EC2::SecurityGroup").values()
    assert group["Properties"]["VpcId"] == "vpc-0123456789abcdef0"


@pytest.mark.parametrize(
    "network",
    [{"build_vpc_id": "vpc-0123456789abcdef0", "build_network_parameters": SSM_NETWORK}, {}],
)
def test_image_stage_refuses_half_a_build_network(network: dict[str, Any]) -> None:
    app = cdk.App(context=_context())
    config = ClusterConfig.from_context(app.node.try_get_context)
    with pytest.raises(ValueError, match="ImageStage"):
        ImageStage(app, "Ami", config=config, **network)


def test_unknown_build_role_is_refused() -> None:
    app = cdk.App(context=_context())
    config = ClusterConfig.from_context(app.node.try_get_context)
    with pytest.raises(ValueError, match="build_role"):
        ImageStack(app, "ImageStack", config=config, build_role="shared")


def test_own_build_role_stack_has_no_unsuppressed_cdk_nag_finding(own: StageSynthesized) -> None:
    assert own.nag_findings == []
