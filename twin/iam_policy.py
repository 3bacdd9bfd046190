"""IAM identity-policy evaluation, pure: which statements a principal holds in a synthesized template, and
whether they allow one request (action, resource ARN, condition context).

Reading (:func:`principal_statements`): a role's statements are its ``AWS::IAM::Role`` inline ``Policies``
plus every ``AWS::IAM::Policy`` / ``AWS::IAM::ManagedPolicy`` whose ``Roles`` names the role (a ``Ref`` to the
role's logical id or its literal RoleName), plus ``ManagedPolicyArns`` that ``Ref`` a ManagedPolicy of the same
template. Intrinsics in the documents are resolved by the caller's resolver (:class:`IntrinsicResolver` does
Ref, Fn::GetAtt, Fn::Sub, Fn::Join and the pseudo parameters from callables the caller passes). An AWS-managed
policy ARN (``arn:<partition>:iam::aws:policy/...``) cannot be read from a template: it is reported in
:attr:`PrincipalPolicies.unreadable` and grants nothing here (kinder would be to guess what it grants).

Deciding (:func:`is_allowed`), as "Policy evaluation logic" in the IAM User Guide
(https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_evaluation-logic.html) and "The
difference between explicit and implicit denies" describe it for identity-based policies in one account:

* a matching ``Deny`` statement wins over any ``Allow`` (explicit deny);
* otherwise a matching ``Allow`` is needed; no match is an implicit deny;
* a statement matches when its Action (or NotAction), its Resource (or NotResource) and every condition
  match. Actions compare case-insensitively, resources case-sensitively; both take ``*`` (any run of
  characters, ``:`` and ``/`` included) and ``?`` (one character) ("IAM JSON policy elements: Action" and
  "...: Resource").

Conditions ("IAM JSON policy elements: Condition operators",
https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_elements_condition_operators.html):
the operators in a block are ANDed, the keys under one operator are ANDed, the values of one key are ORed
(for a negated operator: the request value must match none of them). Condition key names compare
case-insensitively, values as the operator says. "If the key that you specify in a policy condition is not
present in the request context, the values do not match and the condition is false. If the policy condition
requires that the key is not matched, such as StringNotLike or ArnNotLike, and the right key is not
present, the condition is true" -- except ``...IfExists`` (an absent key is true) and ``Null`` (which tests
presence). ``ForAllValues:`` is true for an absent or empty key; ``ForAnyValue:`` is false for it.
Supported: String{Equals,NotEquals,EqualsIgnoreCase,NotEqualsIgnoreCase,Like,NotLike}, Arn{Equals,Like,
NotEquals,NotLike}, Bool, Null, with IfExists and the two set qualifiers. Any other operator raises
:class:`PolicyError` naming it: a condition the twin cannot evaluate must not silently pass or fail.
Policy variables (``${aws:username}``) are not substituted; no project policy uses them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ContextValue = str | bool | Sequence[str]
Context = Mapping[str, ContextValue]
Resolver = Callable[[Any], Any]


class PolicyError(ValueError):
    """A policy document or template the evaluator cannot read (names the bad element)."""


@dataclass(frozen=True)
class Statement:
    """One statement, with the policy it came from (``source``) so a decision can name it."""

    effect: str
    actions: tuple[str, ...] = ()
    not_actions: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    not_resources: tuple[str, ...] = ()
    conditions: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    sid: str = ""
    source: str = ""

    def describe(self) -> str:
        return f"{self.source}:{self.sid or '(no Sid)'}"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    statement: Statement | None  # the deciding statement: the Deny that matched, or the first Allow
    reason: str


def _strings(value: Any, what: str) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        if isinstance(v, bool):
            out.append("true" if v else "false")
        elif isinstance(v, (str, int)):
            out.append(str(v))
        else:
            raise PolicyError(f"{what}: {v!r} is not a string (an unresolved intrinsic?)")
    return tuple(out)


def statements_from_document(document: Mapping[str, Any], source: str) -> list[Statement]:
    """The statements of one (resolved) policy document; ``source`` names the policy in decisions."""
    raw = document.get("Statement")
    if raw is None:
        raise PolicyError(f"{source}: policy document has no Statement")
    out = []
    for i, st in enumerate(raw if isinstance(raw, list) else [raw]):
        where = f"{source} statement {st.get('Sid') or i}"
        effect = st.get("Effect")
        if effect not in ("Allow", "Deny"):
            raise PolicyError(f"{where}: Effect {effect!r} is neither Allow nor Deny")
        if ("Action" in st) == ("NotAction" in st):
            raise PolicyError(f"{where}: exactly one of Action / NotAction is required")
        if ("Resource" in st) == ("NotResource" in st):
            raise PolicyError(f"{where}: exactly one of Resource / NotResource is required")
        conditions: dict[str, dict[str, tuple[str, ...]]] = {}
        for op, block in (st.get("Condition") or {}).items():
            _operator(op)  # an unknown operator fails at read time, naming it
            conditions[op] = {key: _strings(v, f"{where} condition {op} {key}") for key, v in block.items()}
        out.append(
            Statement(
                effect=effect,
                actions=_strings(st["Action"], f"{where} Action") if "Action" in st else (),
                not_actions=_strings(st["NotAction"], f"{where} NotAction") if "NotAction" in st else (),
                resources=_strings(st["Resource"], f"{where} Resource") if "Resource" in st else (),
                not_resources=_strings(st["NotResource"], f"{where} NotResource") if "NotResource" in st else (),
                conditions=conditions,
                sid=str(st.get("Sid") or ""),
                source=source,
            )
        )
    return out


# -- intrinsics ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IntrinsicResolver:
    """Resolves Ref, Fn::GetAtt, Fn::Sub, Fn::Join and the pseudo parameters in a template value.

    ``ref(logical_id)`` and ``get_att(logical_id, attribute)`` answer for the template's resources (the caller
    knows what they became: moto's ids, or deterministic names); pseudo parameters come from ``pseudo``
    (``{"AWS::Partition": "aws", "AWS::Region": ..., "AWS::AccountId": ..., "AWS::URLSuffix": ...}``).
    Anything unresolvable raises :class:`PolicyError` naming it.
    """

    pseudo: Mapping[str, str]
    ref: Callable[[str], str] = field(default=lambda name: _unresolvable("Ref", name))
    get_att: Callable[[str, str], str] = field(default=lambda name, attr: _unresolvable("Fn::GetAtt", f"{name}.{attr}"))

    def __call__(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, arg),) = value.items()
            if key in ("Ref", "Fn::GetAtt", "Fn::Join", "Fn::Sub"):
                return self._intrinsic(key, arg)
            if key.startswith("Fn::") or key == "Condition":
                raise PolicyError(f"intrinsic {key} is not supported by the policy reader")
        return {k: self(v) for k, v in value.items()}

    def _intrinsic(self, key: str, arg: Any) -> str:
        if key == "Ref":
            return self.pseudo[arg] if arg in self.pseudo else self.ref(arg)
        if key == "Fn::GetAtt":
            name, attr = arg if isinstance(arg, list) else arg.split(".", 1)
            return self.get_att(name, attr)
        if key == "Fn::Join":
            sep, parts = arg
            return str(sep).join(str(self(p)) for p in self(parts))
        text, variables = (arg, {}) if isinstance(arg, str) else (arg[0], self(arg[1]))
        return self._sub(text, variables)

    def _sub(self, text: str, variables: Mapping[str, Any]) -> str:
        def one(m: re.Match[str]) -> str:
            name = m.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"  # ${!Literal} is the literal text ${Literal}
            if name in variables:
                return str(variables[name])
            if name in self.pseudo:
                return self.pseudo[name]
            if "." in name:
                res, attr = name.split(".", 1)
                return str(self.get_att(res, attr))
            return str(self.ref(name))

        return re.sub(r"\$\{([^}]+)\}", one, text)


def _unresolvable(kind: str, name: str) -> str:
    raise PolicyError(f"{kind} {name} cannot be resolved (no resolver for it)")


# -- reading a principal's policies from a template ---------------------------------------------------------------
@dataclass(frozen=True)
class PrincipalPolicies:
    role_logical_id: str
    statements: tuple[Statement, ...]
    unreadable: tuple[str, ...] = ()  # policy ARNs outside the template (AWS-managed): they grant nothing here


def role_logical_id(template: Mapping[str, Any], role_name: str) -> str:
    """The logical id of the AWS::IAM::Role whose RoleName is ``role_name``; PolicyError if none."""
    for lid, res in template.get("Resources", {}).items():
        if res.get("Type") == "AWS::IAM::Role" and res.get("Properties", {}).get("RoleName") == role_name:
            return str(lid)
    raise PolicyError(f"no AWS::IAM::Role with RoleName {role_name!r} in the template")


def _names_role(roles: Iterable[Any], logical_id: str, role_name: str | None) -> bool:
    return any(r == {"Ref": logical_id} or (role_name is not None and r == role_name) for r in roles)


def principal_statements(
    template: Mapping[str, Any], logical_id: str, resolve: Resolver, *, role_name: str | None = None
) -> PrincipalPolicies:
    """Every statement attached to the role ``logical_id`` in ``template`` (see the module docstring).

    ``role_name`` also matches policies that name the role literally (a policy in another stack attached with
    ``Role.from_role_name`` names it so)."""
    resources = template.get("Resources", {})
    role = resources.get(logical_id)
    if role is None or role.get("Type") != "AWS::IAM::Role":
        raise PolicyError(f"{logical_id!r} is not an AWS::IAM::Role of the template")
    props = role.get("Properties", {})
    statements: list[Statement] = []
    for p in props.get("Policies") or []:
        statements += statements_from_document(resolve(p["PolicyDocument"]), f"{logical_id}/{p.get('PolicyName')}")
    unreadable: list[str] = []
    for arn in props.get("ManagedPolicyArns") or []:
        if (
            isinstance(arn, dict)
            and set(arn) == {"Ref"}
            and resources.get(arn["Ref"], {}).get("Type") == ("AWS::IAM::ManagedPolicy")
        ):
            continue  # read below with the template's other managed policies
        unreadable.append(str(resolve(arn)))
    for lid, res in resources.items():
        if res.get("Type") not in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            continue
        rp = res.get("Properties", {})
        attached = _names_role(rp.get("Roles") or [], logical_id, role_name) or {"Ref": lid} in (
            props.get("ManagedPolicyArns") or []
        )
        if attached:
            statements += statements_from_document(resolve(rp["PolicyDocument"]), str(lid))
    return PrincipalPolicies(logical_id, tuple(statements), tuple(unreadable))


# -- matching -----------------------------------------------------------------------------------------------------
def _wildcard(pattern: str, value: str, *, case: bool) -> bool:
    """IAM's ``*``/``?`` match (``[`` is literal, unlike fnmatch's character classes)."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, flags=re.DOTALL if case else re.IGNORECASE | re.DOTALL) is not None


def action_matches(patterns: Iterable[str], action: str) -> bool:
    """Does ``action`` match one of ``patterns`` (case-insensitive, ``*``/``?`` wildcards)?"""
    return any(_wildcard(p, action, case=False) for p in patterns)


def _resource_matches(patterns: Iterable[str], arn: str) -> bool:
    return any(p == "*" or _wildcard(p, arn, case=True) for p in patterns)


def _arn_like(pattern: str, arn: str) -> bool:
    """ArnLike/ArnEquals: each of the six colon-delimited parts matches on its own (wildcards within a part)."""
    p_parts, a_parts = pattern.split(":", 5), arn.split(":", 5)
    if len(p_parts) != 6 or len(a_parts) != 6:
        return False
    return all(_wildcard(p, a, case=True) for p, a in zip(p_parts, a_parts, strict=True))


_MATCHERS: dict[str, Callable[[str, str], bool]] = {
    "StringEquals": lambda p, v: p == v,
    "StringEqualsIgnoreCase": lambda p, v: p.lower() == v.lower(),
    "StringLike": lambda p, v: _wildcard(p, v, case=True),
    "ArnEquals": _arn_like,
    "ArnLike": _arn_like,
    "Bool": lambda p, v: p.lower() == v.lower(),
}
_NEGATED = {
    "StringNotEquals": "StringEquals",
    "StringNotEqualsIgnoreCase": "StringEqualsIgnoreCase",
    "StringNotLike": "StringLike",
    "ArnNotEquals": "ArnEquals",
    "ArnNotLike": "ArnLike",
}


@dataclass(frozen=True)
class _Operator:
    base: str
    qualifier: str  # "", "ForAnyValue" or "ForAllValues"
    if_exists: bool


def _operator(op: str) -> _Operator:
    qualifier, _, base = op.rpartition(":")
    if qualifier not in ("", "ForAnyValue", "ForAllValues"):
        raise PolicyError(f"condition operator {op!r}: unknown set qualifier {qualifier!r}")
    if_exists = base.endswith("IfExists") and base != "IfExists"
    base = base.removesuffix("IfExists") if if_exists else base
    if base not in _MATCHERS and base not in _NEGATED and base != "Null":
        raise PolicyError(f"condition operator {op!r} is not supported by the twin's evaluator")
    if base == "Null" and (if_exists or qualifier):
        raise PolicyError(f"condition operator {op!r}: Null takes no IfExists or set qualifier")
    return _Operator(base, qualifier, if_exists)


def _context_values(context: Context, key: str) -> list[str] | None:
    for k, v in context.items():
        if k.lower() == key.lower():
            if isinstance(v, bool):
                return ["true" if v else "false"]
            return [v] if isinstance(v, str) else list(v)
    return None


def _condition_holds(op_name: str, key: str, policy_values: tuple[str, ...], context: Context) -> bool:
    op = _operator(op_name)
    values = _context_values(context, key)
    if op.base == "Null":
        absent = values is None or values == []
        return any((pv.lower() == "true") == absent for pv in policy_values)
    if values is None or values == []:
        if op.qualifier == "ForAllValues":
            return True
        if op.qualifier == "ForAnyValue":
            return False
        return op.if_exists or op.base in _NEGATED
    negated = op.base in _NEGATED
    match = _MATCHERS[_NEGATED.get(op.base, op.base)]

    def one(value: str) -> bool:
        hit = any(match(pv, value) for pv in policy_values)
        return not hit if negated else hit

    if op.qualifier == "ForAllValues":
        return all(one(v) for v in values)
    return any(one(v) for v in values)


def conditions_hold(conditions: Mapping[str, Mapping[str, tuple[str, ...]]], context: Context) -> bool:
    return all(
        _condition_holds(op, key, values, context) for op, block in conditions.items() for key, values in block.items()
    )


def statement_matches(st: Statement, action: str, resource_arn: str, context: Context) -> bool:
    if st.actions and not action_matches(st.actions, action):
        return False
    if st.not_actions and action_matches(st.not_actions, action):
        return False
    if st.resources and not _resource_matches(st.resources, resource_arn):
        return False
    if st.not_resources and _resource_matches(st.not_resources, resource_arn):
        return False
    return conditions_hold(st.conditions, context)


def is_allowed(
    statements: Iterable[Statement], action: str, resource_arn: str, context: Context | None = None
) -> Decision:
    """AWS's decision for one identity-policy request: explicit Deny > Allow > implicit deny."""
    ctx = context or {}
    allow: Statement | None = None
    for st in statements:
        if not statement_matches(st, action, resource_arn, ctx):
            continue
        if st.effect == "Deny":
            return Decision(False, st, f"explicitly denied by {st.describe()}")
        if allow is None:
            allow = st
    if allow is not None:
        return Decision(True, allow, f"allowed by {allow.describe()}")
    return Decision(False, None, "no statement allows it (implicit deny)")


__all__ = [
    "Decision",
    "IntrinsicResolver",
    "PolicyError",
    "PrincipalPolicies",
    "Statement",
    "action_matches",
    "conditions_hold",
    "is_allowed",
    "principal_statements",
    "role_logical_id",
    "statement_matches",
    "statements_from_document",
]
