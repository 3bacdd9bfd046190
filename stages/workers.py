"""Workers: one AutoScaling Group per configured worker group, spread over every private subnet."""

from __future__ import annotations

from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from constructs import Construct

from stages.config import ClusterConfig
from stages.nodes import lifecycle_hooks_at_creation, node_launch_template
from stages.security import ClusterSecurityGroups


def autoscaler_discovery_tags(cluster_name: str) -> dict[str, str]:
    """The tags node_agent.addons.cluster_autoscaler discovers worker groups by (and IAM scopes scaling to)."""
    return {"k8s.io/cluster-autoscaler/enabled": "true", f"k8s.io/cluster-autoscaler/{cluster_name}": "owned"}


WORKER_LAUNCH_TIMEOUT = 600  # join + kubelet registration
WORKER_TERMINATE_TIMEOUT = 300  # cordon and drain


class Workers(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: ClusterConfig,
        vpc: ec2.IVpc,
        subnets: list[ec2.ISubnet],
        security_groups: ClusterSecurityGroups,
        key: kms.IKey,
        notification_topic: sns.ITopic,
        agent_config: dict[str, Any],
    ) -> None:
        super().__init__(scope, construct_id)
        self.groups: list[autoscaling.AutoScalingGroup] = []
        for worker_group in config.worker_groups:
            template = node_launch_template(
                self,
                f"LaunchTemplate-{worker_group.name}",
                config=config,
                name=config.worker_group_name(worker_group),
                instance_type=worker_group.instance_type,
                role_name=config.worker_role_name,
                security_group=security_groups.workers,
                key=key,
                agent_config={**agent_config, "role": "worker"},
            )
            group = autoscaling.AutoScalingGroup(
                self,
                f"Group-{worker_group.name}",
                auto_scaling_group_name=config.worker_group_name(worker_group),
                vpc=vpc,
                vpc_subnets=ec2.SubnetSelection(subnets=subnets),
                launch_template=template,
                min_capacity=worker_group.min_size,
                max_capacity=worker_group.max_size,
                desired_capacity=worker_group.desired_capacity,
                health_checks=autoscaling.HealthChecks.ec2(grace_period=cdk.Duration.minutes(10)),
                notifications=[autoscaling.NotificationConfiguration(topic=notification_topic)],
                group_metrics=[autoscaling.GroupMetrics.all()],
            )
            cdk.Tags.of(group).add(ClusterConfig.ROLE_TAG_KEY, "worker", apply_to_launched_instances=True)
            if config.cluster_autoscaler:
                # cluster-autoscaler's ASG auto-discovery: both tags, so a blue/green neighbour's groups never match.
                for tag, value in autoscaler_discovery_tags(config.cluster_name).items():
                    cdk.Tags.of(group).add(tag, value, apply_to_launched_instances=False)
            lifecycle_hooks_at_creation(
                group,
                launch_timeout=WORKER_LAUNCH_TIMEOUT,
                terminate_timeout=WORKER_TERMINATE_TIMEOUT,
                # CONTINUE: a worker holds no quorum; if the drain does not finish, termination goes on.
                terminate_default="CONTINUE",
            )
            self.groups.append(group)
