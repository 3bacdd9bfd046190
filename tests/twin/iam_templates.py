"""The synthesized stacks for the twin's IAM and endpoint tests, with the twin's own context (cluster ``twin``
in the twin's region), synthesized once per test process (a synth costs ~15 s); callers get deep copies."""

from __future__ import annotations

import copy
import functools
from typing import Any

from stages.config import ClusterConfig
from twin.authorizer import Authorizer, authorizer_from_templates
from twin.aws import ACCOUNT, PARTITION, REGION
from twin.aws_calls import Arns

CONTEXT = {"clusterName": "twin", "region": REGION, "availabilityZones": [f"{REGION}{z}" for z in "abc"]}
CFG = ClusterConfig.from_mapping({"clusterName": "twin", "region": REGION})
ARNS = Arns(PARTITION, REGION, ACCOUNT)
NODE_ROLES = {"control-plane": CFG.control_plane_role_name, "worker": CFG.worker_role_name}


@functools.cache
def _synth() -> dict[str, dict[str, Any]]:
    from tests.stacks.conftest import synth_app

    return {name: dict(t.to_json()) for name, t in synth_app(CONTEXT).items()}


def templates() -> dict[str, dict[str, Any]]:
    return copy.deepcopy(_synth())


def authorizer(stacks: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> Authorizer:
    stacks = stacks or templates()
    return authorizer_from_templates(
        stacks["IamStack"], stacks["K8sClusterStack"], node_roles=NODE_ROLES, arns=ARNS, **kwargs
    )
