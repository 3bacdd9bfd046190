"""The twin's cloud comes from the synthesized ``K8sClusterStack`` template: the artifact the pipeline deploys.

:func:`synthesized_templates` synthesizes the CDK app in-process (``app.build_app``) with the twin's context,
once per process and context (a synth costs seconds). :class:`TemplateCloud` reads the cluster template and
creates its resources in moto **in CloudFormation's order**: a resource is created only after every resource
it depends on (``DependsOn``, ``Ref``, ``Fn::GetAtt``, ``Fn::Sub`` references) exists ("CloudFormation
creates ... resources in the order determined by their dependencies", AWS CloudFormation User Guide,
"DependsOn attribute"; references are implicit dependencies). Among independent resources the twin takes
the template's order, one at a time (CloudFormation creates those in parallel: no order is promised).

Why a reader and not moto's own CloudFormation (checked in moto 5.2's source): its
``AWS::AutoScaling::AutoScalingGroup`` knows neither ``LifecycleHookSpecificationList`` nor
``InstanceLifecyclePolicy`` (moto/autoscaling has no trace of either), it has no ``AWS::AutoScaling::LifecycleHook``
nor ``AWS::SecretsManager::Secret`` resource type, and its groups launch their instances themselves, without
lifecycle hooks. (Its ESM keeps ScalingConfig, and it reads SSM-typed parameters.) Partial coverage would drop
silently what the twin must model; a reader that refuses what it does not know fails loudly instead.

Creation order matters for hooks: an ``AWS::AutoScaling::AutoScalingGroup`` is created (and launches its
desired capacity) before a separate ``AWS::AutoScaling::LifecycleHook`` that refers to it exists, so that
hook does not apply to the group's first instances; hooks in the group's ``LifecycleHookSpecificationList``
apply from the first instance ("One or more lifecycle hooks to add to the Auto Scaling group before
instances are launched", Amazon EC2 Auto Scaling API Reference, CreateAutoScalingGroup,
LifecycleHookSpecificationList). The receiver (:class:`CreationReceiver`, the twin) is told when each group
and each separate hook is created, and launches a group's instances at once.

Addresses: the twin's instances run on loopback (each etcd binds its own address). ONE translation maps the
template's private VPC onto loopback: ``a.b.c.d`` inside the template's VPC CIDR (``/16`` or longer, as
stages/config.py allows) <-> ``127.<o>.c.d`` where ``<o>`` is the twin's own second octet
(:class:`AddressMap`). It is applied where addresses are compared: the VPC and subnet CIDRs created in moto
(so an instance's address lies in its subnet), security-group rules inside the VPC and ``vpcCidr`` in the
agent config. Addresses outside the VPC (``apiAccessCidrs``, pod and service CIDRs) are kept.

Resource types the twin does not model (``UNMODELLED``; a test fails when the template gains a type that
is neither modelled nor listed here):

================================== =====================================================================
type                               why not
================================== =====================================================================
AWS::CDK::Metadata                 CDK's analytics record; no behaviour
AWS::CloudWatch::Alarm             nothing in the twin reads alarms (the twin's checks are its invariants)
AWS::CloudWatch::Dashboard         display only
AWS::EC2::FlowLog                  the twin has no packets to log
AWS::IAM::OIDCProvider             IRSA: the twin's context turns IRSA off (its own tests cover it)
AWS::Lambda::Permission            the twin invokes the handlers in-process from its rule and ESM models
AWS::SNS::Subscription             no e-mail in the twin
================================== =====================================================================

Lambda functions, event source mappings and EventBridge rules are modelled in-process (the real handlers
run in the twin's process): their environment, timeout, reserved concurrency, batch settings, patterns,
targets and schedules are read here and used by :mod:`twin.cluster` / :mod:`twin.events`.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from stages.user_data import AGENT_CONFIG_PATH
from twin.aws import ACCOUNT, PARTITION, REGION

REPO = Path(__file__).resolve().parent.parent
CLUSTER_STACK = "K8sClusterStack"
URL_SUFFIX = "amazonaws.com"
ROLE_TAG_KEY = "dedicated-k8s:role"

UNMODELLED: dict[str, str] = {
    "AWS::CDK::Metadata": "CDK's analytics record; no behaviour",
    "AWS::CloudWatch::Alarm": "nothing in the twin reads alarms (the twin's checks are its invariants)",
    "AWS::CloudWatch::Dashboard": "display only",
    "AWS::EC2::FlowLog": "the twin has no packets to log",
    "AWS::IAM::OIDCProvider": "IRSA: the twin's context turns IRSA off (its own tests cover it)",
    "AWS::Lambda::Permission": "the twin invokes the handlers in-process from its rule and ESM models",
    "AWS::SNS::Subscription": "no e-mail in the twin",
}


class TemplateError(ValueError):
    """The template asks for something the twin cannot create; the message names the resource and the value."""


# -- synthesis ---------------------------------------------------------------------------------------------------
@functools.cache
def _synth(context_json: str) -> dict[str, dict[str, Any]]:
    import os

    # As the Makefile sets them: jsii's Node end-of-life banner is silenced only by the Node major version.
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
    os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
    import aws_cdk as cdk

    from app import build_app

    app = cdk.App(context=json.loads(context_json))
    build_app(app)
    return {stack.hierarchical_id: stack.template for stack in app.synth().stacks}


def synthesized_templates(overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every stack of the app (``IamStack``, ``K8sClusterStack``, ...) synthesized with cdk.json's context plus
    ``overrides``; cached per process and context. Callers get a deep copy (they may mutate it)."""
    context = {**json.loads((REPO / "cdk.json").read_text())["context"], **overrides}
    return json.loads(json.dumps(_synth(json.dumps(context, sort_keys=True))))


# -- addresses -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AddressMap:
    """The template's VPC ``a.b.0.0/16`` (or a longer prefix inside it) <-> the twin's ``127.<octet>.0.0/16``."""

    template_cidr: str
    octet: int

    def __post_init__(self) -> None:
        net = ipaddress.IPv4Network(self.template_cidr)
        if net.prefixlen < 16 or not net.is_private:
            raise TemplateError(f"VPC CidrBlock {self.template_cidr!r}: the twin maps a private /16 or longer")
        if not 1 <= self.octet <= 254:
            raise TemplateError(f"twin loopback octet {self.octet!r}: must be 1..254")

    def _inside(self, addr: ipaddress.IPv4Address) -> bool:
        return addr in ipaddress.IPv4Network(self.template_cidr)

    def to_twin(self, value: str) -> str:
        """An address or CIDR of the template: translated when inside the VPC, unchanged otherwise."""
        host, slash, prefix = value.partition("/")
        addr = ipaddress.IPv4Address(host)
        if not self._inside(addr):
            return value
        c, d = addr.packed[2], addr.packed[3]
        return f"127.{self.octet}.{c}.{d}{slash}{prefix}"

    def to_template(self, value: str) -> str:
        host, slash, prefix = value.partition("/")
        addr = ipaddress.IPv4Address(host)
        if addr.packed[:2] != bytes([127, self.octet]):
            raise TemplateError(f"{value!r} is not a twin VPC address (127.{self.octet}.x.y)")
        a, b = ipaddress.IPv4Network(self.template_cidr).network_address.packed[:2]
        return f"{a}.{b}.{addr.packed[2]}.{addr.packed[3]}{slash}{prefix}"


# -- what the twin reads -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HookSpec:
    name: str
    transition: str  # autoscaling:EC2_INSTANCE_LAUNCHING | autoscaling:EC2_INSTANCE_TERMINATING
    heartbeat_timeout: int  # seconds, as the template says (the twin scales it)
    default_result: str
    form: str  # "specification" (in the group's LifecycleHookSpecificationList) | "resource"

    @property
    def launching(self) -> bool:
        return self.transition == "autoscaling:EC2_INSTANCE_LAUNCHING"


@dataclass
class GroupSpec:
    logical_id: str
    name: str
    role: str
    min_size: int
    max_size: int
    desired: int
    subnets: list[tuple[str, str]]  # (zone, moto subnet id), in VPCZoneIdentifier order
    launch_template_id: str
    agent_config: dict[str, Any]
    hooks: list[HookSpec]  # the LifecycleHookSpecificationList
    retain_on_abandon: bool
    target_groups: list[str]  # logical ids
    tags: list[dict[str, Any]]


@dataclass(frozen=True)
class LambdaSpec:
    logical_id: str
    name: str
    handler: str  # "module:function"
    environment: dict[str, str]
    timeout: int
    reserved_concurrency: int | None


@dataclass(frozen=True)
class EventSourceSpec:
    function: str  # logical id
    queue_url: str
    queue_arn: str
    batch_size: int
    batching_window: int
    maximum_concurrency: int | None
    response_types: tuple[str, ...]


@dataclass(frozen=True)
class RuleSpec:
    name: str
    pattern: dict[str, Any] | None
    schedule: str | None
    targets: tuple[str, ...]  # target ARNs

    def matches(self, event: Mapping[str, Any]) -> bool:
        """EventBridge content matching for the exact-value patterns the stack uses (a list of allowed values
        per field, nested objects for ``detail``): "Amazon EventBridge event patterns", EventBridge User Guide."""
        return self.pattern is not None and _match(self.pattern, event)


def _match(pattern: Mapping[str, Any], event: Mapping[str, Any]) -> bool:
    for key, want in pattern.items():
        got = event.get(key)
        if isinstance(want, dict):
            if not isinstance(got, Mapping) or not _match(want, got):
                return False
        elif not isinstance(want, list) or any(isinstance(w, dict) for w in want):
            raise TemplateError(f"event pattern field {key!r} = {want!r}: the twin matches exact-value lists only")
        elif got not in want:
            return False
    return True


@dataclass(frozen=True)
class TargetGroupSpec:
    logical_id: str
    arn: str
    port: int
    interval: int
    healthy_threshold: int
    unhealthy_threshold: int
    deregistration_delay: int
    preserve_client_ip: bool


def schedule_seconds(expression: str) -> int:
    """``rate(5 minutes)`` -> 300 ("Schedule types on EventBridge Scheduler": rate expressions)."""
    m = re.fullmatch(r"rate\((\d+) (minute|minutes|hour|hours|day|days)\)", expression)
    if not m:
        raise TemplateError(f"ScheduleExpression {expression!r}: the twin runs rate(N unit) schedules only")
    unit = {"minute": 60, "hour": 3600, "day": 86400}[m.group(2).rstrip("s")]
    return int(m.group(1)) * unit


def agent_config_from_user_data(user_data: str) -> dict[str, Any]:
    """The agent JSON stages/user_data.py writes with a quoted heredoc to AGENT_CONFIG_PATH."""
    m = re.search(rf"cat > {re.escape(AGENT_CONFIG_PATH)} <<'(\w+)'\n(.*?)\n\1\n", user_data, flags=re.S)
    if not m:
        raise TemplateError(f"UserData writes no agent config to {AGENT_CONFIG_PATH}: {user_data[:200]!r}")
    return dict(json.loads(m.group(2)))


class CreationReceiver(Protocol):
    def group_created(self, group: GroupSpec) -> None:
        """The group exists: it launches its desired capacity now, with the hooks it has."""

    def hook_created(self, group_name: str, hook: HookSpec) -> None:
        """A separate AWS::AutoScaling::LifecycleHook now exists: it applies from the next transition on."""


# -- the reader ----------------------------------------------------------------------------------------------------
def references(value: Any) -> Iterator[str]:
    """Logical ids ``value`` refers to through Ref, Fn::GetAtt and Fn::Sub."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "Ref" and isinstance(inner, str) and not inner.startswith("AWS::"):
                yield inner
            elif key == "Fn::GetAtt":
                yield inner[0] if isinstance(inner, list) else str(inner).split(".", 1)[0]
            elif key == "Fn::Sub":
                text = inner[0] if isinstance(inner, list) else inner
                for name in re.findall(r"\$\{([^}!]+)\}", text):
                    if not name.startswith("AWS::"):
                        yield name.split(".", 1)[0]
                if isinstance(inner, list):
                    yield from references(inner[1])
            else:
                yield from references(inner)
    elif isinstance(value, list):
        for item in value:
            yield from references(item)


def creation_order(resources: Mapping[str, Mapping[str, Any]], parameters: Mapping[str, Any]) -> list[str]:
    """Every logical id after everything it depends on; template order among independent ones."""
    deps: dict[str, set[str]] = {}
    for logical_id, res in resources.items():
        depends = res.get("DependsOn", [])
        wanted = set([depends] if isinstance(depends, str) else depends)
        wanted |= {r for r in references(res.get("Properties", {})) if r not in parameters}
        missing = wanted - set(resources)
        if missing:
            raise TemplateError(f"{logical_id} refers to {sorted(missing)}, which the template does not define")
        deps[logical_id] = wanted
    order: list[str] = []
    done: set[str] = set()
    while len(order) < len(resources):
        ready = [lid for lid in resources if lid not in done and deps[lid] <= done]
        if not ready:
            raise TemplateError(f"circular dependency among {sorted(set(resources) - done)}")
        order.append(ready[0])
        done.add(ready[0])
    return order


@dataclass
class _Made:
    ref: str
    attrs: dict[str, Any] = field(default_factory=dict)


class TemplateCloud:
    """One template, created in moto (``create``); afterwards the specs the twin runs on."""

    def __init__(
        self, template: Mapping[str, Any], *, octet: int, time_scale: float, addresses: AddressMap | None = None
    ) -> None:
        if not 0 < time_scale <= 1:
            raise TemplateError(f"time_scale {time_scale!r}: must be in (0, 1]")
        self.template = template
        self.time_scale = time_scale
        self.resources: dict[str, dict[str, Any]] = dict(template.get("Resources", {}))
        self.parameters: dict[str, Any] = dict(template.get("Parameters", {}))
        vpcs = [r for r in self.resources.values() if r["Type"] == "AWS::EC2::VPC"]
        if addresses is None:
            if len(vpcs) != 1:
                raise TemplateError(f"the twin needs exactly one AWS::EC2::VPC in the template, found {len(vpcs)}")
            addresses = AddressMap(vpcs[0]["Properties"]["CidrBlock"], octet)
        self.addresses = addresses
        self.made: dict[str, _Made] = {}
        self.groups: dict[str, GroupSpec] = {}  # by group name
        self.separate_hooks: list[tuple[str, HookSpec]] = []
        self.lambdas: dict[str, LambdaSpec] = {}  # by logical id
        self.event_sources: list[EventSourceSpec] = []
        self.rules: list[RuleSpec] = []
        self.target_groups: dict[str, TargetGroupSpec] = {}
        self.endpoint_services: list[str] = []
        self.queues: dict[str, dict[str, Any]] = {}  # logical id -> {url, arn, attributes}
        self.created: list[tuple[str, str]] = []  # (logical id, type) in creation order
        self._aws: Any = None

    @staticmethod
    def unmodelled_types(template: Mapping[str, Any]) -> set[str]:
        """Types in ``template`` that are neither created by :class:`TemplateCloud` nor listed in UNMODELLED."""
        types = {r["Type"] for r in template.get("Resources", {}).values()}
        return {t for t in types if t not in _CREATORS and t not in UNMODELLED}

    # -- intrinsics ------------------------------------------------------------------------------------------------
    def resolve(self, value: Any) -> Any:  # noqa: PLR0911 (one branch per intrinsic function)
        if isinstance(value, list):
            return [v for v in (self.resolve(v) for v in value) if v is not _NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, arg),) = value.items()
            if key == "Ref":
                return self._ref(arg)
            if key == "Fn::GetAtt":
                lid, attr = arg if isinstance(arg, list) else arg.split(".", 1)
                return self._get_att(lid, attr)
            if key == "Fn::Join":
                sep, items = arg
                return str(sep).join(str(i) for i in self.resolve(items))
            if key == "Fn::Sub":
                return self._sub(arg)
            if key == "Fn::Base64":
                return base64.b64encode(str(self.resolve(arg)).encode()).decode()
            if key == "Fn::Select":
                index, items = self.resolve(arg)
                return items[int(index)]
            if key == "Fn::Split":
                sep, text = self.resolve(arg)
                return str(text).split(sep)
            if key == "Fn::GetAZs":
                return [f"{REGION}{z}" for z in "abc"]
            if key.startswith("Fn::"):
                raise TemplateError(f"intrinsic {key} = {arg!r}: not resolved by the twin")
        return {k: r for k, v in value.items() if (r := self.resolve(v)) is not _NO_VALUE}

    def _ref(self, name: str) -> Any:
        pseudo = {
            "AWS::Region": REGION,
            "AWS::AccountId": ACCOUNT,
            "AWS::Partition": PARTITION,
            "AWS::URLSuffix": URL_SUFFIX,
            "AWS::StackName": f"twin-{CLUSTER_STACK}",
        }
        if name in pseudo:
            return pseudo[name]
        if name == "AWS::NoValue":
            return _NO_VALUE
        if name in self.parameters:
            return self._parameter(name)
        if name not in self.made:
            raise TemplateError(f"Ref {name}: not created yet (creation order) or not in the template")
        return self.made[name].ref

    def _get_att(self, logical_id: str, attr: str) -> Any:
        made = self.made.get(logical_id)
        if made is None:
            raise TemplateError(f"Fn::GetAtt {logical_id}.{attr}: {logical_id} is not created yet or unknown")
        if attr not in made.attrs:
            raise TemplateError(f"Fn::GetAtt {logical_id}.{attr}: the twin's model has {sorted(made.attrs)}")
        return made.attrs[attr]

    def _sub(self, arg: Any) -> str:
        text, variables = (arg[0], self.resolve(arg[1])) if isinstance(arg, list) else (arg, {})

        def one(m: re.Match[str]) -> str:
            name = m.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in variables:
                return str(variables[name])
            if "." in name and not name.startswith("AWS::"):
                return str(self._get_att(*name.split(".", 1)))
            return str(self._ref(name))

        return re.sub(r"\$\{([^}]+)\}", one, text)

    def _parameter(self, name: str) -> Any:
        param = self.parameters[name]
        kind, default = param.get("Type", "String"), param.get("Default")
        if kind.startswith("AWS::SSM::Parameter::Value<"):
            # CloudFormation reads the SSM parameter at deploy time (the image pipeline / CDK bootstrap wrote it).
            try:
                return self._aws.client("ssm").get_parameter(Name=default)["Parameter"]["Value"]
            except Exception as err:
                raise TemplateError(f"parameter {name}: SSM parameter {default!r} unreadable: {err}") from err
        if default is None:
            raise TemplateError(f"parameter {name} has no Default and the twin passes no parameters")
        return default

    # -- creation --------------------------------------------------------------------------------------------------
    def create(self, aws: Any, receiver: CreationReceiver) -> TemplateCloud:
        self._aws = aws
        self.receiver = receiver
        unknown = self.unmodelled_types(self.template)
        if unknown:
            raise TemplateError(f"resource types neither modelled nor listed in UNMODELLED: {sorted(unknown)}")
        for logical_id in creation_order(self.resources, self.parameters):
            res = self.resources[logical_id]
            creator = _CREATORS.get(res["Type"])
            props = res.get("Properties", {})
            if creator is None:
                self.made[logical_id] = _Made(f"twin-unmodelled-{logical_id}", {"Arn": self._arn(logical_id)})
                continue
            try:
                self.made[logical_id] = creator(self, logical_id, props)
            except TemplateError:
                raise
            except Exception as err:
                raise TemplateError(f"creating {logical_id} ({res['Type']}) in moto failed: {err}") from err
            self.created.append((logical_id, res["Type"]))
        return self

    def client(self, service: str) -> Any:
        return self._aws.client(service)

    def whole_seconds(self, production_seconds: float) -> int:
        """A scaled duration where AWS takes whole seconds (SQS VisibilityTimeout/DelaySeconds, the Lambda's
        ``*_SECONDS`` settings): rounded UP, at least 1, so a scaled wait is never shorter than its share of
        production's and the order of two durations never flips to "shorter first"."""
        return max(1, math.ceil(production_seconds * self.time_scale - 1e-9))

    @staticmethod
    def _arn(logical_id: str) -> str:
        return f"arn:{PARTITION}:cloudformation:{REGION}:{ACCOUNT}:unmodelled/{logical_id}"

    @staticmethod
    def tags(props: Mapping[str, Any]) -> list[dict[str, str]]:
        return [{"Key": t["Key"], "Value": t["Value"]} for t in props.get("Tags", [])]


_NO_VALUE = object()
Creator = Callable[[TemplateCloud, str, dict[str, Any]], _Made]
_CREATORS: dict[str, Creator] = {}


def creates(*types: str) -> Callable[[Creator], Creator]:
    def register(fn: Creator) -> Creator:
        for t in types:
            _CREATORS[t] = fn
        return fn

    return register


# The creators live in twin/template_resources.py (one function per resource type); importing it registers them.
from twin import template_resources as _resources  # noqa: E402

__all__ = ["_resources"]
