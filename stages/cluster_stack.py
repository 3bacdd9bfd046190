"""K8sClusterStack: the network, control plane, workers, cluster state, etcd lifecycle and observability."""

from __future__ import annotations

from typing import Any

import aws_cdk as cdk
from constructs import Construct

from stages.cluster_state import ClusterState
from stages.config import POD_CIDR, SERVICE_CIDR, ClusterConfig
from stages.control_plane import ControlPlane
from stages.etcd_lifecycle import EtcdLifecycle
from stages.irsa import ServiceAccountIssuer
from stages.network import ClusterNetwork
from stages.observability import AlarmTopic, ClusterObservability, NodeLogGroups
from stages.security import ClusterSecurityGroups
from stages.termination_handler import TerminationHandlerQueue
from stages.workers import Workers


class K8sClusterStack(cdk.Stack):
    def __init__(self, scope: Construct, construct_id: str, *, config: ClusterConfig, **kwargs: Any) -> None:
        super().__init__(scope, construct_id, **kwargs)
        cdk.Tags.of(self).add(ClusterConfig.CLUSTER_TAG_KEY, config.cluster_name)
        # The AWS cloud controller manager recognises the cluster's resources by this tag.
        cdk.Tags.of(self).add(f"kubernetes.io/cluster/{config.cluster_name}", "owned")

        state = ClusterState(self, "State", config=config)
        network = ClusterNetwork(self, "Network", config=config, log_bucket=state.log_bucket)
        security = ClusterSecurityGroups(self, "SecurityGroups", config=config, vpc=network.vpc)
        alarm_topic = AlarmTopic(self, "AlarmTopic", config=config, key=state.key)
        # EC2 interruption/health events (never ASG hooks: those go to the lifecycle Lambda) for NTH's queue mode.
        termination_handler = TerminationHandlerQueue(self, "TerminationHandler", config=config, key=state.key)

        agent_config: dict[str, Any] = {
            "clusterName": config.cluster_name,
            "region": self.region,
            "kubernetesVersion": config.kubernetes_version,
            "apiPort": 6443,
            "clusterStateTable": state.table.table_name,
            "snapshotBucket": state.snapshot_bucket.bucket_name,
            "kmsKeyId": state.key.key_arn,
            "pkiSecretName": config.pki_secret_name,
            "etcdClientSecretName": config.etcd_client_secret_name,
            "kubeClientSecretName": config.kube_client_secret_name,
            "terminationHandlerQueueUrl": termination_handler.queue.queue_url,
            "vpcCidr": config.vpc.cidr,
            "joinSecretName": config.join_secret_name,
            "snapshotIntervalMinutes": config.snapshot_interval_minutes,
            "snapshotRetentionDays": config.snapshot_retention_days,
            "launchHookName": "dk8s-launch",
            # In stages/config.py, whose validation keeps the VPC clear of both ranges.
            "podCidr": POD_CIDR,
            "serviceCidr": SERVICE_CIDR,
            **({"clusterAutoscaler": True} if config.cluster_autoscaler else {}),
        }
        # IAM Roles for Service Accounts (stages/irsa.py): the issuer bucket and the IAM OIDC provider; the
        # initialising control-plane node publishes the issuer documents and configures the API server with it.
        self.irsa: ServiceAccountIssuer | None = None
        irsa_keys: dict[str, str] = {}
        if config.irsa:
            self.irsa = ServiceAccountIssuer(self, "Irsa", config=config, log_bucket=state.log_bucket)
            irsa_keys = {"irsaIssuerUrl": self.irsa.issuer_url, "irsaBucket": self.irsa.bucket.bucket_name}
        control_plane = ControlPlane(
            self,
            "ControlPlane",
            config=config,
            vpc=network.vpc,
            subnets=network.subnets,
            security_groups=security,
            key=state.key,
            notification_topic=alarm_topic.topic,
            agent_config={**agent_config, **irsa_keys},
        )
        workers = Workers(
            self,
            "Workers",
            config=config,
            vpc=network.vpc,
            subnets=network.subnets,
            security_groups=security,
            key=state.key,
            notification_topic=alarm_topic.topic,
            agent_config={**agent_config, "apiEndpoint": control_plane.api_endpoint},
        )
        lifecycle = EtcdLifecycle(
            self,
            "EtcdLifecycle",
            config=config,
            vpc=network.vpc,
            subnets=network.subnets,
            security_group=security.etcd_lambda,
            key=state.key,
            api_endpoint=control_plane.api_endpoint,
        )
        ClusterObservability(
            self,
            "Observability",
            config=config,
            topic=alarm_topic.topic,
            lifecycle_function=lifecycle.lifecycle_function,
            reconciler_function=lifecycle.reconciler_function,
            dead_letter_queue=lifecycle.dead_letter_queue,
            control_plane_groups=control_plane.groups,
            api_target_group=control_plane.api_target_group,
            api_load_balancer=control_plane.load_balancer,
            state_table=state.table,
        )
        NodeLogGroups(self, "NodeLogs", config=config, key=state.key)

        outputs = {
            "ClusterName": config.cluster_name,
            "ControlPlaneGroupNames": ",".join(config.control_plane_group_names),
            "WorkerGroupNames": ",".join(config.worker_group_name(g) for g in config.worker_groups),
            "ApiEndpoint": control_plane.api_endpoint,
            "ClusterOpsFunctionName": lifecycle.ops_function.function_name,
            "EtcdLifecycleFunctionName": lifecycle.lifecycle_function.function_name,
            "SnapshotBucketName": state.snapshot_bucket.bucket_name,
            "ClusterStateTableName": state.table.table_name,
            "KmsKeyArn": state.key.key_arn,
            "VpcId": network.vpc.vpc_id,
            # What a blue/green twin cluster imports (vpcId, vpcCidr, privateSubnetIds, privateRouteTableIds).
            "VpcCidr": config.vpc.cidr or "",
            "PrivateSubnetIds": ",".join(subnet.subnet_id for subnet in network.subnets),
            "PrivateRouteTableIds": ",".join(subnet.route_table.route_table_id for subnet in network.subnets),
            "AlarmTopicArn": alarm_topic.topic.topic_arn,
        }
        # Read by the pipeline's canary step (env_from_cfn_outputs) and by `cdk deploy --outputs-file`.
        self.outputs = {key: cdk.CfnOutput(self, key, value=value) for key, value in outputs.items()}
        self.control_plane = control_plane
        self.workers = workers
        self.lifecycle = lifecycle
        self.termination_handler = termination_handler
        self.network = network
        self.state = state
        if self.irsa is not None:
            self.outputs |= {key: cdk.CfnOutput(self, key, value=value) for key, value in self.irsa.outputs.items()}
