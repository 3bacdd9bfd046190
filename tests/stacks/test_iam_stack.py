"""IamStack is least privilege: no wildcard actions, justified wildcard resources, partition-neutral."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Template

from lambdas.common.cluster_aws import CLUSTER_STATE_KEY, FIRST_SEEN_PREFIX
from lambdas.common.join_watch import WATCH_KEY
from lambdas.common.writer_lease import LEASE_KEY
from node_agent import election
from stages.config import ClusterConfig, ConfigError
from stages.iam_stack import (
    CCM_CREATE_ACTIONS,
    CCM_DESCRIBE_ACTIONS,
    CCM_TAG_ON_CREATE,
    CCM_TAGGED_ACTIONS,
    DESCRIBE_ACTIONS,
    NTH_DESCRIBE_ACTIONS,
    SSM_AGENT_ACTIONS,
    VPC_LAMBDA_ENI_ACTIONS,
    XRAY_ACTIONS,
)
from tests.stacks.conftest import ROOT

# Actions that may use Resource "*": no resource-level permissions, or scoped by a condition.
JUSTIFIED_WILDCARD_ACTIONS = {
    *SSM_AGENT_ACTIONS,
    *DESCRIBE_ACTIONS,
    *VPC_LAMBDA_ENI_ACTIONS,
    *XRAY_ACTIONS,
    *CCM_DESCRIBE_ACTIONS,
    *CCM_TAGGED_ACTIONS,
    *CCM_CREATE_ACTIONS,
    *(action for _, action, _, _ in CCM_TAG_ON_CREATE),
    *NTH_DESCRIBE_ACTIONS,
    "cloudwatch:PutMetricData",
}


def statements(template: Template) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for logical_id, policy in template.find_resources("AWS::IAM::Policy").items():
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            found.append((logical_id, statement))
    return found


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def test_no_action_is_a_wildcard(iam_template: Template) -> None:
    for logical_id, statement in statements(iam_template):
        for action in as_list(statement["Action"]):
            assert action != "*", logical_id
            assert not action.endswith(":*"), f"{logical_id}: {action}"


def test_every_wildcard_resource_is_justified(iam_template: Template) -> None:
    for logical_id, statement in statements(iam_template):
        if "*" in as_list(statement["Resource"]):
            unjustified = set(as_list(statement["Action"])) - JUSTIFIED_WILDCARD_ACTIONS
            assert not unjustified, f"{logical_id} {statement.get('Sid')}: {sorted(unjustified)}"


def test_mutating_cloud_controller_calls_need_the_cluster_tag(iam_template: Template) -> None:
    """On the resource (owned already), or for a tag sent with a create, in the request and only as part of
    that create (what the calls are allowed for: tests/stacks/test_ccm_iam.py)."""
    owned = "kubernetes.io/cluster/dedicated-k8s"
    tag_on_create = {action: (key, sorted(creates)) for _, action, key, creates in CCM_TAG_ON_CREATE}
    seen = 0
    for _, statement in statements(iam_template):
        actions = set(as_list(statement["Action"]))
        if not actions & (set(CCM_TAGGED_ACTIONS) | set(tag_on_create)):
            continue
        seen += 1
        if statement["Condition"] == {"StringEquals": {f"aws:ResourceTag/{owned}": "owned"}}:
            continue
        (action,) = actions
        key, creates = tag_on_create[action]
        condition = statement["Condition"]["StringEquals"]
        assert set(statement["Condition"]) == {"StringEquals"}
        assert sorted(as_list(condition[key])) == creates and condition[f"aws:RequestTag/{owned}"] == "owned"
    assert seen == 3, "the owned-resource statement and the two tag-on-create statements"


def test_lifecycle_lambda_completes_hooks_only_on_the_cluster_groups_and_reads_the_kube_client_secret(
    iam_template: Template,
) -> None:
    """It drains every terminating node (workers too) before completing the hook, with its own API certificate."""
    policies = iam_template.find_resources("AWS::IAM::Policy")
    (lifecycle,) = [p for logical_id, p in policies.items() if logical_id.startswith("EtcdLifecycleRolePolicy")]
    lifecycle_statements = lifecycle["Properties"]["PolicyDocument"]["Statement"]
    hook_statements = [s for s in lifecycle_statements if "autoscaling:CompleteLifecycleAction" in as_list(s["Action"])]
    assert len(hook_statements) == 1
    assert "autoscaling:RecordLifecycleActionHeartbeat" in as_list(hook_statements[0]["Action"])
    resources = as_list(hook_statements[0]["Resource"])
    groups = sorted(json.dumps(r).split("autoScalingGroupName/")[1].split('"')[0] for r in resources)
    workers = ["dk8s-dedicated-k8s-workers-general"]
    assert groups == sorted([f"dk8s-dedicated-k8s-control-plane-{index}" for index in range(3)] + workers)
    reads = [s["Resource"] for s in lifecycle_statements if "secretsmanager:GetSecretValue" in as_list(s["Action"])]
    assert "dedicated-k8s/dedicated-k8s/lifecycle-kube-client-??????" in json.dumps(reads)
    (reconciler,) = [p for logical_id, p in policies.items() if logical_id.startswith("EtcdReconcilerRolePolicy")]
    assert "lifecycle-kube-client" not in json.dumps(reconciler), "only the lifecycle Lambda drains"


def test_reconciler_cannot_complete_lifecycle_actions(iam_template: Template) -> None:
    policies = iam_template.find_resources("AWS::IAM::Policy")
    (reconciler,) = [p for logical_id, p in policies.items() if logical_id.startswith("EtcdReconcilerRolePolicy")]
    assert "CompleteLifecycleAction" not in json.dumps(reconciler)


def test_instance_profiles_carry_the_role_names_the_cluster_stack_imports(iam_template: Template) -> None:
    names = sorted(
        p["Properties"]["InstanceProfileName"]
        for p in iam_template.find_resources("AWS::IAM::InstanceProfile").values()
    )
    assert names == [
        "dk8s-dedicated-k8s-control-plane-node",
        "dk8s-dedicated-k8s-image-builder",
        "dk8s-dedicated-k8s-worker-node",
    ]


@pytest.mark.parametrize(
    ("region", "zones"),
    [
        ("us-gov-west-1", ["us-gov-west-1a", "us-gov-west-1b", "us-gov-west-1c"]),
        ("cn-north-1", ["cn-north-1a", "cn-north-1b", "cn-north-1d"]),
    ],
)
def test_templates_name_no_partition(synth: Callable[..., dict[str, Template]], region: str, zones: list[str]) -> None:
    templates = synth({"region": region, "availabilityZones": zones})
    for name, template in templates.items():
        assert "arn:aws:" not in json.dumps(template.to_json()), name


@pytest.mark.slow
def test_npx_cdk_synth_works_offline_without_credentials(tmp_path: Path) -> None:
    if not (ROOT / "node_modules" / ".bin" / "cdk").exists():
        pytest.fail("node_modules/.bin/cdk is missing: run `make setup` (npm ci)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env["JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION"] = "20"
    npx = shutil.which("npx")
    assert npx is not None
    started = time.monotonic()
    result = subprocess.run(
        [npx, "cdk", "synth", "--quiet", "--no-notices", "-o", str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    produced = {path.name for path in (tmp_path / "out").glob("*.template.json")}
    assert {"IamStack.template.json", "K8sClusterStack.template.json"} <= produced
    print(f"npx cdk synth took {elapsed:.1f} s")


def table_grants(policy: dict[str, Any]) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Each DynamoDB statement of a policy, as (the partition keys it is limited to) -> (its actions); every one
    must be on the cluster-state table and limited by ``dynamodb:LeadingKeys``."""
    grants: dict[tuple[str, ...], tuple[str, ...]] = {}
    for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
        if not any(a.startswith("dynamodb:") for a in as_list(statement["Action"])):
            continue
        assert json.dumps(statement["Resource"]).endswith(':table/dk8s-dedicated-k8s-cluster-state"]]}')
        ((operator, condition),) = statement["Condition"].items()
        assert operator in ("ForAllValues:StringEquals", "ForAllValues:StringLike") and list(condition) == [
            "dynamodb:LeadingKeys"
        ]
        grants[tuple(condition["dynamodb:LeadingKeys"])] = tuple(sorted(as_list(statement["Action"])))
    return grants


def test_the_lambdas_may_touch_only_their_own_items_of_the_cluster_state_table(iam_template: Template) -> None:
    """``dynamodb:LeadingKeys`` limits each grant to items whose partition key is listed ("Using IAM policy
    conditions for fine-grained access control", Amazon DynamoDB Developer Guide): the lifecycle Lambda writes
    only its writer lease (a conditional PutItem and DeleteItem, lambdas/common/writer_lease.py) and its
    first-sight records (``first-seen/*``, ClusterAws.first_seen); every Lambda may only *read* the nodes'
    cluster item ("was it initialised?", ClusterAws.etcd_tls), so none can overwrite the bootstrap lock or the
    "initialised" item; the reconciler reads and replaces only its records of the joins in flight."""
    policies = iam_template.find_resources("AWS::IAM::Policy")

    def policy_of(prefix: str) -> Any:
        (found,) = [p for logical_id, p in policies.items() if logical_id.startswith(prefix)]
        return found

    assert table_grants(policy_of("EtcdLifecycleRolePolicy")) == {
        (LEASE_KEY,): ("dynamodb:DeleteItem", "dynamodb:PutItem"),
        (f"{FIRST_SEEN_PREFIX}*",): ("dynamodb:GetItem", "dynamodb:PutItem"),
        (CLUSTER_STATE_KEY,): ("dynamodb:GetItem",),
    }
    assert table_grants(policy_of("EtcdReconcilerRolePolicy")) == {
        (WATCH_KEY,): ("dynamodb:GetItem", "dynamodb:PutItem"),
        (CLUSTER_STATE_KEY,): ("dynamodb:GetItem",),
    }
    assert table_grants(policy_of("ClusterOpsRolePolicy")) == {(CLUSTER_STATE_KEY,): ("dynamodb:GetItem",)}
    assert CLUSTER_STATE_KEY == election.PK, "the Lambdas read the very item the node agents write"


def test_cluster_ops_has_its_own_role_with_no_queue_no_hook_and_no_metrics(iam_template: Template) -> None:
    """cluster-ops (status, canary sentinel) used to share the reconciler's role, which may send to the
    lifecycle queue: its own role holds exactly what its handler calls (DescribeInstances for the etcd
    endpoints, the etcd client secret and its key, the cluster item read, its logs, X-Ray, VPC ENIs)."""
    roles = {r["Properties"]["RoleName"] for r in iam_template.find_resources("AWS::IAM::Role").values()}
    assert "dk8s-dedicated-k8s-cluster-ops" in roles
    policies = iam_template.find_resources("AWS::IAM::Policy")
    (ops,) = [p for logical_id, p in policies.items() if logical_id.startswith("ClusterOpsRolePolicy")]
    actions = {a for s in ops["Properties"]["PolicyDocument"]["Statement"] for a in as_list(s["Action"])}
    assert actions == {
        "ec2:DescribeInstances",
        "kms:Decrypt",
        "secretsmanager:GetSecretValue",
        "dynamodb:GetItem",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        *XRAY_ACTIONS,
        *VPC_LAMBDA_ENI_ACTIONS,
    }
    assert "cluster-ops" not in json.dumps(
        [p for logical_id, p in policies.items() if logical_id.startswith("EtcdReconcilerRolePolicy")]
    ), "the reconciler's role no longer writes the cluster-ops function's logs"


def test_the_auto_scaling_service_linked_role_is_not_created_by_default(templates: dict[str, Template]) -> None:
    """AWS::IAM::ServiceLinkedRole fails when the role exists already, as it does in every account that has
    used Auto Scaling (AWS::IAM::ServiceLinkedRole, AWS CloudFormation Template Reference; "Service-linked
    roles for Amazon EC2 Auto Scaling"): a default stack must deploy there."""
    for name, template in templates.items():
        assert template.find_resources("AWS::IAM::ServiceLinkedRole") == {}, name


def test_create_auto_scaling_service_linked_role_creates_exactly_that_role_in_iam_stack(
    synth: Callable[..., dict[str, Template]],
) -> None:
    """Opt-in for an account that never used Auto Scaling: the cluster key's policy names
    AWSServiceRoleForAutoScaling, and KMS refuses a key policy whose principal does not exist. IamStack is
    deployed before K8sClusterStack, so the role exists when the key is created."""
    templates = synth({"createAutoScalingServiceLinkedRole": True})
    roles = templates["IamStack"].find_resources("AWS::IAM::ServiceLinkedRole")
    assert [r["Properties"]["AWSServiceName"] for r in roles.values()] == ["autoscaling.amazonaws.com"]
    others = [
        name for name, t in templates.items() if name != "IamStack" and t.find_resources("AWS::IAM::ServiceLinkedRole")
    ]
    assert others == []


def test_create_auto_scaling_service_linked_role_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match="createAutoScalingServiceLinkedRole") as caught:
        ClusterConfig.from_mapping({"createAutoScalingServiceLinkedRole": "sometimes"})
    assert '"sometimes": must be true or false' in str(caught.value)
