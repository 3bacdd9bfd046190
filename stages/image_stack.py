"""ImageStack: the EC2 Image Builder pipeline that bakes the air-gapped Kubernetes AMI.

Recipe: Amazon Linux 2023 (parent image from the public SSM parameter, resolved by Image Builder at each
build, so every build starts from the latest patched AL2023) plus the components in
``imagebuilder/components/`` rendered from ``imagebuilder/versions.json``. The build instance uses
IamStack's Image Builder instance profile (by name; ``build_role="iam-stack"``, the manual path) or, in the
pipeline's ImageStage (``build_role="own"``), a role and instance profile of this stack with the same
statements (``stages.iam_stack.image_builder_statements``), so the image can be built before any IamStack
exists. It runs in a private subnet, is terminated on failure and logs to S3. Distribution encrypts the
AMI with this stack's KMS key, names it after the Kubernetes version, and writes the AMI ID to the SSM
parameter that ``ClusterConfig.ami`` names (Image Builder's own distribution SSM parameter setting, so no
Lambda or custom resource is needed).

Every name that must change with the content carries a digest of it: a component's name carries its
rendered document's digest and the recipe's name the Kubernetes version plus the digest of all of them,
because Image Builder components and recipes are immutable name/version pairs.
"""

from __future__ import annotations

import json
from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_imagebuilder as imagebuilder
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_assets as s3_assets
from constructs import Construct

from imagebuilder.bundle import agent_bundle_dir
from imagebuilder.versions import (
    Versions,
    component_files,
    component_name,
    dashed,
    load_versions,
    render_component,
    short_digest,
)
from stages.cluster_state import VOLUME_KEY_ACTIONS, grant_auto_scaling_volumes
from stages.config import ClusterConfig, ConfigError, bucket_name_problem
from stages.iam_stack import IMAGE_BUILDER_WILDCARDS_REASON, image_builder_statements, image_builder_wildcards
from stages.nag import skip_checkov, suppress

# Amazon Linux 2023, x86_64, the default kernel: the public parameter AWS keeps pointing at the latest AMI.
PARENT_IMAGE_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
BUILD_INSTANCE_TYPES = ("m6i.large",)
ROOT_VOLUME_GIB = 40  # images (~1.5 GB), binaries, and room for kubelet's image GC thresholds
# Where the build instance's role comes from: IamStack's profile by name, or this stack's own.
BUILD_ROLES = ("iam-stack", "own")


def pipeline_name(config: ClusterConfig) -> str:
    """The image pipeline's name; ``scripts/build-k8s-ami-imagebuilder.sh`` finds the pipeline by it."""
    return f"{config.resource_prefix}-kubernetes-ami"


def ami_parameter_name(config: ClusterConfig) -> str:
    """The SSM parameter the cluster reads its AMI from (ClusterConfig's default ``ami`` for this version).

    If the operator pinned ``ami`` to an AMI ID, the image still goes to the parameter the default would name.
    """
    if config.ami_is_ssm_parameter:
        return config.ami
    return ClusterConfig.from_mapping({"kubernetesVersion": config.kubernetes_version}).ami


class ImageStack(cdk.Stack):
    """Components, recipe, infrastructure and distribution configurations, and the image pipeline."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: ClusterConfig,
        build_vpc_id: str | None = None,
        build_subnet_id: str | None = None,
        build_role: str = "iam-stack",
        build_network_parameters: tuple[str, str] | None = None,
        versions: Versions | None = None,
        **kwargs: Any,
    ) -> None:
        """``build_vpc_id`` / ``build_subnet_id``: the build network (values or deploy-time tokens); when not
        given, the stack takes them as the CloudFormation parameters BuildVpcId / BuildSubnetId, which
        ``build_network_parameters`` (SSM parameter names: VPC ID, subnet ID) lets CloudFormation read from SSM.
        ``build_role``: "iam-stack" uses IamStack's Image Builder instance profile by name (deploy IamStack
        first); "own" creates this stack's least-privilege build role and instance profile.
        """
        if build_role not in BUILD_ROLES:
            raise ValueError(f"build_role = {build_role!r}: must be one of {', '.join(BUILD_ROLES)}")
        super().__init__(scope, construct_id, **kwargs)
        self.config = config
        self.versions = versions or load_versions()
        if self.versions.kubernetes != config.kubernetes_version:
            raise ConfigError(
                [
                    f"'kubernetesVersion' = \"{config.kubernetes_version}\": the AMI carries Kubernetes "
                    f"{self.versions.kubernetes} (imagebuilder/versions.json); change the version there, not in context"
                ]
            )
        cdk.Tags.of(self).add(ClusterConfig.CLUSTER_TAG_KEY, config.cluster_name)
        prefix = config.resource_prefix

        vpc_ssm, subnet_ssm = build_network_parameters or (None, None)
        vpc_id = build_vpc_id or self._parameter(
            "BuildVpcId", "AWS::EC2::VPC::Id", "VPC of the private build subnet", from_ssm=vpc_ssm
        )
        subnet_id = build_subnet_id or self._parameter(
            "BuildSubnetId",
            "AWS::EC2::Subnet::Id",
            "Private subnet for the build instance: HTTPS egress (NAT or proxy) to the release hosts at build "
            "time only, plus the S3 gateway endpoint for the Amazon Linux repositories",
            from_ssm=subnet_ssm,
        )

        self.key = self._key()
        self.logs_bucket = self._logs_bucket()
        self.security_group = self._security_group(vpc_id)
        self.build_role: iam.Role | None = None
        if build_role == "own":
            self.build_role, instance_profile_name = self._own_build_role()
        else:
            instance_profile_name = config.image_builder_role_name

        bundle = s3_assets.Asset(self, "NodeAgentBundle", path=str(agent_bundle_dir()))
        self.components = self._components(bundle)
        # Recipes are immutable: anything that shapes it (components, parent, volume) goes into its name.
        digest = short_digest(PARENT_IMAGE_PARAMETER, str(ROOT_VOLUME_GIB), *self._component_digests)
        self.recipe_name = f"{prefix}-k8s-{dashed(self.versions.kubernetes)}-{digest}"
        self.recipe = imagebuilder.CfnImageRecipe(
            self,
            "Recipe",
            name=self.recipe_name,
            version="1.0.0",
            description=f"Kubernetes {self.versions.kubernetes} on Amazon Linux 2023, air-gapped (dedicated-k8s)",
            parent_image=f"ssm:{PARENT_IMAGE_PARAMETER}",
            components=[
                imagebuilder.CfnImageRecipe.ComponentConfigurationProperty(component_arn=c.attr_arn)
                for c in self.components
            ],
            block_device_mappings=[
                imagebuilder.CfnImageRecipe.InstanceBlockDeviceMappingProperty(
                    device_name="/dev/xvda",
                    ebs=imagebuilder.CfnImageRecipe.EbsInstanceBlockDeviceSpecificationProperty(
                        volume_size=ROOT_VOLUME_GIB,
                        volume_type="gp3",
                        encrypted=True,
                        kms_key_id=self.key.key_arn,
                        delete_on_termination=True,
                    ),
                )
            ],
            additional_instance_configuration=imagebuilder.CfnImageRecipe.AdditionalInstanceConfigurationProperty(
                systems_manager_agent=imagebuilder.CfnImageRecipe.SystemsManagerAgentProperty(
                    uninstall_after_build=False
                )
            ),
        )

        self.infrastructure = imagebuilder.CfnInfrastructureConfiguration(
            self,
            "Infrastructure",
            name=f"{prefix}-kubernetes-ami",
            description=(
                "Build instance: "
                + ("this stack's build profile" if self.build_role else "IamStack's Image Builder profile")
                + ", private subnet, IMDSv2, logs to S3"
            ),
            instance_profile_name=instance_profile_name,
            instance_types=list(BUILD_INSTANCE_TYPES),
            subnet_id=subnet_id,
            security_group_ids=[self.security_group.attr_group_id],
            terminate_instance_on_failure=True,
            logging=imagebuilder.CfnInfrastructureConfiguration.LoggingProperty(
                s3_logs=imagebuilder.CfnInfrastructureConfiguration.S3LogsProperty(
                    s3_bucket_name=self.logs_bucket.bucket_name, s3_key_prefix="builds"
                )
            ),
            instance_metadata_options=imagebuilder.CfnInfrastructureConfiguration.InstanceMetadataOptionsProperty(
                http_tokens="required", http_put_response_hop_limit=1
            ),
            resource_tags={ClusterConfig.CLUSTER_TAG_KEY: config.cluster_name},
        )

        self.ami_parameter_name = ami_parameter_name(config)
        self.distribution = imagebuilder.CfnDistributionConfiguration(
            self,
            "Distribution",
            name=f"{prefix}-kubernetes-ami",
            description=f"KMS-encrypted AMI, ID written to {self.ami_parameter_name}",
            distributions=[
                imagebuilder.CfnDistributionConfiguration.DistributionProperty(
                    region=self.region,
                    # The L1 types this property as a plain object: CloudFormation's own (PascalCase) keys.
                    ami_distribution_configuration={
                        "Name": f"{prefix}-kubernetes-{self.versions.kubernetes}-{{{{ imagebuilder:buildDate }}}}",
                        "Description": f"dedicated-k8s: Kubernetes {self.versions.kubernetes}, every image pre-pulled",
                        "KmsKeyId": self.key.key_arn,
                        "AmiTags": {
                            ClusterConfig.CLUSTER_TAG_KEY: config.cluster_name,
                            "dedicated-k8s:kubernetes-version": self.versions.kubernetes,
                            "dedicated-k8s:recipe": self.recipe_name,
                        },
                    },
                    ssm_parameter_configurations=[
                        imagebuilder.CfnDistributionConfiguration.SsmParameterConfigurationProperty(
                            parameter_name=self.ami_parameter_name, data_type="aws:ec2:image"
                        )
                    ],
                )
            ],
        )

        self.pipeline = imagebuilder.CfnImagePipeline(
            self,
            "Pipeline",
            name=pipeline_name(config),
            description=f"dedicated-k8s {config.cluster_name}: the air-gapped Kubernetes AMI (run by the build script)",
            image_recipe_arn=self.recipe.attr_arn,
            infrastructure_configuration_arn=self.infrastructure.attr_arn,
            distribution_configuration_arn=self.distribution.attr_arn,
            image_tests_configuration=imagebuilder.CfnImagePipeline.ImageTestsConfigurationProperty(
                image_tests_enabled=True, timeout_minutes=90
            ),
            enhanced_image_metadata_enabled=True,
            status="ENABLED",
        )

        cdk.CfnOutput(self, "PipelineArn", value=self.pipeline.attr_arn)
        cdk.CfnOutput(self, "PipelineName", value=pipeline_name(config))
        cdk.CfnOutput(self, "AmiParameterName", value=self.ami_parameter_name)
        cdk.CfnOutput(self, "LogsBucketName", value=self.logs_bucket.bucket_name)
        cdk.CfnOutput(self, "RecipeName", value=self.recipe_name)

    # ---- pieces ------------------------------------------------------------------------------

    def _parameter(self, name: str, type_: str, description: str, *, from_ssm: str | None = None) -> str:
        if from_ssm is not None:
            # CloudFormation resolves the SSM parameter at deploy time and validates the ID's type.
            return cdk.CfnParameter(
                self,
                name,
                type=f"AWS::SSM::Parameter::Value<{type_}>",
                default=from_ssm,
                description=f"{description} (read from the SSM parameter {from_ssm})",
            ).value_as_string
        return cdk.CfnParameter(self, name, type=type_, description=description).value_as_string

    def _own_build_role(self) -> tuple[iam.Role, str]:
        """The build instance's role and profile, with IamStack's Image Builder statements (one definition).

        Names are generated by CloudFormation: this stack never collides with an IamStack's role of the
        deterministic name in the same account.
        """
        role = iam.Role(
            self,
            "BuildRole",
            description=f"dedicated-k8s {self.config.cluster_name}: the Image Builder build instance",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
        )
        profile = iam.CfnInstanceProfile(self, "BuildInstanceProfile", roles=[role.role_name])
        policy = iam.Policy(self, "BuildPolicy", statements=image_builder_statements(self, self.config))
        policy.attach_to_role(role)
        suppress(
            policy, "AwsSolutions-IAM5", IMAGE_BUILDER_WILDCARDS_REASON, applies_to=image_builder_wildcards(self.config)
        )
        skip_checkov(
            policy.node.default_child,  # type: ignore[arg-type]
            [
                (
                    "CKV_AWS_111",
                    "writes on '*' are only the SSM agent's channels, which have no resource-level permissions",
                )
            ],
        )
        return role, profile.ref

    def _key(self) -> kms.Key:
        key = kms.Key(
            self,
            "AmiKey",
            alias=f"alias/{self.config.resource_prefix}-ami",
            description=f"dedicated-k8s {self.config.cluster_name}: the Kubernetes AMI, its build volumes and logs",
            enable_key_rotation=True,
            removal_policy=cdk.RemovalPolicy.RETAIN_ON_UPDATE_OR_DELETE,  # not on a rolled-back create
        )
        # EC2 Auto Scaling launches the cluster's nodes from this AMI through its service-linked role.
        grant_auto_scaling_volumes(key)
        volume_actions = list(VOLUME_KEY_ACTIONS)
        # Image Builder (its service-linked role) copies and encrypts the AMI and launches the build and test
        # instances through EC2; principals of this account may use the key only through EC2 (the aws/ebs pattern).
        key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="ThisAccountThroughEc2",
                principals=[iam.AnyPrincipal()],
                actions=[*volume_actions, "kms:CreateGrant"],
                resources=["*"],
                conditions={
                    "StringEquals": {
                        "kms:CallerAccount": self.account,
                        "kms:ViaService": f"ec2.{self.region}.{self.url_suffix}",
                    }
                },
            )
        )
        skip_checkov(
            key.node.default_child,  # type: ignore[arg-type]
            [
                (
                    "CKV_AWS_33",
                    "'*' only with kms:CallerAccount = this account and kms:ViaService = EC2 (aws/ebs pattern)",
                )
            ],
        )
        return key

    def _logs_bucket(self) -> s3.Bucket:
        # The name matches IamStack's BuildLogs statement ({prefix}-imagebuilder-logs-*).
        region = self.config.region if cdk.Token.is_unresolved(self.region) else self.region
        probe = self.config.image_logs_bucket_name("0" * 12, region)
        problem = bucket_name_problem(probe, self.config.cluster_name)
        if problem:
            name = json.dumps(self.config.cluster_name)
            raise ConfigError([f"'clusterName' = {name}: too long for ImageStack in {region}: {problem}"])
        bucket = s3.Bucket(
            self,
            "BuildLogs",
            bucket_name=f"{self.config.resource_prefix}-imagebuilder-logs-{self.account}-{self.region}",
            encryption=s3.BucketEncryption.KMS,
            encryption_key=self.key,
            bucket_key_enabled=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            versioned=True,
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="build-logs",
                    expiration=cdk.Duration.days(90),
                    noncurrent_version_expiration=cdk.Duration.days(7),
                    abort_incomplete_multipart_upload_after=cdk.Duration.days(1),
                )
            ],
            removal_policy=cdk.RemovalPolicy.RETAIN_ON_UPDATE_OR_DELETE,  # not on a rolled-back create
        )
        reason = "holds only Image Builder build logs (written by the build role); logging a log bucket needs another"
        suppress(bucket, "AwsSolutions-S1", reason)
        skip_checkov(bucket.node.default_child, [("CKV_AWS_18", reason)])  # type: ignore[arg-type]
        return bucket

    def _security_group(self, vpc_id: str) -> ec2.CfnSecurityGroup:
        return ec2.CfnSecurityGroup(
            self,
            "BuildSecurityGroup",
            group_description="Image Builder build instance: no inbound; HTTPS out (AWS endpoints, release hosts)",
            vpc_id=vpc_id,
            security_group_egress=[
                ec2.CfnSecurityGroup.EgressProperty(
                    ip_protocol="tcp",
                    from_port=443,
                    to_port=443,
                    cidr_ip="0.0.0.0/0",
                    description="HTTPS: SSM/Image Builder endpoints, AL2023 repositories, pinned release downloads",
                )
            ],
        )

    def _components(self, bundle: s3_assets.Asset) -> list[imagebuilder.CfnComponent]:
        components: list[imagebuilder.CfnComponent] = []
        self._component_digests: list[str] = []
        for path in component_files():
            name = component_name(path)
            # The digest covers the rendered document with the bundle's content hash (the S3 URL is a token).
            digest = short_digest(render_component(path, self.versions, {"AGENT_BUNDLE_S3_URI": bundle.asset_hash}))
            self._component_digests.append(digest)
            data = render_component(path, self.versions, {"AGENT_BUNDLE_S3_URI": bundle.s3_object_url})
            components.append(
                imagebuilder.CfnComponent(
                    self,
                    f"Component-{name}",
                    name=f"{self.config.resource_prefix}-{name}-{digest}",
                    version="1.0.0",
                    platform="Linux",
                    supported_os_versions=["Amazon Linux 2023"],
                    description=f"dedicated-k8s {name} for Kubernetes {self.versions.kubernetes}",
                    change_description=f"versions.json digest {self.versions.digest()[:12]}",
                    data=data,
                    kms_key_id=self.key.key_arn,
                )
            )
        return components
