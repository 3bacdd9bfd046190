"""The cluster-state item: bootstrap lock with a renewed lease, the initialised flag and the generation.

One DynamoDB item (``pk = "cluster"``) in the cluster-state table. Every change is a conditional write,
so the decisions below hold whatever the number of concurrent nodes (invariant 2):

* ``try_acquire``: only if nobody holds the lock, the lease has expired, or I already hold it.
* ``renew`` / ``release``: only while I am the holder.
* ``begin(INITIALISING)``: only while I hold the lock and the state is ``uninitialised``
  (or ``initialising`` after a takeover, see :mod:`node_agent.bootstrap`).
* ``complete``: writes ``initialised`` + generation + membership, only while I hold the lock and the
  state is the phase I began. Nothing ever writes ``uninitialised`` over ``initialised``, so once a
  cluster is initialised no node can run ``kubeadm init`` again.
* ``update_membership``: only for the generation the writer joined (a restore bumps the generation, so a
  node that joined the old cluster cannot overwrite the new membership).
* ``kubernetes_version``: the cluster's Kubernetes version, written by ``complete`` (init, adoption,
  restore) and raised by ``raise_version`` after a newer control-plane node joined; only ever raised.
  Items written before this attribute existed have none: the version skew check is then skipped.

A state value this agent does not know makes :meth:`read` raise :class:`UnknownClusterStateError`;
the caller abandons its launch and writes nothing.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from botocore.exceptions import ClientError

from node_agent.errors import LeaseLostError, UnknownClusterStateError
from node_agent.log import get_logger, log

LOG = get_logger("election")
PK = "cluster"


class Phase(StrEnum):
    UNINITIALISED = "uninitialised"
    INITIALISING = "initialising"
    INITIALISED = "initialised"
    RESTORING = "restoring"


@dataclass(frozen=True)
class MemberRecord:
    """One etcd member as the table remembers it (enough to find its instance and to probe it)."""

    instance_id: str
    peer_url: str
    member_id: str = ""
    name: str = ""
    client_url: str = ""

    def to_item(self) -> dict[str, Any]:
        return {"M": {k: {"S": v} for k, v in self.__dict__.items()}}

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> MemberRecord:
        m = item.get("M", {})
        keys = ("instance_id", "peer_url", "member_id", "name", "client_url")
        return cls(**{k: str(m[k]["S"]) for k in keys if k in m})


@dataclass(frozen=True)
class Attempt:
    """What an initialiser/restorer recorded before touching anything: whom to probe after a takeover."""

    holder: str
    instance_id: str
    client_url: str
    phase: str
    started_at: str = ""

    def to_item(self) -> dict[str, Any]:
        return {"M": {k: {"S": v} for k, v in self.__dict__.items()}}

    @classmethod
    def from_item(cls, item: dict[str, Any] | None) -> Attempt | None:
        if not item:
            return None
        m = item.get("M", {})
        keys = ("holder", "instance_id", "client_url", "phase", "started_at")
        return cls(**{k: str(m.get(k, {}).get("S", "")) for k in keys})


@dataclass(frozen=True)
class ClusterState:
    phase: Phase
    generation: int = 0
    holder: str | None = None
    lease_expires_at: float = 0.0
    last_membership: tuple[MemberRecord, ...] = field(default=())
    initialised_at: str = ""
    attempt: Attempt | None = None
    membership_rev: int = 0
    kubernetes_version: str = ""  # "" = not recorded (an item from an older agent): skew check skipped

    def lease_held_by_other(self, me: str, now: float) -> bool:
        return self.holder is not None and self.holder != me and self.lease_expires_at >= now


def _utc_now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_item(item: dict[str, Any] | None) -> ClusterState:
    """The typed state from a raw DynamoDB item; a missing item is a never-initialised cluster."""
    if not item:
        return ClusterState(phase=Phase.UNINITIALISED)
    raw_state = item.get("state", {}).get("S")
    try:
        phase = Phase(raw_state)
    except ValueError:
        raise UnknownClusterStateError(
            f"cluster-state item has unknown state {raw_state!r} (known: {', '.join(p.value for p in Phase)}); "
            "refusing to act on it"
        ) from None
    try:
        generation = int(item.get("generation", {}).get("N", "0"))
        lease = float(item.get("lease_expires_at", {}).get("N", "0"))
        members = tuple(MemberRecord.from_item(m) for m in item.get("last_membership", {}).get("L", []))
    except (ValueError, KeyError, TypeError) as err:
        raise UnknownClusterStateError(f"cluster-state item is malformed ({err}); refusing to act on it") from err
    return ClusterState(
        phase=phase,
        generation=generation,
        holder=item.get("holder", {}).get("S"),
        lease_expires_at=lease,
        last_membership=members,
        initialised_at=item.get("initialised_at", {}).get("S", ""),
        attempt=Attempt.from_item(item.get("attempt")),
        membership_rev=int(item.get("membership_rev", {}).get("N", "0")),
        kubernetes_version=item.get("kubernetes_version", {}).get("S", ""),
    )


_NAMES = {
    "#s": "state",
    "#g": "generation",
    "#h": "holder",
    "#l": "lease_expires_at",
    "#r": "membership_rev",
    "#v": "kubernetes_version",
}
_KNOWN = {f":k{i}": {"S": p.value} for i, p in enumerate(Phase)}
_KNOWN_COND = "#s IN (" + ", ".join(_KNOWN) + ")"


class ClusterStateStore:
    def __init__(self, client: Any, table_name: str, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.table = table_name
        self.clock = clock

    # -- reads -------------------------------------------------------------------------------------
    def read(self) -> ClusterState:
        resp = self.client.get_item(TableName=self.table, Key={"pk": {"S": PK}}, ConsistentRead=True)
        return parse_item(resp.get("Item"))

    # -- conditional writes -------------------------------------------------------------------------
    def _update(self, update: str, condition: str, values: dict[str, Any], names: dict[str, str] | None = None) -> bool:
        # DynamoDB rejects unused placeholders, so pass only the ones these expressions use.
        used = set(re.findall(r"[#:]\w+", update + " " + condition))
        all_names = {**_NAMES, **(names or {})}
        try:
            self.client.update_item(
                TableName=self.table,
                Key={"pk": {"S": PK}},
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames={k: v for k, v in all_names.items() if k in used},
                ExpressionAttributeValues={k: v for k, v in values.items() if k in used},
            )
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return False
            raise
        return True

    def ensure_item(self) -> None:
        """Create the item as ``uninitialised``/generation 0 if the table is empty (first node ever)."""
        try:
            self.client.put_item(
                TableName=self.table,
                Item={"pk": {"S": PK}, "state": {"S": Phase.UNINITIALISED.value}, "generation": {"N": "0"}},
                ConditionExpression="attribute_not_exists(pk)",
            )
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise

    def try_acquire(self, holder: str, lease_seconds: float) -> bool:
        """Take (or re-take) the bootstrap lock: only if free, expired, or already mine; never on an unknown state."""
        now = self.clock()
        return self._update(
            "SET #h = :me, #l = :exp",
            f"(attribute_not_exists(#h) OR #l < :now OR #h = :me) AND {_KNOWN_COND}",
            {":me": {"S": holder}, ":exp": {"N": repr(now + lease_seconds)}, ":now": {"N": repr(now)}, **_KNOWN},
        )

    def renew(self, holder: str, lease_seconds: float) -> bool:
        return self._update(
            "SET #l = :exp", "#h = :me", {":me": {"S": holder}, ":exp": {"N": repr(self.clock() + lease_seconds)}}
        )

    def release(self, holder: str) -> bool:
        return self._update("REMOVE #h, #l", "#h = :me", {":me": {"S": holder}})

    def begin(self, holder: str, phase: Phase, attempt: Attempt, expected: ClusterState) -> None:
        """Record that I start initialising/restoring; fails if the lock or the state moved under me."""
        if phase == Phase.INITIALISING:
            cond = "#h = :me AND #l >= :now AND (#s = :u OR #s = :i) AND #g = :g"
            vals = {":u": {"S": Phase.UNINITIALISED.value}, ":i": {"S": Phase.INITIALISING.value}}
        elif phase == Phase.RESTORING:
            cond = "#h = :me AND #l >= :now AND (#s = :d OR #s = :r) AND #g = :g"
            vals = {":d": {"S": Phase.INITIALISED.value}, ":r": {"S": Phase.RESTORING.value}}
        else:
            raise ValueError(f"cannot begin phase {phase}")
        ok = self._update(
            "SET #s = :p, attempt = :a",
            cond,
            {
                ":me": {"S": holder},
                ":now": {"N": repr(self.clock())},
                ":p": {"S": phase.value},
                ":a": attempt.to_item(),
                ":g": {"N": str(expected.generation)},
                **vals,
            },
        )
        if not ok:
            raise LeaseLostError(f"could not record {phase.value}: the lock or the cluster state changed under me")

    def complete(
        self,
        holder: str,
        from_phase: Phase,
        generation: int,
        membership: list[MemberRecord],
        kubernetes_version: str = "",
    ) -> bool:
        """``initialised`` with the new generation and membership; only the holder, only from its own phase.

        ``kubernetes_version`` (the version the completing node runs) is recorded when given.
        """
        version = ", #v = :v" if kubernetes_version else ""
        return self._update(
            f"SET #s = :d, #g = :g, last_membership = :m, initialised_at = :t{version} REMOVE attempt",
            "#h = :me AND #s = :from",
            {
                ":me": {"S": holder},
                ":from": {"S": from_phase.value},
                ":d": {"S": Phase.INITIALISED.value},
                ":g": {"N": str(generation)},
                ":m": {"L": [m.to_item() for m in membership]},
                ":t": {"S": _utc_now_iso()},
                ":v": {"S": kubernetes_version},
            },
        )

    def raise_version(self, new_version: str, expected: str) -> bool:
        """Record ``new_version`` as the cluster's version, only if the record still says ``expected``.

        Called after a control-plane node of a newer (skew-checked) version joined; a concurrent writer
        that raised it first wins and this write is refused (the caller re-reads if it cares).
        """
        seen = "attribute_not_exists(#v)" if not expected else "#v = :old"
        return self._update(
            "SET #v = :v",
            f"#s = :d AND {seen}",
            {":d": {"S": Phase.INITIALISED.value}, ":v": {"S": new_version}, ":old": {"S": expected}},
        )

    def update_membership(self, generation: int, membership: list[MemberRecord], expected_rev: int) -> bool:
        """Record the membership after a join/removal; only for the generation it was observed in.

        Optimistic concurrency: the write succeeds only if nobody wrote since ``expected_rev`` was read,
        so a writer whose etcd view is older can never overwrite a newer one (read rev, then etcd, then write).
        """
        rev_cond = "(attribute_not_exists(#r) OR #r = :r)" if expected_rev == 0 else "#r = :r"
        return self._update(
            "SET last_membership = :m, #r = :r1",
            f"#s = :d AND #g = :g AND {rev_cond}",
            {
                ":d": {"S": Phase.INITIALISED.value},
                ":g": {"N": str(generation)},
                ":m": {"L": [m.to_item() for m in membership]},
                ":r": {"N": str(expected_rev)},
                ":r1": {"N": str(expected_rev + 1)},
            },
        )


class LeaseRenewer:
    """Renews the holder's lease in the background; sets :attr:`lost` if a renewal is refused.

    ``max_hold_seconds`` bounds the renewals: a holder whose step hangs (a stuck ``kubeadm init``) stops
    renewing, its lease runs out and another node may take over under the takeover rule.
    """

    def __init__(
        self,
        store: ClusterStateStore,
        holder: str,
        lease_seconds: float,
        interval_seconds: float,
        max_hold_seconds: float | None = None,
    ) -> None:
        self.store = store
        self.holder = holder
        self.lease_seconds = lease_seconds
        self.interval = interval_seconds
        self.hold_until = None if max_hold_seconds is None else time.monotonic() + max_hold_seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-renewer-{holder}", daemon=True)

    def __enter__(self) -> LeaseRenewer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 5)

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLostError(f"bootstrap lease of {self.holder} was lost; stopping before the next step")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.hold_until is not None and time.monotonic() > self.hold_until:
                log(LOG, 40, "held the lock longer than allowed; no more renewals", holder=self.holder)
                self.lost.set()
                return
            try:
                ok = self.store.renew(self.holder, self.lease_seconds)
            except Exception as err:  # a transient API error: try again next tick, the lease still runs
                log(LOG, 30, "lease renewal failed", holder=self.holder, error=str(err))
                continue
            if not ok:
                log(LOG, 40, "lease lost", holder=self.holder)
                self.lost.set()
                return
