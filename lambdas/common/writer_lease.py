"""The single etcd membership writer: a lease in the cluster-state table (invariant 4a, docs/architecture.md:
one membership change at a time).

The lifecycle Lambda holds this lease while it observes the member list, decides and removes, so two
invocations at once (two terminations, a redelivery beside a reconciler request) never both remove against
the same, soon stale, view of the membership. It replaces reserved concurrency 1, which an account whose
Lambda concurrency quota is 10 cannot grant: Lambda keeps at least 100 unreserved concurrent executions
("Configuring reserved concurrency for a function", AWS Lambda Developer Guide).

One item, ``pk = "membership-writer"``: ``holder`` (what it is doing, for the logs), ``token`` (random per
acquisition) and ``expires_at`` (epoch seconds).

* taken by one conditional PutItem: the item is absent, or its ``expires_at`` has passed (the holder died:
  timed out, crashed, lost its network). DynamoDB applies a condition expression and the write atomically
  on one item ("Condition expressions", Amazon DynamoDB Developer Guide), so of two takers exactly one wins.
* the lease must outlive the function timeout (the stack sets twice the timeout): an invocation cannot run
  past its timeout, so a live holder never has its lease taken over.
* released by a DeleteItem conditioned on our token: a release never deletes a successor's lease.

Whoever cannot take it treats the request as "not safe now" (heartbeat + delayed re-enqueue, the usual
retry path in :mod:`lambdas.common.termination`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

LEASE_KEY = "membership-writer"


@dataclass(frozen=True)
class Lease:
    """Held by this invocation until :meth:`WriterLease.release`."""

    token: str
    holder: str
    expires_at: float


@dataclass(frozen=True)
class LeaseBusy:
    """Someone else holds the lease (``holder`` as they wrote it) until ``expires_at``."""

    holder: str
    expires_at: float

    def reason(self, now: float) -> str:
        left = max(0, int(self.expires_at - now))
        return f"another membership change holds the writer lease ({self.holder}, expires in {left}s)"


class WriterLease:
    """The lease on ``table`` over a boto3 DynamoDB client; ``clock`` is injectable for tests."""

    def __init__(
        self, dynamodb: Any, table: str, duration_seconds: int, clock: Callable[[], float] = time.time
    ) -> None:
        if not table:
            raise ValueError("the writer lease needs the cluster-state table name (CLUSTER_STATE_TABLE)")
        if duration_seconds <= 0:
            raise ValueError(f"writer lease duration {duration_seconds!r} must be a positive number of seconds")
        self.dynamodb = dynamodb
        self.table = table
        self.duration_seconds = duration_seconds
        self.clock = clock

    def acquire(self, holder: str) -> Lease | LeaseBusy:
        """Take the lease if it is free or its holder's time is up; AWS errors other than the lost
        condition raise (the caller's message is redelivered, nothing was changed)."""
        now = self.clock()
        lease = Lease(token=uuid.uuid4().hex, holder=holder, expires_at=now + self.duration_seconds)
        try:
            self.dynamodb.put_item(
                TableName=self.table,
                Item={
                    "pk": {"S": LEASE_KEY},
                    "holder": {"S": holder},
                    "token": {"S": lease.token},
                    "expires_at": {"N": f"{lease.expires_at:.3f}"},
                    "acquired_at": {"N": f"{now:.3f}"},
                },
                ConditionExpression="attribute_not_exists(pk) OR expires_at <= :now",
                ExpressionAttributeValues={":now": {"N": f"{now:.3f}"}},
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise
            current = err.response.get("Item") or {}
            return LeaseBusy(
                holder=str(current.get("holder", {}).get("S", "unknown holder")),
                expires_at=float(current.get("expires_at", {}).get("N", now + self.duration_seconds)),
            )
        return lease

    def release(self, lease: Lease) -> bool:
        """Give the lease back; False if it was no longer ours (taken over after expiry) or the call failed.
        Never raises: an unreleased lease only makes the next writer wait until it expires."""
        try:
            self.dynamodb.delete_item(
                TableName=self.table,
                Key={"pk": {"S": LEASE_KEY}},
                ConditionExpression="#token = :token",
                ExpressionAttributeNames={"#token": "token"},
                ExpressionAttributeValues={":token": {"S": lease.token}},
            )
        except (ClientError, BotoCoreError):
            return False
        return True
