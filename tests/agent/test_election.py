"""The bootstrap lock and the cluster-state item: conditional writes decide, never local memory."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from node_agent.election import (
    Attempt,
    ClusterStateStore,
    LeaseRenewer,
    MemberRecord,
    Phase,
)
from node_agent.errors import LeaseLostError, UnknownClusterStateError

TABLE = "dk8s-demo-cluster-state"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _store(aws: dict[str, Any], clock: Clock | None = None) -> ClusterStateStore:
    store = ClusterStateStore(aws["dynamodb"], TABLE, clock=clock or time.time)
    store.ensure_item()
    return store


def _attempt(holder: str) -> Attempt:
    return Attempt(holder=holder, instance_id=holder, client_url="https://10.0.0.1:2379", phase="initialising")


def test_an_empty_table_reads_as_never_initialised(aws: dict[str, Any]) -> None:
    state = ClusterStateStore(aws["dynamodb"], TABLE).read()
    assert state.phase == Phase.UNINITIALISED
    assert state.generation == 0
    assert state.holder is None


def test_only_one_of_many_concurrent_acquirers_gets_the_lock(aws: dict[str, Any]) -> None:
    store = _store(aws)
    winners: list[str] = []
    barrier = threading.Barrier(8)

    def contend(name: str) -> None:
        barrier.wait()
        if store.try_acquire(name, 60):
            winners.append(name)

    threads = [threading.Thread(target=contend, args=(f"i-{n}",)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    assert store.read().holder == winners[0]


def test_an_expired_lease_can_be_taken_over_but_a_live_one_cannot(aws: dict[str, Any]) -> None:
    clock = Clock()
    store = _store(aws, clock)
    assert store.try_acquire("i-a", 60)
    clock.now += 59
    assert not store.try_acquire("i-b", 60)
    assert store.renew("i-a", 60)
    clock.now += 61
    assert store.try_acquire("i-b", 60)
    assert not store.renew("i-a", 60), "the old holder can no longer renew"
    assert not store.release("i-a")
    assert store.read().holder == "i-b"


def test_once_initialised_the_state_can_never_go_back_to_initialising(aws: dict[str, Any]) -> None:
    store = _store(aws)
    assert store.try_acquire("i-a", 60)
    store.begin("i-a", Phase.INITIALISING, _attempt("i-a"), store.read())
    member = MemberRecord(instance_id="i-a", peer_url="https://10.0.0.1:2380", member_id="1")
    assert store.complete("i-a", Phase.INITIALISING, 1, [member])
    state = store.read()
    assert (state.phase, state.generation, state.last_membership) == (Phase.INITIALISED, 1, (member,))
    assert state.attempt is None
    with pytest.raises(LeaseLostError):
        store.begin("i-a", Phase.INITIALISING, _attempt("i-a"), state)
    assert store.read().phase == Phase.INITIALISED


def test_begin_requires_the_lock_and_complete_requires_the_phase(aws: dict[str, Any]) -> None:
    store = _store(aws)
    with pytest.raises(LeaseLostError):
        store.begin("i-a", Phase.INITIALISING, _attempt("i-a"), store.read())
    assert store.try_acquire("i-a", 60)
    assert not store.complete("i-a", Phase.INITIALISING, 1, []), "complete without begin is refused"
    store.begin("i-a", Phase.INITIALISING, _attempt("i-a"), store.read())
    assert store.read().attempt == _attempt("i-a")
    assert not store.complete("i-b", Phase.INITIALISING, 1, []), "only the holder completes"


def test_restore_begins_only_from_the_generation_it_observed(aws: dict[str, Any]) -> None:
    store = _store(aws)
    assert store.try_acquire("i-a", 60)
    store.begin("i-a", Phase.INITIALISING, _attempt("i-a"), store.read())
    store.complete("i-a", Phase.INITIALISING, 1, [])
    stale = store.read()
    store.begin("i-a", Phase.RESTORING, _attempt("i-a"), stale)
    assert store.complete("i-a", Phase.RESTORING, 2, [])
    with pytest.raises(LeaseLostError):
        store.begin("i-a", Phase.RESTORING, _attempt("i-a"), stale)


def test_membership_updates_are_fenced_by_generation(aws: dict[str, Any]) -> None:
    store = _store(aws)
    store.try_acquire("i-a", 60)
    store.begin("i-a", Phase.INITIALISING, _attempt("i-a"), store.read())
    store.complete("i-a", Phase.INITIALISING, 3, [])
    new = [MemberRecord(instance_id="i-b", peer_url="https://10.0.0.2:2380", member_id="2")]
    assert not store.update_membership(2, new, 0)
    assert store.update_membership(3, new, 0)
    assert store.read().last_membership == tuple(new)
    assert not store.update_membership(3, [], 0), "a writer with an older view cannot overwrite a newer one"
    assert store.update_membership(3, [], 1)
    assert store.read().membership_rev == 2


def test_an_unknown_state_is_a_clear_error_and_cannot_be_locked(aws: dict[str, Any]) -> None:
    aws["dynamodb"].put_item(
        TableName=TABLE, Item={"pk": {"S": "cluster"}, "state": {"S": "half-baked"}, "generation": {"N": "1"}}
    )
    store = ClusterStateStore(aws["dynamodb"], TABLE)
    with pytest.raises(UnknownClusterStateError, match="unknown state 'half-baked'"):
        store.read()
    assert not store.try_acquire("i-a", 60)
    item = aws["dynamodb"].get_item(TableName=TABLE, Key={"pk": {"S": "cluster"}})["Item"]
    assert "holder" not in item


def test_the_renewer_keeps_the_lease_and_reports_when_it_is_lost(aws: dict[str, Any]) -> None:
    store = _store(aws)
    assert store.try_acquire("i-a", 0.6)
    with LeaseRenewer(store, "i-a", lease_seconds=0.6, interval_seconds=0.1) as renewer:
        time.sleep(1.0)
        assert not store.try_acquire("i-b", 0.6), "renewed lease still live after more than one lease period"
        renewer.check()
        # Simulate a takeover (the holder was paused longer than its lease).
        aws["dynamodb"].update_item(
            TableName=TABLE,
            Key={"pk": {"S": "cluster"}},
            UpdateExpression="SET holder = :b",
            ExpressionAttributeValues={":b": {"S": "i-b"}},
        )
        deadline = time.time() + 2
        while not renewer.lost.is_set() and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(LeaseLostError):
            renewer.check()


def test_a_hung_holder_stops_renewing_after_its_maximum_hold_time(aws: dict[str, Any]) -> None:
    store = _store(aws)
    assert store.try_acquire("i-a", 0.4)
    with LeaseRenewer(store, "i-a", lease_seconds=0.4, interval_seconds=0.1, max_hold_seconds=0.5) as renewer:
        time.sleep(0.3)
        assert not store.try_acquire("i-b", 0.4), "renewed while within its hold time"
        deadline = time.time() + 3
        while not store.try_acquire("i-b", 0.4):
            assert time.time() < deadline, "the lease never ran out"
            time.sleep(0.05)
        assert renewer.lost.is_set()
