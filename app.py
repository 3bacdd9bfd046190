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
    from stages.cluster_stack import K8sClusterStack
    from stages.iam_stack import IamStack
    from stages.nag import apply_policy_checks

    config = ClusterConfig.from_context(app.node.try_get_context)
    env = cdk.Environment(account=config.account, region=config.region)
    iam = IamStack(app, "IamStack", config=config, env=env, stack_name=f"{config.resource_prefix}-iam")
    cluster = K8sClusterStack(
        app, "K8sClusterStack", config=config, env=env, stack_name=f"{config.resource_prefix}-cluster"
    )
    # The cluster stack uses IamStack's roles by name (no CloudFormation exports, so IamStack can
    # change without blocking on imports); the dependency keeps `cdk deploy` ordering right.
    cluster.add_stack_dependency(iam)
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
