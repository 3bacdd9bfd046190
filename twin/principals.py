"""Who calls AWS in the twin, with which policies and which (dummy) credentials.

Each principal of the deployed stack is an IAM role of the synthesized templates: the control-plane and worker
instance roles (the node agents' processes), the execution role of each Lambda function (read from the
cluster template's ``AWS::Lambda::Function`` ``Role``), and optionally the pipeline's canary/rollout
CodeBuild roles. Each gets its own access key; the proxy (:mod:`twin.aws`) finds the principal of a request by
the access key in its SigV4 ``Authorization`` header (``Credential=<key>/<date>/<region>/<service>/aws4_request``,
"Authenticating Requests (AWS Signature Version 4)", Amazon S3 / IAM API references) and evaluates the role's
statements (:mod:`twin.iam_policy`). The twin's own set-up calls use the unrestricted ``harness`` principal.

The in-process Lambda handlers share the twin's process, and boto3 clients they cache at import time
(``lambdas.common.cluster_aws.default_cluster_aws`` is one per process, shared by the three handlers) would
carry whoever's credentials were first in the environment. So in-process code signs with
:class:`InvocationCredentials`: boto3's default session resolves to it, and it answers, at every request
(botocore asks for frozen credentials per signature), the credentials of the Lambda invocation running in the
current thread (:func:`invocation_as`, set by :mod:`twin.events` from the function name in the invocation
context). Code running outside any invocation signs as ``unattributed`` and is denied: a handler's background
thread would have no credentials in AWS either. A per-function subprocess was the alternative: it costs an
interpreter start and the handler imports (~1 s) per function, and the chaos hooks and results that run around
each invocation would have to cross a process boundary; the credentials are what differs per function.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from botocore.credentials import Credentials, ReadOnlyCredentials

from twin.iam_policy import IntrinsicResolver, PolicyError, Statement, principal_statements, role_logical_id

HARNESS = "harness"
UNATTRIBUTED = "unattributed"  # in-process code outside any Lambda invocation


def access_key_for(principal: str) -> str:
    """A stable dummy temporary access key per principal (``ASIA`` + 16 characters, as STS issues them)."""
    return "ASIA" + hashlib.sha256(principal.encode()).hexdigest()[:16].upper()


def secret_key_for(principal: str) -> str:
    return hashlib.sha256(f"secret:{principal}".encode()).hexdigest()[:40]


@dataclass(frozen=True)
class Principal:
    name: str
    role_arn: str = ""
    statements: tuple[Statement, ...] = ()
    in_vpc: bool = False  # the node agents and the VPC Lambdas: they reach AWS only through VPC endpoints
    unrestricted: bool = False  # the harness: the twin's own set-up and observation
    session: str = ""  # the role session name in the assumed-role ARN (instance id / function name)

    @property
    def access_key(self) -> str:
        return access_key_for(self.name)

    @property
    def arn(self) -> str:
        """The caller as AWS names it in an AccessDenied message (an assumed-role session)."""
        if not self.role_arn:
            return self.name
        partition, account = self.role_arn.split(":")[1], self.role_arn.split(":")[4]
        role = self.role_arn.rsplit("/", 1)[-1]
        return f"arn:{partition}:sts::{account}:assumed-role/{role}/{self.session or self.name}"

    def credentials(self) -> dict[str, str]:
        return {"aws_access_key_id": self.access_key, "aws_secret_access_key": secret_key_for(self.name)}

    def environment(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": secret_key_for(self.name)}


HARNESS_PRINCIPAL = Principal(HARNESS, unrestricted=True)
UNATTRIBUTED_PRINCIPAL = Principal(UNATTRIBUTED)


def template_resolver(template: Mapping[str, Any], pseudo: Mapping[str, str]) -> IntrinsicResolver:
    """A resolver for policy documents: pseudo parameters, and Ref / Fn::GetAtt Arn of the resources whose
    deterministic name the template carries (roles, queues, tables, buckets, functions, log groups). A
    reference to anything else raises PolicyError naming it (the caller passes a cloud-backed resolver then)."""
    resources = template.get("Resources", {})
    partition, region, account = pseudo["AWS::Partition"], pseudo["AWS::Region"], pseudo["AWS::AccountId"]
    names = {
        "AWS::IAM::Role": ("RoleName", lambda n: f"arn:{partition}:iam::{account}:role/{n}"),
        "AWS::SQS::Queue": ("QueueName", lambda n: f"arn:{partition}:sqs:{region}:{account}:{n}"),
        "AWS::DynamoDB::Table": ("TableName", lambda n: f"arn:{partition}:dynamodb:{region}:{account}:table/{n}"),
        "AWS::S3::Bucket": ("BucketName", lambda n: f"arn:{partition}:s3:::{n}"),
        "AWS::Lambda::Function": ("FunctionName", lambda n: f"arn:{partition}:lambda:{region}:{account}:function:{n}"),
        "AWS::Logs::LogGroup": ("LogGroupName", lambda n: f"arn:{partition}:logs:{region}:{account}:log-group:{n}:*"),
    }

    def name_of(lid: str) -> tuple[str, Callable[[str], str]]:
        res = resources.get(lid)
        if res is None or res.get("Type") not in names:
            raise PolicyError(f"Ref {lid}: not a resource with a deterministic name in this template")
        prop, arn = names[res["Type"]]
        value = res.get("Properties", {}).get(prop)
        if not isinstance(value, str):
            raise PolicyError(f"Ref {lid}: {prop} is not a literal name ({value!r})")
        return value, arn

    def get_att(lid: str, attr: str) -> str:
        if attr != "Arn":
            raise PolicyError(f"Fn::GetAtt {lid}.{attr}: only Arn is resolved from the template alone")
        value, arn = name_of(lid)
        return arn(value)

    return IntrinsicResolver(pseudo, ref=lambda lid: name_of(lid)[0], get_att=get_att)


@dataclass(frozen=True)
class PrincipalSource:
    """Where one principal's role is: ``template`` holding the role (by RoleName or logical id)."""

    name: str
    template: Mapping[str, Any]
    role: str  # RoleName, or the logical id when the role has no name (CDK Pipelines' generated roles)
    in_vpc: bool
    resolver: IntrinsicResolver | None = None


def principal_from(source: PrincipalSource, pseudo: Mapping[str, str]) -> Principal:
    resources = source.template.get("Resources", {})
    if source.role in resources:
        lid, role_name = source.role, resources[source.role].get("Properties", {}).get("RoleName")
    else:
        lid, role_name = role_logical_id(source.template, source.role), source.role
    resolve = source.resolver or template_resolver(source.template, pseudo)
    read = principal_statements(source.template, lid, resolve, role_name=role_name)
    name = role_name if isinstance(role_name, str) else lid
    arn = f"arn:{pseudo['AWS::Partition']}:iam::{pseudo['AWS::AccountId']}:role/{name}"
    return Principal(source.name, arn, read.statements, in_vpc=source.in_vpc)


def lambda_roles(cluster_template: Mapping[str, Any], resolve: Callable[[Any], Any]) -> dict[str, tuple[str, bool]]:
    """function name -> (execution role name, in a VPC?) for every AWS::Lambda::Function of the template."""
    out = {}
    for lid, res in cluster_template.get("Resources", {}).items():
        if res.get("Type") != "AWS::Lambda::Function":
            continue
        props = res.get("Properties", {})
        name, role = resolve(props.get("FunctionName")), resolve(props.get("Role"))
        if not isinstance(name, str) or not isinstance(role, str) or ":role/" not in role:
            raise PolicyError(f"Lambda function {lid}: FunctionName {name!r} / Role {role!r} not resolvable")
        out[name] = (role.rsplit("/", 1)[-1], bool(props.get("VpcConfig")))
    return out


@dataclass
class PrincipalBook:
    """Every principal of a twin run, by name and by access key (the proxy's lookup)."""

    principals: dict[str, Principal] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.add(HARNESS_PRINCIPAL)
        self.add(UNATTRIBUTED_PRINCIPAL)

    def add(self, principal: Principal) -> Principal:
        self.principals[principal.name] = principal
        return principal

    def by_key(self, access_key: str) -> Principal | None:
        for p in self.principals.values():
            if p.access_key == access_key:
                return p
        return None

    def __getitem__(self, name: str) -> Principal:
        if name not in self.principals:
            raise KeyError(f"no principal {name!r} in the twin (known: {', '.join(sorted(self.principals))})")
        return self.principals[name]


def principals_from_templates(
    iam_template: Mapping[str, Any],
    cluster_template: Mapping[str, Any],
    *,
    node_roles: Mapping[str, str],
    pseudo: Mapping[str, str],
    cluster_resolver: IntrinsicResolver | None = None,
    extra: tuple[PrincipalSource, ...] = (),
) -> PrincipalBook:
    """The node principals (``node_roles``: principal name -> instance role name, e.g. ``{"control-plane":
    cfg.control_plane_role_name}``), one principal per Lambda function (named by the function name) and the
    ``extra`` ones (pipeline roles)."""
    book = PrincipalBook()
    for name, role in node_roles.items():
        book.add(principal_from(PrincipalSource(name, iam_template, role, in_vpc=True), pseudo))
    resolve = cluster_resolver or template_resolver(cluster_template, pseudo)
    for function, (role, in_vpc) in lambda_roles(cluster_template, resolve).items():
        p = principal_from(PrincipalSource(function, iam_template, role, in_vpc=in_vpc), pseudo)
        book.add(Principal(p.name, p.role_arn, p.statements, in_vpc=p.in_vpc, session=function))
    for source in extra:
        book.add(principal_from(source, pseudo))
    return book


# -- in-process credentials (the Lambda handlers) ------------------------------------------------------------------
_active = PrincipalBook()


def activate(book: PrincipalBook) -> Callable[[], None]:
    """Make ``book`` the principals in-process Lambda invocations are looked up in (one twin per process at a
    time); returns an undo."""
    global _active
    previous, _active = _active, book

    def undo() -> None:
        global _active  # noqa: PLW0603
        _active = previous

    return undo


def function_principal(function_name: str) -> Principal:
    """The execution role principal of ``function_name`` in the active twin; ``unattributed`` if none."""
    return _active.principals.get(function_name, UNATTRIBUTED_PRINCIPAL)


_invocation: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("twin_invocation", default=None)


@contextlib.contextmanager
def invocation_as(principal: Principal) -> Iterator[None]:
    """Requests signed by in-process boto3 clients in this thread carry ``principal``'s key meanwhile."""
    token = _invocation.set(principal)
    try:
        yield
    finally:
        _invocation.reset(token)


class InvocationCredentials(Credentials):
    """Credentials whose value is the current invocation's principal's (``unattributed`` outside one)."""

    def __init__(self) -> None:
        super().__init__(UNATTRIBUTED_PRINCIPAL.access_key, secret_key_for(UNATTRIBUTED))

    def _current(self) -> Principal:
        return _invocation.get() or UNATTRIBUTED_PRINCIPAL

    def get_frozen_credentials(self) -> ReadOnlyCredentials:
        p = self._current()
        return ReadOnlyCredentials(p.access_key, secret_key_for(p.name), None)


def install_default_session(region: str) -> Callable[[], None]:
    """Make boto3's default session (``boto3.client(...)``) sign with :class:`InvocationCredentials`;
    returns an undo that restores the previous default session."""
    import boto3
    import botocore.session

    previous = boto3.DEFAULT_SESSION
    core = botocore.session.get_session()

    class _Resolver:
        def load_credentials(self) -> Credentials:
            return InvocationCredentials()

    core.register_component("credential_provider", _Resolver())
    boto3.DEFAULT_SESSION = boto3.session.Session(botocore_session=core, region_name=region)

    def undo() -> None:
        boto3.DEFAULT_SESSION = previous

    return undo
