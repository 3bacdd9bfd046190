"""The twin's IAM and VPC-endpoint enforcement: every request through the proxy (:mod:`twin.aws`) is decided
here for its principal (:mod:`twin.principals`), and refused as AWS would refuse it.

* From inside the VPC (node agents, VPC Lambdas) a service without a VPC endpoint is unreachable
  (:mod:`twin.endpoints`): the proxy closes the connection, and the refusal is recorded.
* Otherwise each authorisation the request needs (:mod:`twin.aws_calls`) is evaluated against the principal's
  statements (:mod:`twin.iam_policy`); the first one not allowed fails the request with AWS's AccessDenied
  error for the protocol, its message shaped as AWS writes it ("User: <assumed-role ARN> is not authorized to
  perform: <action> on resource: <ARN> because no identity-based policy allows the <action> action", IAM User
  Guide, "Troubleshoot access denied error messages",
  https://docs.aws.amazon.com/IAM/latest/UserGuide/troubleshoot_access-denied.html). EC2 answers
  ``UnauthorizedOperation`` (403); the other query services ``AccessDenied`` (403); JSON services
  ``AccessDeniedException`` (400); S3 ``AccessDenied`` (403); Lambda ``AccessDeniedException`` (403).
* Every decision is recorded: :meth:`Authorizer.report` lists the denials, the unreachable services and, per
  principal, the granted action patterns no allowed request used (least privilege: candidates to remove).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

from botocore.exceptions import ClientError

from twin.aws_calls import (
    Arns,
    Call,
    Lookup,
    Operation,
    Request,
    UnknownCallError,
    calls_of,
    operation_of,
    signature_of,
)
from twin.endpoints import EndpointModel, NoVpcEndpointError, endpoint_services_from_template
from twin.iam_policy import IntrinsicResolver, action_matches, is_allowed, statement_matches
from twin.principals import (
    UNATTRIBUTED_PRINCIPAL,
    Principal,
    PrincipalBook,
    PrincipalSource,
    principals_from_templates,
    template_resolver,
)

ANONYMOUS = Principal("anonymous")


@dataclass(frozen=True)
class Denial:
    at: float
    principal: str
    action: str
    resource: str
    reason: str
    kind: str = "denied"  # or "unreachable" (no VPC endpoint)

    def describe(self) -> str:
        if self.kind == "unreachable":
            return self.reason
        return f"{self.principal}: {self.action} on {self.resource} denied ({self.reason})"


@dataclass(frozen=True)
class Refusal:
    """What the proxy answers instead of forwarding: an error body, or (``close``) no answer at all."""

    status: int = 0
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False
    message: str = ""


class MotoLookup:
    """:class:`twin.aws_calls.Lookup` over moto itself (``client(service)``: a harness client straight to moto).

    Group ARNs and tags are cached for two seconds: agents heartbeat often, groups and their tags change rarely
    (a cached tag can be two seconds stale: a condition on a tag just changed would decide on the old value)."""

    TTL = 2.0

    def __init__(self, client: Callable[[str], Any]) -> None:
        self._client = client
        self._clients: dict[str, Any] = {}
        self._groups: dict[str, tuple[float, tuple[str, dict[str, str]] | None]] = {}
        self._lock = threading.Lock()

    def _c(self, service: str) -> Any:
        with self._lock:
            if service not in self._clients:
                self._clients[service] = self._client(service)
            return self._clients[service]

    def group(self, name: str) -> tuple[str, dict[str, str]] | None:
        cached = self._groups.get(name)
        if cached is not None and time.monotonic() - cached[0] < self.TTL:
            return cached[1]
        groups = self._c("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
        found = (
            (groups[0]["AutoScalingGroupARN"], {t["Key"]: t["Value"] for t in groups[0].get("Tags", [])})
            if groups
            else None
        )
        self._groups[name] = (time.monotonic(), found)
        return found

    def instance_group(self, instance_id: str) -> str | None:
        found = self._c("autoscaling").describe_auto_scaling_instances(InstanceIds=[instance_id])
        rows = found.get("AutoScalingInstances", [])
        return str(rows[0]["AutoScalingGroupName"]) if rows else None

    def instance_tags(self, instance_id: str) -> dict[str, str]:
        rows = self._c("ec2").describe_tags(Filters=[{"Name": "resource-id", "Values": [instance_id]}])["Tags"]
        return {t["Key"]: t["Value"] for t in rows}

    def secret_arn(self, secret_id: str) -> str | None:
        try:
            return str(self._c("secretsmanager").describe_secret(SecretId=secret_id)["ARN"])
        except ClientError:
            return None

    def key(self, key_id: str) -> tuple[str, dict[str, str]] | None:
        kms = self._c("kms")
        try:
            arn = str(kms.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"])
            tags = kms.list_resource_tags(KeyId=arn).get("Tags", [])
        except ClientError:
            return None
        return arn, {t["TagKey"]: t["TagValue"] for t in tags}


@dataclass
class Authorizer:
    principals: PrincipalBook
    arns: Arns
    lookup: Lookup | None = None  # None: MotoAws binds a MotoLookup over its moto server
    endpoints: EndpointModel | None = None  # None: no endpoint model (every service reachable)
    denials: list[Denial] = field(default_factory=list)
    unreachable: list[Denial] = field(default_factory=list)
    _used: set[tuple[str, int, str]] = field(default_factory=set)  # (principal, statement index, action pattern)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def principal_of(self, request: Request) -> tuple[Principal, str]:
        """The request's principal and service (signing name); anonymous if unsigned or the key is unknown."""
        sig = signature_of(request)
        if sig is None:
            return ANONYMOUS, ""
        return self.principals.by_key(sig.access_key) or ANONYMOUS, sig.service

    def decide(self, request: Request) -> tuple[Principal, Operation | None, Refusal | None]:
        """None as the refusal means: forward the request."""
        principal, service = self.principal_of(request)
        if principal.unrestricted:
            return principal, None, None
        if self.endpoints is not None and principal.in_vpc and service:
            try:
                self.endpoints.check(service, principal.name)
            except NoVpcEndpointError as err:
                self._record(self.unreachable, principal, f"{service}:*", "*", str(err))
                return principal, None, Refusal(close=True, message=str(err))
        try:
            op = operation_of(request, service or "unknown")
            if self.lookup is None:
                raise UnknownCallError("the authorizer has no resource lookup (not bound to a moto server)")
            calls = calls_of(op, self.arns, self.lookup)
        except (UnknownCallError, ValueError) as err:
            self._record(self.denials, principal, f"{service}:?", "?", f"the twin cannot authorise it: {err}")
            return principal, None, self._access_denied(request, principal, f"{service}:?", "?", explicit=False)
        for call in calls:
            refusal = self._authorise(request, principal, op, call)
            if refusal is not None:
                return principal, op, refusal
        return principal, op, None

    def _authorise(self, request: Request, principal: Principal, op: Operation, call: Call) -> Refusal | None:
        decision = is_allowed(principal.statements, call.action, call.resource, call.context)
        if decision.allowed:
            self._mark_used(principal, call)
            return None
        self._record(self.denials, principal, call.action, call.resource, decision.reason)
        explicit = decision.statement is not None
        return self._access_denied(request, principal, call.action, call.resource, explicit=explicit, op=op)

    def _mark_used(self, principal: Principal, call: Call) -> None:
        with self._lock:
            for i, st in enumerate(principal.statements):
                if st.effect == "Allow" and statement_matches(st, call.action, call.resource, call.context):
                    for pattern in st.actions:
                        if action_matches([pattern], call.action):
                            self._used.add((principal.name, i, pattern))

    def _record(self, into: list[Denial], principal: Principal, action: str, resource: str, reason: str) -> None:
        kind = "unreachable" if into is self.unreachable else "denied"
        with self._lock:
            into.append(Denial(time.time(), principal.name, action, resource, reason, kind))

    # -- AWS's error shapes ----------------------------------------------------------------------------------------
    def _access_denied(
        self,
        request: Request,
        principal: Principal,
        action: str,
        resource: str,
        *,
        explicit: bool,
        op: Operation | None = None,
    ) -> Refusal:
        who = principal.arn if principal is not ANONYMOUS else "anonymous"
        why = (
            "with an explicit deny in an identity-based policy"
            if explicit
            else f"because no identity-based policy allows the {action} action"
        )
        message = f"User: {who} is not authorized to perform: {action} on resource: {resource} {why}"
        rid = str(uuid.uuid4())
        protocol = op.protocol if op is not None else _protocol_guess(request)
        service = action.split(":", 1)[0]
        if protocol == "query" and service == "ec2":
            body = (
                f"<Response><Errors><Error><Code>UnauthorizedOperation</Code><Message>{escape(message)}</Message>"
                f"</Error></Errors><RequestID>{rid}</RequestID></Response>"
            )
            return Refusal(403, body.encode(), (("Content-Type", "text/xml"),), message=message)
        if protocol == "query":
            body = (
                f"<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>{escape(message)}"
                f"</Message></Error><RequestId>{rid}</RequestId></ErrorResponse>"
            )
            return Refusal(403, body.encode(), (("Content-Type", "text/xml"),), message=message)
        if protocol == "json":
            headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/x-amz-json-1.0"),)
            if service == "sqs":  # SQS's JSON protocol keeps its query error code for query-compatible clients
                headers += (("x-amzn-query-error", "AccessDenied;Sender"),)
            payload = {"__type": "com.amazon.coral.service#AccessDeniedException", "message": message}
            return Refusal(400, json.dumps(payload).encode(), headers, message=message)
        if protocol == "rest-json":
            payload = {"Type": "User", "message": message}
            headers = (("Content-Type", "application/json"), ("x-amzn-ErrorType", "AccessDeniedException"))
            return Refusal(403, json.dumps(payload).encode(), headers, message=message)
        body = (
            f"<Error><Code>AccessDenied</Code><Message>{escape(message)}</Message><RequestId>{rid}</RequestId></Error>"
        )
        return Refusal(403, body.encode(), (("Content-Type", "application/xml"),), message=message)

    def forget_usage(self) -> None:
        """Start a new record of used grants (a new run on the same authorizer)."""
        with self._lock:
            self._used.clear()

    # -- the run's report -------------------------------------------------------------------------------------------
    def unused(self) -> dict[str, list[str]]:
        """principal -> "policy:Sid action" for every granted action pattern no allowed request used."""
        out: dict[str, list[str]] = {}
        with self._lock:
            used = set(self._used)
        for p in self.principals.principals.values():
            if p.unrestricted or p is UNATTRIBUTED_PRINCIPAL:
                continue
            rows = [
                f"{st.describe()} {pattern}"
                for i, st in enumerate(p.statements)
                if st.effect == "Allow"
                for pattern in st.actions
                if (p.name, i, pattern) not in used
            ]
            if rows:
                out[p.name] = rows
        return out

    def report(self) -> dict[str, Any]:
        with self._lock:
            denied = [d.describe() for d in self.denials]
            unreachable = [d.describe() for d in self.unreachable]
        return {"denied": denied, "unreachable": unreachable, "unused_permissions": self.unused()}


def _protocol_guess(request: Request) -> str:
    if request.header("X-Amz-Target"):
        return "json"
    if request.body[:7] == b"Action=":
        return "query"
    return "rest-xml"


def authorizer_from_templates(
    iam_template: Mapping[str, Any],
    cluster_template: Mapping[str, Any],
    *,
    node_roles: Mapping[str, str],
    arns: Arns,
    cluster_resolver: IntrinsicResolver | None = None,
    extra: tuple[PrincipalSource, ...] = (),
    endpoint_services: frozenset[str] | None = None,
) -> Authorizer:
    """The twin's authorizer for the synthesized stacks: principals from IamStack's roles (the nodes by
    ``node_roles``, the Lambdas by the cluster template's functions) and the endpoint list of the cluster
    template (``endpoint_services`` overrides it, e.g. twin/template.py's resolved list)."""
    pseudo = {
        "AWS::Partition": arns.partition,
        "AWS::Region": arns.region,
        "AWS::AccountId": arns.account,
        "AWS::URLSuffix": "amazonaws.com",
    }
    book = principals_from_templates(
        iam_template, cluster_template, node_roles=node_roles, pseudo=pseudo, cluster_resolver=cluster_resolver,
        extra=extra,
    )  # fmt: skip
    if endpoint_services is None:
        resolve = cluster_resolver or template_resolver(cluster_template, pseudo)
        endpoint_services = endpoint_services_from_template(cluster_template, resolve)
    return Authorizer(book, arns, endpoints=EndpointModel.of(endpoint_services, arns.region))


def twin_authorizer(stacks: Mapping[str, Mapping[str, Any]], cfg: Any, arns: Arns | None = None) -> Authorizer:
    """The authorizer for a twin of ``cfg`` (a ClusterConfig) from its synthesized ``IamStack`` and
    ``K8sClusterStack``: principals ``control-plane`` / ``worker`` (the instance roles, the names of the
    twin's group roles) and one per Lambda function (its function name)."""
    if arns is None:
        from twin.aws import ACCOUNT, PARTITION, REGION

        arns = Arns(PARTITION, REGION, ACCOUNT)
    return authorizer_from_templates(
        stacks["IamStack"],
        stacks["K8sClusterStack"],
        node_roles={"control-plane": cfg.control_plane_role_name, "worker": cfg.worker_role_name},
        arns=arns,
    )
