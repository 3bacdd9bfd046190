"""The control-plane role, as synthesized, against the exact calls the AWS cloud controller manager makes for a
Service of type LoadBalancer (cloud-provider-aws pkg/providers/v1/aws_loadbalancer.go and aws.go): the classic
ELB (the default) and the NLB (annotation aws-load-balancer-type: nlb), both with instance targets.

Evaluated by twin/iam_policy.py (identity-policy evaluation as the IAM User Guide's "Policy evaluation logic"
describes it). Each request is modelled as AWS authorizes it, not more kindly:

* a create is authorized on the new resource, which has no tags yet: its context carries ``aws:RequestTag/*``
  and ``aws:TagKeys`` from the request, never ``aws:ResourceTag/*``;
* tags sent with a create are authorized as a separate tagging action (``elasticloadbalancing:AddTags``,
  ``ec2:CreateTags``) whose context carries the create's name in ``elasticloadbalancing:CreateAction`` /
  ``ec2:CreateAction`` ("Tag your resources during creation" in the Elastic Load Balancing docs; "Grant
  permission to tag Amazon EC2 resources during creation" in the EC2 User Guide; the AWS Load Balancer
  Controller's reference policy docs/install/iam_policy.json grants AddTags on exactly that condition);
* CreateSecurityGroup is authorized on the security group AND on the VPC it goes into; the VPC's context has
  the VPC's own tags, not the request's (Service Authorization Reference, Amazon EC2: CreateSecurityGroup
  lists vpc with aws:ResourceTag, security-group with aws:RequestTag);
* a call on an existing resource has that resource's tags as ``aws:ResourceTag/*`` and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
from aws_cdk.assertions import Template

from twin.iam_policy import IntrinsicResolver, Statement, is_allowed, principal_statements, role_logical_id

ACCOUNT = "123456789012"
REGION = "us-east-1"
ROLE = "dk8s-dedicated-k8s-control-plane-node"
OWNED = {"kubernetes.io/cluster/dedicated-k8s": "owned"}
# What buildTags(ResourceLifecycleOwned, ...) puts in every create: the cluster tag and the Service's name.
CCM_CREATE_TAGS = {**OWNED, "kubernetes.io/service-name": "default/web"}
ELB = f"arn:aws:elasticloadbalancing:{REGION}:{ACCOUNT}"
CLASSIC_LB = f"{ELB}:loadbalancer/a0123456789abcdef0123456789abcde"
NLB = f"{ELB}:loadbalancer/net/a0123456789abcdef0123456789abcde/50dc6c495c0c9188"
TARGET_GROUP = f"{ELB}:targetgroup/k8s-default-web-4a1b2c3d4e/73e2d6bc24d8a067"
LISTENER = f"{ELB}:listener/net/a0123456789abcdef0123456789abcde/50dc6c495c0c9188/f2f7dc8efc522ab2"
EC2 = f"arn:aws:ec2:{REGION}:{ACCOUNT}"


def role_statements(template: Template) -> Sequence[Statement]:
    raw = template.to_json()
    resolve = IntrinsicResolver(
        pseudo={
            "AWS::Partition": "aws",
            "AWS::Region": REGION,
            "AWS::AccountId": ACCOUNT,
            "AWS::URLSuffix": "amazonaws.com",
        }
    )
    return principal_statements(raw, role_logical_id(raw, ROLE), resolve, role_name=ROLE).statements


@pytest.fixture(scope="module")
def policy(iam_template: Template) -> Sequence[Statement]:
    return role_statements(iam_template)


def create(tags: Mapping[str, str]) -> dict[str, Any]:
    """The context of a create request carrying ``tags`` (the new resource has none yet)."""
    return {**{f"aws:RequestTag/{k}": v for k, v in tags.items()}, "aws:TagKeys": list(tags)}


def tag_on_create(key: str, action: str, tags: Mapping[str, str]) -> dict[str, Any]:
    return {**create(tags), key: action}


def existing(tags: Mapping[str, str]) -> dict[str, Any]:
    return {f"aws:ResourceTag/{k}": v for k, v in tags.items()}


def allowed(policy: Sequence[Statement], action: str, arn: str, context: Mapping[str, Any]) -> bool:
    return is_allowed(policy, action, arn, context).allowed


# -- creating a load balancer -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "arn", "create_action"),
    [
        ("elasticloadbalancing:CreateLoadBalancer", CLASSIC_LB, "CreateLoadBalancer"),
        ("elasticloadbalancing:CreateLoadBalancer", NLB, "CreateLoadBalancer"),
        ("elasticloadbalancing:CreateTargetGroup", TARGET_GROUP, "CreateTargetGroup"),
    ],
    ids=["classic-elb", "nlb", "nlb-target-group"],
)
def test_a_create_tagged_owned_is_allowed_with_its_tags(
    policy: Sequence[Statement], action: str, arn: str, create_action: str
) -> None:
    assert allowed(policy, action, arn, create(CCM_CREATE_TAGS)), action
    tags = tag_on_create("elasticloadbalancing:CreateAction", create_action, CCM_CREATE_TAGS)
    assert allowed(policy, "elasticloadbalancing:AddTags", arn, tags), f"the tags sent with {create_action}"


def test_an_nlb_listener_is_created_on_an_owned_load_balancer_with_its_tags(policy: Sequence[Statement]) -> None:
    assert allowed(policy, "elasticloadbalancing:CreateListener", NLB, existing(CCM_CREATE_TAGS))
    tags = tag_on_create("elasticloadbalancing:CreateAction", "CreateListener", CCM_CREATE_TAGS)
    assert allowed(policy, "elasticloadbalancing:AddTags", LISTENER, tags)
    assert not allowed(policy, "elasticloadbalancing:CreateListener", NLB, existing({})), "not on a foreign LB"


@pytest.mark.parametrize(
    "tags",
    [{}, {"kubernetes.io/cluster/someone-else": "owned"}, {"kubernetes.io/cluster/dedicated-k8s": "shared"}],
    ids=["untagged", "another-cluster", "shared-not-owned"],
)
def test_a_create_that_is_not_tagged_owned_by_this_cluster_is_denied(
    policy: Sequence[Statement], tags: dict[str, str]
) -> None:
    for arn in (CLASSIC_LB, NLB):
        assert not allowed(policy, "elasticloadbalancing:CreateLoadBalancer", arn, create(tags))
        context = tag_on_create("elasticloadbalancing:CreateAction", "CreateLoadBalancer", tags)
        assert not allowed(policy, "elasticloadbalancing:AddTags", arn, context)
    assert not allowed(policy, "elasticloadbalancing:CreateTargetGroup", TARGET_GROUP, create(tags))


def test_add_tags_cannot_claim_an_existing_foreign_load_balancer(policy: Sequence[Statement]) -> None:
    """Tagging someone's LB owned would hand it to the owned-resource statement (and to DeleteLoadBalancer)."""
    for arn in (CLASSIC_LB, NLB, TARGET_GROUP):
        assert not allowed(policy, "elasticloadbalancing:AddTags", arn, {**existing({}), **create(OWNED)}), arn
        foreign = existing({"kubernetes.io/cluster/someone-else": "owned"})
        assert not allowed(policy, "elasticloadbalancing:AddTags", arn, {**foreign, **create(OWNED)}), arn
        # the CreateAction key is set by ELB itself for a create, never by a plain AddTags call
        other_create = tag_on_create("elasticloadbalancing:CreateAction", "CreateRule", OWNED)
        assert not allowed(policy, "elasticloadbalancing:AddTags", arn, other_create), arn
    # the CCM's own tag updates (the additional-tags annotation) on a load balancer it owns stay allowed
    assert allowed(policy, "elasticloadbalancing:AddTags", CLASSIC_LB, {**existing(OWNED), **create({"team": "a"})})


# -- the classic ELB's and the NLB's follow-up calls ----------------------------------------------------------

CLASSIC_ELB_CALLS = (
    "elasticloadbalancing:ConfigureHealthCheck",
    "elasticloadbalancing:RegisterInstancesWithLoadBalancer",
    "elasticloadbalancing:DeregisterInstancesFromLoadBalancer",
    "elasticloadbalancing:CreateLoadBalancerListeners",
    "elasticloadbalancing:DeleteLoadBalancerListeners",
    "elasticloadbalancing:AttachLoadBalancerToSubnets",
    "elasticloadbalancing:DetachLoadBalancerFromSubnets",
    "elasticloadbalancing:ApplySecurityGroupsToLoadBalancer",
    "elasticloadbalancing:ModifyLoadBalancerAttributes",
    "elasticloadbalancing:CreateLoadBalancerPolicy",
    "elasticloadbalancing:SetLoadBalancerPoliciesOfListener",
    "elasticloadbalancing:SetLoadBalancerPoliciesForBackendServer",
    "elasticloadbalancing:DeleteLoadBalancer",
)
NLB_CALLS = (
    ("elasticloadbalancing:ModifyLoadBalancerAttributes", NLB),
    ("elasticloadbalancing:SetSecurityGroups", NLB),
    ("elasticloadbalancing:ModifyListener", LISTENER),
    ("elasticloadbalancing:DeleteListener", LISTENER),
    ("elasticloadbalancing:ModifyTargetGroup", TARGET_GROUP),
    ("elasticloadbalancing:ModifyTargetGroupAttributes", TARGET_GROUP),
    ("elasticloadbalancing:RegisterTargets", TARGET_GROUP),
    ("elasticloadbalancing:DeregisterTargets", TARGET_GROUP),
    ("elasticloadbalancing:DeleteTargetGroup", TARGET_GROUP),
    ("elasticloadbalancing:DeleteLoadBalancer", NLB),
)


@pytest.mark.parametrize("action", CLASSIC_ELB_CALLS)
def test_classic_elb_calls_are_allowed_on_an_owned_elb_only(policy: Sequence[Statement], action: str) -> None:
    assert allowed(policy, action, CLASSIC_LB, existing(CCM_CREATE_TAGS)), action
    assert not allowed(policy, action, CLASSIC_LB, existing({"kubernetes.io/cluster/someone-else": "owned"}))
    assert not allowed(policy, action, CLASSIC_LB, existing({}))


@pytest.mark.parametrize(("action", "arn"), NLB_CALLS)
def test_nlb_calls_are_allowed_on_owned_resources_only(policy: Sequence[Statement], action: str, arn: str) -> None:
    assert allowed(policy, action, arn, existing(CCM_CREATE_TAGS)), action
    assert not allowed(policy, action, arn, existing({})), action


@pytest.mark.parametrize(
    "action",
    [
        "elasticloadbalancing:DescribeLoadBalancers",
        "elasticloadbalancing:DescribeLoadBalancerAttributes",
        "elasticloadbalancing:DescribeLoadBalancerPolicies",
        "elasticloadbalancing:DescribeListeners",
        "elasticloadbalancing:DescribeTargetGroups",
        "elasticloadbalancing:DescribeTargetGroupAttributes",
        "elasticloadbalancing:DescribeTargetHealth",
        "elasticloadbalancing:DescribeTags",
    ],
)
def test_the_reads_the_load_balancer_code_makes_are_allowed(policy: Sequence[Statement], action: str) -> None:
    """Describe calls have no resource-level permissions: they are authorized on ``*``."""
    assert allowed(policy, action, "*", {})


# -- the load balancer's security group -----------------------------------------------------------------------

SECURITY_GROUP = f"{EC2}:security-group/*"
CLUSTER_VPC = f"{EC2}:vpc/vpc-0a1b2c3d4e5f60718"


def test_the_elb_security_group_is_created_tagged_owned_in_the_cluster_vpc(policy: Sequence[Statement]) -> None:
    assert allowed(policy, "ec2:CreateSecurityGroup", SECURITY_GROUP, create(CCM_CREATE_TAGS))
    assert allowed(policy, "ec2:CreateSecurityGroup", CLUSTER_VPC, existing(OWNED)), "the VPC it goes into"
    tags = tag_on_create("ec2:CreateAction", "CreateSecurityGroup", CCM_CREATE_TAGS)
    assert allowed(policy, "ec2:CreateTags", SECURITY_GROUP, tags)
    # the same create in a VPC that is not the cluster's, or without the owned tag, is denied
    assert not allowed(policy, "ec2:CreateSecurityGroup", f"{EC2}:vpc/vpc-0ffffffffffffffff", existing({}))
    assert not allowed(policy, "ec2:CreateSecurityGroup", SECURITY_GROUP, create({}))


def test_create_tags_cannot_claim_an_existing_security_group(policy: Sequence[Statement]) -> None:
    foreign = f"{EC2}:security-group/sg-0123456789abcdef0"
    assert not allowed(policy, "ec2:CreateTags", foreign, {**existing({}), **create(OWNED)})
    assert not allowed(policy, "ec2:CreateTags", foreign, tag_on_create("ec2:CreateAction", "RunInstances", OWNED))
    assert allowed(policy, "ec2:AuthorizeSecurityGroupIngress", foreign, existing(OWNED)), "once owned: rules"
    assert not allowed(policy, "ec2:AuthorizeSecurityGroupIngress", foreign, existing({}))


def test_an_imported_vpc_is_named_by_its_id(synth: Callable[..., dict[str, Template]]) -> None:
    """An imported VPC may carry no cluster tag (blue/green shares one): the grant names it instead."""
    imported = "vpc-0123456789abcdef0"
    templates = synth(
        {
            "vpcId": imported,
            "vpcCidr": "10.40.0.0/16",
            "privateSubnetIds": ["subnet-0aaaaaaaaaaaaaaa1", "subnet-0aaaaaaaaaaaaaaa2", "subnet-0aaaaaaaaaaaaaaa3"],
            "privateRouteTableIds": ["rtb-0aaaaaaaaaaaaaaa1", "rtb-0aaaaaaaaaaaaaaa2", "rtb-0aaaaaaaaaaaaaaa3"],
        }
    )
    policy = role_statements(templates["IamStack"])
    assert allowed(policy, "ec2:CreateSecurityGroup", f"{EC2}:vpc/{imported}", existing({}))
    assert not allowed(policy, "ec2:CreateSecurityGroup", f"{EC2}:vpc/vpc-0ffffffffffffffff", existing(OWNED))
