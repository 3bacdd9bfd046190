#!/usr/bin/env python3
"""The dedicated-k8s CDK app.

``cdk deploy IamStack`` then ``cdk deploy K8sClusterStack`` is the manual path; the pipeline stack
deploys the same two stacks through its stages. Configuration is read from context once
(``cdk.json``, overridable with ``-c key=value``) and validated before any construct is built.
"""

from __future__ import annotations

import sys

import aws_cdk as cdk

from stages.config import ClusterConfig, ConfigError


def build_app(app: cdk.App) -> cdk.App:
    """Compose the stacks into ``app`` (tests call this with their own context)."""
    # Imported here so a configuration error is reported before any construct code is loaded.
    from pipeline.config import PipelineSettings
    from pipeline.pipeline_stack import PipelineStack
    from stages.compose import add_cluster_stacks
    from stages.image_stack import ImageStack
    from stages.nag import apply_policy_checks

    # Every key given is checked: a misspelt key is an error, never silently the default.
    config = ClusterConfig.from_context(app.node.try_get_context, given_keys=app.node.get_all_context())
    settings = PipelineSettings.from_context(app.node.try_get_context)
    iam, _ = add_cluster_stacks(app, config)
    # The AMI bake (`cdk deploy ImageStack`, then scripts/build-k8s-ami-imagebuilder.sh) uses IamStack's
    # Image Builder instance profile, and writes the AMI ID to the SSM parameter K8sClusterStack reads.
    image = ImageStack(
        app,
        "ImageStack",
        config=config,
        env=cdk.Environment(account=config.account, region=config.region),
        stack_name=f"{config.resource_prefix}-image",
    )
    image.add_stack_dependency(iam)
    PipelineStack(
        app,
        "PipelineStack",
        config=config,
        settings=settings,
        # The pipeline lives with the cluster unless pipelineAccount/pipelineRegion say otherwise.
        env=cdk.Environment(account=settings.account or config.account, region=settings.region or config.region),
        stack_name=f"{config.resource_prefix}-pipeline",
    )
    apply_policy_checks(app)
    return app


def main() -> None:
    app = cdk.App()
    try:
        build_app(app)
    except ConfigError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
    app.synth()


if __name__ == "__main__":
    main()
