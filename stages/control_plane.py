"""ControlPlane: one AutoScaling Group per control-plane node, and the internal API load balancer.

One group per node (each pinned to one subnet/AZ, min = max = desired = 1) rather than one group
across AZs: AZ rebalancing can then never terminate a control-plane node, each etcd member's
replacement lands in its own AZ, and replacements (instance refresh, the canary) go one group, so
one member, at a time.
"""

from __future__ import annotations

from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from constructs import Construct

from stages.config import ClusterConfig
from stages.nag import skip_checkov, suppress
from stages.nodes import lifecycle_hooks_at_creation, node_launch_template
from stages.security import API_PORT, ClusterSecurityGroups

CONTROL_PLANE_LAUNCH_TIMEOUT = 900  # kubeadm init/join, etcd learner catch-up and promotion
CONTROL_PLANE_TERMINATE_TIMEOUT = 300  # the lifecycle Lambda heartbeats while removal is unsafe


class ControlPlane(Construct):
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
        self.load_balancer = elbv2.NetworkLoadBalancer(
            self,
            "ApiLoadBalancer",
            load_balancer_name=f"{config.resource_prefix}-api"[:32],
            vpc=vpc,
            internet_facing=False,
            vpc_subnets=ec2.SubnetSelection(subnets=subnets),
            security_groups=[security_groups.api_load_balancer],
            cross_zone_enabled=True,
            # On in the pipeline's production stage, off for a deletable dev stack (config key
            # apiLoadBalancerDeletionProtection).
            deletion_protection=config.api_load_balancer_deletion_protection,
        )
        # No NLB access logs: ELB writes them only for TLS listeners, and this listener is TCP (the API server
        # terminates TLS itself), so they would never be written. Who called the API is recorded by the API
        # server's audit log (CloudWatch log group /dedicated-k8s/<cluster>/audit); who connected to the NLB by
        # the VPC flow logs (stages/network.py), which see the NLB's network interfaces.
        no_access_logs = (
            "ELB writes Network Load Balancer access logs only for TLS listeners; the API listener is TCP (the API "
            "server terminates TLS), so access logs would never be written. The API server audit log and the VPC "
            "flow logs record API access instead"
        )
        suppress(self.load_balancer, "AwsSolutions-ELB2", no_access_logs, children=False)
        skip_checkov(self.load_balancer.node.default_child, [("CKV_AWS_91", no_access_logs)])  # type: ignore[arg-type]
        listener = self.load_balancer.add_listener("Api", port=API_PORT, protocol=elbv2.Protocol.TCP)

        zone_subnets = {subnet.availability_zone: subnet for subnet in subnets}
        self.groups: list[autoscaling.AutoScalingGroup] = []
        self.api_endpoint = self.load_balancer.load_balancer_dns_name
        template_config = {**agent_config, "role": "control-plane", "apiEndpoint": self.api_endpoint}
        template = node_launch_template(
            self,
            "LaunchTemplate",
            config=config,
            name=f"{config.resource_prefix}-control-plane",
            instance_type=config.control_plane_instance_type,
            role_name=config.control_plane_role_name,
            security_group=security_groups.control_plane,
            key=key,
            agent_config=template_config,
        )
        targets: list[elbv2.INetworkLoadBalancerTarget] = []
        for index, group_name in enumerate(config.control_plane_group_names):
            zone = config.control_plane_zone(index)
            subnet = zone_subnets.get(zone, subnets[index % len(subnets)])
            group = autoscaling.AutoScalingGroup(
                self,
                f"Group{index}",
                auto_scaling_group_name=group_name,
                vpc=vpc,
                vpc_subnets=ec2.SubnetSelection(subnets=[subnet]),
                launch_template=template,
                min_capacity=1,
                # 2, with desired 1: room for an instance refresh's launch-before-terminate replacement
                # (pipeline/rollout.py, MaxHealthyPercentage 200); nothing else ever asks for a second node.
                max_capacity=2,
                desired_capacity=1,
                # EC2 health checks, not the NLB's: a cluster-wide API outage (for example etcd
                # quorum loss) must not make every group replace its node at once.
                health_checks=autoscaling.HealthChecks.ec2(grace_period=cdk.Duration.minutes(15)),
                notifications=[autoscaling.NotificationConfiguration(topic=notification_topic)],
                group_metrics=[autoscaling.GroupMetrics.all()],
            )
            cdk.Tags.of(group).add(ClusterConfig.ROLE_TAG_KEY, "control-plane", apply_to_launched_instances=True)
            lifecycle_hooks_at_creation(
                group,
                launch_timeout=CONTROL_PLANE_LAUNCH_TIMEOUT,
                terminate_timeout=CONTROL_PLANE_TERMINATE_TIMEOUT,
                # ABANDON, together with retain-on-abandon below: if the lifecycle Lambda never answers,
                # the instance (and its etcd member) stays running in the Retained state and an alarm
                # calls an operator, instead of terminating a voter whose removal was never checked.
                terminate_default="ABANDON",
            )
            cfn_group = group.node.default_child
            assert isinstance(cfn_group, autoscaling.CfnAutoScalingGroup)
            # Invariant 4b: a terminate hook's ABANDON terminates the instance unless the group retains
            # on abandon. The lifecycle Lambda abandons only when removal stayed unsafe past its deadline.
            cfn_group.instance_lifecycle_policy = autoscaling.CfnAutoScalingGroup.InstanceLifecyclePolicyProperty(
                retention_triggers=autoscaling.CfnAutoScalingGroup.RetentionTriggersProperty(
                    terminate_hook_abandon="retain"
                )
            )
            suppress(
                group,
                "AwsSolutions-AS1",
                "API server health is judged by the node agent's launch hook; "
                "NLB health checks would replace every node during a cluster-wide outage",
            )
            self.groups.append(group)
            targets.append(group)

        self.api_target_group = listener.add_targets(
            "ControlPlane",
            port=API_PORT,
            protocol=elbv2.Protocol.TCP,
            targets=targets,
            # Client IP preservation off (on by default for instance targets): an internal NLB drops a connection
            # that it routes back to the target that opened it (source = destination, "hairpinning"), and every
            # control-plane node is both a target and, through kubelet, the CCM and the add-ons, a client of this
            # NLB. With preservation off the API server sees the NLB's private address as the source; the
            # control-plane security group admits the NLB's security group (stages/security.py), and client
            # filtering happens on the NLB's own group. IP targets (TargetType ip) would fix the hairpin too, but
            # the Auto Scaling groups register instances by ID as they reach InService; IP targets would need a
            # registration hook of our own for every replacement.
            preserve_client_ip=False,
            deregistration_delay=cdk.Duration.seconds(30),
            health_check=elbv2.HealthCheck(
                protocol=elbv2.Protocol.TCP,
                port=str(API_PORT),
                interval=cdk.Duration.seconds(10),
                healthy_threshold_count=2,
                unhealthy_threshold_count=2,
            ),
        )
