"""VPC endpoints in the twin: from inside the VPC only the services the template gives an endpoint are reachable.

AWS behaviour modelled: a subnet without a NAT or internet gateway reaches an AWS service only through an
interface endpoint (AWS PrivateLink) or a gateway endpoint (S3, DynamoDB) -- "Access AWS services through AWS
PrivateLink" and "Gateway endpoints", AWS PrivateLink Guide
(https://docs.aws.amazon.com/vpc/latest/privatelink/privatelink-access-aws-services.html,
https://docs.aws.amazon.com/vpc/latest/privatelink/gateway-endpoints.html). Without one the connection is never
answered (a connect timeout): the twin closes it unanswered, so the SDK raises a connection error, not an API
error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ConnectionClosedError

from tests.twin.iam_templates import CFG, templates
from tests.twin.test_iam_twin import start
from twin.aws import REGION
from twin.endpoints import EndpointModel, NoVpcEndpointError, endpoint_services_from_template
from twin.iam_policy import IntrinsicResolver, PolicyError

PSEUDO = {"AWS::Partition": "aws", "AWS::Region": REGION, "AWS::AccountId": "123456789012", "AWS::URLSuffix": "x"}


def test_the_template_lists_interface_and_gateway_endpoints_resolved_to_the_region() -> None:
    cluster = templates()["K8sClusterStack"]
    services = endpoint_services_from_template(cluster, IntrinsicResolver(PSEUDO))
    for name in ("ssm", "ec2", "autoscaling", "secretsmanager", "kms", "sqs", "logs", "monitoring", "s3", "dynamodb"):
        assert f"com.amazonaws.{REGION}.{name}" in services
    model = EndpointModel.of(services, REGION)
    assert model.reachable("dynamodb")  # a gateway endpoint (Fn::Join with the region in the template)
    assert not model.reachable("cloudformation")


def test_an_unresolvable_service_name_is_an_error_naming_the_endpoint() -> None:
    fragment: dict[str, Any] = {
        "Resources": {"Ep": {"Type": "AWS::EC2::VPCEndpoint", "Properties": {"ServiceName": {"Ref": "Missing"}}}}
    }
    with pytest.raises(PolicyError, match="Missing"):
        endpoint_services_from_template(fragment, IntrinsicResolver(PSEUDO))
    fragment["Resources"]["Ep"]["Properties"]["ServiceName"] = ""
    with pytest.raises(ValueError, match="VPC endpoint Ep"):
        endpoint_services_from_template(fragment, IntrinsicResolver(PSEUDO))


def test_the_check_names_the_principal_and_the_service() -> None:
    model = EndpointModel.of({f"com.amazonaws.{REGION}.sqs"}, REGION)
    model.check("sqs", "worker")
    with pytest.raises(NoVpcEndpointError, match=rf"worker -> kms: no VPC endpoint for com\.amazonaws\.{REGION}\.kms"):
        model.check("kms", "worker")


def test_a_service_whose_endpoint_the_template_lacks_is_unreachable_from_the_vpc_only(tmp_path: Path) -> None:
    stacks = templates()
    resources = stacks["K8sClusterStack"]["Resources"]
    sqs_endpoint = [
        lid
        for lid, r in resources.items()
        if r["Type"] == "AWS::EC2::VPCEndpoint" and str(r["Properties"]["ServiceName"]).endswith(".sqs")
    ]
    assert len(sqs_endpoint) == 1
    del resources[sqs_endpoint[0]]
    aws, _ = start(tmp_path, stacks)
    try:
        url = aws.client("sqs").create_queue(QueueName=f"{CFG.resource_prefix}-etcd-lifecycle")["QueueUrl"]
        with pytest.raises(ConnectionClosedError):  # the in-VPC reconciler: no answer, not an API error
            aws.client("sqs", CFG.reconciler_function_name).send_message(QueueUrl=url, MessageBody="{}")
        refused = aws.iam_report()["unreachable"]
        assert refused, "the refusal is recorded"
        assert all(
            f"{CFG.reconciler_function_name} -> sqs: no VPC endpoint for com.amazonaws.{REGION}.sqs" in line
            for line in refused
        )
        assert aws.authorizer is not None and aws.authorizer.denials == []  # not an IAM denial
        # the same principal still reaches a service that has its endpoint
        assert aws.client("ec2", CFG.reconciler_function_name).describe_instances()["Reservations"] == []
    finally:
        aws.stop()
