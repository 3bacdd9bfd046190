"""The etcd lifecycle Lambda: SQS records (EventBridge terminate events, our retries, reconciler requests)
-> :func:`lambdas.common.termination.handle_termination`. Thin: parse, call, log, report failures.

Batch size is 1 and the event source runs at most two invocations at once; one membership change at a time
is kept by the writer lease (lambdas/common/writer_lease.py), not by reserved concurrency. A record that fails
(a body we cannot parse, or an unexpected error such as an unreadable etcd client secret on an initialised
cluster) is reported in ``batchItemFailures`` so SQS redelivers it and, after maxReceiveCount, moves it to the
dead-letter queue (alarmed). A request that AWS does not confirm (the instance is not leaving, the group is not
ours, the hook token is not live: lambdas/common/verify.py) or that carries a retry key we never wrote is
rejected and consumed: one ERROR line names the instance, group, the state AWS reported and the reason, the
RejectedRequests metric counts it, and redelivering it would only be rejected again. The other records of the
batch go on either way (partial batch responses).
"""

from __future__ import annotations

import json
import time
from typing import Any

from lambdas.common.cluster_aws import ClusterAws, default_cluster_aws
from lambdas.common.join_withdrawal import WithdrawalRequest, handle_withdrawal, is_withdrawal
from lambdas.common.observability import Logger, Metrics
from lambdas.common.termination import (
    MalformedRequestError,
    MalformedRetryKeyError,
    TerminationRequest,
    TerminationResult,
    handle_termination,
)

LOGGER = Logger("etcd-lifecycle")


def cluster_aws() -> ClusterAws:
    """Created on first use, kept for warm invocations; tests and the twin point it elsewhere."""
    return default_cluster_aws()


def _bodies(event: Any) -> list[tuple[str | None, Any]]:
    if isinstance(event, dict) and isinstance(event.get("Records"), list):
        out: list[tuple[str | None, Any]] = []
        for record in event["Records"]:
            try:
                out.append((record.get("messageId"), json.loads(record.get("body", ""))))
            except (TypeError, ValueError, AttributeError):
                out.append((record.get("messageId") if isinstance(record, dict) else None, None))
        return out
    return [(None, event)]  # invoked directly with an EventBridge event


def _metric(result: TerminationResult) -> str:
    if result.role == "worker":
        return {"continue": "WorkerDrainCompleted", "retry": "DrainRetried", "rejected": "RejectedRequests"}.get(
            result.action, "DrainDeferred"
        )
    return {"continue": "MemberRemovalCompleted", "abandon": "RemovalAbandoned", "retry": "RemovalRetried",
            "rejected": "RejectedRequests"}.get(result.action, "RemovalDeferred")  # fmt: skip


def _withdraw(aws: ClusterAws, body: Any, message_id: str | None, metrics: Metrics) -> bool:
    """One withdrawal request; False if it is malformed (rejected, nothing done) or failed (redelivered)."""
    try:
        request = WithdrawalRequest.parse(body)
        result = handle_withdrawal(request, aws)
    except ValueError as err:
        LOGGER.error("rejected: malformed withdrawal", reason=str(err), message_id=message_id, body=str(body)[:2000])
        metrics.add("RejectedRequests", 1)
        return False
    except Exception as err:
        LOGGER.error("withdrawal failed; the message will be redelivered", error=f"{type(err).__name__}: {err}",
                     message_id=message_id)  # fmt: skip
        metrics.add("LifecycleErrors", 1)
        if message_id is None:
            raise
        return False
    LOGGER.log("INFO" if result.action == "continue" else "WARNING", f"join withdrawal {result.action}",
               member_id=request.member_id, why=request.why, message_id=message_id,
               **result.log_fields())  # fmt: skip
    metrics.add("JoinsWithdrawn" if result.action == "continue" else "JoinWithdrawalDeferred", 1)
    return True


def handle(event: Any, context: Any) -> dict[str, Any]:
    aws = cluster_aws()
    metrics = Metrics(aws.settings.metrics_namespace)
    failures: list[dict[str, str]] = []
    LOGGER.reset()
    LOGGER.bind(request_id=getattr(context, "aws_request_id", None))
    for message_id, body in _bodies(event):
        started = time.monotonic()
        if is_withdrawal(body):  # an abandoned join the reconciler found (lambdas/common/join_withdrawal.py)
            if not _withdraw(aws, body, message_id, metrics) and message_id:
                failures.append({"itemIdentifier": message_id})
            continue
        try:
            request = TerminationRequest.parse(body, time.time())
        except MalformedRequestError as err:
            LOGGER.error("rejected: malformed request", reason=str(err), message_id=message_id, body=str(body)[:2000])
            metrics.add("RejectedRequests", 1)
            if message_id and not isinstance(err, MalformedRetryKeyError):
                failures.append({"itemIdentifier": message_id})
            continue
        fields = {"instance_id": request.instance_id, "group": request.group, "origin": request.origin,
                  "kind": request.kind, "attempt": request.attempt, "message_id": message_id}  # fmt: skip
        try:
            result = handle_termination(request, aws)
        except Exception as err:
            LOGGER.error("failed; the message will be redelivered", error=f"{type(err).__name__}: {err}", **fields)
            metrics.add("LifecycleErrors", 1)
            if message_id is None:
                raise
            failures.append({"itemIdentifier": message_id})
            continue
        level = {"rejected": "ERROR", "abandon": "ERROR", "retry": "WARNING", "deferred": "WARNING"}.get(
            result.action, "INFO"
        )
        LOGGER.log(level, f"termination {result.action}", **fields, **result.log_fields(),
                   millis=round((time.monotonic() - started) * 1000, 1))  # fmt: skip
        metrics.add(_metric(result), 1)
        if result.drain is not None and result.drain.deadline_passed:
            metrics.add("DrainDeadlinePassed", 1)
    metrics.flush({"ClusterName": aws.settings.cluster_name})
    return {"batchItemFailures": failures}
