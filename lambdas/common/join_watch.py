"""Abandoned joins, found by the reconciler between its runs (issue 15, "Found by fault injection").

A control-plane join is ``member add --learner`` (kubeadm's etcd learner) followed by the new etcd starting and
catching up, then its promotion. Until it is promoted the learner (or unstarted member) is "a membership change
in flight" (architecture.md, invariant 4a): no removal, no other join. A joiner that dies in that window leaves
its member behind, and nothing else ever removes it. This module decides when a join is abandoned; the
lifecycle Lambda withdraws the member (:mod:`lambdas.common.join_withdrawal`, under the writer lease and the
quorum rule, where learners never count).

etcd keeps no creation time for a member and no progress history, so the reconciler measures both: every run it
records, per member in flight, when it first saw it, when its address was last held by a live instance, and its
raft index with the time that index last moved (one item, ``pk = "join-watch"``, in the cluster-state table).
With a run every minute, each time below is measured to within a minute (plus one run's length). A join is
abandoned when:

* ``instance-gone``: the learner's name carries an instance ID that EC2 reports terminated / shutting-down or no
  longer knows (the joiner is dead: withdraw at once, well before its launch hook's timeout);
* ``stalled``: a learner whose raft index has not moved for ``LEARNER_STALL_SECONDS`` while it is behind the
  leader (or not answering at all: an unstarted learner never answers). A caught-up learner waiting for its
  promotion is not stalled;
* ``unclaimed``: an unstarted member whose peer address no pending/running instance of this cluster has held for
  longer than a join can take (``JOIN_TIMEOUT_SECONDS``, the launch hook's timeout). EC2 shows no private IP for
  a terminated instance, so an address is the only link an unstarted member has to an instance.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from botocore.exceptions import ClientError

from lambdas.common.cluster_aws import SettingsError
from lambdas.common.membership import ClusterView, Member

WATCH_KEY = "join-watch"
LIVE_STATES = ("pending", "running")


@dataclass(frozen=True)
class JoinTimings:
    """``join_timeout_seconds``: how long a join may take (the control-plane launch hook's timeout);
    ``stall_seconds``: how long a learner may make no progress. Both set by the stack (stages/etcd_lifecycle.py)."""

    join_timeout_seconds: int
    stall_seconds: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> JoinTimings:
        env = os.environ if env is None else env

        def seconds(key: str) -> int:
            raw = env.get(key, "").strip()
            if not raw.isdigit() or int(raw) <= 0:
                raise SettingsError(f"environment variable {key}={raw!r} must be a positive integer")
            return int(raw)

        timings = cls(seconds("JOIN_TIMEOUT_SECONDS"), seconds("LEARNER_STALL_SECONDS"))
        if timings.stall_seconds >= timings.join_timeout_seconds:
            raise SettingsError(
                f"LEARNER_STALL_SECONDS={timings.stall_seconds} must be shorter than JOIN_TIMEOUT_SECONDS="
                f"{timings.join_timeout_seconds} (a stalled join is withdrawn before its launch hook times out)"
            )
        return timings


@dataclass(frozen=True)
class JoinWatch:
    """What the reconciler remembers of one member in flight (times are epoch seconds of its runs)."""

    member_id: str
    peer_url: str
    first_seen: float
    progress_at: float
    raft_index: int | None
    unclaimed_since: float | None

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> JoinWatch:
        index, unclaimed = raw.get("raft_index"), raw.get("unclaimed_since")
        return cls(
            member_id=str(raw["member_id"]),
            peer_url=str(raw["peer_url"]),
            first_seen=float(raw["first_seen"]),
            progress_at=float(raw["progress_at"]),
            raft_index=None if index is None else int(index),
            unclaimed_since=None if unclaimed is None else float(unclaimed),
        )


@dataclass(frozen=True)
class AbandonedJoin:
    member: Member
    why: str  # "instance-gone" | "stalled" | "unclaimed"
    reason: str


def _peer_host(member: Member) -> str:
    return member.peer_hosts[0] if member.peer_hosts else ""


def watch_joins(
    view: ClusterView,
    previous: Mapping[str, JoinWatch],
    *,
    ip_holders: Mapping[str, Collection[str]],
    gone_instance_ids: Collection[str],
    now: float,
    timings: JoinTimings,
) -> tuple[dict[str, JoinWatch], list[AbandonedJoin]]:
    """This run's records (members no longer in flight are dropped) and the joins found abandoned.

    ``ip_holders``: private IP -> the pending/running instances of this cluster holding it (EC2);
    ``gone_instance_ids``: instances EC2 reports terminated / shutting-down or does not know."""
    leader_index = view.leader.raft_index if view.leader else None
    watches: dict[str, JoinWatch] = {}
    abandoned: list[AbandonedJoin] = []
    for member in view.changes_in_flight():
        prev = previous.get(member.id)
        if prev is not None and prev.peer_url not in member.peer_urls:
            prev = None  # a record of some other member (IDs are random): start over
        index = member.raft_index
        moved = index is not None and (prev is None or prev.raft_index is None or index > prev.raft_index)
        caught_up = index is not None and leader_index is not None and index >= leader_index
        holders = set(ip_holders.get(_peer_host(member), ()))
        watch = JoinWatch(
            member_id=member.id,
            peer_url=member.peer_urls[0] if member.peer_urls else "",
            first_seen=prev.first_seen if prev else now,
            progress_at=now if prev is None or moved or caught_up else prev.progress_at,
            raft_index=index if index is not None else (prev.raft_index if prev else None),
            unclaimed_since=None if holders else (prev.unclaimed_since if prev else None) or now,
        )
        watches[member.id] = watch
        if member.instance_id is not None and member.instance_id in gone_instance_ids:
            reason = f"{member.label}: its instance {member.instance_id} is terminated or unknown to EC2"
            abandoned.append(AbandonedJoin(member, "instance-gone", reason))
        elif member.is_learner and now - watch.progress_at >= timings.stall_seconds:
            at = "never answered" if watch.raft_index is None else f"raft index {watch.raft_index}"
            reason = (
                f"{member.label}: learner made no progress for {int(now - watch.progress_at)}s ({at}, leader at "
                f"{leader_index}; bound {timings.stall_seconds}s)"
            )
            abandoned.append(AbandonedJoin(member, "stalled", reason))
        elif (
            not member.started
            and watch.unclaimed_since is not None
            and now - watch.unclaimed_since > timings.join_timeout_seconds
        ):
            reason = (
                f"{member.label}: no live instance has held {_peer_host(member)} for "
                f"{int(now - watch.unclaimed_since)}s, longer than a join can take ({timings.join_timeout_seconds}s)"
            )
            abandoned.append(AbandonedJoin(member, "unclaimed", reason))
    return watches, abandoned


def live_instances_by_ip(ec2: Any, cluster_tag_key: str, cluster_name: str) -> dict[str, list[str]]:
    """private IP -> IDs of this cluster's pending/running instances holding it (any role: a worker holding a
    control-plane member's address is not that member's joiner, but it proves the address is in use)."""
    found: dict[str, list[str]] = {}
    filters = [
        {"Name": f"tag:{cluster_tag_key}", "Values": [cluster_name]},
        {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
    ]
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page.get("Reservations", []):
            for inst in reservation.get("Instances", []):
                if inst.get("PrivateIpAddress") and inst.get("InstanceId"):
                    found.setdefault(str(inst["PrivateIpAddress"]), []).append(str(inst["InstanceId"]))
    return found


class JoinWatchStore:
    """The records in the cluster-state table: one item, replaced by a put conditioned on the version read, so
    two overlapping reconciler runs cannot interleave their records (the loser's records are simply dropped:
    the next run measures again). A record that cannot be read is an error, never "first seen now"."""

    def __init__(self, dynamodb: Any, table: str) -> None:
        self.dynamodb = dynamodb
        self.table = table

    def load(self) -> tuple[dict[str, JoinWatch], int]:
        item = self.dynamodb.get_item(TableName=self.table, Key={"pk": {"S": WATCH_KEY}}, ConsistentRead=True).get(
            "Item"
        )
        if not item:
            return {}, 0
        raw = item.get("members", {}).get("S", "{}")
        try:
            records = {key: JoinWatch.from_json(value) for key, value in json.loads(raw).items()}
            version = int(item.get("version", {}).get("N", "0"))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"cluster-state item {WATCH_KEY!r} is unreadable ({err}): {raw[:200]!r}") from err
        return records, version

    def save(self, watches: Mapping[str, JoinWatch], version: int) -> bool:
        """False when another run saved first (its records stand)."""
        condition = "attribute_not_exists(pk)" if version == 0 else "version = :read"
        values = {} if version == 0 else {"ExpressionAttributeValues": {":read": {"N": str(version)}}}
        try:
            self.dynamodb.put_item(
                TableName=self.table,
                Item={
                    "pk": {"S": WATCH_KEY},
                    "members": {"S": json.dumps({k: asdict(v) for k, v in watches.items()})},
                    "version": {"N": str(version + 1)},
                },
                ConditionExpression=condition,
                **values,
            )
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise
            return False
        return True
