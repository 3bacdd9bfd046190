"""VPC endpoints: which AWS services a caller inside the twin's VPC can reach.

The cluster's subnets have no NAT gateway and no internet gateway (stages/network.py; docs/architecture.md:
"VPC endpoints (no NAT needed)"). From such a subnet an AWS service is reachable only through an interface
endpoint (AWS PrivateLink) or, for S3 and DynamoDB, a gateway endpoint in the VPC's route tables ("Access AWS
services through AWS PrivateLink" and "Gateway endpoints", Amazon VPC / AWS PrivateLink Guide,
https://docs.aws.amazon.com/vpc/latest/privatelink/privatelink-access-aws-services.html and
https://docs.aws.amazon.com/vpc/latest/privatelink/gateway-endpoints.html). Without one, the service's
public endpoint resolves to public addresses that no route leads to: the TCP connection is never answered and
the SDK fails with a connect timeout after its connect timeout (botocore: 60 s, then retries).

The twin models the reachability, not the wait: a request from an in-VPC principal (the node agents, the VPC
Lambdas) to a service whose endpoint the template does not create is refused by the proxy (:mod:`twin.aws`)
by closing the connection without an answer, so the SDK raises a connection error (never an AWS API error
that code could take for an answer), and the proxy records the refusal naming the principal, the service and
"no VPC endpoint". It answers at once instead of after 60 s: faster than AWS, never more permissive.

The endpoint list is the template's ``AWS::EC2::VPCEndpoint`` ``ServiceName`` values
(:func:`endpoint_services_from_template`; twin/template.py's ``TemplateCloud.endpoint_services`` gives the same
list once it is resolved against the twin's cloud). A request's service is the signing name in its SigV4
credential scope, which for every service the project calls equals the endpoint service's last label
(``monitoring`` for CloudWatch, ``elasticloadbalancing`` for ELB, ``sts``, ...): ``com.amazonaws.<region>.<name>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# SigV4 signing name -> endpoint service label, where they differ (none of the project's services does today;
# a new one that does must be added here, or its calls from the VPC are refused).
_ENDPOINT_LABEL: dict[str, str] = {}


class NoVpcEndpointError(ConnectionError):
    """A call from inside the VPC to a service the template gives no endpoint (what a connect timeout means)."""


def endpoint_services_from_template(template: Mapping[str, Any], resolve: Callable[[Any], Any]) -> frozenset[str]:
    """The ``ServiceName`` of every ``AWS::EC2::VPCEndpoint`` (``resolve`` turns ``Fn::Join`` with the region into
    text); raises ValueError naming the resource whose name does not resolve to a string."""
    names = set()
    for lid, res in template.get("Resources", {}).items():
        if res.get("Type") != "AWS::EC2::VPCEndpoint":
            continue
        name = resolve(res.get("Properties", {}).get("ServiceName"))
        if not isinstance(name, str) or not name:
            raise ValueError(f"VPC endpoint {lid}: ServiceName {name!r} is not a service name")
        names.add(name)
    return frozenset(names)


@dataclass(frozen=True)
class EndpointModel:
    """The services reachable from inside the VPC: those with an endpoint, in ``region``."""

    services: frozenset[str]
    region: str

    @classmethod
    def of(cls, services: Iterable[str], region: str) -> EndpointModel:
        return cls(frozenset(services), region)

    def service_name(self, signing_name: str) -> str:
        return f"com.amazonaws.{self.region}.{_ENDPOINT_LABEL.get(signing_name, signing_name)}"

    def reachable(self, signing_name: str) -> bool:
        return self.service_name(signing_name) in self.services

    def check(self, signing_name: str, principal: str) -> None:
        """Raise :class:`NoVpcEndpointError` naming the principal and the service if it is unreachable."""
        if not self.reachable(signing_name):
            raise NoVpcEndpointError(
                f"{principal} -> {signing_name}: no VPC endpoint for {self.service_name(signing_name)} in the "
                "template (from a subnet without NAT the connection would time out)"
            )
