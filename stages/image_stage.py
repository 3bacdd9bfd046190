"""ImageStage: the pipeline's image stack (Image Builder pipeline with its own build role).

The pipeline deploys this stage first and runs the AMI build as its post step, so the image pipeline
exists before the build starts on a fresh account, and the one AMI it builds is the one staging tests and
production gets. The stack owns its build role and instance profile (``ImageStack(build_role="own")``):
the stages' IamStacks deploy only after the AMI exists. Its stack name is the manual path's
(``<prefix>-image``): a hand-deployed ImageStack is taken over in place, not duplicated.
"""

from __future__ import annotations

from typing import Any

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks
from constructs import Construct

from stages.config import ClusterConfig
from stages.image_stack import ImageStack


class ImageStage(cdk.Stage):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: ClusterConfig,
        build_vpc_id: str | None = None,
        build_subnet_id: str | None = None,
        build_network_parameters: tuple[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        """``build_vpc_id``/``build_subnet_id`` (both or neither) name the build network; without them the
        stack reads both at deploy time from the SSM parameters ``build_network_parameters`` names."""
        if (build_vpc_id is None) != (build_subnet_id is None):
            raise ValueError("ImageStage: give both build_vpc_id and build_subnet_id, or neither")
        if build_vpc_id is None and build_network_parameters is None:
            raise ValueError("ImageStage: give the build network (IDs or the SSM parameters holding them)")
        super().__init__(scope, construct_id, **kwargs)
        self.config = config
        self.image = ImageStack(
            self,
            "ImageStack",
            config=config,
            build_vpc_id=build_vpc_id,
            build_subnet_id=build_subnet_id,
            build_network_parameters=build_network_parameters,
            build_role="own",
            stack_name=f"{config.resource_prefix}-image",
        )
        # Aspects added at the app stop at a Stage boundary: the same cdk-nag pack as the app's stacks.
        cdk.Aspects.of(self).add(AwsSolutionsChecks(verbose=True, reports=True))
