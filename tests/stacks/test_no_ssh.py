"""Access without SSH: no key pair and no port 22 anywhere, in any synthesized template; nodes carry the SSM
agent's permissions instead (Session Manager is the only way onto a node)."""

from __future__ import annotations

from typing import Any

from aws_cdk.assertions import Template


def _ingress_rules(template: Template) -> list[dict[str, Any]]:
    rules = [r["Properties"] for r in template.find_resources("AWS::EC2::SecurityGroupIngress").values()]
    for group in template.find_resources("AWS::EC2::SecurityGroup").values():
        rules.extend(group["Properties"].get("SecurityGroupIngress", []))
    return rules


def _opens_port(rule: dict[str, Any], port: int) -> bool:
    if str(rule.get("IpProtocol")) == "-1":
        return True
    low, high = rule.get("FromPort"), rule.get("ToPort")
    return isinstance(low, int) and isinstance(high, int) and low <= port <= high


def test_no_template_has_a_key_pair_or_opens_port_22(templates: dict[str, Template]) -> None:
    checked = 0
    for name, template in templates.items():
        assert not template.find_resources("AWS::EC2::KeyPair"), name
        for lt in template.find_resources("AWS::EC2::LaunchTemplate").values():
            assert "KeyName" not in lt["Properties"]["LaunchTemplateData"], name
        for instance in template.find_resources("AWS::EC2::Instance").values():
            assert "KeyName" not in instance["Properties"], name
        for rule in _ingress_rules(template):
            checked += 1
            assert not _opens_port(rule, 22), f"{name}: {rule}"
    assert checked > 0, "the check saw the cluster's ingress rules"


def test_no_ingress_rule_is_open_to_everything(templates: dict[str, Template]) -> None:
    for name, template in templates.items():
        for rule in _ingress_rules(template):
            assert rule.get("CidrIp") != "0.0.0.0/0" and rule.get("CidrIpv6") != "::/0", f"{name}: {rule}"
            assert str(rule.get("IpProtocol")) != "-1" or "SourceSecurityGroupId" in rule, f"{name}: {rule}"


def test_nodes_can_be_reached_through_session_manager(iam_template: Template) -> None:
    policies = iam_template.find_resources("AWS::IAM::Policy")
    actions: set[str] = set()
    for policy in policies.values():
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            listed = statement["Action"]
            actions.update([listed] if isinstance(listed, str) else listed)
    assert {"ssmmessages:CreateControlChannel", "ssmmessages:OpenDataChannel", "ssm:UpdateInstanceInformation"} <= (
        actions
    )
