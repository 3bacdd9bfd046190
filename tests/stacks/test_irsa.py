"""IRSA in the templates: the issuer bucket exposes exactly two objects, the IAM OIDC provider trusts that issuer
for ``sts.amazonaws.com``, the control-plane role may write exactly those two objects, and ``irsa=false`` removes
all of it. IRSA is opt-in (the default is off, tests/stacks/test_first_deploy_template.py), so the templates here
are synthesized with ``irsa: true``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from aws_cdk.assertions import Template

from stages.config import IRSA_AUDIENCE, IRSA_DISCOVERY_KEY, IRSA_JWKS_KEY

TWO_KEYS = {IRSA_DISCOVERY_KEY, IRSA_JWKS_KEY}
ACCOUNT, REGION, PARTITION, SUFFIX = "${AWS::AccountId}", "${AWS::Region}", "${AWS::Partition}", "${AWS::URLSuffix}"
ISSUER_BUCKET = f"dk8s-dedicated-k8s-irsa-oidc-{ACCOUNT}-{REGION}"


def render(value: Any, ids: dict[str, str] | None = None) -> Any:
    """Fn::Join/Ref/GetAtt to one string (pseudo parameters as ``${AWS::X}``, a bucket's Arn by its name)."""
    ids = ids or {}
    if isinstance(value, dict) and "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return separator.join(str(render(part, ids)) for part in parts)
    if isinstance(value, dict) and "Ref" in value:
        return "${" + value["Ref"] + "}" if value["Ref"].startswith("AWS::") else ids.get(value["Ref"], value["Ref"])
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        logical_id, attribute = value["Fn::GetAtt"]
        return f"arn:{PARTITION}:s3:::{ids[logical_id]}" if attribute == "Arn" else f"{logical_id}.{attribute}"
    return value


@pytest.fixture(scope="module")
def with_irsa(synth: Callable[[dict[str, Any]], dict[str, Template]]) -> dict[str, Template]:
    return synth({"irsa": True})


# This module's cluster_template / iam_template are the IRSA-on templates (they shadow the default ones).
@pytest.fixture(scope="module")
def cluster_template(with_irsa: dict[str, Template]) -> Template:
    return with_irsa["K8sClusterStack"]


@pytest.fixture(scope="module")
def iam_template(with_irsa: dict[str, Template]) -> Template:
    return with_irsa["IamStack"]


def issuer_bucket(template: Template) -> tuple[str, dict[str, Any]]:
    found = [
        (logical_id, dict(bucket))
        for logical_id, bucket in template.find_resources("AWS::S3::Bucket").items()
        if render(bucket["Properties"].get("BucketName")) == ISSUER_BUCKET
    ]
    assert len(found) == 1
    return found[0]


def bucket_policy_statements(template: Template, logical_id: str) -> list[dict[str, Any]]:
    policies = [
        policy
        for policy in template.find_resources("AWS::S3::BucketPolicy").values()
        if policy["Properties"]["Bucket"] == {"Ref": logical_id}
    ]
    assert len(policies) == 1
    return list(policies[0]["Properties"]["PolicyDocument"]["Statement"])


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def test_the_issuer_bucket_is_encrypted_versioned_logged_and_never_acl_public(cluster_template: Template) -> None:
    logical_id, bucket = issuer_bucket(cluster_template)
    props = bucket["Properties"]
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "AES256"
    }
    log_buckets = [k for k in cluster_template.find_resources("AWS::S3::Bucket") if k.startswith("StateLogBucket")]
    assert props["LoggingConfiguration"] == {
        "DestinationBucketName": {"Ref": log_buckets[0]},
        "LogFilePrefix": "irsa-issuer-bucket/",
    }
    # ACLs can grant nothing (disabled and blocked); only the bucket policy's two-object grant is public.
    assert props["OwnershipControls"] == {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}
    block = props["PublicAccessBlockConfiguration"]
    assert block["BlockPublicAcls"] is True and block["IgnorePublicAcls"] is True
    # Kept on delete and replacement, not when its own create rolls back (the fixed name would block the retry).
    assert bucket["DeletionPolicy"] == "RetainExceptOnCreate" and bucket["UpdateReplacePolicy"] == "Retain"
    tls_only = [
        s
        for s in bucket_policy_statements(cluster_template, logical_id)
        if s["Effect"] == "Deny" and s.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}
    ]
    assert len(tls_only) == 1 and tls_only[0]["Action"] == "s3:*"


def test_anyone_may_read_exactly_the_discovery_document_and_the_jwks_and_nothing_else(
    cluster_template: Template,
) -> None:
    logical_id, _ = issuer_bucket(cluster_template)
    statements = bucket_policy_statements(cluster_template, logical_id)
    allows = [s for s in statements if s["Effect"] == "Allow"]
    assert len(allows) == 1, allows
    allow = allows[0]
    assert allow["Principal"] == {"AWS": "*"}
    assert as_list(allow["Action"]) == ["s3:GetObject"]
    assert "Condition" not in allow
    resources = {render(r, {logical_id: ISSUER_BUCKET}) for r in as_list(allow["Resource"])}
    assert resources == {f"arn:{PARTITION}:s3:::{ISSUER_BUCKET}/{key}" for key in TWO_KEYS}
    assert all(s["Effect"] == "Deny" for s in statements if s is not allow)


def test_the_oidc_provider_trusts_the_issuer_url_for_sts_without_a_pinned_thumbprint(
    cluster_template: Template,
) -> None:
    providers = cluster_template.find_resources("AWS::IAM::OIDCProvider")
    assert len(providers) == 1
    ((provider_id, provider),) = providers.items()
    props = provider["Properties"]
    issuer = f"https://{ISSUER_BUCKET}.s3.{REGION}.{SUFFIX}"
    assert render(props["Url"]) == issuer
    assert props["ClientIdList"] == [IRSA_AUDIENCE] == ["sts.amazonaws.com"]
    assert "ThumbprintList" not in props
    bucket_id, _ = issuer_bucket(cluster_template)
    assert bucket_id in provider["DependsOn"]
    outputs = cluster_template.to_json()["Outputs"]
    assert render(outputs["IrsaIssuerUrl"]["Value"]) == issuer
    assert outputs["IrsaOidcProviderArn"]["Value"] == {"Fn::GetAtt": [provider_id, "Arn"]}


def control_plane_statements(template: Template) -> list[dict[str, Any]]:
    found = []
    for logical_id, policy in template.find_resources("AWS::IAM::Policy").items():
        if logical_id.startswith("ControlPlaneNodeRole"):
            found.extend(policy["Properties"]["PolicyDocument"]["Statement"])
    assert found
    return found


def test_the_control_plane_role_may_write_only_the_two_issuer_documents(iam_template: Template) -> None:
    statements = control_plane_statements(iam_template)
    writes = [s for s in statements if s.get("Sid") == "IrsaIssuerDocuments"]
    assert len(writes) == 1
    assert as_list(writes[0]["Action"]) == ["s3:PutObject"]
    resources = {render(r) for r in as_list(writes[0]["Resource"])}
    assert resources == {f"arn:{PARTITION}:s3:::{ISSUER_BUCKET}/{key}" for key in TWO_KEYS}
    # No other statement of any role in IamStack touches the issuer bucket (no read, list or delete of it).
    for logical_id, policy in iam_template.find_resources("AWS::IAM::Policy").items():
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            if statement is writes[0] or statement.get("Sid") == "IrsaIssuerDocuments":
                continue
            assert "irsa-oidc" not in json.dumps(statement), logical_id


@pytest.fixture(scope="module")
def without_irsa(synth: Callable[[dict[str, Any]], dict[str, Template]]) -> dict[str, Template]:
    return synth({"irsa": False})


def test_irsa_false_synthesizes_no_issuer_bucket_provider_grant_or_output(without_irsa: dict[str, Template]) -> None:
    cluster, iam_stack = without_irsa["K8sClusterStack"], without_irsa["IamStack"]
    cluster.resource_count_is("AWS::IAM::OIDCProvider", 0)
    assert "irsa-oidc" not in json.dumps(cluster.to_json())
    assert not {"IrsaIssuerUrl", "IrsaOidcProviderArn"} & set(cluster.to_json()["Outputs"])
    assert all(s.get("Sid") != "IrsaIssuerDocuments" for s in control_plane_statements(iam_stack))
    assert "irsa-oidc" not in json.dumps(iam_stack.to_json())


def launch_template_user_data(template: Template) -> dict[str, str]:
    return {
        logical_id: json.dumps(lt["Properties"]["LaunchTemplateData"]["UserData"])
        for logical_id, lt in template.find_resources("AWS::EC2::LaunchTemplate").items()
    }


def test_control_plane_nodes_get_the_issuer_and_its_bucket_in_their_agent_config(cluster_template: Template) -> None:
    bucket_id, _ = issuer_bucket(cluster_template)
    user_data = launch_template_user_data(cluster_template)
    control_plane = {k: v for k, v in user_data.items() if k.startswith("ControlPlane")}
    workers = {k: v for k, v in user_data.items() if k.startswith("Workers")}
    assert control_plane and workers
    for logical_id, text in control_plane.items():
        assert '\\"irsaIssuerUrl\\":\\"https://' in text and '\\"irsaBucket\\":\\"' in text, logical_id
        assert json.dumps({"Ref": bucket_id}) in text, "the bucket itself: nodes launch only once it exists"
    for logical_id, text in workers.items():
        assert "irsaIssuerUrl" not in text, f"{logical_id}: workers never publish the issuer documents"


def test_irsa_false_leaves_the_agent_config_without_an_issuer(without_irsa: dict[str, Template]) -> None:
    for logical_id, text in launch_template_user_data(without_irsa["K8sClusterStack"]).items():
        assert "irsaIssuerUrl" not in text and "irsaBucket" not in text, logical_id
