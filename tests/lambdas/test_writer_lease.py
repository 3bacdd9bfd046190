"""The single membership writer (invariant 4a, docs/architecture.md) without reserved concurrency: the lease
in the cluster-state table (lambdas/common/writer_lease.py), on moto DynamoDB, and the lifecycle Lambda on
a real 3-member TLS etcd cluster holding it.

What the lease relies on from DynamoDB: a PutItem/DeleteItem with a ConditionExpression is evaluated and
applied atomically on the one item, and a failed condition raises ConditionalCheckFailedException, carrying
the current item when ReturnValuesOnConditionCheckFailure=ALL_OLD ("Condition expressions", Amazon DynamoDB
Developer Guide; PutItem API reference). moto 5.2.5 implements both.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from lambdas.common.etcd_client import EtcdClient
from lambdas.common.termination import RETRY_KEY
from lambdas.common.writer_lease import LEASE_KEY, Lease, LeaseBusy, WriterLease
from lambdas.etcd_lifecycle import handler as lifecycle
from tests.lambdas.conftest import REGION, TABLE, Env, sqs_event


class Ctx:
    aws_request_id = "test-request"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def table(moto_env: None) -> Iterator[Any]:
    client = boto3.client("dynamodb", region_name=REGION)
    client.create_table(
        TableName=TABLE,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    yield client


def lease_item(dynamodb: Any) -> dict[str, Any] | None:
    item = dynamodb.get_item(TableName=TABLE, Key={"pk": {"S": LEASE_KEY}}, ConsistentRead=True).get("Item")
    return dict(item) if item else None


def write_lease(dynamodb: Any, holder: str, expires_at: float) -> None:
    """A lease as another invocation's WriterLease.acquire leaves it (the same attributes)."""
    dynamodb.put_item(
        TableName=TABLE,
        Item={
            "pk": {"S": LEASE_KEY},
            "holder": {"S": holder},
            "token": {"S": "someone-elses-token"},
            "expires_at": {"N": f"{expires_at:.3f}"},
            "acquired_at": {"N": f"{expires_at - 120:.3f}"},
        },
    )


# -- the lease itself (moto DynamoDB) ---------------------------------------------------------------------


def test_a_held_lease_is_refused_to_a_second_taker_who_is_told_the_holder(table: Any) -> None:
    clock = Clock()
    first = WriterLease(table, TABLE, 120, clock).acquire("removing i-0aaaaaaaaaaaaaaaa")
    assert isinstance(first, Lease)
    clock.now += 119  # one second before expiry
    second = WriterLease(table, TABLE, 120, clock).acquire("removing i-0bbbbbbbbbbbbbbbb")
    assert isinstance(second, LeaseBusy)
    assert second.holder == "removing i-0aaaaaaaaaaaaaaaa" and second.expires_at == pytest.approx(first.expires_at)
    assert "removing i-0aaaaaaaaaaaaaaaa" in second.reason(clock.now) and "expires in 1s" in second.reason(clock.now)
    assert lease_item(table)["token"]["S"] == first.token, "the refused taker changed nothing"  # type: ignore[index]


def test_an_expired_lease_is_taken_over_and_the_dead_holders_release_cannot_free_it(table: Any) -> None:
    clock = Clock()
    dead = WriterLease(table, TABLE, 120, clock).acquire("removing i-0aaaaaaaaaaaaaaaa")
    assert isinstance(dead, Lease)
    clock.now += 120  # expires_at has passed (<=): the holder died, timed out or lost its network
    successor = WriterLease(table, TABLE, 120, clock).acquire("removing i-0bbbbbbbbbbbbbbbb")
    assert isinstance(successor, Lease)
    assert WriterLease(table, TABLE, 120, clock).release(dead) is False, "not the dead holder's lease any more"
    assert lease_item(table)["token"]["S"] == successor.token  # type: ignore[index]
    assert WriterLease(table, TABLE, 120, clock).release(successor) is True
    assert lease_item(table) is None
    assert isinstance(WriterLease(table, TABLE, 120, clock).acquire("next"), Lease), "free again after release"


def test_a_missing_table_raises_instead_of_skipping_the_lease(table: Any) -> None:
    """Fail closed: an invocation that cannot tell whether it is the only writer must not write."""
    with pytest.raises(table.exceptions.ResourceNotFoundException):
        WriterLease(table, "dk8s-nosuch-cluster-state", 120).acquire("removing i-0aaaaaaaaaaaaaaaa")


@pytest.mark.parametrize(("name", "seconds"), [("", 120), (TABLE, 0), (TABLE, -5)])
def test_a_lease_without_a_table_or_duration_is_refused_by_name(table: Any, name: str, seconds: int) -> None:
    with pytest.raises(ValueError, match="CLUSTER_STATE_TABLE" if not name else f"{seconds}"):
        WriterLease(table, name, seconds)


# -- the lifecycle Lambda holding it (real etcd + moto) --------------------------------------------------


def run(*bodies: dict[str, Any]) -> dict[str, Any]:
    return lifecycle.handle(sqs_event(*bodies), Ctx())


def log_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.etcd
def test_two_invocations_at_once_for_two_leaving_members_remove_exactly_one(
    handlers: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The race the lease closes: invocation A has observed three healthy voters and decided, and is about to
    call MemberRemove, when invocation B arrives for another member. B's own view also shows three healthy
    voters, so without the lease both remove and one voter is left (quorum lost at the next failure)."""
    env = handlers
    first, second, _ = env.instance_ids
    real_remove = EtcdClient.member_remove
    a_decided, a_may_go = threading.Event(), threading.Event()
    calls: list[str] = []

    def remove_after_a_pause_for_the_first_caller(self: EtcdClient, endpoints: Any, member_id: str) -> Any:
        calls.append(member_id)
        if len(calls) == 1:
            a_decided.set()
            assert a_may_go.wait(30), "the test never let invocation A go on"
        return real_remove(self, endpoints, member_id)

    monkeypatch.setattr(EtcdClient, "member_remove", remove_after_a_pause_for_the_first_caller)
    event_a, event_b = env.begin_termination(first), env.begin_termination(second)
    results: list[dict[str, Any]] = []
    thread_a = threading.Thread(target=lambda: results.append(run(event_a)), name="invocation-a")
    thread_a.start()
    try:
        assert a_decided.wait(30), "invocation A never reached its removal"
        held = lease_item(env.dynamodb)
        assert held is not None and first in held["holder"]["S"], "A holds the lease while it changes membership"
        assert run(event_b) == {"batchItemFailures": []}
    finally:
        a_may_go.set()
        thread_a.join(60)
    assert results == [{"batchItemFailures": []}]
    assert env.hooks.results(first) == ["CONTINUE"] and env.hooks.results(second) == []
    assert len(calls) == 1, "only the lease holder called MemberRemove"
    assert sorted(env.etcd.voter_names()) == sorted(
        n.name for n in env.etcd.nodes.values() if n.instance_id != first
    ), "exactly one member removed: the other leaving member is still a voter"
    assert ("heartbeat", second, "") in env.hooks.calls, "B keeps its hook alive"
    retries = env.queued(wait=1.2)  # RETRY_DELAY_SECONDS=1
    assert [r["detail"]["EC2InstanceId"] for r in retries] == [second] and retries[0][RETRY_KEY]["attempt"] == 2
    busy = [line for line in log_lines(capsys.readouterr().out) if line.get("instance_id") == second]
    assert busy and busy[-1]["action"] == "retry" and busy[-1]["writer_lease"] == "busy"
    assert "writer lease" in busy[-1]["reason"] and first in busy[-1]["reason"]
    assert lease_item(env.dynamodb) is None, "A released the lease after its success"


@pytest.mark.etcd
def test_a_live_lease_defers_the_removal_and_an_expired_one_is_taken_over(
    handlers: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    env = handlers
    leaving = env.instance_ids[2]
    holder = "etcd-lifecycle removing i-0deaddeaddeaddead (lifecycle-event)"
    write_lease(env.dynamodb, holder, expires_at=time.time() + 100)  # another invocation is still within its time
    event = env.begin_termination(leaving)
    assert run(event) == {"batchItemFailures": []}
    assert len(env.etcd.member_names()) == 3 and env.hooks.results(leaving) == []
    (retry,) = env.queued(wait=1.2)
    assert lease_item(env.dynamodb)["holder"]["S"] == holder, "a refused taker leaves the lease alone"  # type: ignore[index]

    write_lease(env.dynamodb, holder, expires_at=time.time() - 1)  # that holder died: its time is up
    assert run(retry) == {"batchItemFailures": []}
    assert env.hooks.results(leaving) == ["CONTINUE"]
    assert len(env.etcd.member_names()) == 2 and not any(leaving in n for n in env.etcd.member_names())
    assert lease_item(env.dynamodb) is None, "the successor released it when done"
    lines = [line for line in log_lines(capsys.readouterr().out) if line.get("instance_id") == leaving]
    assert [line.get("writer_lease") for line in lines] == ["busy", "released"]


@pytest.mark.etcd
def test_the_lease_is_released_after_an_error_and_the_redelivery_can_take_it(
    handlers: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = handlers
    leaving = env.instance_ids[0]
    event = env.begin_termination(leaving)

    def broken(self: EtcdClient, endpoints: Any, member_id: str) -> Any:
        raise RuntimeError("an unexpected failure inside the removal")

    with monkeypatch.context() as patch:
        patch.setattr(EtcdClient, "member_remove", broken)
        assert run(event) == {"batchItemFailures": [{"itemIdentifier": "m-0"}]}, "SQS will redeliver it"
    assert lease_item(env.dynamodb) is None, "released although the removal raised"
    assert len(env.etcd.member_names()) == 3 and env.hooks.results(leaving) == []
    assert run(event) == {"batchItemFailures": []}  # the redelivery is not locked out for the lease's lifetime
    assert env.hooks.results(leaving) == ["CONTINUE"] and len(env.etcd.member_names()) == 2
