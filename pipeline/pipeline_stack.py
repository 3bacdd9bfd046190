"""PipelineStack: the self-mutating CDK Pipeline that promotes IamStack + K8sClusterStack.

    Source -> Build (make test, npx cdk synth) -> UpdatePipeline (self-mutation) -> Assets
        -> Ami (deploy ImageStack: the Image Builder pipeline and its own build role; then BuildAmi runs it
           once and writes the AMI ID to the SSM parameter both stages' cluster config reads)
        -> Staging (IamStack, K8sClusterStack, then the quorum canary, then the smoke test)
        -> Production (manual approval, IamStack, K8sClusterStack, then the quorum canary, then the smoke test)

Failures and approval waits are announced on a KMS-encrypted SNS topic through EventBridge rules on the
pipeline's own state-change events (CodeStar Notifications does not exist in GovCloud or China; EventBridge
does, in every partition). Every CodeBuild role is scoped to what its step does; the few wildcards that AWS
requires (describe calls without resource-level permissions) are suppressed next to the step with the
reason.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_codebuild as codebuild
from aws_cdk import aws_codecommit as codecommit
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_ssm as ssm
from aws_cdk import pipelines
from constructs import Construct

from pipeline.config import PipelineSettings, StageTarget
from pipeline.preflight import READ_ACTIONS
from stages.cluster_stage import ClusterStage
from stages.config import ClusterConfig
from stages.image_stage import ImageStage
from stages.nag import skip_checkov, suppress

# The CDK CLI the pipeline's own actions (self-mutation, asset publishing) install: the one package.json pins.
CDK_CLI_VERSION = "2.1148.1"
AMI_BUILD_SCRIPT = "build-k8s-ami-imagebuilder.sh"
# Events of the pipeline that someone must hear about.
# EventBridge detail-type -> the detail that makes it worth a message (failed runs; approvals waiting).
NOTIFIED_EVENTS: dict[str, dict[str, Any]] = {
    "CodePipeline Pipeline Execution State Change": {"state": ["FAILED"]},
    "CodePipeline Action Execution State Change": {"state": ["STARTED"], "type": {"category": ["Approval"]}},
}
_RUNTIMES = {"python": "3.11", "nodejs": "20"}
# What `python -m pipeline.smoke` and `python -m pipeline.smoke.kubeconfig` import, at requirements.txt's pins. The
# smoke step runs inside the cluster's VPC, which has no route to a package index: the synth step downloads these
# wheels (same image, same Python) and hands them over as an artifact.
SMOKE_PACKAGES = (
    "aiohappyeyeballs|aiohttp|aiohttp-retry|aiosignal|annotated-types|attrs|boto3|botocore|certifi|cffi|"
    "charset-normalizer|cryptography|durationpy|frozenlist|idna|jmespath|kubernetes|multidict|oauthlib|propcache|"
    "pycparser|pydantic|pydantic_core|python-dateutil|PyYAML|requests|requests-oauthlib|s3transfer|six|"
    "typing-inspection|typing_extensions|urllib3|websocket-client|yarl"
)
SMOKE_REQUIREMENTS = f"$(grep -E '^({SMOKE_PACKAGES})==' requirements.txt)"
SMOKE_WHEELS = "smoke-wheels"
# How cdk-nag prints a region / account inside a finding: a token name or a literal.
_REGION = r"(<AWS::Region>|[a-z0-9-]+)"
_ACCOUNT = r"(<AWS::AccountId>|\d{12})"


def _partial_build_spec(**extra: Any) -> codebuild.BuildSpec:
    """Pinned runtimes and bash (``set -o pipefail`` works) for every step."""
    return codebuild.BuildSpec.from_object(
        {"env": {"shell": "bash", **extra}, "phases": {"install": {"runtime-versions": _RUNTIMES}}}
    )


class PipelineStack(cdk.Stack):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: ClusterConfig,
        settings: PipelineSettings,
        **kwargs: Any,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.config = config
        self.settings = settings
        staging = _stage_config(settings.staging)
        production = _stage_config(settings.production)

        self.source = self._source()
        self.synth_step = self._synth_step()
        self.pipeline = pipelines.CodePipeline(
            self,
            "Pipeline",
            pipeline_name=f"{config.resource_prefix}-pipeline",
            synth=self.synth_step,
            self_mutation=True,
            cross_account_keys=settings.cross_account,
            enable_key_rotation=settings.cross_account or None,
            cli_version=CDK_CLI_VERSION,
            publish_assets_in_parallel=False,
            docker_enabled_for_synth=False,
            code_build_defaults=pipelines.CodeBuildOptions(
                build_environment=codebuild.BuildEnvironment(
                    build_image=codebuild.LinuxBuildImage.STANDARD_7_0,
                    compute_type=codebuild.ComputeType.MEDIUM,
                    privileged=False,
                ),
                partial_build_spec=_partial_build_spec(),
            ),
        )

        # The image stack deploys first (it owns its build role: no IamStack needed), then the AMI is built
        # once; its ID flows to staging and production, so production gets the AMI staging tested.
        self.rollout_steps: dict[str, pipelines.CodeBuildStep] = {}  # per stage, before its canary (_rollout_step)
        self.preflight_steps: dict[str, pipelines.CodeBuildStep] = {}  # per stage, before its deploy
        self.image_stage = self._image_stage()
        self.ami_step = self._ami_step([staging, production])
        self.pipeline.add_stage(self.image_stage, post=[self.ami_step])

        self.staging_stage = ClusterStage(self, "Staging", config=staging)
        self.staging_preflight = self._preflight_step("StagingPreflight", self.staging_stage, "staging")
        self.staging_canary = self._canary_step("StagingCanary", self.staging_stage)
        self.staging_smoke = self._smoke_step("StagingSmokeTest", self.staging_stage, after=self.staging_canary)
        self.pipeline.add_stage(
            self.staging_stage, pre=[self.staging_preflight], post=[self.staging_canary, *_present(self.staging_smoke)]
        )

        self.approval = pipelines.ManualApprovalStep(
            "PromoteToProduction",
            comment=(
                f"Staging cluster {staging.cluster_name} deployed and its quorum canary passed. "
                f"Approve to deploy {production.cluster_name}."
            ),
        )
        self.production_stage = ClusterStage(self, "Production", config=production)
        # After the approval, right before the deploy: the account may have changed while the approval waited.
        self.production_preflight = self._preflight_step("ProductionPreflight", self.production_stage, "production")
        self.production_preflight.add_step_dependency(self.approval)
        self.production_canary = self._canary_step("ProductionCanary", self.production_stage)
        self.production_smoke = self._smoke_step(
            "ProductionSmokeTest", self.production_stage, after=self.production_canary
        )
        self.pipeline.add_stage(
            self.production_stage,
            pre=[self.approval, self.production_preflight],
            post=[self.production_canary, *_present(self.production_smoke)],
        )

        # Materialise the CodePipeline now so the notification rule and the suppressions can reach it.
        self.pipeline.build_pipeline()
        # cfn-lint on what CDK Pipelines generates: E3703 wants Fn::Sub in the deploy actions' RoleArn
        # (CDK writes Fn::Join; both resolve identically) and W3005 notes that the generated DependsOn on
        # the pipeline role repeats the GetAtt. Neither is a defect of this pipeline.
        cfn_pipeline = self.pipeline.pipeline.node.default_child
        assert isinstance(cfn_pipeline, cdk.CfnResource)
        cfn_pipeline.add_metadata("cfn-lint", {"config": {"ignore_checks": ["E3703", "W3005"]}})
        self.topic = self._notifications()
        self._policy_exceptions()

    # --- source ---------------------------------------------------------------------------------

    def _source(self) -> pipelines.CodePipelineSource:
        settings, config = self.settings, self.config
        if settings.source == "codecommit":
            assert settings.codecommit_repository is not None
            repository = codecommit.Repository.from_repository_name(
                self, "SourceRepository", settings.codecommit_repository
            )
            return pipelines.CodePipelineSource.code_commit(repository, settings.branch)
        if settings.source == "s3":
            bucket_name = (
                settings.s3_bucket or f"{config.resource_prefix}-pipeline-source-{cdk.Aws.ACCOUNT_ID}-{cdk.Aws.REGION}"
            )
            bucket = s3.Bucket.from_bucket_name(self, "SourceBucket", bucket_name)
            return pipelines.CodePipelineSource.s3(bucket, settings.s3_key, action_name="Source")
        assert settings.repository is not None
        # Without an ARN in context, the connection ARN is read at deploy time from SSM: nothing
        # account-specific has to be committed to cdk.json.
        connection_arn = settings.connection_arn or ssm.StringParameter.value_for_string_parameter(
            self, f"{config.ssm_prefix}/pipeline/connection-arn"
        )
        return pipelines.CodePipelineSource.connection(
            settings.repository, settings.branch, connection_arn=connection_arn, trigger_on_push=True
        )

    # --- synth ----------------------------------------------------------------------------------

    def _code_artifact(self) -> tuple[list[str], dict[str, str], list[iam.PolicyStatement]]:
        """Install commands, environment and permissions for the optional CodeArtifact mirror."""
        settings = self.settings
        if settings.code_artifact_domain is None or settings.code_artifact_repository is None:
            return [], {}, []
        owner = settings.code_artifact_owner or cdk.Aws.ACCOUNT_ID
        env = {
            "CODEARTIFACT_DOMAIN": settings.code_artifact_domain,
            "CODEARTIFACT_REPOSITORY": settings.code_artifact_repository,
            "CODEARTIFACT_OWNER": owner,
        }
        login = (
            'aws codeartifact login --tool {tool} --domain "$CODEARTIFACT_DOMAIN" '
            '--domain-owner "$CODEARTIFACT_OWNER" --repository "$CODEARTIFACT_REPOSITORY"'
        )
        domain_arn = self.format_arn(
            service="codeartifact", resource="domain", resource_name=settings.code_artifact_domain, account=owner
        )
        repository_arn = self.format_arn(
            service="codeartifact",
            resource="repository",
            resource_name=f"{settings.code_artifact_domain}/{settings.code_artifact_repository}",
            account=owner,
        )
        package_arn = self.format_arn(
            service="codeartifact",
            resource="package",
            resource_name=f"{settings.code_artifact_domain}/{settings.code_artifact_repository}/*",
            account=owner,
        )
        statements = [
            iam.PolicyStatement(actions=["codeartifact:GetAuthorizationToken"], resources=[domain_arn]),
            iam.PolicyStatement(
                actions=["codeartifact:GetRepositoryEndpoint", "codeartifact:ReadFromRepository"],
                resources=[repository_arn, package_arn],
            ),
            iam.PolicyStatement(
                actions=["sts:GetServiceBearerToken"],
                resources=["*"],
                conditions={"StringEquals": {"sts:AWSServiceName": "codeartifact.amazonaws.com"}},
            ),
        ]
        return [login.format(tool="pip"), login.format(tool="npm")], env, statements

    def _synth_step(self) -> pipelines.CodeBuildStep:
        login, env, statements = self._code_artifact()
        self._code_artifact_statements = statements
        step = pipelines.CodeBuildStep(
            "Synth",
            input=self.source,
            # Pinned: requirements.txt / requirements-checkov.txt (==) and package-lock.json (npm ci).
            install_commands=[*login, "make setup"],
            # Unit tests, ruff, mypy, cfn-lint, checkov and cdk-nag; any failure ends the build here.
            commands=[
                "make test",
                "npx cdk synth",
                # The smoke steps' wheels (they run in the cluster VPC, without a package index).
                f"python3 -m pip download --quiet --no-deps --dest {SMOKE_WHEELS} {SMOKE_REQUIREMENTS}",
            ],
            env={"JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "1", **env},
            role_policy_statements=statements,
            primary_output_directory="cdk.out",
            timeout=cdk.Duration.minutes(45),
        )
        self.smoke_wheels = step.add_output_directory(SMOKE_WHEELS)
        return step

    # --- AMI ------------------------------------------------------------------------------------

    def _image_stage(self) -> ImageStage:
        """ImageStack in the pipeline's account and region."""
        account = None if cdk.Token.is_unresolved(self.account) else self.account
        region = None if cdk.Token.is_unresolved(self.region) else self.region
        return image_stage(
            self, "Ami", config=self.config, settings=self.settings, env=cdk.Environment(account=account, region=region)
        )

    def _ami_step(self, stages: Sequence[ClusterConfig]) -> pipelines.CodeBuildStep:
        """Run the Image Builder pipeline, then publish the AMI ID where the stages read it.

        Stage stacks resolve ``ClusterConfig.ami`` (an SSM parameter name by default) at deploy time,
        so writing the parameter here is how the new AMI reaches both stages; the ID is also exported
        as the pipeline variable ``AMI_ID`` (the canaries log it).
        """
        config = self.config
        region = self.region if not cdk.Token.is_unresolved(self.region) else cdk.Aws.REGION
        targets = sorted({(c.ami, c.region) for c in stages if c.ami_is_ssm_parameter and self._same_account(c)})
        publish = [
            f"aws ssm put-parameter --region {shlex.quote(r)} --name {shlex.quote(name)} --type String "
            '--data-type aws:ec2:image --overwrite --value "$AMI_ID"'
            for name, r in targets
        ]
        statements = [
            iam.PolicyStatement(
                sid="RunImagePipeline",
                actions=[
                    "imagebuilder:StartImagePipelineExecution",
                    "imagebuilder:GetImagePipeline",
                    "imagebuilder:ListImagePipelineImages",
                ],
                resources=[
                    self.format_arn(
                        service="imagebuilder", resource="image-pipeline", resource_name=f"{config.resource_prefix}*"
                    )
                ],
            ),
            iam.PolicyStatement(
                sid="ReadBuiltImage",
                actions=["imagebuilder:GetImage"],
                resources=[
                    self.format_arn(
                        service="imagebuilder", resource="image", resource_name=f"{config.resource_prefix}*"
                    )
                ],
            ),
            iam.PolicyStatement(
                sid="DescribeImages",
                actions=["imagebuilder:ListImagePipelines", "ec2:DescribeImages"],
                resources=["*"],
            ),
        ]
        if targets:
            statements.append(
                iam.PolicyStatement(
                    sid="PublishAmiId",
                    actions=["ssm:PutParameter", "ssm:GetParameter"],
                    resources=sorted(
                        {
                            self.format_arn(service="ssm", region=r, resource="parameter", resource_name=name[1:])
                            for name, r in targets
                        }
                    ),
                )
            )
        return pipelines.CodeBuildStep(
            "BuildAmi",
            input=self.source,
            commands=[
                # The script shows progress and prints the AMI ID; the last ami-... it prints is the one.
                f"cd scripts && bash -o pipefail -c './{AMI_BUILD_SCRIPT} --region \"$AMI_REGION\" | tee /tmp/ami.log'",
                "export AMI_ID=$(grep -Eo 'ami-[0-9a-f]{8,17}' /tmp/ami.log | tail -n 1)",
                'test -n "$AMI_ID" || { echo "the AMI build printed no AMI ID" >&2; exit 1; }',
                *publish,
                'echo "AMI_ID=$AMI_ID"',
            ],
            env={"AMI_REGION": region},
            role_policy_statements=statements,
            timeout=cdk.Duration.hours(3),
        )

    def _same_account(self, config: ClusterConfig) -> bool:
        return config.account is None or config.account == self.settings.account

    # --- canary ---------------------------------------------------------------------------------

    def _canary_step(self, step_id: str, stage: ClusterStage) -> pipelines.CodeBuildStep:
        """The quorum canary against the stage's cluster, fed by the cluster stack's outputs."""
        config = stage.config
        outputs = stage.cluster.outputs
        account = config.account or self.account
        function_arn = self.format_arn(
            service="lambda",
            region=config.region,
            account=account,
            resource="function",
            resource_name=config.cluster_ops_function_name,
            arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME,
        )
        group_arn = self.format_arn(
            service="autoscaling",
            region=config.region,
            account=account,
            resource="autoScalingGroup",
            resource_name=f"*:autoScalingGroupName/{config.resource_prefix}-control-plane-*",
            arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME,
        )
        statements = [
            iam.PolicyStatement(sid="ClusterOps", actions=["lambda:InvokeFunction"], resources=[function_arn]),
            # DescribeAutoScalingGroups has no resource-level permissions: it needs "*".
            iam.PolicyStatement(sid="ReadGroups", actions=["autoscaling:DescribeAutoScalingGroups"], resources=["*"]),
            iam.PolicyStatement(
                sid="ReplaceControlPlaneNodes",
                actions=["autoscaling:TerminateInstanceInAutoScalingGroup"],
                resources=[group_arn],
                conditions={
                    "StringEquals": {f"autoscaling:ResourceTag/{ClusterConfig.CLUSTER_TAG_KEY}": config.cluster_name}
                },
            ),
        ]
        per_replacement = 1200
        canary = pipelines.CodeBuildStep(
            step_id,
            input=self.source,
            install_commands=[
                # Only what the canary imports, at the versions requirements.txt pins.
                "python -m pip install --quiet "
                "$(grep -E '^(boto3|botocore|s3transfer|jmespath|python-dateutil|six|urllib3)==' requirements.txt)"
            ],
            commands=[
                "mkdir -p canary",
                "python -m pipeline.canary "
                f"--region {config.region} --expected-voters {config.control_plane_count} "
                f"--replacement-timeout {per_replacement} --report canary/{step_id}-report.json",
            ],
            env={"AMI_ID": self.ami_step.exported_variable("AMI_ID"), "CLUSTER_REGION": config.region},
            env_from_cfn_outputs={
                "CONTROL_PLANE_GROUP_NAMES": outputs["ControlPlaneGroupNames"],
                "CLUSTER_OPS_FUNCTION_NAME": outputs["ClusterOpsFunctionName"],
                "CLUSTER_NAME": outputs["ClusterName"],
            },
            role_policy_statements=statements,
            primary_output_directory="canary",
            timeout=cdk.Duration.seconds(per_replacement * config.control_plane_count + 1800),
        )
        # The rollout of a new AMI runs first; CDK Pipelines adds a step's dependencies to the same stage.
        canary.add_step_dependency(self._rollout_step(step_id.replace("Canary", "Rollout"), stage))
        return canary

    # --- preflight ------------------------------------------------------------------------------

    def _preflight_step(self, step_id: str, stage: ClusterStage, stage_name: str) -> pipelines.CodeBuildStep:
        """``python -m pipeline.preflight`` before the stage deploys: read-only checks of the stage's account
        against the stage's templates, read from the synth step's cloud assembly (exactly what is deployed next).
        A stage in another account is read through that account's CDK lookup role (``cdk bootstrap --trust`` or
        ``--trust-for-lookup`` the pipeline account; the role is read-only by design)."""
        config = stage.config
        account = config.account or self.account
        command = (
            f"python -m pipeline.preflight --stage {stage_name} --region {config.region} "
            f"--assembly cdk.out/{stage.artifact_id}"
        )
        statements = preflight_statements(self, config, account)
        assembly = self.synth_step.primary_output  # cdk.out (primary_output_directory)
        assert assembly is not None
        if not self._same_account(config):
            lookup_role = self.format_arn(
                service="iam",
                region="",
                account=account,
                resource="role",
                resource_name=f"cdk-hnb659fds-lookup-role-{account}-{config.region}",
            )
            command += f" --account {account} --role-arn {lookup_role}"
            statements.append(
                iam.PolicyStatement(sid="ReadStageAccount", actions=["sts:AssumeRole"], resources=[lookup_role])
            )
        step = pipelines.CodeBuildStep(
            step_id,
            input=self.source,
            additional_inputs={"cdk.out": assembly},
            install_commands=[
                "python -m pip install --quiet "
                "$(grep -E '^(boto3|botocore|s3transfer|jmespath|python-dateutil|six|urllib3)==' requirements.txt)"
            ],
            commands=[command],
            env={"CLUSTER_REGION": config.region},
            role_policy_statements=statements,
            timeout=cdk.Duration.minutes(15),
        )
        self.preflight_steps[step_id] = step
        return step

    # --- rollout of a new AMI -------------------------------------------------------------------

    def _rollout_step(self, step_id: str, stage: ClusterStage) -> pipelines.CodeBuildStep:
        """``python -m pipeline.rollout``: the deploy pointed the groups at the new launch template version;
        replace the instances by instance refresh (control plane one group at a time, quorum checked through
        the cluster-ops function, then workers in batches). SkipMatching makes it a no-op without a new AMI."""
        config = stage.config
        outputs = stage.cluster.outputs
        account = config.account or self.account

        def group_arn(name: str) -> str:
            return self.format_arn(
                service="autoscaling",
                region=config.region,
                account=account,
                resource="autoScalingGroup",
                resource_name=f"*:autoScalingGroupName/{name}",
                arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME,
            )

        function_arn = self.format_arn(
            service="lambda",
            region=config.region,
            account=account,
            resource="function",
            resource_name=config.cluster_ops_function_name,
            arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME,
        )
        groups = [*config.control_plane_group_names, *(config.worker_group_name(g) for g in config.worker_groups)]
        statements = [
            iam.PolicyStatement(sid="ClusterOps", actions=["lambda:InvokeFunction"], resources=[function_arn]),
            # DescribeInstanceRefreshes has no resource-level permissions: it needs "*".
            iam.PolicyStatement(
                sid="ReadInstanceRefreshes", actions=["autoscaling:DescribeInstanceRefreshes"], resources=["*"]
            ),
            iam.PolicyStatement(
                sid="RefreshClusterGroups",
                actions=["autoscaling:StartInstanceRefresh", "autoscaling:CancelInstanceRefresh"],
                resources=[group_arn(name) for name in groups],
                conditions={
                    "StringEquals": {f"autoscaling:ResourceTag/{ClusterConfig.CLUSTER_TAG_KEY}": config.cluster_name}
                },
            ),
        ]
        per_group = 3600
        step = pipelines.CodeBuildStep(
            step_id,
            input=self.source,
            install_commands=[
                "python -m pip install --quiet "
                "$(grep -E '^(boto3|botocore|s3transfer|jmespath|python-dateutil|six|urllib3)==' requirements.txt)"
            ],
            commands=[
                "mkdir -p rollout",
                f"python -m pipeline.rollout --region {config.region} --group-timeout {per_group} "
                f"--report rollout/{step_id}-report.json",
            ],
            env={"AMI_ID": self.ami_step.exported_variable("AMI_ID"), "CLUSTER_REGION": config.region},
            env_from_cfn_outputs={
                "CONTROL_PLANE_GROUP_NAMES": outputs["ControlPlaneGroupNames"],
                "WORKER_GROUP_NAMES": outputs["WorkerGroupNames"],
                "CLUSTER_OPS_FUNCTION_NAME": outputs["ClusterOpsFunctionName"],
            },
            role_policy_statements=statements,
            primary_output_directory="rollout",
            timeout=cdk.Duration.seconds(per_group * len(groups) + 1800),
        )
        self.rollout_steps[step_id] = step
        return step

    # --- smoke test -----------------------------------------------------------------------------

    def _smoke_step(
        self, step_id: str, stage: ClusterStage, *, after: pipelines.Step
    ) -> pipelines.CodeBuildStep | None:
        """``python -m pipeline.smoke`` against the stage's cluster, after its canary, from inside its VPC.

        The API is an internal NLB, so the step runs in the cluster's private subnets; CodeBuild can join
        only a VPC known at synth time in the pipeline's own account and region, i.e. a stage that imports
        its VPC (``vpcId``, ``privateSubnetIds``). A stage that creates its VPC gets no smoke step (its VPC ID
        exists only after the stage deploys). Credentials: the step reads the cluster PKI secret and signs a
        one-hour client certificate (``pipeline/smoke/kubeconfig.py``). IRSA is skipped until the cluster runs
        the pod identity webhook.
        """
        config = stage.config
        vpc_config = config.vpc
        same_region = config.region == self.region or cdk.Token.is_unresolved(self.region)
        if not vpc_config.imported or not self._same_account(config) or not same_region:
            return None
        assert vpc_config.vpc_id is not None and vpc_config.cidr is not None
        vpc = ec2.Vpc.from_vpc_attributes(
            self,
            f"{step_id}Vpc",
            vpc_id=vpc_config.vpc_id,
            vpc_cidr_block=vpc_config.cidr,
            availability_zones=list(config.availability_zones),
            private_subnet_ids=list(vpc_config.private_subnet_ids),
            private_subnet_route_table_ids=list(vpc_config.private_route_table_ids),
        )
        security_group = ec2.SecurityGroup(
            self,
            f"{step_id}SecurityGroup",
            vpc=vpc,
            description=f"{config.cluster_name} smoke test: the Kubernetes API and the VPC endpoints only",
            allow_all_outbound=False,
        )
        security_group.add_egress_rule(ec2.Peer.ipv4(vpc_config.cidr), ec2.Port.tcp(6443), "Kubernetes API (NLB)")
        security_group.add_egress_rule(ec2.Peer.ipv4(vpc_config.cidr), ec2.Port.tcp(443), "VPC interface endpoints")
        # The private subnets have no internet route: 443 beyond the VPC reaches only the S3 gateway endpoint
        # (source and artifacts), whose prefix list is not known at synth time.
        security_group.add_egress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "S3 gateway endpoint")
        account = config.account or self.account
        secret_arn = self.format_arn(
            service="secretsmanager",
            region=config.region,
            account=account,
            resource="secret",
            resource_name=f"{config.pki_secret_name}-??????",
            arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME,
        )
        statements = [
            iam.PolicyStatement(sid="ReadClusterCa", actions=["secretsmanager:GetSecretValue"], resources=[secret_arn]),
            # The cluster key's ARN is another stack's: allowed only through Secrets Manager, for this secret.
            iam.PolicyStatement(
                sid="DecryptClusterCa",
                actions=["kms:Decrypt"],
                resources=[
                    self.format_arn(
                        service="kms", region=config.region, account=account, resource="key", resource_name="*"
                    )
                ],
                conditions={
                    "StringEquals": {"kms:ViaService": f"secretsmanager.{config.region}.{self.url_suffix}"},
                    "StringLike": {"kms:EncryptionContext:SecretARN": secret_arn},
                },
            ),
        ]
        expected_workers = sum(group.min_size for group in config.worker_groups)
        kubeconfig = "$HOME/.kube/smoke"
        step = pipelines.CodeBuildStep(
            step_id,
            input=self.source,
            additional_inputs={SMOKE_WHEELS: self.smoke_wheels},
            install_commands=[
                f"python -m pip install --quiet --no-index --find-links {SMOKE_WHEELS} {SMOKE_REQUIREMENTS}",
            ],
            commands=[
                f'python -m pipeline.smoke.kubeconfig --out "{kubeconfig}"',
                f'python -m pipeline.smoke --kubeconfig "{kubeconfig}" '
                f"--expect-control-plane {config.control_plane_count} --expect-workers {expected_workers} "
                "--timeout 300 --skip-irsa",
            ],
            env={"PKI_SECRET_NAME": config.pki_secret_name, "CLUSTER_REGION": config.region},
            env_from_cfn_outputs={
                "API_ENDPOINT": stage.cluster.outputs["ApiEndpoint"],
                "CLUSTER_NAME": stage.cluster.outputs["ClusterName"],
            },
            vpc=vpc,
            subnet_selection=ec2.SubnetSelection(subnets=vpc.private_subnets),
            security_groups=[security_group],
            role_policy_statements=statements,
            timeout=cdk.Duration.minutes(30),
        )
        step.add_step_dependency(after)
        return step

    # --- notifications --------------------------------------------------------------------------

    def _notifications(self) -> sns.Topic:
        key = kms.Key(
            self,
            "NotificationsKey",
            description=f"dedicated-k8s {self.config.cluster_name}: pipeline notifications topic",
            enable_key_rotation=True,
        )
        # EventBridge publishes to the encrypted topic: it needs the key, for this account's rules only.
        key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="EventBridgeNotifications",
                principals=[iam.ServicePrincipal("events.amazonaws.com")],
                actions=["kms:GenerateDataKey*", "kms:Decrypt"],
                resources=["*"],
                conditions={"StringEquals": {"aws:SourceAccount": self.account}},
            )
        )
        topic = sns.Topic(
            self,
            "Notifications",
            topic_name=f"{self.config.resource_prefix}-pipeline-notifications",
            master_key=key,
            enforce_ssl=True,
        )
        for email in self.settings.notification_emails:
            topic.add_subscription(subscriptions.EmailSubscription(email))
        for index, (detail_type, detail) in enumerate(NOTIFIED_EVENTS.items()):
            events.Rule(
                self,
                f"PipelineNotification{index}",
                rule_name=f"{self.config.resource_prefix}-pipeline-{('failed', 'approval')[index]}",
                description=f"dedicated-k8s pipeline: {detail_type} ({detail}) to the notifications topic",
                event_pattern=events.EventPattern(
                    source=["aws.codepipeline"],
                    detail_type=[detail_type],
                    detail={"pipeline": [self.pipeline.pipeline.pipeline_name], **detail},
                ),
                targets=[targets.SnsTopic(topic)],
            )
        return topic

    # --- policy exceptions ----------------------------------------------------------------------

    def _policy_exceptions(self) -> None:
        """cdk-nag exceptions, each scoped to the findings it explains and carrying the reason."""
        prefix = self.config.resource_prefix
        for preflight in self.preflight_steps.values():
            suppress(
                preflight.project,
                "AwsSolutions-IAM5",
                "the preflight's describe calls (EC2 Describe*, lambda:GetAccountSettings, "
                "s3:GetAccountPublicAccessBlock, logs:DescribeLogGroups) support no resource-level permissions; its "
                "other reads are limited to this cluster's names and the CDK bootstrap parameters",
                applies_to=[
                    "Resource::*",
                    _regex(rf"Resource::arn:<AWS::Partition>:[a-z0-9-]+:{_REGION}?:{_ACCOUNT}?:.*"),
                ],
            )
        for rollout in self.rollout_steps.values():
            suppress(
                rollout.project,
                "AwsSolutions-IAM5",
                "autoscaling:DescribeInstanceRefreshes supports no resource-level permissions; starting and "
                "cancelling a refresh is limited to this cluster's groups by name and by the cluster tag",
                applies_to=[
                    "Resource::*",
                    _regex(rf"Resource::arn:<AWS::Partition>:autoscaling:{_REGION}:{_ACCOUNT}:autoScalingGroup:\*:.*"),
                ],
            )
        suppress(
            self.pipeline,
            "AwsSolutions-IAM5",
            "CDK Pipelines' generated grants: each role reads/writes objects of this pipeline's own artifact "
            "bucket (and uses its key), and each CodeBuild project writes its own log group and report groups",
            applies_to=[
                *(
                    f"Action::s3:{action}"
                    for action in ("Abort*", "DeleteObject*", "GetBucket*", "GetObject*", "List*")
                ),
                "Action::kms:GenerateDataKey*",
                "Action::kms:ReEncrypt*",
                _regex(r"Resource::<PipelineArtifactsBucket[0-9A-F]{8}\.Arn>/\*"),
                _regex(rf"Resource::arn:<AWS::Partition>:logs:{_REGION}:{_ACCOUNT}:log-group:/aws/codebuild/.*"),
                _regex(rf"Resource::arn:<AWS::Partition>:codebuild:{_REGION}:{_ACCOUNT}:report-group/.*"),
            ],
        )
        for child, what in (
            ("UpdatePipeline", "self-mutation runs `cdk deploy`"),
            ("Assets", "asset publishing runs `cdk-assets`"),
        ):
            generated = self.pipeline.node.try_find_child(child)
            if generated is not None:
                suppress(
                    generated,
                    "AwsSolutions-IAM5",
                    f"{what}: it assumes only the CDK bootstrap roles (by their bootstrap-role tag) and calls "
                    "cloudformation:DescribeStacks / s3:ListBucket / CodeBuild batch calls that take no resource ARN",
                    applies_to=["Resource::*", _regex(rf"Resource::arn:\*:iam::{_ACCOUNT}:role/\*")],
                )
        suppress(
            self.pipeline.pipeline.artifact_bucket,
            "AwsSolutions-S1",
            "holds only transient pipeline artifacts written and read by this pipeline's roles; every access is "
            "in CloudTrail, and per-object access logs would add a log bucket that logs nothing new",
        )
        artifact_bucket = self.pipeline.pipeline.artifact_bucket.node.default_child
        assert isinstance(artifact_bucket, cdk.CfnResource)
        skip_checkov(
            artifact_bucket,
            [
                ("CKV_AWS_18", "transient pipeline artifacts; access is by this pipeline's roles and is in CloudTrail"),
                ("CKV_AWS_21", "each execution writes new artifact keys; nothing is overwritten that versioning keeps"),
            ],
        )
        assets = self.pipeline.node.try_find_child("Assets")
        file_role = assets.node.try_find_child("FileRole") if assets is not None else None
        file_policy = file_role.node.try_find_child("DefaultPolicy") if file_role is not None else None
        if file_policy is not None and isinstance(file_policy.node.default_child, cdk.CfnResource):
            skip_checkov(
                file_policy.node.default_child,
                [
                    (
                        "CKV_AWS_111",
                        "CDK Pipelines' asset-publishing role: codebuild:StartBuild/StopBuild are generated on *",
                    )
                ],
            )
        if not self.settings.cross_account:
            suppress(
                self.pipeline,
                "AwsSolutions-CB4",
                "single-account pipeline: CDK Pipelines creates no customer-managed artifact key, so build "
                "artifacts are encrypted with the AWS-managed S3 key in the SSE-encrypted artifact bucket; a stage "
                "in another account (or cross-account keys) switches every project to the pipeline's KMS key",
            )
        for step, stage in ((self.staging_canary, self.staging_stage), (self.production_canary, self.production_stage)):
            suppress(
                step.project,
                "AwsSolutions-IAM5",
                "autoscaling:DescribeAutoScalingGroups supports no resource-level permissions; terminate is "
                "limited to this cluster's control-plane groups by name prefix and by the cluster tag",
                applies_to=[
                    "Resource::*",
                    _regex(
                        rf"Resource::arn:<AWS::Partition>:autoscaling:{_REGION}:{_ACCOUNT}:autoScalingGroup:\*:"
                        rf"autoScalingGroupName/{stage.config.resource_prefix}-control-plane-\*"
                    ),
                ],
            )
        for smoke, stage in ((self.staging_smoke, self.staging_stage), (self.production_smoke, self.production_stage)):
            if smoke is None:
                continue
            # The policy CDK adds for a project in a VPC (network interfaces), beside the role's default policy.
            smoke_policy = smoke.project.node.try_find_child("PolicyDocument")
            if smoke_policy is not None and isinstance(smoke_policy.node.default_child, cdk.CfnResource):
                skip_checkov(
                    smoke_policy.node.default_child,
                    [
                        (
                            "CKV_AWS_111",
                            "CodeBuild in a VPC: CDK's ec2:CreateNetworkInterface/DeleteNetworkInterface on *",
                        )
                    ],
                )
            suppress(
                smoke.project,
                "AwsSolutions-IAM5",
                "CodeBuild's VPC network-interface calls support no resource-level permissions (created by CDK for a "
                "project in a VPC; CreateNetworkInterfacePermission is limited to the step's subnets); the secret "
                "is the cluster's PKI secret by name (Secrets Manager appends a random "
                "6-character suffix), and kms:Decrypt is allowed only through Secrets Manager for that secret",
                applies_to=[
                    "Resource::*",
                    "Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:network-interface/*",
                    _regex(rf"Resource::arn:<AWS::Partition>:kms:{_REGION}:{_ACCOUNT}:key/\*"),
                    _regex(
                        rf"Resource::arn:<AWS::Partition>:secretsmanager:{_REGION}:{_ACCOUNT}:secret:"
                        rf"{re.escape(stage.config.pki_secret_name)}-\?\?\?\?\?\?"
                    ),
                ],
            )
        suppress(
            self.ami_step.project,
            "AwsSolutions-IAM5",
            "imagebuilder:ListImagePipelines and ec2:DescribeImages support no resource-level permissions; the "
            "image pipeline and its images are limited to this cluster's name prefix",
            applies_to=[
                "Resource::*",
                _regex(
                    rf"Resource::arn:<AWS::Partition>:imagebuilder:{_REGION}:{_ACCOUNT}:(image-pipeline|image)/{prefix}\*"
                ),
            ],
        )
        if self._code_artifact_statements:
            suppress(
                self.synth_step.project,
                "AwsSolutions-IAM5",
                "sts:GetServiceBearerToken has no resource-level permissions (limited to CodeArtifact by "
                "condition); package reads cover the mirror repository's packages",
                applies_to=[
                    "Resource::*",
                    _regex(rf"Resource::arn:<AWS::Partition>:codeartifact:{_REGION}:{_ACCOUNT}:package/.*"),
                ],
            )


def image_stage(
    scope: Construct, construct_id: str, *, config: ClusterConfig, settings: PipelineSettings, **kwargs: Any
) -> ImageStage:
    """The pipeline's ImageStage: the build network from context (imageBuildVpcId/imageBuildSubnetId) or,
    when context names none, from the SSM parameters <ssmPrefix>/pipeline/image-build-{vpc,subnet}-id."""
    prefix = f"{config.ssm_prefix}/pipeline"
    return ImageStage(
        scope,
        construct_id,
        config=config,
        build_vpc_id=settings.image_build_vpc_id,
        build_subnet_id=settings.image_build_subnet_id,
        build_network_parameters=(f"{prefix}/image-build-vpc-id", f"{prefix}/image-build-subnet-id"),
        **kwargs,
    )


def preflight_statements(stack: cdk.Stack, config: ClusterConfig, account: str) -> list[iam.PolicyStatement]:
    """Exactly the reads of ``pipeline.preflight.READ_ACTIONS``: names of this cluster where the action takes a
    resource, "*" where it takes none."""
    region = config.region

    def arn(service: str, resource: str, name: str, **kwargs: Any) -> str:
        return stack.format_arn(
            service=service, region=region, account=account, resource=resource, resource_name=name, **kwargs
        )

    scoped = {
        "ssm:GetParameter": [
            arn("ssm", "parameter", "cdk-bootstrap/*"),
            *([arn("ssm", "parameter", config.ami[1:])] if config.ami_is_ssm_parameter else []),
        ],
        "iam:GetRole": [
            stack.format_arn(
                service="iam",
                region="",
                account=account,
                resource="role",
                resource_name="aws-service-role/autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling",
            )
        ],
        "cloudformation:ListStackResources": [arn("cloudformation", "stack", f"{config.resource_prefix}-*/*")],
        "secretsmanager:DescribeSecret": [
            arn("secretsmanager", "secret", f"{config.secrets_prefix}/*", arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME)
        ],
        "dynamodb:DescribeTable": [arn("dynamodb", "table", config.cluster_state_table_name)],
        "s3:ListBucket": [f"arn:{stack.partition}:s3:::{config.resource_prefix}-*"],
    }
    unscoped = [action for action in READ_ACTIONS if action not in scoped]
    return [
        iam.PolicyStatement(sid="PreflightDescribe", actions=unscoped, resources=["*"]),
        *(
            iam.PolicyStatement(sid=f"Preflight{i}", actions=[action], resources=resources)
            for i, (action, resources) in enumerate(sorted(scoped.items()))
        ),
    ]


def _stage_config(target: StageTarget) -> ClusterConfig:
    if target.config is None:
        raise ValueError(f"the {target.name} stage has no cluster configuration (use PipelineSettings.from_context)")
    return target.config


def _present(*steps: pipelines.Step | None) -> list[pipelines.Step]:
    return [step for step in steps if step is not None]


def _regex(pattern: str) -> dict[str, str]:
    """A cdk-nag ``applies_to`` entry matching the whole finding text."""
    return {"regex": f"/^{pattern}$/g"}
