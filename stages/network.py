"""ClusterNetwork: the VPC (new or imported), its VPC endpoints and flow logs.

The cluster runs with no NAT and no internet gateway: every AWS API that nodes and Lambdas call is
reached through an interface endpoint (S3 and DynamoDB through gateway endpoints).

Blue/green: a second cluster imports the first one's VPC and subnets (``vpcId``...) with
``vpcEndpoints: existing`` and creates no endpoints: the first cluster's interface endpoints answer the
services' private DNS names for the whole VPC (a second private-DNS endpoint for the same service is
refused by EC2), and its gateway endpoints already route the shared route tables. With
``retainNetworkOnDelete`` the VPC, its subnets, routes, endpoints and their security group outlive the
stack (DeletionPolicy RetainExceptOnCreate), so the first cluster can be deleted while the second still uses them.
"""

from __future__ import annotations

import ipaddress

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_s3 as s3
from constructs import Construct

from stages.config import ClusterConfig

# Every service the node agent, the Lambdas and the SSM agent call (tests cross-check this list
# against the boto3 clients in node_agent/ and lambdas/).
INTERFACE_ENDPOINTS: dict[str, ec2.InterfaceVpcEndpointAwsService] = {
    "ssm": ec2.InterfaceVpcEndpointAwsService.SSM,
    "ssmmessages": ec2.InterfaceVpcEndpointAwsService.SSM_MESSAGES,
    "ec2messages": ec2.InterfaceVpcEndpointAwsService.EC2_MESSAGES,
    "ec2": ec2.InterfaceVpcEndpointAwsService.EC2,
    "autoscaling": ec2.InterfaceVpcEndpointAwsService.AUTOSCALING,
    "secretsmanager": ec2.InterfaceVpcEndpointAwsService.SECRETS_MANAGER,
    "kms": ec2.InterfaceVpcEndpointAwsService.KMS,
    "sts": ec2.InterfaceVpcEndpointAwsService.STS,
    "logs": ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_LOGS,
    "monitoring": ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_MONITORING,
    "elasticloadbalancing": ec2.InterfaceVpcEndpointAwsService.ELASTIC_LOAD_BALANCING,
    "sqs": ec2.InterfaceVpcEndpointAwsService.SQS,
    "events": ec2.InterfaceVpcEndpointAwsService.EVENTBRIDGE,
    "lambda": ec2.InterfaceVpcEndpointAwsService.LAMBDA_,
}
GATEWAY_ENDPOINTS: dict[str, ec2.GatewayVpcEndpointAwsService] = {
    "s3": ec2.GatewayVpcEndpointAwsService.S3,
    "dynamodb": ec2.GatewayVpcEndpointAwsService.DYNAMODB,
}


class ClusterNetwork(Construct):
    """The VPC and private subnets (one per AZ, in config order), endpoints and flow logs."""

    def __init__(self, scope: Construct, construct_id: str, *, config: ClusterConfig, log_bucket: s3.IBucket) -> None:
        super().__init__(scope, construct_id)
        zones = list(config.availability_zones)
        if config.vpc.imported:
            assert config.vpc.vpc_id is not None and config.vpc.cidr is not None
            self.vpc: ec2.IVpc = ec2.Vpc.from_vpc_attributes(
                self,
                "Vpc",
                vpc_id=config.vpc.vpc_id,
                vpc_cidr_block=config.vpc.cidr,
                availability_zones=zones,
                private_subnet_ids=list(config.vpc.private_subnet_ids),
                private_subnet_route_table_ids=list(config.vpc.private_route_table_ids),
            )
            self.subnets = list(self.vpc.private_subnets)
            ec2.FlowLog(
                self,
                "FlowLog",
                resource_type=ec2.FlowLogResourceType.from_vpc(self.vpc),
                destination=ec2.FlowLogDestination.to_s3(log_bucket, "vpc-flow-logs/"),
            )
        else:
            assert config.vpc.cidr is not None
            prefix = ipaddress.IPv4Network(config.vpc.cidr).prefixlen
            vpc = ec2.Vpc(
                self,
                "Vpc",
                vpc_name=f"{config.resource_prefix}-vpc",
                ip_addresses=ec2.IpAddresses.cidr(config.vpc.cidr),
                availability_zones=zones,
                # Isolated subnets only: no NAT gateway and no internet gateway exist in this VPC.
                nat_gateways=0,
                subnet_configuration=[
                    ec2.SubnetConfiguration(
                        name="private", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED, cidr_mask=min(prefix + 3, 27)
                    )
                ],
                restrict_default_security_group=False,
                flow_logs={
                    "s3": ec2.FlowLogOptions(destination=ec2.FlowLogDestination.to_s3(log_bucket, "vpc-flow-logs/"))
                },
            )
            self.vpc = vpc
            self.subnets = list(vpc.isolated_subnets)
            for subnet in self.subnets:
                # The AZs are pinned on purpose (config.availabilityZones): one control-plane node per AZ,
                # and every replacement must land in the AZ of the member it replaces.
                subnet.node.default_child.add_metadata(  # type: ignore[union-attr]
                    "cfn-lint", {"config": {"ignore_checks": ["W3010"]}}
                )
            # restrict_default_security_group is off on purpose: it needs a custom-resource Lambda with its
            # own IAM role, and all IAM lives in IamStack. Nothing here uses the default group: every ENI
            # (nodes, endpoints, NLB, Lambdas) has an explicit group (asserted by tests).
        self.vpc_cidr = config.vpc.cidr
        self.subnet_selection = ec2.SubnetSelection(subnets=self.subnets)
        self.endpoint_security_group: ec2.SecurityGroup | None = None
        self.interface_endpoints: dict[str, ec2.InterfaceVpcEndpoint] = {}
        if config.vpc.create_endpoints:
            self._create_endpoints(config)
        if config.vpc.retain_on_delete:
            self._retain_network()

    def _create_endpoints(self, config: ClusterConfig) -> None:
        assert config.vpc.cidr is not None
        self.endpoint_security_group = ec2.SecurityGroup(
            self,
            "EndpointSecurityGroup",
            vpc=self.vpc,
            description="VPC interface endpoints: HTTPS from inside the VPC",
            allow_all_outbound=False,
        )
        self.endpoint_security_group.add_ingress_rule(
            ec2.Peer.ipv4(config.vpc.cidr), ec2.Port.tcp(443), "HTTPS to AWS APIs from the cluster VPC"
        )
        for name, service in INTERFACE_ENDPOINTS.items():
            self.interface_endpoints[name] = ec2.InterfaceVpcEndpoint(
                self,
                f"Endpoint-{name}",
                vpc=self.vpc,
                service=service,
                private_dns_enabled=True,
                subnets=self.subnet_selection,
                security_groups=[self.endpoint_security_group],
                open=False,
            )
        for name, gateway in GATEWAY_ENDPOINTS.items():
            ec2.GatewayVpcEndpoint(
                self, f"Endpoint-{name}", vpc=self.vpc, service=gateway, subnets=[self.subnet_selection]
            )

    def _retain_network(self) -> None:
        """Every network resource this construct creates outlives the stack, except the flow log (it writes to
        this cluster's log bucket; a cluster that imports the VPC has its own). Not when the create that made them
        rolls back: no other cluster can be using a network whose first deploy failed, and a retained half-made
        VPC would only be left for an operator to find."""
        for child in self.node.find_all():
            if isinstance(child, cdk.CfnResource) and not isinstance(child, ec2.CfnFlowLog):
                child.apply_removal_policy(cdk.RemovalPolicy.RETAIN_ON_UPDATE_OR_DELETE)
