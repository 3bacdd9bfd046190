"""The twin's IAM identity-policy evaluator (twin/iam_policy.py) against the rules AWS documents.

Sources: IAM User Guide, "Policy evaluation logic" and "The difference between explicit and implicit denies"
(https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_evaluation-logic.html), "IAM JSON policy
elements: Condition operators"
(https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_elements_condition_operators.html),
"IAM JSON policy elements: Action / Resource" (wildcards), and Secrets Manager's "Limiting access to specific
secrets" (the ``-??????`` suffix pattern).
"""

from __future__ import annotations

from typing import Any

import pytest

from twin.iam_policy import (
    IntrinsicResolver,
    PolicyError,
    Statement,
    is_allowed,
    principal_statements,
    role_logical_id,
    statements_from_document,
)

TABLE = "arn:aws:dynamodb:eu-west-1:123456789012:table/dk8s-state"
PSEUDO = {
    "AWS::Partition": "aws",
    "AWS::Region": "eu-west-1",
    "AWS::AccountId": "123456789012",
    "AWS::URLSuffix": "amazonaws.com",
}


def doc(*statements: dict[str, Any]) -> list[Statement]:
    return statements_from_document({"Version": "2012-10-17", "Statement": list(statements)}, "test-policy")


def allow(action: Any, resource: Any = "*", **extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": action, "Resource": resource, **extra}


# -- evaluation logic ---------------------------------------------------------------------------------------------
def test_no_statement_is_an_implicit_deny() -> None:
    d = is_allowed(doc(allow("dynamodb:PutItem", TABLE)), "dynamodb:GetItem", TABLE)
    assert not d.allowed
    assert d.statement is None
    assert "implicit deny" in d.reason


def test_an_explicit_deny_wins_over_an_allow_in_any_order() -> None:
    statements = doc(
        allow("dynamodb:*", "*", Sid="All"),
        {"Effect": "Deny", "Action": "dynamodb:DeleteItem", "Resource": TABLE, "Sid": "NoDelete"},
    )
    for order in (statements, list(reversed(statements))):
        d = is_allowed(order, "dynamodb:DeleteItem", TABLE)
        assert not d.allowed
        assert d.statement is not None and d.statement.sid == "NoDelete"
        assert "explicitly denied by test-policy:NoDelete" in d.reason
    assert is_allowed(statements, "dynamodb:GetItem", TABLE).allowed


def test_actions_match_case_insensitively_with_wildcards() -> None:
    statements = doc(allow(["autoscaling:Describe*", "ec2:DescribeInstance?"]))
    assert is_allowed(statements, "AutoScaling:describeautoscalinggroups", "*").allowed
    assert is_allowed(statements, "ec2:DescribeInstances", "*").allowed
    assert not is_allowed(statements, "ec2:DescribeInstanceStatus", "*").allowed  # ? is exactly one character
    assert not is_allowed(statements, "autoscaling:SetDesiredCapacity", "*").allowed


def test_resources_match_case_sensitively_and_star_crosses_separators() -> None:
    statements = doc(allow("s3:GetObject", "arn:aws:s3:::bucket/snapshots/*"))
    assert is_allowed(statements, "s3:GetObject", "arn:aws:s3:::bucket/snapshots/2026/a:b.db").allowed
    assert not is_allowed(statements, "s3:GetObject", "arn:aws:s3:::bucket/Snapshots/x").allowed
    assert not is_allowed(statements, "s3:GetObject", "arn:aws:s3:::bucket/other/x").allowed


def test_the_secret_suffix_pattern_matches_exactly_six_characters() -> None:
    base = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:dk8s/etcd-client"
    statements = doc(allow("secretsmanager:GetSecretValue", f"{base}-??????"))
    assert is_allowed(statements, "secretsmanager:GetSecretValue", f"{base}-AbC123").allowed
    assert not is_allowed(statements, "secretsmanager:GetSecretValue", f"{base}-extra-AbC123").allowed
    assert not is_allowed(statements, "secretsmanager:GetSecretValue", base).allowed  # the ARN of no secret


def test_not_action_and_not_resource_invert_the_match() -> None:
    statements = doc(
        {"Effect": "Allow", "NotAction": "iam:*", "Resource": "*"},
        {"Effect": "Deny", "Action": "s3:*", "NotResource": "arn:aws:s3:::mine/*"},
    )
    assert not is_allowed(statements, "iam:CreateRole", "*").allowed
    assert is_allowed(statements, "s3:GetObject", "arn:aws:s3:::mine/x").allowed
    assert not is_allowed(statements, "s3:GetObject", "arn:aws:s3:::theirs/x").allowed


# -- conditions ----------------------------------------------------------------------------------------------------
KEY = "arn:aws:kms:eu-west-1:123456789012:key/1234"
TAGGED = allow(
    "kms:Decrypt", "arn:aws:kms:eu-west-1:123456789012:key/*",
    Condition={"StringEquals": {"aws:ResourceTag/dedicated-k8s:cluster": "twin"}},
)  # fmt: skip


def test_string_equals_needs_the_key_and_an_exact_value() -> None:
    statements = doc(TAGGED)
    assert is_allowed(statements, "kms:Decrypt", KEY, {"aws:ResourceTag/dedicated-k8s:cluster": "twin"}).allowed
    # condition key names are case-insensitive, values (for StringEquals) are not
    assert is_allowed(statements, "kms:Decrypt", KEY, {"AWS:resourcetag/dedicated-k8s:cluster": "twin"}).allowed
    assert not is_allowed(statements, "kms:Decrypt", KEY, {"aws:ResourceTag/dedicated-k8s:cluster": "Twin"}).allowed
    assert not is_allowed(statements, "kms:Decrypt", KEY, {}).allowed  # an untagged key: the key is missing


def test_several_values_are_ored_several_keys_and_operators_anded() -> None:
    statements = doc(
        allow(
            "ec2:CreateTags",
            Condition={
                "StringEquals": {"aws:RequestTag/env": ["dev", "test"], "aws:RequestTag/team": "k8s"},
                "StringLike": {"ec2:CreateAction": "Run*"},
            },
        )
    )
    ok = {"aws:RequestTag/env": "test", "aws:RequestTag/team": "k8s", "ec2:CreateAction": "RunInstances"}
    assert is_allowed(statements, "ec2:CreateTags", "*", ok).allowed
    assert not is_allowed(statements, "ec2:CreateTags", "*", {**ok, "aws:RequestTag/team": "web"}).allowed
    assert not is_allowed(statements, "ec2:CreateTags", "*", {**ok, "ec2:CreateAction": "CreateVolume"}).allowed


def test_a_negated_operator_is_true_for_a_missing_key_and_must_match_no_value() -> None:
    statements = doc(allow("sqs:SendMessage", Condition={"StringNotEquals": {"aws:SourceVpce": ["vpce-1", "vpce-2"]}}))
    assert is_allowed(statements, "sqs:SendMessage", "*", {}).allowed
    assert is_allowed(statements, "sqs:SendMessage", "*", {"aws:SourceVpce": "vpce-3"}).allowed
    assert not is_allowed(statements, "sqs:SendMessage", "*", {"aws:SourceVpce": "vpce-2"}).allowed


def test_if_exists_passes_a_missing_key_but_still_checks_a_present_one() -> None:
    statements = doc(allow("ec2:StartInstances", Condition={"StringEqualsIfExists": {"ec2:ResourceTag/role": "cp"}}))
    assert is_allowed(statements, "ec2:StartInstances", "*", {}).allowed
    assert is_allowed(statements, "ec2:StartInstances", "*", {"ec2:ResourceTag/role": "cp"}).allowed
    assert not is_allowed(statements, "ec2:StartInstances", "*", {"ec2:ResourceTag/role": "worker"}).allowed


def test_null_tests_presence() -> None:
    absent = doc(allow("s3:PutObject", Condition={"Null": {"s3:x-amz-server-side-encryption": "true"}}))
    present = doc(allow("s3:PutObject", Condition={"Null": {"s3:x-amz-server-side-encryption": "false"}}))
    ctx = {"s3:x-amz-server-side-encryption": "aws:kms"}
    assert is_allowed(absent, "s3:PutObject", "*", {}).allowed
    assert not is_allowed(absent, "s3:PutObject", "*", ctx).allowed
    assert is_allowed(present, "s3:PutObject", "*", ctx).allowed
    assert not is_allowed(present, "s3:PutObject", "*", {}).allowed


def test_set_qualifiers_for_multivalued_keys() -> None:
    all_of = doc(allow("ec2:CreateTags", Condition={"ForAllValues:StringEquals": {"aws:TagKeys": ["Name", "env"]}}))
    any_of = doc(allow("ec2:CreateTags", Condition={"ForAnyValue:StringEquals": {"aws:TagKeys": ["Name", "env"]}}))
    assert is_allowed(all_of, "ec2:CreateTags", "*", {"aws:TagKeys": ["Name", "env"]}).allowed
    assert not is_allowed(all_of, "ec2:CreateTags", "*", {"aws:TagKeys": ["Name", "owner"]}).allowed
    assert is_allowed(all_of, "ec2:CreateTags", "*", {}).allowed  # ForAllValues: true for a missing key
    assert is_allowed(any_of, "ec2:CreateTags", "*", {"aws:TagKeys": ["owner", "env"]}).allowed
    assert not is_allowed(any_of, "ec2:CreateTags", "*", {}).allowed  # ForAnyValue: false for a missing key


def test_arn_like_matches_each_arn_part_on_its_own() -> None:
    statements = doc(
        allow("sqs:SendMessage", Condition={"ArnLike": {"aws:SourceArn": "arn:aws:events:*:123456789012:rule/*"}})
    )
    ok = {"aws:SourceArn": "arn:aws:events:eu-west-1:123456789012:rule/dk8s-reconcile"}
    assert is_allowed(statements, "sqs:SendMessage", "*", ok).allowed
    other_account = {"aws:SourceArn": "arn:aws:events:eu-west-1:999999999999:rule/x"}
    assert not is_allowed(statements, "sqs:SendMessage", "*", other_account).allowed
    assert not is_allowed(statements, "sqs:SendMessage", "*", {"aws:SourceArn": "not-an-arn"}).allowed
    equals = doc(allow("sqs:SendMessage", Condition={"ArnEquals": {"aws:SourceArn": ok["aws:SourceArn"]}}))
    assert is_allowed(equals, "sqs:SendMessage", "*", ok).allowed
    assert not is_allowed(equals, "sqs:SendMessage", "*", other_account).allowed


def test_bool_compares_true_and_false() -> None:
    statements = doc(allow("kms:CreateGrant", Condition={"Bool": {"kms:GrantIsForAWSResource": "true"}}))
    assert is_allowed(statements, "kms:CreateGrant", "*", {"kms:GrantIsForAWSResource": True}).allowed
    assert not is_allowed(statements, "kms:CreateGrant", "*", {"kms:GrantIsForAWSResource": "false"}).allowed
    assert not is_allowed(statements, "kms:CreateGrant", "*", {}).allowed


def test_an_operator_the_evaluator_does_not_know_fails_loudly_naming_it() -> None:
    with pytest.raises(PolicyError, match="NumericLessThan"):
        doc(allow("s3:GetObject", Condition={"NumericLessThan": {"s3:max-keys": "10"}}))
    with pytest.raises(PolicyError, match="Effect 'Maybe'"):
        doc({"Effect": "Maybe", "Action": "s3:*", "Resource": "*"})
    with pytest.raises(PolicyError, match="Action / NotAction"):
        doc({"Effect": "Allow", "Resource": "*"})


# -- reading a template ------------------------------------------------------------------------------------------------
def _arn(service: str, resource: str) -> dict[str, Any]:
    """How CDK synthesizes ``stack.format_arn``: a Fn::Join over the pseudo parameters."""
    return {
        "Fn::Join": [
            "",
            ["arn:", {"Ref": "AWS::Partition"}, f":{service}:", {"Ref": "AWS::Region"}, ":",
             {"Ref": "AWS::AccountId"}, f":{resource}"],
        ]
    }  # fmt: skip


GROUP_SUB = (
    "arn:${AWS::Partition}:autoscaling:${AWS::Region}:${AWS::AccountId}:autoScalingGroup:*:"
    "autoScalingGroupName/${GroupName}"
)
TEMPLATE: dict[str, Any] = {
    "Resources": {
        "LifecycleRole": {
            "Type": "AWS::IAM::Role",
            "Properties": {
                "RoleName": "dk8s-lifecycle",
                "Policies": [
                    {
                        "PolicyName": "inline",
                        "PolicyDocument": {"Statement": [allow("sqs:SendMessage", {"Fn::GetAtt": ["Queue", "Arn"]})]},
                    }
                ],
                "ManagedPolicyArns": [
                    {"Ref": "SharedPolicy"},
                    {"Fn::Sub": "arn:${AWS::Partition}:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"},
                ],
            },
        },
        "OtherRole": {"Type": "AWS::IAM::Role", "Properties": {"RoleName": "other"}},
        "LifecyclePolicy": {
            "Type": "AWS::IAM::Policy",
            "Properties": {
                "Roles": [{"Ref": "LifecycleRole"}],
                "PolicyDocument": {
                    "Statement": [
                        {**allow("dynamodb:GetItem", _arn("dynamodb", "table/dk8s-state")), "Sid": "State"},
                        allow(
                            "autoscaling:CompleteLifecycleAction",
                            {"Fn::Sub": GROUP_SUB},
                        ),
                    ]
                },
            },
        },
        "SharedPolicy": {
            "Type": "AWS::IAM::ManagedPolicy",
            "Properties": {"PolicyDocument": {"Statement": [allow("ec2:DescribeInstances")]}},
        },
        "OtherPolicy": {
            "Type": "AWS::IAM::Policy",
            "Properties": {"Roles": [{"Ref": "OtherRole"}], "PolicyDocument": {"Statement": [allow("ec2:*")]}},
        },
        "LiteralPolicy": {  # another stack's policy attached by role name
            "Type": "AWS::IAM::Policy",
            "Properties": {"Roles": ["dk8s-lifecycle"], "PolicyDocument": {"Statement": [allow("logs:PutLogEvents")]}},
        },
    }
}


def resolver() -> IntrinsicResolver:
    refs = {"GroupName": "dk8s-control-plane-0"}
    return IntrinsicResolver(
        PSEUDO,
        ref=lambda name: refs[name],
        get_att=lambda name, attr: f"arn:aws:sqs:eu-west-1:123456789012:{name.lower()}-{attr.lower()}",
    )


def test_a_roles_statements_come_from_inline_attached_and_managed_policies_with_intrinsics_resolved() -> None:
    lid = role_logical_id(TEMPLATE, "dk8s-lifecycle")
    assert lid == "LifecycleRole"
    read = principal_statements(TEMPLATE, lid, resolver(), role_name="dk8s-lifecycle")
    st = read.statements
    assert is_allowed(st, "sqs:SendMessage", "arn:aws:sqs:eu-west-1:123456789012:queue-arn").allowed
    assert is_allowed(st, "dynamodb:GetItem", TABLE.replace("dk8s-state", "dk8s-state")).allowed
    group = (
        "arn:aws:autoscaling:eu-west-1:123456789012:autoScalingGroup:uuid-1:autoScalingGroupName/dk8s-control-plane-0"
    )
    assert is_allowed(st, "autoscaling:CompleteLifecycleAction", group).allowed
    assert not is_allowed(st, "autoscaling:CompleteLifecycleAction", group.replace("plane-0", "plane-1")).allowed
    assert is_allowed(st, "ec2:DescribeInstances", "*").allowed  # the template's ManagedPolicy, by Ref
    assert is_allowed(st, "logs:PutLogEvents", "*").allowed  # attached by the role's literal name
    assert not is_allowed(st, "ec2:TerminateInstances", "*").allowed  # OtherRole's ec2:* is not ours
    assert read.unreadable == ("arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",)
    d = is_allowed(st, "dynamodb:GetItem", TABLE)
    assert d.statement is not None and d.statement.describe() == "LifecyclePolicy:State"


def test_reading_fails_naming_what_it_cannot_resolve() -> None:
    with pytest.raises(PolicyError, match="no AWS::IAM::Role with RoleName 'missing'"):
        role_logical_id(TEMPLATE, "missing")
    with pytest.raises(PolicyError, match="'LifecyclePolicy' is not an AWS::IAM::Role"):
        principal_statements(TEMPLATE, "LifecyclePolicy", resolver())
    with pytest.raises(PolicyError, match=r"Fn::GetAtt Queue\.Arn cannot be resolved"):
        principal_statements(TEMPLATE, "LifecycleRole", IntrinsicResolver(PSEUDO, ref=lambda n: n))


def test_sub_keeps_an_escaped_literal_and_join_nests() -> None:
    r = resolver()
    assert r({"Fn::Sub": "${!Literal}-${AWS::Region}"}) == "${Literal}-eu-west-1"
    assert (
        r({"Fn::Sub": ["${A}/${GroupName}", {"A": {"Ref": "AWS::AccountId"}}]}) == "123456789012/dk8s-control-plane-0"
    )
    assert r({"Fn::Join": ["-", ["a", {"Fn::Join": ["", ["b", {"Ref": "AWS::URLSuffix"}]]}]]}) == "a-bamazonaws.com"
    with pytest.raises(PolicyError, match="Fn::ImportValue"):
        r({"Fn::ImportValue": "x"})
