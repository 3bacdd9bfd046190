"""What an AWS request asks for, in IAM's terms: the service, the IAM action, the resource ARN(s) and the
condition keys the project's policies test (``aws:ResourceTag/...`` and the services' own tag keys).

Parsing is by protocol (botocore's service models name it): query (``Action=`` form body: EC2, Auto Scaling,
STS, ELB), JSON (``X-Amz-Target: <prefix>.<Operation>``: DynamoDB, Secrets Manager, KMS, SQS, SSM, Logs,
EventBridge), REST (S3 path-style, Lambda) and RPC-v2 CBOR (CloudWatch: the operation is in the path). The
service is the signing name of the SigV4 credential scope.

Actions and resource ARNs follow the Service Authorization Reference ("Actions, resources, and condition keys
for <service>", https://docs.aws.amazon.com/service-authorization/latest/reference/): e.g. a DynamoDB item
call is authorised on ``arn:<partition>:dynamodb:<region>:<account>:table/<name>``; S3 ``ListObjectsV2`` is
``s3:ListBucket`` on the bucket and ``HeadObject`` is ``s3:GetObject`` on the object; an SQS call is on
``arn:<partition>:sqs:<region>:<account>:<queue>``; a Secrets Manager call is on the secret's full ARN (with its random
suffix, looked up in moto); a KMS call on the key's ARN with the key's tags as ``aws:ResourceTag/...``; an Auto
Scaling group call on the group ARN (``autoScalingGroup:<uuid>:autoScalingGroupName/<name>``) with the group's
tags as ``autoscaling:ResourceTag/...`` and ``aws:ResourceTag/...``; an EC2 instance call on
``arn:<partition>:ec2:<region>:<account>:instance/<id>`` with ``ec2:ResourceTag/...``; Lambda ``Invoke`` is
``lambda:InvokeFunction`` on the function ARN. Describe/List calls without resource-level permissions are on
``*``. An operation this module does not know raises :class:`UnknownCallError` (the proxy denies it: a call
whose permission the twin cannot name must not pass unchecked).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from twin.iam_policy import ContextValue

_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/\d{8}/([^/]+)/([^/]+)/aws4_request")


class UnknownCallError(ValueError):
    """A request whose IAM action or resource the twin cannot derive (names the service and operation)."""


@dataclass(frozen=True)
class Request:
    """One HTTP request as the proxy received it."""

    method: str
    path: str  # with the query string
    headers: Mapping[str, str]
    body: bytes

    def header(self, name: str) -> str:
        for k, v in self.headers.items():
            if k.lower() == name.lower():
                return v
        return ""


@dataclass(frozen=True)
class Signature:
    access_key: str
    region: str
    service: str


def signature_of(request: Request) -> Signature | None:
    """The access key, region and service of the SigV4 signature (header or presigned query); None if unsigned."""
    text = request.header("Authorization")
    if not text:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(request.path).query))
        text = "Credential=" + query.get("X-Amz-Credential", "")
    m = _CREDENTIAL.search(text)
    return Signature(m.group(1), m.group(2), m.group(3)) if m else None


@dataclass(frozen=True)
class Operation:
    service: str  # signing name
    name: str  # the API operation (GetItem, ListObjectsV2, ...)
    protocol: str  # query | json | rest-xml | rest-json | cbor
    params: Mapping[str, Any] = field(default_factory=dict)


def operation_of(request: Request, service: str) -> Operation:
    """The API operation and its parameters; raises UnknownCallError when the request fits no protocol."""
    target = request.header("X-Amz-Target")
    if target and "." in target:
        params = json.loads(request.body or b"{}")
        return Operation(service, target.rsplit(".", 1)[1], "json", params)
    if request.method == "POST" and request.body[:7] == b"Action=":
        params = dict(urllib.parse.parse_qsl(request.body.decode(), keep_blank_values=True))
        return Operation(service, params.get("Action", ""), "query", params)
    if request.header("smithy-protocol") == "rpc-v2-cbor":
        return Operation(service, request.path.rstrip("/").rsplit("/", 1)[-1], "cbor", {})
    if service == "s3":
        return _s3_operation(request)
    if service == "lambda":
        return _lambda_operation(request)
    raise UnknownCallError(f"{service}: {request.method} {request.path} fits none of the twin's protocols")


def _s3_operation(request: Request) -> Operation:
    split = urllib.parse.urlsplit(request.path)
    query = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
    bucket, _, key = urllib.parse.unquote(split.path.lstrip("/")).partition("/")
    m, p = request.method, {"Bucket": bucket, "Key": key, **query}
    if not bucket:
        return Operation("s3", "ListBuckets", "rest-xml", p)
    if key:
        if "uploadId" in query or "uploads" in query:
            name = "AbortMultipartUpload" if m == "DELETE" else "PutObject"  # part uploads are s3:PutObject
        elif request.header("x-amz-copy-source"):
            name = "CopyObject"
        else:
            name = {"GET": "GetObject", "HEAD": "HeadObject", "PUT": "PutObject", "DELETE": "DeleteObject"}.get(m, "")
        return Operation("s3", name, "rest-xml", p)
    for sub, names in (
        ("versioning", {"GET": "GetBucketVersioning", "PUT": "PutBucketVersioning"}),
        ("versions", {"GET": "ListObjectVersions"}),
        ("delete", {"POST": "DeleteObjects"}),
        ("location", {"GET": "GetBucketLocation"}),
        ("policy", {"GET": "GetBucketPolicy", "PUT": "PutBucketPolicy"}),
        ("encryption", {"GET": "GetBucketEncryption", "PUT": "PutBucketEncryption"}),
        ("tagging", {"GET": "GetBucketTagging", "PUT": "PutBucketTagging"}),
    ):
        if sub in query:
            return Operation("s3", names.get(m, ""), "rest-xml", p)
    name = {"GET": "ListObjectsV2" if query.get("list-type") == "2" else "ListObjects", "HEAD": "HeadBucket",
            "PUT": "CreateBucket", "DELETE": "DeleteBucket"}.get(m, "")  # fmt: skip
    return Operation("s3", name, "rest-xml", p)


def _lambda_operation(request: Request) -> Operation:
    path = urllib.parse.urlsplit(request.path).path
    if re.fullmatch(r"/\d{4}-\d{2}-\d{2}/account-settings/?", path):
        return Operation("lambda", "GetAccountSettings", "rest-json", {})
    m = re.fullmatch(r"/\d{4}-\d{2}-\d{2}/functions/([^/]+)(/invocations|/configuration)?/?", path)
    if m:
        fn = urllib.parse.unquote(m.group(1))
        name = {"/invocations": "Invoke", "/configuration": "GetFunctionConfiguration"}.get(m.group(2) or "", "")
        name = name or {"GET": "GetFunction", "DELETE": "DeleteFunction"}.get(request.method, "")
        return Operation("lambda", name, "rest-json", {"FunctionName": fn})
    return Operation("lambda", "", "rest-json", {})


# -- IAM actions and resources --------------------------------------------------------------------------------------
class Lookup(Protocol):
    """What the twin's cloud (moto) knows about a resource; None where it has no such resource."""

    def group(self, name: str) -> tuple[str, dict[str, str]] | None: ...  # (ARN, tags)
    def instance_group(self, instance_id: str) -> str | None: ...
    def instance_tags(self, instance_id: str) -> dict[str, str]: ...
    def secret_arn(self, secret_id: str) -> str | None: ...
    def key(self, key_id: str) -> tuple[str, dict[str, str]] | None: ...  # (ARN, tags)


@dataclass(frozen=True)
class Call:
    """One authorisation the request needs: ``action`` on ``resource`` with ``context``."""

    action: str
    resource: str
    context: Mapping[str, ContextValue] = field(default_factory=dict)


# Operations whose IAM action differs from their name (Service Authorization Reference).
_S3_ACTIONS = {
    "ListObjectsV2": "ListBucket", "ListObjects": "ListBucket", "HeadBucket": "ListBucket",
    "HeadObject": "GetObject", "ListObjectVersions": "ListBucketVersions", "DeleteObjects": "DeleteObject",
    "CopyObject": "PutObject", "ListBuckets": "ListAllMyBuckets",
}  # fmt: skip
_LAMBDA_ACTIONS = {"Invoke": "InvokeFunction", "GetFunctionConfiguration": "GetFunctionConfiguration"}
# Calls that have no resource-level permissions: authorised on "*".
_UNSCOPED_PREFIXES = ("Describe", "List", "Get")  # EC2/ASG/ELB reads; Get* of ec2 only (GetConsoleOutput aside)
_ASG_GROUP_CALLS = {
    "CompleteLifecycleAction", "RecordLifecycleActionHeartbeat", "SetDesiredCapacity", "UpdateAutoScalingGroup",
    "AttachInstances", "DetachInstances", "StartInstanceRefresh", "CancelInstanceRefresh", "PutLifecycleHook",
    "DeleteLifecycleHook", "CreateOrUpdateTags", "DeleteAutoScalingGroup", "SetInstanceProtection",
}  # fmt: skip


def _tag_context(prefixes: tuple[str, ...], tags: Mapping[str, str]) -> dict[str, ContextValue]:
    return {f"{prefix}:ResourceTag/{k}": v for prefix in prefixes for k, v in tags.items()}


def _members(params: Mapping[str, Any], name: str) -> list[str]:
    """Query-protocol list values (``Name.member.1`` for Auto Scaling, ``Name.1`` for EC2)."""
    pattern = re.compile(rf"{re.escape(name)}(?:\.member)?\.\d+$")
    return [str(v) for k, v in sorted(params.items()) if pattern.match(k)]


@dataclass(frozen=True)
class Arns:
    partition: str
    region: str
    account: str

    def of(self, service: str, resource: str, *, regional: bool = True) -> str:
        region, account = (self.region, self.account) if regional else ("", "")
        return f"arn:{self.partition}:{service}:{region}:{account}:{resource}"


def calls_of(op: Operation, arns: Arns, lookup: Lookup) -> list[Call]:
    """The authorisations ``op`` needs; UnknownCallError when the twin cannot name them."""
    if not op.name:
        raise UnknownCallError(f"{op.service}: the request's operation is not one the twin knows")
    handler = _SERVICES.get(op.service)
    if handler is not None:
        return handler(op, arns, lookup)
    if op.service in ("ssm", "logs", "events", "sts", "monitoring", "elasticloadbalancing"):
        return _simple(op, arns)
    raise UnknownCallError(f"{op.service}:{op.name}: the twin does not know this service's resources")


def _action(op: Operation, name: str | None = None) -> str:
    service = "cloudwatch" if op.service == "monitoring" else op.service
    return f"{service}:{name or op.name}"


def _autoscaling(op: Operation, arns: Arns, lookup: Lookup) -> list[Call]:
    p = op.params
    group_name = str(p.get("AutoScalingGroupName", ""))
    if op.name == "TerminateInstanceInAutoScalingGroup":
        group_name = lookup.instance_group(str(p.get("InstanceId", ""))) or ""
    if op.name in _ASG_GROUP_CALLS or op.name == "TerminateInstanceInAutoScalingGroup":
        found = lookup.group(group_name) if group_name else None
        if found is None:  # no such group: AWS authorises on the name alone, and answers ValidationError after
            arn = arns.of("autoscaling", f"autoScalingGroup:*:autoScalingGroupName/{group_name}")
            return [Call(_action(op), arn)]
        arn, tags = found
        return [Call(_action(op), arn, _tag_context(("aws", "autoscaling"), tags))]
    if op.name.startswith("Describe"):
        return [Call(_action(op), "*")]
    raise UnknownCallError(f"autoscaling:{op.name}: the twin does not know its resource")


def _ec2(op: Operation, arns: Arns, lookup: Lookup) -> list[Call]:
    ids = _members(op.params, "InstanceId")
    if ids and not op.name.startswith("Describe"):
        tags = {iid: _tag_context(("aws", "ec2"), lookup.instance_tags(iid)) for iid in ids}
        return [Call(_action(op), arns.of("ec2", f"instance/{iid}"), tags[iid]) for iid in ids]
    if op.name.startswith(_UNSCOPED_PREFIXES):
        return [Call(_action(op), "*")]
    # RunInstances, CreateTags, CreateLaunchTemplate, ...: only the harness makes these in the twin; they are
    # authorised on "*" (their real resource list is long: image, subnet, network interface, ...).
    return [Call(_action(op), "*")]


def _dynamodb(op: Operation, arns: Arns, lookup: Lookup) -> list[Call]:
    p = op.params
    if op.name in ("TransactWriteItems", "TransactGetItems"):
        calls = []
        for item in p.get("TransactItems", []):
            for kind, body in item.items():
                action = {"Put": "PutItem", "Update": "UpdateItem", "Delete": "DeleteItem", "Get": "GetItem",
                          "ConditionCheck": "ConditionCheckItem"}[kind]  # fmt: skip
                calls.append(Call(f"dynamodb:{action}", arns.of("dynamodb", f"table/{body['TableName']}")))
        return calls
    if op.name in ("BatchGetItem", "BatchWriteItem"):
        action = "BatchGetItem" if op.name == "BatchGetItem" else "BatchWriteItem"
        return [Call(f"dynamodb:{action}", arns.of("dynamodb", f"table/{t}")) for t in p.get("RequestItems", {})]
    if "TableName" in p:
        return [Call(_action(op), arns.of("dynamodb", f"table/{p['TableName']}"))]
    return [Call(_action(op), "*")]  # ListTables


def _secretsmanager(op: Operation, arns: Arns, lookup: Lookup) -> list[Call]:
    secret_id = str(op.params.get("SecretId") or op.params.get("Name") or "")
    if not secret_id:
        return [Call(_action(op), "*")]  # ListSecrets, GetRandomPassword
    if op.name == "CreateSecret" or secret_id.startswith("arn:"):
        # A new secret's ARN gets its random suffix at creation: IAM sees the name without one.
        arn = secret_id if secret_id.startswith("arn:") else arns.of("secretsmanager", f"secret:{secret_id}")
        return [Call(_action(op), arn, _request_tags(op.params))]
    # An existing secret is authorised on its full ARN; a missing one on its bare name (which no "-??????"
    # pattern matches: the caller is denied before it could learn the secret does not exist).
    return [Call(_action(op), lookup.secret_arn(secret_id) or arns.of("secretsmanager", f"secret:{secret_id}"))]


def _request_tags(params: Mapping[str, Any]) -> dict[str, ContextValue]:
    tags = {str(t["Key"]): str(t["Value"]) for t in params.get("Tags") or [] if "Key" in t}
    context: dict[str, ContextValue] = {f"aws:RequestTag/{k}": v for k, v in tags.items()}
    if tags:
        context["aws:TagKeys"] = list(tags)
    return context


def _kms(op: Operation, arns: Arns, lookup: Lookup) -> list[Call]:
    key_id = str(op.params.get("KeyId", ""))
    if not key_id:
        return [Call(_action(op), "*")]  # CreateKey, ListKeys; Decrypt without KeyId is not used by the project
    found = lookup.key(key_id)
    if found is None:
        return [Call(_action(op), key_id if key_id.startswith("arn:") else arns.of("kms", f"key/{key_id}"))]
    arn, tags = found
    return [Call(_action(op), arn, _tag_context(("aws",), tags))]


def _sqs(op: Operation, arns: Arns, lookup: Lookup) -> list[Call]:
    url = str(op.params.get("QueueUrl", ""))
    name = url.rstrip("/").rsplit("/", 1)[-1] if url else str(op.params.get("QueueName", ""))
    action = _action(op, op.name.removesuffix("Batch"))  # SendMessageBatch is authorised as sqs:SendMessage
    return [Call(action, arns.of("sqs", name) if name else "*")]


def _s3(op: Operation, arns: Arns, lookup: Lookup) -> list[Call]:
    p = op.params
    bucket, key = str(p.get("Bucket", "")), str(p.get("Key", ""))
    action = _S3_ACTIONS.get(op.name, op.name)
    if "versionId" in p and action in ("GetObject", "DeleteObject"):
        action += "Version"
    if op.name == "ListBuckets":
        return [Call("s3:ListAllMyBuckets", "*")]
    resource = f"{bucket}/{key}" if key else bucket
    return [Call(f"s3:{action}", arns.of("s3", resource, regional=False))]


def _lambda(op: Operation, arns: Arns, lookup: Lookup) -> list[Call]:
    action = f"lambda:{_LAMBDA_ACTIONS.get(op.name, op.name)}"
    fn = str(op.params.get("FunctionName", ""))
    if not fn:
        return [Call(action, "*")]  # GetAccountSettings, ListFunctions
    return [Call(action, fn if fn.startswith("arn:") else arns.of("lambda", f"function:{fn}"))]


def _simple(op: Operation, arns: Arns) -> list[Call]:
    """Services the project calls only on ``*`` or by name: SSM parameters, log streams, the rest on ``*``."""
    p = op.params
    if op.service == "ssm" and "Name" in p:
        return [Call(_action(op), arns.of("ssm", "parameter/" + str(p["Name"]).lstrip("/")))]
    if op.service == "ssm" and "Names" in p:
        return [Call(_action(op), arns.of("ssm", "parameter/" + str(n).lstrip("/"))) for n in p["Names"]]
    if op.service == "logs" and "logGroupName" in p:
        stream = f":log-stream:{p['logStreamName']}" if "logStreamName" in p else ":*"
        return [Call(_action(op), arns.of("logs", f"log-group:{p['logGroupName']}{stream}"))]
    return [Call(_action(op), "*")]


_SERVICES: dict[str, Any] = {
    "autoscaling": _autoscaling,
    "ec2": _ec2,
    "dynamodb": _dynamodb,
    "secretsmanager": _secretsmanager,
    "kms": _kms,
    "sqs": _sqs,
    "s3": _s3,
    "lambda": _lambda,
}
