"""What the stacks about to be deployed will create, read from their synthesized templates.

``pipeline/preflight.py`` compares the account with this, so no constant of the stacks is repeated there: the
reservations come from ``AWS::Lambda::Function`` ReservedConcurrentExecutions, the retained names from the
resources' name properties, the bootstrap requirement from CDK's ``CheckBootstrapVersion`` rule.

Two sources, each where it is the truth:

* ``synthesize``: in-process, as ``tests/stacks/conftest.py`` does (``stages.compose.add_cluster_stacks`` with the
  same context the app reads). ``cdk deploy`` synthesizes afresh too, so an operator's preflight sees exactly
  what their deploy will send; a ``cdk.out`` left on the machine may come from other context or older code.
* ``from_assembly``: a cloud assembly directory. The pipeline's preflight step gets the synth step's ``cdk.out``,
  which is byte for byte what the next actions deploy (and needs no Node/CDK in that step).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.config import ClusterConfig, url_suffix_for_region

# The name property of each resource type whose existing namesake makes CloudFormation's create fail; these are
# the kinds the stacks retain, so a deleted stack (and, with plain Retain, a rolled-back create) leaves them behind.
NAME_PROPERTIES = {
    "AWS::SecretsManager::Secret": "Name",
    "AWS::DynamoDB::Table": "TableName",
    "AWS::S3::Bucket": "BucketName",
    "AWS::Logs::LogGroup": "LogGroupName",
}
AUTOSCALING_SERVICE = "autoscaling.amazonaws.com"
AUTOSCALING_ROLE_NAME = "AWSServiceRoleForAutoScaling"
# CDK's bootstrap version rule: Fn::Not [Fn::Contains [[versions too old], Ref BootstrapVersion]].
BOOTSTRAP_RULE = "CheckBootstrapVersion"
# DeletionPolicy values that keep the resource when its stack is deleted (RetainExceptOnCreate still deletes it
# when the stack's own create rolls back; plain Retain keeps it even then).
RETAINING_POLICIES = ("Retain", "RetainExceptOnCreate")


@dataclass(frozen=True)
class NamedResource:
    stack: str
    logical_id: str
    kind: str  # CloudFormation type
    name: str


@dataclass(frozen=True)
class PlannedStacks:
    """The synthesized templates by stack name (``dk8s-<cluster>-iam``, ``dk8s-<cluster>-cluster``)."""

    templates: Mapping[str, Mapping[str, Any]]

    def resources(self) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
        for stack, template in sorted(self.templates.items()):
            for logical_id, resource in sorted(template.get("Resources", {}).items()):
                yield stack, logical_id, resource

    def reserved_concurrency(self) -> dict[str, int]:
        """``stack/logical id`` -> ReservedConcurrentExecutions of every function that reserves any."""
        reserved: dict[str, int] = {}
        for stack, logical_id, resource in self.resources():
            if resource.get("Type") == "AWS::Lambda::Function":
                value = resource.get("Properties", {}).get("ReservedConcurrentExecutions")
                if value is not None:
                    reserved[f"{stack}/{logical_id}"] = int(value)
        return reserved

    def creates_service_linked_role(self, service: str) -> bool:
        return any(
            r.get("Type") == "AWS::IAM::ServiceLinkedRole" and r.get("Properties", {}).get("AWSServiceName") == service
            for _, _, r in self.resources()
        )

    def key_policies_name(self, role_name: str) -> list[str]:
        """``stack/logical id`` of every KMS key whose policy names ``role_name`` as a principal."""
        keys = []
        for stack, logical_id, resource in self.resources():
            if resource.get("Type") == "AWS::KMS::Key":
                statements = resource.get("Properties", {}).get("KeyPolicy", {}).get("Statement", [])
                if any(f"/{role_name}" in json.dumps(s.get("Principal", {})) for s in statements):
                    keys.append(f"{stack}/{logical_id}")
        return keys

    def retained_names(self, account: str, region: str) -> list[NamedResource]:
        """Resources with a fixed name that outlive their stack (RETAINING_POLICIES), names resolved."""
        named = []
        for stack, logical_id, resource in self.resources():
            kind = resource.get("Type", "")
            prop = NAME_PROPERTIES.get(kind)
            if prop is None or resource.get("DeletionPolicy") not in RETAINING_POLICIES:
                continue
            name = resolve(resource.get("Properties", {}).get(prop), account, region)
            if name is not None:
                named.append(NamedResource(stack, logical_id, kind, name))
        return named

    def bootstrap_requirement(self) -> tuple[str, int] | None:
        """(SSM parameter holding the bootstrap version, minimum version) from the first template that has them."""
        for template in self.templates.values():
            parameter = template.get("Parameters", {}).get("BootstrapVersion", {}).get("Default")
            assertions = template.get("Rules", {}).get(BOOTSTRAP_RULE, {}).get("Assertions", [])
            if not isinstance(parameter, str):
                continue
            too_old: list[str] = []
            for assertion in assertions:
                contains = assertion.get("Assert", {}).get("Fn::Not", [{}])[0].get("Fn::Contains", [[]])
                too_old.extend(v for v in contains[0] if isinstance(v, str) and v.isdigit())
            return parameter, max((int(v) for v in too_old), default=0) + 1
        return None


def resolve(value: Any, account: str, region: str) -> str | None:
    """A template value as a string, with the pseudo parameters CDK writes into names; None if it needs more."""
    pseudo = {
        "AWS::AccountId": account,
        "AWS::Region": region,
        "AWS::URLSuffix": url_suffix_for_region(region),
        "AWS::Partition": partition_for_region(region),
    }
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and set(value) == {"Ref"}:
        return pseudo.get(value["Ref"])
    if isinstance(value, dict) and set(value) == {"Fn::Join"}:
        separator, parts = value["Fn::Join"]
        resolved = [resolve(part, account, region) for part in parts]
        return None if any(p is None for p in resolved) else str(separator).join(str(p) for p in resolved)
    return None


def partition_for_region(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def synthesize(config: ClusterConfig, context: Mapping[str, Any]) -> PlannedStacks:
    """IamStack and K8sClusterStack of ``config``, synthesized in-process with the app's context (feature flags)."""
    import aws_cdk as cdk  # imported here: reading an assembly needs no CDK

    from stages.compose import add_cluster_stacks

    with tempfile.TemporaryDirectory(prefix="preflight-") as outdir:
        app = cdk.App(context=dict(context), outdir=outdir)
        add_cluster_stacks(app, config)
        assembly = app.synth()
        return PlannedStacks({stack.stack_name: dict(stack.template) for stack in assembly.stacks})


def from_assembly(directory: Path) -> PlannedStacks:
    """Every stack template of one cloud assembly directory (not its nested ones): in the pipeline, a stage's
    (``cdk.out/assembly-PipelineStack-Staging``, the directory CDK names after the stage's ``artifact_id``)."""
    manifest_file = directory / "manifest.json"
    if not manifest_file.is_file():
        raise ValueError(f"--assembly {directory}: no manifest.json (not a cloud assembly such as cdk.out)")
    found: dict[str, Mapping[str, Any]] = {}
    for artifact in json.loads(manifest_file.read_text()).get("artifacts", {}).values():
        properties = artifact.get("properties", {})
        if artifact.get("type") == "aws:cloudformation:stack":
            found[properties["stackName"]] = json.loads((directory / properties["templateFile"]).read_text())
    if not found:
        raise ValueError(
            f"--assembly {directory}: the assembly holds no stack (a stage's is assembly-<pipeline>-<stage>)"
        )
    return PlannedStacks(found)
