"""Lifecycle events as AWS delivers them, to the REAL Lambda handlers, in-process.

* Terminate hook -> EventBridge event ("EC2 Instance-terminate Lifecycle Action", detail as Auto Scaling
  sends it) -> the rule's target, the SQS queue in moto -> :class:`QueueDelivery`, which behaves like the
  Lambda event source mapping (batch size 1): receive, wrap in an ``aws:sqs`` record, invoke the handler,
  delete on success; on an exception (or a reported batch item failure) the message becomes visible
  again after the queue's visibility timeout. Messages the Lambda re-enqueues with DelaySeconds are in
  the same queue, so they are redelivered the same way.
* The reconciler is invoked on a timer with an EventBridge "Scheduled Event".

Every handler :func:`load_handler` returns runs as its function's execution role: the AWS calls it makes
(through boto3's default session, clients cached at import time included) are signed with the credentials of
the principal named by the invocation context's ``function_name`` (:func:`twin.principals.invocation_as`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from twin.aws import ACCOUNT, PARTITION, REGION
from twin.principals import function_principal, invocation_as

Handler = Callable[[dict[str, Any], Any], Any]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def terminate_lifecycle_event(
    *, group: str, hook: str, instance_id: str, token: str, metadata: str | None = None
) -> dict[str, Any]:
    """The EventBridge event Auto Scaling emits for a terminate lifecycle action."""
    detail: dict[str, Any] = {
        "LifecycleActionToken": token,
        "AutoScalingGroupName": group,
        "LifecycleHookName": hook,
        "EC2InstanceId": instance_id,
        "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
        "Origin": "AutoScalingGroup",
        "Destination": "EC2",
    }
    if metadata is not None:
        detail["NotificationMetadata"] = metadata
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "EC2 Instance-terminate Lifecycle Action",
        "source": "aws.autoscaling",
        "account": ACCOUNT,
        "time": _now(),
        "region": REGION,
        "resources": [
            f"arn:{PARTITION}:autoscaling:{REGION}:{ACCOUNT}:autoScalingGroup:{uuid.uuid4()}:autoScalingGroupName/{group}"
        ],
        "detail": detail,
    }


def scheduled_event(rule: str) -> dict[str, Any]:
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": ACCOUNT,
        "time": _now(),
        "region": REGION,
        "resources": [f"arn:{PARTITION}:events:{REGION}:{ACCOUNT}:rule/{rule}"],
        "detail": {},
    }


def sqs_record(message: dict[str, Any], queue_arn: str) -> dict[str, Any]:
    """One record of the event the SQS event source mapping passes to a Lambda."""
    attrs = {}
    for name, a in (message.get("MessageAttributes") or {}).items():
        attrs[name] = {
            "stringValue": a.get("StringValue"),
            "binaryValue": a.get("BinaryValue"),
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": a.get("DataType", "String"),
        }
        attrs[name] = {k: v for k, v in attrs[name].items() if v is not None}
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": dict(message.get("Attributes") or {}),
        "messageAttributes": attrs,
        "md5OfBody": message.get("MD5OfBody") or hashlib.md5(message["Body"].encode()).hexdigest(),  # noqa: S324
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": REGION,
    }


@dataclass
class LambdaContext:
    function_name: str
    timeout_s: float = 60.0
    memory_limit_in_mb: int = 256

    def __post_init__(self) -> None:
        self.aws_request_id = str(uuid.uuid4())
        self.invoked_function_arn = f"arn:{PARTITION}:lambda:{REGION}:{ACCOUNT}:function:{self.function_name}"
        self.function_version = "$LATEST"
        self.log_group_name = f"/aws/lambda/{self.function_name}"
        self.log_stream_name = "twin"
        self._deadline = time.monotonic() + self.timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def load_handler(path: str) -> Handler:
    """``"lambdas.etcd_lifecycle.handler:handle"`` -> the function (imported when first needed), wrapped so that
    each invocation signs its AWS calls as the execution role of ``context.function_name``."""
    module, _, name = path.partition(":")
    handler: Handler = getattr(importlib.import_module(module), name)

    def as_function(event: dict[str, Any], context: Any) -> Any:
        with invocation_as(function_principal(context.function_name)):
            return handler(event, context)

    return as_function


class QueueDelivery:
    """The SQS -> Lambda event source mapping, polling moto's queue (batch size 1, ``concurrency`` at once)."""

    def __init__(  # noqa: PLR0917 (the mapping's settings, named at the one call site)
        self,
        sqs: Any,
        queue_url: str,
        queue_arn: str,
        handler: Callable[[], Handler],
        function_name: str,
        on_event: Callable[..., None],
        concurrency: int = 2,
        poll_interval: float = 0.2,
    ) -> None:
        self.sqs = sqs
        self.queue_url = queue_url
        self.queue_arn = queue_arn
        self.handler = handler
        self.function_name = function_name
        self.on_event = on_event
        self.poll_interval = poll_interval
        self.timeout_s = 60.0  # the function's Timeout (the twin sets the template's, scaled)
        self.invocations = 0
        self.errors = 0
        self.before_invoke: Callable[[dict[str, Any]], None] | None = None  # chaos hooks
        self.after_invoke: Callable[[dict[str, Any], bool], None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="lambda")
        self._slots = threading.Semaphore(concurrency)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="esm", daemon=True)

    def start(self) -> QueueDelivery:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._slots.acquire(timeout=0.5):
                continue
            try:
                resp = self.sqs.receive_message(
                    QueueUrl=self.queue_url,
                    MaxNumberOfMessages=1,
                    WaitTimeSeconds=0,
                    AttributeNames=["All"],
                    MessageAttributeNames=["All"],
                )
                messages = resp.get("Messages", [])
            except Exception as err:
                messages = []
                self.on_event("esm-error", error=str(err))
            if not messages:
                self._slots.release()
                self._stop.wait(self.poll_interval)
                continue
            self._pool.submit(self._invoke, messages[0])

    def _invoke(self, message: dict[str, Any]) -> None:
        try:
            record = sqs_record(message, self.queue_arn)
            body: dict[str, Any] = {}
            with contextlib.suppress(ValueError):
                body = json.loads(record["body"])
            if self.before_invoke is not None:
                self.before_invoke(body)
            ok = True
            detail = body.get("detail", {}) if isinstance(body.get("detail"), dict) else {}
            self.invocations += 1
            try:
                result = self.handler()({"Records": [record]}, LambdaContext(self.function_name, self.timeout_s))
                failures = (result or {}).get("batchItemFailures", []) if isinstance(result, dict) else []
                ok = not any(f.get("itemIdentifier") == record["messageId"] for f in failures)
            except Exception as err:
                ok = False
                self.errors += 1
                self.on_event(
                    "lambda-error",
                    function=self.function_name,
                    error=f"{type(err).__name__}: {err}",
                    instance_id=detail.get("EC2InstanceId"),
                    trace=traceback.format_exc()[-800:],
                )
            if ok:
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
            self.on_event(
                "lambda",
                function=self.function_name,
                ok=ok,
                instance_id=detail.get("EC2InstanceId"),
                receive_count=record["attributes"].get("ApproximateReceiveCount"),
            )
            if self.after_invoke is not None:
                self.after_invoke(body, ok)
        finally:
            self._slots.release()


class Timer:
    """Calls ``fn`` every ``interval`` seconds in a thread (the reconciler's schedule)."""

    def __init__(self, interval: float, fn: Callable[[], None], name: str) -> None:
        self.interval = interval
        self.fn = fn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> Timer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.fn()
