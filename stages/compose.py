"""How IamStack and K8sClusterStack are put together: one function, used by app.py and ClusterStage."""

from __future__ import annotations

import aws_cdk as cdk
from constructs import Construct

from stages.cluster_stack import K8sClusterStack
from stages.config import ClusterConfig
from stages.iam_stack import IamStack


def add_cluster_stacks(
    scope: Construct, config: ClusterConfig, env: cdk.Environment | None = None
) -> tuple[IamStack, K8sClusterStack]:
    env = env or cdk.Environment(account=config.account, region=config.region)
    iam = IamStack(scope, "IamStack", config=config, env=env, stack_name=f"{config.resource_prefix}-iam")
    cluster = K8sClusterStack(
        scope, "K8sClusterStack", config=config, env=env, stack_name=f"{config.resource_prefix}-cluster"
    )
    # The cluster stack uses IamStack's roles by name (no CloudFormation exports, so IamStack can change
    # without blocking on imports); the dependency keeps deploy order right (`cdk deploy`, pipelines).
    cluster.add_stack_dependency(iam)
    return iam, cluster
