"""The level-triggered reconciler (invariant 6): compare etcd's membership with the control-plane
instances and ask the lifecycle Lambda, through its queue, to remove what should not be there.

It never changes the membership itself: the lifecycle Lambda, holding the membership writer lease
(lambdas/common/writer_lease.py), is the single writer, so a reconcile run and a terminate event can never
remove two members at once. What it asks for:

* an instance waiting in ``Terminating:Wait`` (its event was lost or is slow): the same removal and hook
  completion the event would have caused;
* a member whose instance EC2 reports terminated or no longer knows: remove it (never a member whose
  instance is merely unreachable);
* an abandoned join's learner or unstarted member (:mod:`lambdas.common.join_watch`): withdraw it, so a joiner
  that died after its ``member add`` does not block every later change (invariant 4a) until its hook times out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lambdas.common.cluster_aws import GONE_STATES, GroupInstance
from lambdas.common.join_watch import AbandonedJoin
from lambdas.common.join_withdrawal import withdrawal_request
from lambdas.common.membership import ClusterView
from lambdas.common.termination import RECONCILER_DETAIL_TYPE, RECONCILER_SOURCE

TERMINATING_WAIT = "Terminating:Wait"


@dataclass
class ReconcilePlan:
    requests: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def ask(self, kind: str, instance_id: str, reason: str, group: str | None = None, hook: str | None = None) -> None:
        detail: dict[str, Any] = {"EC2InstanceId": instance_id, "kind": kind, "reason": reason}
        if group and hook:
            detail.update(AutoScalingGroupName=group, LifecycleHookName=hook)
        self.requests.append({"source": RECONCILER_SOURCE, "detail-type": RECONCILER_DETAIL_TYPE, "detail": detail})


def plan_reconcile(
    view: ClusterView,
    group_instances: list[GroupInstance],
    hooks: dict[str, str | None],
    instance_states: dict[str, str | None],
    abandoned_joins: list[AbandonedJoin] | None = None,
) -> ReconcilePlan:
    """``hooks``: group -> its terminate hook name; ``instance_states``: EC2 state of every member's instance
    that is not InService/Pending in a group (None = EC2 does not know it); ``abandoned_joins``: what
    :func:`lambdas.common.join_watch.watch_joins` found this run."""
    plan = ReconcilePlan()
    in_groups = {gi.instance_id: gi for gi in group_instances}
    members_by_instance = {m.instance_id: m for m in view.members if m.instance_id}
    for gi in group_instances:
        if gi.lifecycle_state != TERMINATING_WAIT:
            continue
        hook = hooks.get(gi.group)
        if hook is None:
            plan.notes.append(f"{gi.instance_id} waits in {gi.group}, which has no terminate hook")
            continue
        member = members_by_instance.get(gi.instance_id)
        why = f"member {member.name} still present" if member else "no member left: the hook only needs completing"
        plan.ask("terminating", gi.instance_id, f"{gi.lifecycle_state}: {why}", gi.group, hook)
    abandoned = {join.member.id: join for join in abandoned_joins or []}
    for iid, member in members_by_instance.items():
        if iid in in_groups or member.id in abandoned:  # an abandoned join is withdrawn below, asked once
            continue
        state = instance_states.get(iid)
        if iid in instance_states and (state is None or state in GONE_STATES):
            plan.ask("stale-member", iid, f"instance is {state or 'unknown to EC2'}; member {member.name} is stale")
        else:
            plan.notes.append(f"member {member.name}: instance {iid} is {state} outside the groups (retained?)")
    for join in abandoned.values():
        plan.requests.append(withdrawal_request(join))
    for member in view.changes_in_flight():
        if member.id not in abandoned:
            plan.notes.append(f"{member.label} ({'learner' if member.is_learner else 'voter'}): a join in progress")
    return plan
