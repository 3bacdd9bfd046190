"""The hardened launch template shared by control-plane and worker groups."""

from __future__ import annotations

from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct

from stages.config import ClusterConfig
from stages.user_data import agent_user_data

ROOT_DEVICE = "/dev/xvda"  # Amazon Linux 2023, the AMI's parent image
ROOT_VOLUME_GIB = 50


def machine_image(config: ClusterConfig) -> ec2.IMachineImage:
    if config.ami_is_ssm_parameter:
        # Resolved by CloudFormation at deploy time: synth stays offline and picks up each new AMI.
        return ec2.MachineImage.from_ssm_parameter(config.ami, os=ec2.OperatingSystemType.LINUX)
    return ec2.MachineImage.generic_linux({config.region: config.ami})


def node_launch_template(
    scope: Construct,
    construct_id: str,
    *,
    config: ClusterConfig,
    name: str,
    instance_type: str,
    role_name: str,
    security_group: ec2.ISecurityGroup,
    key: kms.IKey,
    agent_config: dict[str, Any],
) -> ec2.LaunchTemplate:
    template = ec2.LaunchTemplate(
        scope,
        construct_id,
        launch_template_name=name,
        instance_type=ec2.InstanceType(instance_type),
        machine_image=machine_image(config),
        user_data=agent_user_data(cdk.Stack.of(scope), agent_config),
        security_group=security_group,
        instance_profile=iam.InstanceProfile.from_instance_profile_name(scope, f"{construct_id}Profile", role_name),
        require_imdsv2=True,
        # Hop limit 1: pods cannot reach the instance metadata (and the node role) through the node;
        # pods get AWS credentials through IRSA instead.
        http_put_response_hop_limit=1,
        http_tokens=ec2.LaunchTemplateHttpTokens.REQUIRED,
        detailed_monitoring=True,
        ebs_optimized=True,
        block_devices=[
            ec2.BlockDevice(
                device_name=ROOT_DEVICE,
                volume=ec2.BlockDeviceVolume.ebs(
                    ROOT_VOLUME_GIB,
                    encrypted=True,
                    kms_key=key,
                    volume_type=ec2.EbsDeviceVolumeType.GP3,
                    delete_on_termination=True,
                ),
            )
        ],
    )
    cfn = template.node.default_child
    assert isinstance(cfn, ec2.CfnLaunchTemplate)
    cfn.add_property_override("LaunchTemplateData.Placement.Tenancy", config.tenancy)
    # Resource-name hostnames (i-....<region>.compute.internal): the instance's private DNS name is then the node
    # name the agent registers (node_agent/instance.py), so the cloud controller manager's node addresses, the
    # kubelet serving certificate's DNS name and kubelet-csr-approver's name check all agree on one name.
    cfn.add_property_override(
        "LaunchTemplateData.PrivateDnsNameOptions",
        {
            "HostnameType": "resource-name",
            "EnableResourceNameDnsARecord": True,
            "EnableResourceNameDnsAAAARecord": False,
        },
    )
    return template


LAUNCH_HOOK_NAME = "dk8s-launch"
TERMINATE_HOOK_NAME = "dk8s-terminate"


def lifecycle_hooks_at_creation(
    group: autoscaling.AutoScalingGroup,
    *,
    launch_timeout: int,
    terminate_timeout: int,
    terminate_default: str,
) -> None:
    """The group's launch and terminate hooks, in its ``LifecycleHookSpecificationList``.

    Not ``group.add_lifecycle_hook``: that creates separate ``AWS::AutoScaling::LifecycleHook`` resources, which
    CloudFormation creates only after the group, whose first instances are then already launching without a hook
    (no Pending:Wait, so a control-plane node goes InService before it is healthy). Hooks in the specification list
    are created with the group, before any instance. ``terminate_default`` is ``"ABANDON"`` or ``"CONTINUE"``.
    """
    if terminate_default not in ("ABANDON", "CONTINUE"):
        raise ValueError(f"terminate_default {terminate_default!r}: a lifecycle hook's default is ABANDON or CONTINUE")
    cfn_group = group.node.default_child
    assert isinstance(cfn_group, autoscaling.CfnAutoScalingGroup)
    cfn_group.lifecycle_hook_specification_list = [
        # Launch: the agent completes with CONTINUE only when the node is healthy; if it never answers,
        # ABANDON terminates the instance and the group launches a fresh one (healthy before InService).
        autoscaling.CfnAutoScalingGroup.LifecycleHookSpecificationProperty(
            lifecycle_hook_name=LAUNCH_HOOK_NAME,
            lifecycle_transition="autoscaling:EC2_INSTANCE_LAUNCHING",
            heartbeat_timeout=launch_timeout,
            default_result="ABANDON",
        ),
        autoscaling.CfnAutoScalingGroup.LifecycleHookSpecificationProperty(
            lifecycle_hook_name=TERMINATE_HOOK_NAME,
            lifecycle_transition="autoscaling:EC2_INSTANCE_TERMINATING",
            heartbeat_timeout=terminate_timeout,
            default_result=terminate_default,
        ),
    ]
