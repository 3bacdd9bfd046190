"""Is this instance really leaving? What the lifecycle Lambda establishes from AWS itself before it drains a
node or removes an etcd member, whatever the message says (issue 15; docs/architecture.md, invariant 1).

A message on the lifecycle queue is a claim, not a fact: it may be stale (redelivered after the hook was
completed), replayed, or forged by anything that can send to the queue. So before acting:

* a ``terminating`` request (Auto Scaling's event, our retry of it, or the reconciler's repair): the group
  it names is one of this cluster's (CONTROL_PLANE_GROUP_NAMES / WORKER_GROUP_NAMES); Auto Scaling's
  DescribeAutoScalingInstances puts the instance in *that* group in ``Terminating:Wait`` (or
  ``Terminating:Proceed``); and a RecordLifecycleActionHeartbeat with the message's hook and token succeeds,
  which only a live lifecycle action accepts ("No active Lifecycle Action found" otherwise);
* a ``stale-member`` request (the reconciler, no hook): EC2 reports the instance terminated (or shutting
  down) or does not know it at all.

Anything else is rejected: nothing is drained, removed or completed. The rejection is logged (instance,
group, the state AWS reported, the reason) and the message consumed: a message that fails verification
would fail it again on every redelivery, and a real termination whose event is lost or mangled is still
found by the reconciler, which reads the same states from AWS.

Kept apart from :mod:`lambdas.common.termination` (what to do) so the question "is it leaving" has one
answer, read from AWS and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from lambdas.common.cluster_aws import GONE_STATES

# DescribeAutoScalingInstances' LifecycleState while a terminate hook holds the instance, and right after it
# was completed (AutoScalingInstanceDetails.LifecycleState, Amazon EC2 Auto Scaling API Reference).
LEAVING_STATES = frozenset({"Terminating:Wait", "Terminating:Proceed"})


@dataclass(frozen=True)
class Verdict:
    """``verified``: AWS agrees the instance is leaving. ``state``: what AWS reported (a lifecycle state, an
    EC2 state, or a description of its absence), for the log line either way."""

    verified: bool
    reason: str
    state: str | None = None


class VerifyPorts(Protocol):
    """What :func:`verify_leaving` reads from AWS (:class:`lambdas.common.cluster_aws.ClusterAws`)."""

    def lifecycle_state(self, instance_id: str) -> tuple[str, str] | None: ...
    def heartbeat(self, group: str, hook: str, instance_id: str, token: str | None) -> bool: ...
    def instance_states(self, instance_ids: Sequence[str]) -> dict[str, str | None]: ...


def verify_terminating(  # noqa: PLR0911 (one return per refusal reads best here)
    ports: VerifyPorts,
    *,
    instance_id: str,
    group: str | None,
    hook: str | None,
    token: str | None,
    cluster_groups: Sequence[str],
) -> Verdict:
    """Is ``instance_id`` waiting on a live terminate hook in ``group``, one of ``cluster_groups``?"""
    if group is None or hook is None:
        return Verdict(False, "a terminating request must name its Auto Scaling group and lifecycle hook")
    if group not in cluster_groups:
        return Verdict(False, f"group {group!r} is not one of this cluster's control-plane or worker groups")
    found = ports.lifecycle_state(instance_id)
    if found is None:
        return Verdict(False, f"Auto Scaling has no instance {instance_id} in any group", "not in a group")
    actual_group, state = found
    if actual_group != group:
        return Verdict(False, f"instance {instance_id} is in group {actual_group!r}, not {group!r}", state)
    if state not in LEAVING_STATES:
        return Verdict(False, f"instance {instance_id} is {state} in {group}: it is not leaving", state)
    if not ports.heartbeat(group, hook, instance_id, token):
        return Verdict(False, f"no live lifecycle action of hook {hook!r} with this token for {instance_id}", state)
    return Verdict(True, f"{state} in {group}, hook {hook} live", state)


def verify_gone(ports: VerifyPorts, *, instance_id: str) -> Verdict:
    """Is ``instance_id`` terminated, shutting down, or unknown to EC2 (never merely unreachable)?"""
    state = ports.instance_states([instance_id]).get(instance_id)
    if state is None:
        return Verdict(True, f"EC2 does not know {instance_id}", "unknown to EC2")
    if state in GONE_STATES:
        return Verdict(True, f"EC2 reports {instance_id} {state}", state)
    return Verdict(False, f"instance {instance_id} is {state}: not removing its member on a guess", state)
