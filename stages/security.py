"""ClusterSecurityGroups: who may talk to whom. No rule admits 0.0.0.0/0."""

from __future__ import annotations

from aws_cdk import aws_ec2 as ec2
from constructs import Construct

from stages.config import ClusterConfig

API_PORT = 6443
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
KUBELET_PORT = 10250
CALICO_VXLAN_PORT = 4789  # UDP, Calico's VXLAN overlay
CALICO_TYPHA_PORT = 5473  # TCP, Calico Typha


class ClusterSecurityGroups(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, config: ClusterConfig, vpc: ec2.IVpc) -> None:
        super().__init__(scope, construct_id)
        assert config.vpc.cidr is not None
        vpc_cidr = ec2.Peer.ipv4(config.vpc.cidr)

        def group(name: str, description: str) -> ec2.SecurityGroup:
            return ec2.SecurityGroup(
                self,
                name,
                vpc=vpc,
                description=f"dedicated-k8s {config.cluster_name}: {description}",
                allow_all_outbound=False,
            )

        self.api_load_balancer = group("ApiLoadBalancer", "internal NLB for the Kubernetes API")
        self.control_plane = group("ControlPlane", "control-plane nodes")
        self.workers = group("Workers", "worker nodes")
        self.etcd_lambda = group("EtcdLambda", "etcd lifecycle, reconciler and ops Lambdas")

        # API server, through the NLB and directly from nodes.
        for cidr in config.api_access_cidrs:
            self.api_load_balancer.add_ingress_rule(
                ec2.Peer.ipv4(cidr), ec2.Port.tcp(API_PORT), f"Kubernetes API from {cidr}"
            )
        self.api_load_balancer.add_ingress_rule(vpc_cidr, ec2.Port.tcp(API_PORT), "Kubernetes API from the cluster VPC")
        self.api_load_balancer.add_egress_rule(self.control_plane, ec2.Port.tcp(API_PORT), "to API servers")
        self.control_plane.add_ingress_rule(
            self.api_load_balancer, ec2.Port.tcp(API_PORT), "API (and health checks) from the NLB"
        )
        for source, label in ((self.control_plane, "control plane"), (self.workers, "workers")):
            self.control_plane.add_ingress_rule(source, ec2.Port.tcp(API_PORT), f"API from {label}")

        # etcd: peers only between control-plane nodes; clients are control-plane nodes and the Lambdas.
        self.control_plane.add_ingress_rule(
            self.control_plane, ec2.Port.tcp_range(ETCD_CLIENT_PORT, ETCD_PEER_PORT), "etcd client and peer"
        )
        self.control_plane.add_ingress_rule(
            self.etcd_lambda, ec2.Port.tcp(ETCD_CLIENT_PORT), "etcd client from Lambdas"
        )
        self.etcd_lambda.add_egress_rule(self.control_plane, ec2.Port.tcp(ETCD_CLIENT_PORT), "etcd client")
        self.etcd_lambda.add_egress_rule(vpc_cidr, ec2.Port.tcp(443), "AWS APIs through VPC endpoints")
        # The lifecycle Lambda drains terminating nodes through the API (the NLB admits the VPC CIDR on 6443).
        self.etcd_lambda.add_egress_rule(self.api_load_balancer, ec2.Port.tcp(API_PORT), "Kubernetes API (node drain)")

        # kubelet API from the control plane (logs, exec, metrics).
        for target in (self.control_plane, self.workers):
            target.add_ingress_rule(self.control_plane, ec2.Port.tcp(KUBELET_PORT), "kubelet from control plane")

        # Calico between every pair of nodes.
        nodes = (self.control_plane, self.workers)
        for target in nodes:
            for source in nodes:
                target.add_ingress_rule(source, ec2.Port.udp(CALICO_VXLAN_PORT), "Calico VXLAN")
                target.add_ingress_rule(source, ec2.Port.tcp(CALICO_TYPHA_PORT), "Calico Typha")

        for node in nodes:
            node.add_egress_rule(vpc_cidr, ec2.Port.all_traffic(), "cluster traffic inside the VPC")
            # No internet route exists (isolated subnets); 443 beyond the VPC CIDR reaches only the S3 and
            # DynamoDB gateway endpoints, whose prefix lists are not known at synth time.
            node.add_egress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "S3/DynamoDB gateway endpoints")
