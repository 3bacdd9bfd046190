"""Drain a node the way ``kubectl drain --ignore-daemonsets --delete-emptydir-data --force`` does, one step per
call, so the lifecycle Lambda can heartbeat and retry between calls instead of sleeping.

Why our own drain and not aws-node-termination-handler for Auto Scaling terminate hooks: NTH in queue mode
completes the lifecycle action itself right after its drain, so on a control-plane node it cannot be ordered
before the etcd member removal (which must happen before the hook completes), and it never deletes the Node
object. The lifecycle Lambda already has the machinery a drain needs (delayed re-enqueue as retry, hook
heartbeats, a deadline). NTH still handles the EC2 events that are not ASG hooks (spot interruption,
rebalance recommendations, scheduled maintenance).

Eviction goes through the policy/v1 Eviction API, so PodDisruptionBudgets are enforced by the API server
exactly as for ``kubectl drain``: a 429 means a budget does not allow the eviction now, and the drain waits.

One call of :func:`drain_node`:

1. find the Node of the instance (gone -> nothing to drain);
2. cordon it (merge-patch ``spec.unschedulable``), unless already cordoned;
3. evict every pod that a drain must move: not DaemonSet-owned (the DaemonSet controller would put it back,
   and it tolerates ``unschedulable``), not a static pod's mirror (the kubelet owns it), not finished
   (Succeeded/Failed), not already terminating. Pods without a controller and pods with emptyDir data are
   evicted too: the instance is going away, their data with it (kubectl's --force/--delete-emptydir-data);
4. when no pod is left to move or still terminating, delete the Node object.

Every step is idempotent, so a re-run after a crash (or the next retry) continues where the last one stopped.
No AWS and no Lambda types here: the caller decides about deadlines and hooks.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lambdas.common.kube_client import EvictionOutcome, KubeClient, Pod


class DrainStatus(enum.Enum):
    DRAINED = "drained"  # nothing left to move; the Node object was deleted now
    GONE = "gone"  # the cluster has no Node for this instance (never joined, or deleted before)
    WAITING = "waiting"  # pods still to move or terminating: call again later


@dataclass(frozen=True)
class DrainResult:
    status: DrainStatus
    reason: str
    node: str | None = None
    evicted: tuple[str, ...] = ()
    blocked: tuple[str, ...] = ()  # held by a PodDisruptionBudget (429) now
    terminating: tuple[str, ...] = ()
    skipped: tuple[str, ...] = field(default=(), compare=False)

    @property
    def done(self) -> bool:
        return self.status is not DrainStatus.WAITING


def must_move(pod: Pod) -> bool:
    """True for the pods a drain evicts (see the module docstring for the rules)."""
    return not (pod.daemon_set or pod.is_mirror or pod.finished or pod.terminating)


def holds_the_node(pod: Pod) -> bool:
    """A pod that must be gone before the Node object is deleted: one to move, or one still terminating
    (deleting the Node would make the pod garbage collector force-delete it, cutting its grace period)."""
    return not (pod.daemon_set or pod.is_mirror or pod.finished)


def drain_node(
    client: KubeClient,
    instance_id: str,
    *,
    settle_seconds: float = 0.0,
    poll_seconds: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> DrainResult:
    """One drain step for the node of ``instance_id``. ``settle_seconds``: after evicting, watch up to this long
    for the pods to finish terminating, so a quick drain completes in one call (0: never wait)."""
    node = client.node_for_instance(instance_id)
    if node is None:
        return DrainResult(DrainStatus.GONE, f"the cluster has no Node for {instance_id}")
    if not node.unschedulable:
        client.cordon(node.name)
    pods = client.pods_on_node(node.name)
    skipped = tuple(p.label for p in pods if not holds_the_node(p))
    evicted: list[str] = []
    blocked: list[str] = []
    refusals: list[str] = []
    for pod in pods:
        if not must_move(pod):
            continue
        outcome, message = client.evict(pod)
        if outcome is EvictionOutcome.EVICTED:
            evicted.append(pod.label)
        elif outcome is EvictionOutcome.BLOCKED:
            blocked.append(pod.label)
            refusals.append(f"{pod.label} ({message})" if message else pod.label)
    waited = 0.0
    while True:
        remaining = [p for p in client.pods_on_node(node.name) if holds_the_node(p)]
        if not remaining or blocked or waited >= settle_seconds:
            break
        sleep(poll_seconds)
        waited += poll_seconds
    terminating = tuple(p.label for p in remaining if p.terminating)
    if blocked or remaining:
        parts = []
        if blocked:
            parts.append(f"a PodDisruptionBudget does not allow evicting {', '.join(refusals)} now")
        if terminating:
            parts.append(f"{len(terminating)} pod(s) still terminating: {', '.join(terminating)}")
        others = [p.label for p in remaining if not p.terminating and p.label not in blocked]
        if others:
            parts.append(f"not yet evicted: {', '.join(others)}")
        return DrainResult(
            DrainStatus.WAITING, "; ".join(parts), node.name, tuple(evicted), tuple(blocked), terminating, skipped
        )
    client.delete_node(node.name)
    reason = f"node {node.name} cordoned, {len(evicted)} pod(s) evicted this step, Node object deleted"
    return DrainResult(DrainStatus.DRAINED, reason, node.name, tuple(evicted), (), (), skipped)
