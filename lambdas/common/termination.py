"""A control-plane instance is leaving: remove its etcd member safely, then let termination go on.

The requests come from the lifecycle queue (EventBridge -> SQS): Auto Scaling's "EC2 Instance-terminate
Lifecycle Action" events, our own delayed retries of them, and the reconciler's level-triggered requests
(an instance waiting in Terminating:Wait whose event was lost, a member whose instance is gone). One
function decides for all of them, so the rules are the same whichever way a request arrives:

* removed / already gone        -> complete the hook with CONTINUE
* not safe now                  -> heartbeat the hook and re-enqueue with a delay (no Lambda sleeps)
* still not safe past deadline  -> ABANDON; the control-plane groups retain on abandon, so the instance
                                   and its member stay up and the RemovalAbandoned alarm calls a human
* bad input                     -> rejected, logged, nothing changed (the message goes to the DLQ)
* not verified as leaving       -> rejected, logged, nothing changed, the message consumed: before any drain
                                   or removal, AWS itself must say the instance is leaving
                                   (:mod:`lambdas.common.verify`); a message is a claim, not a fact

The removal deadline runs from when the lifecycle action (instance, group, hook) was first seen, kept in the
cluster-state table on first sight (:meth:`ClusterAws.first_seen`), never from a message body: a retry key's
``firstSeen`` is only informational, and a retry key that is not well-formed (``attempt`` not a positive
integer, ``firstSeen`` not a finite past time) is rejected like other bad input, but consumed (our own
retries always write it well-formed, so only a forged or mangled message carries such a key, and the
reconciler finds a real termination whose message was lost).

The etcd removal (observe, decide, remove, complete) runs only while this invocation holds the membership
writer lease (:mod:`lambdas.common.writer_lease`, invariant 4a): the event source runs up to two invocations
at once, and one that finds the lease held treats its request as "not safe now" like any other wait.

Before any of that, a terminating instance's node is drained (:mod:`lambdas.common.drain`: cordon, evict
through the Eviction API so PodDisruptionBudgets hold, delete the Node object): on control-plane nodes the
drain comes before the etcd removal; worker groups (WORKER_GROUP_NAMES) get the drain only, never etcd, and
then CONTINUE. While the drain waits (a PDB blocks an eviction, pods still terminating, the API unreachable,
the client secret not yet written) the hook is heartbeaten and the request re-enqueued, as for an unsafe
removal. Past the drain deadline (DRAIN_DEADLINE_SECONDS, shorter than the removal deadline) termination
proceeds without a finished drain, logged and counted (DrainDeadlinePassed): a dead API server must not
block scale-in or the etcd removal forever.

Why the drain lives here and not in aws-node-termination-handler (NTH, queue mode): NTH completes the
lifecycle action itself right after its drain, so on a control-plane node it cannot be ordered before the
etcd removal, and it never deletes the Node object; this Lambda already has the retry, heartbeat and
deadline machinery. NTH still handles the EC2 events that are not Auto Scaling hooks (spot interruption,
rebalance recommendation, scheduled maintenance).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from lambdas.common.cluster_aws import LambdaSettings
from lambdas.common.drain import DrainResult, drain_node
from lambdas.common.etcd_client import EtcdClient, EtcdUnavailableError, TlsMaterial
from lambdas.common.join_watch import live_instances_by_ip
from lambdas.common.kube_client import KubeClient, KubeRequestError, KubeUnavailableError
from lambdas.common.membership import RemovalOutcome, RemovalResult, remove_member_safely
from lambdas.common.verify import Verdict, verify_gone, verify_terminating
from lambdas.common.writer_lease import LeaseBusy, WriterLease

TERMINATE_DETAIL_TYPE = "EC2 Instance-terminate Lifecycle Action"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
RECONCILER_SOURCE = "dedicated-k8s.reconciler"
RECONCILER_DETAIL_TYPE = "Control-plane Member Cleanup"
RETRY_KEY = "dedicatedK8sRetry"
_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8}([0-9a-f]{9})?$")
# A retry's firstSeen may be this far ahead of our clock (another invocation's clock); further is no retry of ours.
_CLOCK_SKEW_SECONDS = 300
# More attempts than any deadline allows at the shortest retry delay: a larger count is no retry of ours.
_MAX_ATTEMPT = 100_000


class MalformedRequestError(ValueError):
    """The message is not a request we understand; nothing is done with it."""


class MalformedRetryKeyError(MalformedRequestError):
    """A terminate event whose retry key we never wrote; rejected and consumed (see the module docstring)."""


def _retry_key(body: dict[str, Any], now: float) -> tuple[int, float]:
    """(attempt, firstSeen) of our retry key, checked; (1, now) when the event carries none."""
    if RETRY_KEY not in body:
        return 1, now
    retry = body[RETRY_KEY]
    if not isinstance(retry, dict):
        raise MalformedRetryKeyError(f"{RETRY_KEY} is {type(retry).__name__}, not an object")
    attempt = retry.get("attempt", 1)
    if isinstance(attempt, bool) or not isinstance(attempt, int) or not 1 <= attempt <= _MAX_ATTEMPT:
        raise MalformedRetryKeyError(f"{RETRY_KEY}.attempt {attempt!r} is not an integer in 1..{_MAX_ATTEMPT}")
    seen = retry.get("firstSeen", now)
    if isinstance(seen, bool) or not isinstance(seen, int | float) or not math.isfinite(seen) or seen <= 0:
        raise MalformedRetryKeyError(f"{RETRY_KEY}.firstSeen {seen!r} is not a positive finite time")
    if seen > now + _CLOCK_SKEW_SECONDS:
        raise MalformedRetryKeyError(f"{RETRY_KEY}.firstSeen {seen!r} is in the future (now {now:.0f})")
    return attempt, float(seen)


@dataclass(frozen=True)
class TerminationRequest:
    """``kind``: "terminating" (a hook waits) or "stale-member" (the instance is gone, no hook).
    ``origin``: "lifecycle-event" (Auto Scaling's event and our retries of it) or "reconciler"."""

    instance_id: str
    kind: str
    origin: str
    group: str | None = None
    hook: str | None = None
    token: str | None = None
    attempt: int = 1
    first_seen: float = 0.0
    event: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # Set once this invocation's verification heartbeat succeeded (lambdas.common.verify): the hook's timeout
    # was just restarted, so a wait in the same invocation need not heartbeat again.
    heartbeat_recorded: bool = field(default=False, compare=False)

    @classmethod
    def parse(cls, body: Any, now: float) -> TerminationRequest:
        if not isinstance(body, dict):
            raise MalformedRequestError("the message body is not a JSON object")
        detail = body.get("detail")
        if not isinstance(detail, dict):
            raise MalformedRequestError("the event has no 'detail' object")
        instance_id = detail.get("EC2InstanceId")
        if not isinstance(instance_id, str) or not _INSTANCE_ID.match(instance_id):
            raise MalformedRequestError(f"detail.EC2InstanceId {instance_id!r} is not an instance ID")
        detail_type = body.get("detail-type")
        if body.get("source") == RECONCILER_SOURCE and detail_type == RECONCILER_DETAIL_TYPE:
            kind = detail.get("kind")
            if kind not in ("terminating", "stale-member"):
                raise MalformedRequestError(f"reconciler request kind {kind!r} is unknown")
            if kind == "terminating" and not (detail.get("AutoScalingGroupName") and detail.get("LifecycleHookName")):
                raise MalformedRequestError("a terminating request needs AutoScalingGroupName and LifecycleHookName")
            return cls(instance_id, kind, "reconciler", detail.get("AutoScalingGroupName"),
                       detail.get("LifecycleHookName"), None, 1, now, body)  # fmt: skip
        if body.get("source") != "aws.autoscaling" or detail_type != TERMINATE_DETAIL_TYPE:
            raise MalformedRequestError(f"unexpected event {body.get('source')!r} / {detail_type!r}")
        if detail.get("LifecycleTransition") != TERMINATING:
            raise MalformedRequestError(
                f"LifecycleTransition {detail.get('LifecycleTransition')!r} is not {TERMINATING}"
            )
        missing = [k for k in ("AutoScalingGroupName", "LifecycleHookName") if not isinstance(detail.get(k), str)]
        if missing:
            raise MalformedRequestError(f"detail lacks {', '.join(missing)}")
        attempt, first_seen = _retry_key(body, now)
        return cls(
            instance_id=instance_id,
            kind="terminating",
            origin="lifecycle-event",
            group=detail["AutoScalingGroupName"],
            hook=detail["LifecycleHookName"],
            token=detail.get("LifecycleActionToken") if isinstance(detail.get("LifecycleActionToken"), str) else None,
            attempt=attempt,
            first_seen=first_seen,
            event=body,
        )

    def retry_message(self, now: float) -> dict[str, Any]:
        """The same event, carrying the attempt count and when it was first seen (the deadline's start)."""
        body = {k: v for k, v in self.event.items() if k != RETRY_KEY}
        body[RETRY_KEY] = {"attempt": self.attempt + 1, "firstSeen": self.first_seen, "lastTry": now}
        return body


class ClusterPorts(Protocol):
    """What :func:`handle_termination` needs from AWS (:class:`lambdas.common.cluster_aws.ClusterAws`)."""

    settings: LambdaSettings
    ec2: Any  # boto3 EC2 client: who holds an address (lambdas.common.join_watch.live_instances_by_ip)

    def etcd_tls(self) -> TlsMaterial | None: ...
    def etcd_client(self, tls: TlsMaterial, timeout: float = 2.0) -> EtcdClient: ...
    def kube_tls(self) -> TlsMaterial | None: ...
    def kube_client(self, tls: TlsMaterial, timeout: float = 5.0) -> KubeClient: ...
    def etcd_endpoints(self, exclude: Any = ()) -> list[str]: ...
    def private_ip(self, instance_id: str) -> str | None: ...
    def instance_states(self, instance_ids: Any) -> dict[str, str | None]: ...
    def lifecycle_state(self, instance_id: str) -> tuple[str, str] | None: ...
    def first_seen(self, instance_id: str, group: str, hook: str, now: float) -> float: ...
    def complete(self, group: str, hook: str, instance_id: str, token: str | None, result: str) -> bool: ...
    def heartbeat(self, group: str, hook: str, instance_id: str, token: str | None) -> bool: ...
    def enqueue(self, body: dict[str, Any], delay_seconds: int = 0) -> None: ...
    def writer_lease(self) -> WriterLease: ...


@dataclass(frozen=True)
class DrainStep:
    """What the drain allows: ``proceed`` (drained, nothing to drain, disabled, or past the drain deadline)."""

    proceed: bool
    reason: str
    result: DrainResult | None = None
    deadline_passed: bool = False


@dataclass(frozen=True)
class TerminationResult:
    """``action``: continue | abandon | retry | deferred | ignored | rejected | hook-gone.
    ``role``: "control-plane" or "worker" (the request's group)."""

    action: str
    reason: str
    removal: RemovalResult | None = None
    completed: bool | None = None
    drain: DrainStep | None = None
    role: str = "control-plane"
    # The membership writer lease: "released", "release-failed" (it expires by itself), "busy" (not taken).
    writer_lease: str | None = None
    # What AWS reported when the request was verified (lambdas.common.verify): lifecycle or EC2 state.
    aws_state: str | None = None

    def log_fields(self) -> dict[str, Any]:
        member = self.removal.member if self.removal else None
        view = self.removal.view if self.removal else None
        drained = self.drain.result if self.drain else None
        return {
            "action": self.action,
            "reason": self.reason,
            "role": self.role,
            "removal": self.removal.outcome.value if self.removal else None,
            "member": member.label if member else None,
            "healthy_voters": len(view.healthy_voters) if view else None,
            "voters": len(view.voters) if view else None,
            "hook_completed": self.completed,
            "drain": drained.status.value if drained else None,
            "drain_reason": self.drain.reason if self.drain else None,
            "node": drained.node if drained else None,
            "evicted": list(drained.evicted) if drained else None,
            "pdb_blocked": list(drained.blocked) if drained else None,
            "drain_deadline_passed": self.drain.deadline_passed if self.drain else None,
            "writer_lease": self.writer_lease,
            "aws_state": self.aws_state,
        }


def handle_termination(request: TerminationRequest, ports: ClusterPorts, now: float | None = None) -> TerminationResult:
    now = time.time() if now is None else now
    settings = ports.settings
    role = "worker" if request.group is not None and request.group in settings.worker_groups else "control-plane"
    verdict = _verify(request, ports)
    if not verdict.verified:
        return TerminationResult("rejected", verdict.reason, role=role, aws_state=verdict.state)
    if request.kind == "terminating" and request.group and request.hook:  # the deadline's start: never the message
        request = dataclasses.replace(
            request,
            first_seen=ports.first_seen(request.instance_id, request.group, request.hook, now),
            heartbeat_recorded=True,
        )
    terminate = _terminate_worker if role == "worker" else _terminate_control_plane
    result = terminate(request, ports, now)
    return dataclasses.replace(result, aws_state=verdict.state)


def _verify(request: TerminationRequest, ports: ClusterPorts) -> Verdict:
    settings = ports.settings
    if request.kind == "stale-member":
        if request.group is not None and request.group not in settings.control_plane_groups:
            return Verdict(False, f"group {request.group!r} is not one of this cluster's control-plane groups")
        return verify_gone(ports, instance_id=request.instance_id)
    return verify_terminating(
        ports,
        instance_id=request.instance_id,
        group=request.group,
        hook=request.hook,
        token=request.token,
        cluster_groups=(*settings.control_plane_groups, *settings.worker_groups),
    )


def _terminate_control_plane(request: TerminationRequest, ports: ClusterPorts, now: float) -> TerminationResult:
    tls = ports.etcd_tls()  # None only on a cluster never initialised; unreadable on an initialised one raises
    if tls is None:
        return _finish(request, ports, "CONTINUE", "the cluster was never initialised: no etcd member to remove")
    if request.kind != "terminating":  # the instance is gone already: nothing runs there to drain
        return _remove_member(request, ports, now, tls)
    step = _drain_step(request, ports, now)
    if not step.proceed:
        return _not_now(request, ports, now, f"drain: {step.reason}", drain=step)
    return dataclasses.replace(_remove_member(request, ports, now, tls), drain=step)


def _remove_member(request: TerminationRequest, ports: ClusterPorts, now: float, tls: TlsMaterial) -> TerminationResult:
    """The etcd removal under the membership writer lease, released whatever happens (result or error)."""
    lease = ports.writer_lease()
    held = lease.acquire(f"etcd-lifecycle removing {request.instance_id} ({request.origin})")
    if isinstance(held, LeaseBusy):
        busy = _not_now(request, ports, now, held.reason(now))
        return dataclasses.replace(busy, writer_lease="busy")
    try:
        result = _remove_member_as_writer(request, ports, now, tls)
    finally:
        released = lease.release(held)
    return dataclasses.replace(result, writer_lease="released" if released else "release-failed")


def _remove_member_as_writer(
    request: TerminationRequest, ports: ClusterPorts, now: float, tls: TlsMaterial
) -> TerminationResult:
    settings = ports.settings
    endpoints = ports.etcd_endpoints(exclude=[request.instance_id])
    if not endpoints:
        return _not_now(request, ports, now, "no other running control-plane instance to reach etcd through")
    private_ip = ports.private_ip(request.instance_id)
    # Who EC2 shows holding that address: an unstarted member there is the leaving instance's only if no one
    # else holds it (EC2 reuses private IPs; lambdas.common.membership.find_member_for_instance).
    live = live_instances_by_ip(ports.ec2, settings.cluster_tag_key, settings.cluster_name) if private_ip else {}
    try:
        removal = remove_member_safely(
            ports.etcd_client(tls),
            endpoints,
            instance_id=request.instance_id,
            private_ip=private_ip,
            desired_voters=settings.desired_members,
            ip_holders=live.get(private_ip, []) if private_ip else None,
        )
    except EtcdUnavailableError as err:
        return _not_now(request, ports, now, f"etcd unreachable: {err}")
    if removal.outcome is RemovalOutcome.UNSAFE:
        return _not_now(request, ports, now, removal.reason, removal)
    note = "" if private_ip else " (EC2 no longer knows the instance; matched by name only)"
    return _finish(request, ports, "CONTINUE", f"{removal.outcome.value}: {removal.reason}{note}", removal)


def _terminate_worker(request: TerminationRequest, ports: ClusterPorts, now: float) -> TerminationResult:
    """A worker holds no etcd member: drain, delete its Node, CONTINUE. etcd is never touched."""
    if request.kind != "terminating":
        return TerminationResult("ignored", "a worker group has no etcd member to clean up", role="worker")
    step = _drain_step(request, ports, now)
    if not step.proceed:
        return _not_now(request, ports, now, f"drain: {step.reason}", drain=step, role="worker")
    return _finish(request, ports, "CONTINUE", step.reason, drain=step, role="worker")


def _drain_step(request: TerminationRequest, ports: ClusterPorts, now: float) -> DrainStep:
    """One drain step; whatever stops it (a PDB, terminating pods, the API unreachable or refusing, the client
    secret not written yet) waits until the drain deadline, after which termination proceeds anyway."""
    settings = ports.settings
    if not settings.drain_nodes:
        return DrainStep(True, "node drain is disabled (DRAIN_NODES=false)")
    result: DrainResult | None = None
    try:
        tls = ports.kube_tls()
        if tls is None:
            problem = "the Kubernetes client secret holds no certificate yet (written by the node agent at init)"
        else:
            client = ports.kube_client(tls)
            result = drain_node(client, request.instance_id, settle_seconds=settings.drain_settle_seconds)
            if result.done:
                return DrainStep(True, result.reason, result)
            problem = result.reason
    except KubeUnavailableError as err:
        problem = f"Kubernetes API unreachable: {err}"
    except KubeRequestError as err:  # unauthorized (RBAC not applied yet), or another refusal: retry too
        problem = f"Kubernetes API refused: {err}"
    waited = now - request.first_seen
    if waited >= settings.drain_deadline_seconds:
        reason = f"drain unfinished after {int(waited)}s (drain deadline), proceeding without it: {problem}"
        return DrainStep(True, reason, result, deadline_passed=True)
    return DrainStep(False, problem, result)


def _finish(
    request: TerminationRequest,
    ports: ClusterPorts,
    result: str,
    reason: str,
    removal: RemovalResult | None = None,
    *,
    drain: DrainStep | None = None,
    role: str = "control-plane",
) -> TerminationResult:
    if request.kind != "terminating" or request.group is None or request.hook is None:
        return TerminationResult("continue", reason, removal, drain=drain, role=role)
    completed = ports.complete(request.group, request.hook, request.instance_id, request.token, result)
    return TerminationResult(result.lower(), reason, removal, completed, drain=drain, role=role)


def _not_now(
    request: TerminationRequest,
    ports: ClusterPorts,
    now: float,
    reason: str,
    removal: RemovalResult | None = None,
    *,
    drain: DrainStep | None = None,
    role: str = "control-plane",
) -> TerminationResult:
    settings = ports.settings
    if request.kind != "terminating":
        # Level-triggered: the reconciler asks again on its next run; no chain of retries of its own.
        return TerminationResult("deferred", reason, removal, drain=drain, role=role)
    assert request.group is not None and request.hook is not None
    if now - request.first_seen >= settings.removal_deadline_seconds:
        waited = int(now - request.first_seen)
        return _finish(request, ports, "ABANDON", f"still unsafe after {waited}s (deadline): {reason}", removal,
                       drain=drain, role=role)  # fmt: skip
    live = request.heartbeat_recorded or ports.heartbeat(
        request.group, request.hook, request.instance_id, request.token
    )
    if not live:
        return TerminationResult(
            "hook-gone", f"the hook is no longer waiting; stopping retries ({reason})", removal, drain=drain, role=role
        )
    if request.origin == "reconciler":
        # A lost event's hook waiting for its turn (issue 15): the heartbeat above keeps it alive until the
        # reconciler's next request (every minute, well inside the hook's timeout), which asks again; the
        # removal deadline above, from the table's first sight, decides when waiting ends. No retry chain.
        return TerminationResult("deferred", reason, removal, drain=drain, role=role)
    ports.enqueue(request.retry_message(now), settings.retry_delay_seconds)
    return TerminationResult("retry", reason, removal, drain=drain, role=role)
