"""etcd membership, as intents: observe the cluster, decide whether a removal is safe, remove safely,
add a learner, promote it. One module for the lifecycle Lambda, the reconciler, the cluster-ops function,
the node agent and the canary, so the quorum rules live in one place (architecture.md, invariants 1, 4, 4a).

No AWS and no Lambda types here: callers pass the endpoints to use (never the leaving member's own) and an
:class:`~lambdas.common.etcd_client.EtcdClient`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

from lambdas.common.etcd_client import (
    EtcdClient,
    EtcdError,
    EtcdUnavailableError,
    MemberNotFoundError,
    MemberRecord,
    UnhealthyClusterError,
)

INSTANCE_ID = re.compile(r"\bi-[0-9a-f]{8}(?:[0-9a-f]{9})?\b")


def quorum(voters: int) -> int:
    """Votes needed to commit with ``voters`` voting members."""
    return voters // 2 + 1


@dataclass(frozen=True)
class Member:
    id: str
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    is_learner: bool
    healthy: bool
    is_leader: bool = False
    raft_index: int | None = None

    @property
    def started(self) -> bool:
        """etcd lists an added-but-never-started member with an empty name and no client URLs."""
        return bool(self.name) and bool(self.client_urls)

    @property
    def instance_id(self) -> str | None:
        match = INSTANCE_ID.search(self.name)
        return match.group(0) if match else None

    @property
    def peer_hosts(self) -> tuple[str, ...]:
        return tuple(urlsplit(url).hostname or "" for url in self.peer_urls)

    @property
    def label(self) -> str:
        return self.name or f"unstarted {self.id} ({', '.join(self.peer_urls)})"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "instance_id": self.instance_id,
            "peer_urls": list(self.peer_urls),
            "client_urls": list(self.client_urls),
            "is_learner": self.is_learner,
            "started": self.started,
            "healthy": self.healthy,
            "is_leader": self.is_leader,
            "raft_index": self.raft_index,
        }


@dataclass(frozen=True)
class ClusterView:
    """The membership as etcd reports it, each member's health measured from its own client URL."""

    members: tuple[Member, ...]
    leader_id: str | None

    @property
    def voters(self) -> list[Member]:
        return [m for m in self.members if not m.is_learner]

    @property
    def healthy_voters(self) -> list[Member]:
        return [m for m in self.voters if m.healthy]

    @property
    def learners(self) -> list[Member]:
        return [m for m in self.members if m.is_learner]

    @property
    def quorum(self) -> int:
        return quorum(len(self.voters))

    @property
    def has_quorum(self) -> bool:
        return bool(self.voters) and len(self.healthy_voters) >= self.quorum

    @property
    def quorum_margin(self) -> int:
        """Healthy voters beyond quorum: 0 means one more failure loses quorum, negative means lost."""
        return len(self.healthy_voters) - self.quorum

    @property
    def leader(self) -> Member | None:
        return next((m for m in self.members if m.id == self.leader_id), None)

    def changes_in_flight(self, ignoring: Member | None = None) -> list[Member]:
        """Learners and unstarted members: a membership change not finished yet (invariant 4a)."""
        return [
            m for m in self.members if (m.is_learner or not m.started) and (ignoring is None or m.id != ignoring.id)
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "members": [m.to_json() for m in self.members],
            "leader": self.leader_id,
            "voters": len(self.voters),
            "healthy_voters": len(self.healthy_voters),
            "learners": len(self.learners),
            "quorum": self.quorum,
            "has_quorum": self.has_quorum,
            "quorum_margin": self.quorum_margin,
        }


# A key nobody writes: reading it linearizably is only a barrier.
_READ_BARRIER_KEY = "dedicated-k8s/membership-read-barrier"


def committed_member_list(client: EtcdClient, endpoints: Sequence[str]) -> list[MemberRecord]:
    """The member list as of every change committed before the call.

    etcd 3.4 answers a member list from the asked member's own applied state, so a follower a few milliseconds
    behind may not list a learner just added (invariant 4a: no removal while one exists) or may still list a
    member just removed. A linearizable read first makes that member catch up with the leader's commit index,
    then the list is asked of the same member. If no member can serve the read (no leader right now), the plain
    list is the answer, as before.
    """
    for endpoint in endpoints:
        try:
            client.get([endpoint], _READ_BARRIER_KEY)
            return client.member_list([endpoint])
        except EtcdError:
            continue
    return client.member_list(endpoints)


def observe(client: EtcdClient, endpoints: Sequence[str]) -> ClusterView:
    """List the members through ``endpoints`` and measure each member's health at its own client URL.

    Healthy = the member answers its status with a known leader and no alarms/errors. Raises
    :class:`EtcdUnavailableError` if no endpoint answers at all.
    """
    records = committed_member_list(client, endpoints)

    def probe(record: MemberRecord) -> tuple[bool, str | None, int | None]:
        for url in record.client_urls[:1]:
            try:
                status = client.status(url)
            except EtcdError:
                return False, None, None
            return status.has_leader and not status.errors, status.leader_id, status.raft_index
        return False, None, None

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(records)))) as pool:
        probes = list(pool.map(probe, records))
    leaders = [leader for healthy, leader, _ in probes if healthy and leader]
    leader_id = max(set(leaders), key=leaders.count) if leaders else None
    members = tuple(
        Member(
            id=r.id,
            name=r.name,
            peer_urls=r.peer_urls,
            client_urls=r.client_urls,
            is_learner=r.is_learner,
            healthy=healthy,
            is_leader=r.id == leader_id,
            raft_index=index,
        )
        for r, (healthy, _, index) in zip(records, probes, strict=True)
    )
    return ClusterView(members=members, leader_id=leader_id)


def address_is_only_theirs(instance_id: str, ip_holders: Collection[str] | None) -> bool:
    """May a nameless member with this instance's address be attributed to ``instance_id``?

    Only if EC2 shows no other live (pending/running) instance holding the address: EC2 reuses private IPs,
    so a redelivered event for an instance whose member is gone, arriving while a new instance with the same
    IP is joining, must not take the newcomer's unstarted member for its own (issue 15). ``None`` (nobody
    asked EC2) is not an answer: no attribution by address then."""
    return ip_holders is not None and not (set(ip_holders) - {instance_id})


def find_member_for_instance(
    view: ClusterView, instance_id: str, private_ip: str | None = None, *, ip_holders: Collection[str] | None = None
) -> Member | None:
    """Invariant 1: by name (it carries the instance ID) first; by peer URL only for a member whose name
    carries no instance ID (an unstarted member), because IPs are reused by new instances and IDs are not,
    and then only if ``ip_holders`` (the live instances EC2 shows holding ``private_ip``) name no other
    instance (:func:`address_is_only_theirs`)."""
    by_name = [m for m in view.members if m.instance_id == instance_id]
    if by_name:
        return by_name[0]
    if private_ip and address_is_only_theirs(instance_id, ip_holders):
        for m in view.members:
            if m.instance_id is None and private_ip in m.peer_hosts:
                return m
    return None


@dataclass(frozen=True)
class Decision:
    safe: bool
    reason: str


def can_remove_member(view: ClusterView, target: Member, *, desired_voters: int | None = None) -> Decision:
    """Is removing ``target`` now safe (invariants 4 and 4a)?

    * The cluster must have quorum now (nothing is decided on a cluster that cannot commit).
    * A learner or an unstarted member counts for nothing: removing it is safe.
    * Otherwise no other membership change may be in flight (a learner or unstarted member).
    * After removal the healthy voters left must be a quorum of the voters left, and -- if the target is
      healthy, so removing it costs a healthy voter -- at least a quorum of the desired cluster size, so two
      terminations at once never shrink a 3-member cluster below 2 healthy voters: the second waits for the
      first one's replacement to be promoted.
    """
    if not view.has_quorum:
        return Decision(False, f"no quorum now ({len(view.healthy_voters)}/{len(view.voters)} voters healthy)")
    if target.is_learner or not target.started:
        return Decision(True, f"{target.label} is a learner or unstarted: it does not count for quorum")
    in_flight = view.changes_in_flight(ignoring=target)
    if in_flight:
        names = ", ".join(m.label for m in in_flight)
        return Decision(False, f"another membership change is in flight ({names}); one change at a time")
    remaining = [m for m in view.voters if m.id != target.id]
    healthy_left = sum(1 for m in remaining if m.healthy)
    if not remaining or healthy_left < quorum(len(remaining)):
        return Decision(
            False,
            f"removing {target.label} would leave {healthy_left}/{len(remaining)} healthy voters, "
            f"below quorum {quorum(len(remaining)) if remaining else 1}",
        )
    if target.healthy and desired_voters and healthy_left < quorum(desired_voters):
        return Decision(
            False,
            f"removing healthy {target.label} would leave {healthy_left} healthy voters, fewer than a quorum "
            f"({quorum(desired_voters)}) of the desired {desired_voters}; waiting for a replacement to join",
        )
    return Decision(True, f"{healthy_left}/{len(remaining)} healthy voters remain (quorum {quorum(len(remaining))})")


class RemovalOutcome(Enum):
    REMOVED = "removed"
    ALREADY_GONE = "already-gone"
    UNSAFE = "unsafe"


@dataclass(frozen=True)
class RemovalResult:
    outcome: RemovalOutcome
    reason: str
    member: Member | None = None
    view: ClusterView | None = None

    @property
    def done(self) -> bool:
        """The member is not in the cluster any more (removed now or before)."""
        return self.outcome in (RemovalOutcome.REMOVED, RemovalOutcome.ALREADY_GONE)


def _other_endpoints(endpoints: Sequence[str], target: Member) -> list[str]:
    leaving = set(target.client_urls) | {urlsplit(u).hostname for u in target.peer_urls}
    return [e for e in endpoints if e not in leaving and urlsplit(e).hostname not in leaving]


def move_leader_off(client: EtcdClient, view: ClusterView, target: Member) -> str | None:
    """If ``target`` leads, hand leadership to the healthy voter with the highest raft index (the most
    caught-up), so the removal does not cost an election. Returns the new leader's name, or None."""
    if not target.is_leader or not target.client_urls:
        return None
    candidates = [m for m in view.healthy_voters if m.id != target.id]
    if not candidates:
        return None
    best = max(candidates, key=lambda m: m.raft_index or 0)
    client.move_leader(target.client_urls[0], best.id)
    return best.name


def remove_member_safely(
    client: EtcdClient,
    endpoints: Sequence[str],
    *,
    instance_id: str,
    private_ip: str | None = None,
    desired_voters: int | None = None,
    ip_holders: Collection[str] | None = None,
) -> RemovalResult:
    """Remove the member of ``instance_id`` if that is safe now; idempotent (gone = done).

    ``endpoints`` are the other control-plane members' client URLs; the leaving member's own URL is never
    used for the removal itself (only to hand off leadership, which etcd accepts only at the leader).
    ``ip_holders``: the live instances EC2 shows holding ``private_ip`` (see :func:`find_member_for_instance`).
    """
    view = observe(client, endpoints)
    target = find_member_for_instance(view, instance_id, private_ip, ip_holders=ip_holders)
    if target is None:
        return RemovalResult(RemovalOutcome.ALREADY_GONE, f"no member for {instance_id}", view=view)
    decision = can_remove_member(view, target, desired_voters=desired_voters)
    if not decision.safe:
        return RemovalResult(RemovalOutcome.UNSAFE, decision.reason, member=target, view=view)
    others = _other_endpoints(endpoints, target)
    if not others:
        return RemovalResult(RemovalOutcome.UNSAFE, "no endpoint other than the leaving member", target, view)
    with contextlib.suppress(EtcdError):  # best effort: removing a leader is quorum-safe, it costs an election
        move_leader_off(client, view, target)
    return _remove(client, others, target, view, decision)


def _remove(
    client: EtcdClient, endpoints: Sequence[str], target: Member, view: ClusterView, decision: Decision
) -> RemovalResult:
    try:
        client.member_remove(endpoints, target.id)
    except MemberNotFoundError:
        return RemovalResult(RemovalOutcome.ALREADY_GONE, f"{target.label} was removed meanwhile", target, view)
    except UnhealthyClusterError as err:  # etcd's own guard agrees it is not safe yet
        return RemovalResult(RemovalOutcome.UNSAFE, f"etcd refused: {err.message}", target, view)
    return RemovalResult(RemovalOutcome.REMOVED, decision.reason, member=target, view=view)


def remove_member_by_id(
    client: EtcdClient, endpoints: Sequence[str], member_id: str, *, desired_voters: int | None = None
) -> RemovalResult:
    """Same rules as :func:`remove_member_safely`, for a member known by ID (a stale or unstarted member)."""
    view = observe(client, endpoints)
    target = next((m for m in view.members if m.id == member_id), None)
    if target is None:
        return RemovalResult(RemovalOutcome.ALREADY_GONE, f"no member {member_id}", view=view)
    decision = can_remove_member(view, target, desired_voters=desired_voters)
    if not decision.safe:
        return RemovalResult(RemovalOutcome.UNSAFE, decision.reason, member=target, view=view)
    return _remove(client, _other_endpoints(endpoints, target) or list(endpoints), target, view, decision)


def withdraw_join(
    client: EtcdClient,
    endpoints: Sequence[str],
    member_id: str,
    *,
    peer_url: str,
    why: str,
    ip_holders: Collection[str],
    gone_instance_ids: Collection[str] = (),
) -> RemovalResult:
    """Withdraw an abandoned join's member (a learner or unstarted member, never a voter that started).

    Re-checked on a fresh view, because the request was decided a run ago: the member must still carry
    ``peer_url`` and still be a change in flight, and the reason (:mod:`lambdas.common.join_watch`) must still
    hold where one look can tell: ``instance-gone`` -- its name's instance is in ``gone_instance_ids``;
    ``unclaimed`` -- it is unstarted and no live instance holds its address (``ip_holders``: a joiner that
    appeared since is someone's join in progress); ``stalled`` -- it is a learner (a stall is measured over
    runs, not in one look). The removal itself follows :func:`can_remove_member` (a learner or unstarted member
    counts for nothing: always quorum-safe).
    """
    view = observe(client, endpoints)
    target = next((m for m in view.members if m.id == member_id), None)
    if target is None:
        return RemovalResult(RemovalOutcome.ALREADY_GONE, f"no member {member_id}", view=view)
    if peer_url not in target.peer_urls:
        reason = f"member {member_id} has peer URLs {list(target.peer_urls)}, not {peer_url}: not the join asked about"
        return RemovalResult(RemovalOutcome.UNSAFE, reason, member=target, view=view)
    if not (target.is_learner or not target.started):
        reason = f"{target.label} is a started voter now: its join finished, nothing to withdraw"
        return RemovalResult(RemovalOutcome.UNSAFE, reason, member=target, view=view)
    still = {
        "instance-gone": target.instance_id is not None and target.instance_id in gone_instance_ids,
        "unclaimed": not target.started and not ip_holders,
        "stalled": target.is_learner,
    }
    if not still.get(why, False):
        held = f" (address held by {', '.join(sorted(ip_holders))})" if ip_holders else ""
        reason = f"{target.label}: {why!r} no longer holds{held}; not withdrawing"
        return RemovalResult(RemovalOutcome.UNSAFE, reason, member=target, view=view)
    decision = can_remove_member(view, target)
    if not decision.safe:
        return RemovalResult(RemovalOutcome.UNSAFE, decision.reason, member=target, view=view)
    return _remove(client, _other_endpoints(endpoints, target) or list(endpoints), target, view, decision)


def add_learner(client: EtcdClient, endpoints: Sequence[str], peer_url: str) -> MemberRecord:
    """Add a non-voting member (it cannot cost quorum while it catches up); refused during another change."""
    view = observe(client, endpoints)
    in_flight = view.changes_in_flight()
    if in_flight:
        raise MembershipChangeInFlightError(", ".join(m.label for m in in_flight))
    return client.member_add_learner(endpoints, [peer_url])


def promote(client: EtcdClient, endpoints: Sequence[str], member_id: str) -> bool:
    """Promote a learner; False while etcd says it has not caught up yet (call again later)."""
    try:
        client.member_promote(endpoints, member_id)
    except EtcdUnavailableError:
        raise
    except EtcdError as err:
        if "in sync with leader" in str(err) or "not in sync" in str(err):
            return False
        raise
    return True


class MembershipChangeInFlightError(EtcdError):
    """A learner or unstarted member exists: one membership change at a time (invariant 4a)."""


def stale_members(view: ClusterView, gone_instance_ids: set[str]) -> list[Member]:
    """Members whose name carries an instance ID known to be terminated or gone (never merely unreachable)."""
    return [m for m in view.members if m.instance_id is not None and m.instance_id in gone_instance_ids]
