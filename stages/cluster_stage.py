"""ClusterStage: IamStack + K8sClusterStack as one deployable unit, promoted by the pipeline."""

from __future__ import annotations

from typing import Any

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks
from constructs import Construct

from stages.compose import add_cluster_stacks
from stages.config import ClusterConfig


class ClusterStage(cdk.Stage):
    def __init__(self, scope: Construct, construct_id: str, *, config: ClusterConfig, **kwargs: Any) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.config = config
        self.iam, self.cluster = add_cluster_stacks(self, config)
        # Aspects added at the app stop at a Stage boundary, so the stage runs the same cdk-nag pack as
        # stages/nag.py's apply_policy_checks does for the app's top-level stacks.
        cdk.Aspects.of(self).add(AwsSolutionsChecks(verbose=True, reports=True))
