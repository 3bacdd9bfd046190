"""Cross-cutting policy checks: cdk-nag's AwsSolutions pack, applied once at the app as an Aspect.

Suppressions live next to the resource they concern (``suppress``), each with a one-line reason, so
a reader sees why a finding is accepted where the resource is defined.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks, NagPackSuppression, NagSuppressions
from constructs import IConstruct


def apply_policy_checks(app: cdk.App) -> None:
    """Run AwsSolutions on every stack of ``app``; findings become error/warning annotations."""
    cdk.Aspects.of(app).add(AwsSolutionsChecks(verbose=True, reports=True))


def suppress(
    construct: IConstruct,
    rule_id: str,
    reason: str,
    *,
    applies_to: Sequence[object] | None = None,
    children: bool = True,
) -> None:
    """Accept one cdk-nag finding on ``construct`` (and its children) with a reason."""
    suppression = NagPackSuppression(
        id=rule_id,
        reason=reason,
        applies_to=list(applies_to) if applies_to else None,  # type: ignore[arg-type]
    )
    NagSuppressions.add_resource_suppressions(construct, [suppression], apply_to_children=children)


def skip_checkov(resource: cdk.CfnResource, checks: Iterable[tuple[str, str]]) -> None:
    """Record checkov skips (check id, reason) in the resource's template metadata, where checkov reads them."""
    metadata = dict(resource.cfn_options.metadata or {})
    skips = list(metadata.get("checkov", {}).get("skip", []))
    skips.extend({"id": check_id, "comment": reason} for check_id, reason in checks)
    metadata["checkov"] = {"skip": skips}
    resource.cfn_options.metadata = metadata
