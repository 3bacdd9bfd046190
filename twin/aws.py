"""AWS for the twin: a ``moto_server`` process on a free loopback port, behind a small lifecycle proxy.

Every boto3 client of the twin, of the node agents (other processes) and of the Lambda handlers points at
the proxy (``endpoint_url`` / ``AWS_ENDPOINT_URL``, dummy credentials). The proxy forwards each request to
moto unchanged, except for the three Auto Scaling calls whose behaviour moto 5.2.5 lacks (docs/facts.md):

* ``CompleteLifecycleAction`` and ``RecordLifecycleActionHeartbeat`` (moto raises NotImplementedError),
* ``TerminateInstanceInAutoScalingGroup`` (moto terminates at once, with no Terminating:Wait),

and it rewrites the ``LifecycleState`` of each instance in moto's ``DescribeAutoScalingInstances`` /
``DescribeAutoScalingGroups`` answers with the state machine's (moto always says InService).

which go to the twin's lifecycle state machine (:mod:`twin.lifecycle`) and are answered in the AWS query
protocol's XML, including AWS's ``ValidationError`` for an action that is not pending. So the agent's
``AutoScalingLaunchHook`` and the Lambda's completion call run their production code paths unchanged.

DynamoDB requests are applied one at a time: moto checks a condition and writes without a lock, while
real DynamoDB applies each conditional write atomically (the election depends on that).

IAM and VPC endpoints (``MotoAws(..., authorizer=...)``, :mod:`twin.authorizer`): every request is signed with
its principal's own dummy access key (:mod:`twin.principals`: ``client(service, principal)``,
``principal_environment(name)`` for the instance processes, per-invocation credentials for the in-process
Lambdas); before forwarding, the proxy authorises it against that principal's policies from the synthesized
templates and refuses it as AWS would (AccessDenied in the protocol's error shape, or, from inside the VPC to a
service without an endpoint, no answer at all). The twin's own calls sign as the unrestricted ``harness``.
Without an authorizer every request is forwarded (the proxy's own tests).

Account quotas: ``lambda:GetAccountSettings`` is answered by the proxy with the account's concurrency quota
(``lambda_concurrency_quota``; AWS's default is 1,000 concurrent executions per Region, "Lambda quotas", AWS
Lambda Developer Guide, https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html), the
functions' reserved concurrency subtracted from ``UnreservedConcurrentExecutions`` as Lambda reports it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from xml.sax.saxutils import escape

import boto3

from twin.authorizer import Authorizer, MotoLookup, Refusal
from twin.aws_calls import Request
from twin.principals import HARNESS_PRINCIPAL, PrincipalBook, activate, install_default_session

REGION = "eu-west-1"
ACCOUNT = "123456789012"
PARTITION = "aws"  # eu-west-1 is in the commercial partition; ARNs are built from this, never spelt out
DUMMY_CREDENTIALS = HARNESS_PRINCIPAL.credentials()  # the twin's own calls (set-up, observer): unrestricted
_XMLNS = "http://autoscaling.amazonaws.com/doc/2011-01-01/"
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}


class LifecycleRefusedError(Exception):
    """What Auto Scaling answers with a 400 ValidationError (e.g. no active lifecycle action)."""


class LifecycleBackend(Protocol):
    def complete_action(self, group: str, hook: str, instance_id: str, token: str, result: str) -> None: ...
    def heartbeat(self, group: str, hook: str, instance_id: str, token: str) -> None: ...
    def terminate_in_group(self, instance_id: str, decrement: bool) -> str: ...
    def lifecycle_state(self, instance_id: str) -> str | None: ...


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Faults:
    """Fault switches the chaos run sets on the proxy (each names what it breaks)."""

    # instance id -> reason: CompleteLifecycleAction for this instance's terminate hook is dropped
    # (the connection closes without an answer), as if the Lambda crashed after removing the member.
    drop_completion: dict[str, str] = field(default_factory=dict)
    dropped: list[tuple[float, str]] = field(default_factory=list)


class _Proxy(ThreadingHTTPServer):
    daemon_threads = True
    backend: LifecycleBackend
    moto_port: int
    faults: Faults
    ddb_lock: threading.Lock
    authorizer: Authorizer | None
    lambda_concurrency_quota: int
    reserved_concurrency: int

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up mid-answer is an instance the twin just killed (its agent's boto3 call dies with
        it): nothing to report. Anything else is a proxy bug and is printed as socketserver does."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Proxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in _HOP_HEADERS:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, body: bytes, rewrite_states: bool = False) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.moto_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        target = self.headers.get("X-Amz-Target", "")
        lock = self.server.ddb_lock if target.startswith("DynamoDB_") else None
        try:
            if lock is not None:
                lock.acquire()
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            if lock is not None:
                lock.release()
            conn.close()
        if rewrite_states and resp.status == 200:
            data = self._with_lifecycle_states(data)
        self._reply(resp.status, data, resp.getheaders())

    def _with_lifecycle_states(self, data: bytes) -> bytes:
        text = data.decode()

        def one(m: re.Match[str]) -> str:
            block = m.group(0)
            iid = re.search(r"<InstanceId>([^<]+)</InstanceId>", block)
            state = self.server.backend.lifecycle_state(iid.group(1)) if iid else None
            if state is None:
                return block
            return re.sub(r"<LifecycleState>[^<]*</LifecycleState>", f"<LifecycleState>{state}</LifecycleState>", block)

        return re.sub(r"<member>(?:(?!<member>).)*?<LifecycleState>.*?</member>", one, text, flags=re.S).encode()

    def _xml(self, action: str, result: str = "") -> None:
        rid = uuid.uuid4()
        inner = f"<{action}Result>{result}</{action}Result>" if result else f"<{action}Result/>"
        text = (
            f'<{action}Response xmlns="{_XMLNS}">{inner}'
            f"<ResponseMetadata><RequestId>{rid}</RequestId></ResponseMetadata></{action}Response>"
        )
        self._reply(200, text.encode(), [("Content-Type", "text/xml")])

    def _error(self, code: str, message: str, status: int = 400) -> None:
        text = (
            f'<ErrorResponse xmlns="{_XMLNS}"><Error><Type>Sender</Type><Code>{code}</Code>'
            f"<Message>{escape(message)}</Message></Error><RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
        )
        self._reply(status, text.encode(), [("Content-Type", "text/xml")])

    def _lifecycle(self, action: str, p: dict[str, str]) -> bool:
        backend = self.server.backend
        iid = p.get("InstanceId", "")
        try:
            if action == "CompleteLifecycleAction":
                if iid in self.server.faults.drop_completion:
                    self.server.faults.dropped.append((time.time(), iid))
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return True
                backend.complete_action(
                    p.get("AutoScalingGroupName", ""),
                    p.get("LifecycleHookName", ""),
                    iid,
                    p.get("LifecycleActionToken", ""),
                    p.get("LifecycleActionResult", ""),
                )
                self._xml(action)
            elif action == "RecordLifecycleActionHeartbeat":
                backend.heartbeat(
                    p.get("AutoScalingGroupName", ""),
                    p.get("LifecycleHookName", ""),
                    iid,
                    p.get("LifecycleActionToken", ""),
                )
                self._xml(action)
            elif action == "TerminateInstanceInAutoScalingGroup":
                decrement = p.get("ShouldDecrementDesiredCapacity", "false").lower() == "true"
                group = backend.terminate_in_group(iid, decrement)
                now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
                activity = (
                    f"<Activity><ActivityId>{uuid.uuid4()}</ActivityId><AutoScalingGroupName>{group}"
                    f"</AutoScalingGroupName><Cause>user request</Cause><Description>Terminating EC2 instance: "
                    f"{iid}</Description><StartTime>{now}</StartTime><StatusCode>InProgress</StatusCode>"
                    "<Progress>0</Progress><Details>{}</Details></Activity>"
                )
                self._xml(action, activity)
            else:
                return False
        except LifecycleRefusedError as err:
            self._error("ValidationError", str(err))
        return True

    def _refused(self, body: bytes) -> bool:
        """Authorise the request (IAM, VPC endpoints); True when it was refused and answered here."""
        authorizer = self.server.authorizer
        if authorizer is None:
            return False
        _principal, _op, refusal = authorizer.decide(Request(self.command, self.path, dict(self.headers), body))
        if refusal is None:
            return False
        self._refuse(refusal)
        return True

    def _refuse(self, refusal: Refusal) -> None:
        if refusal.close:  # what an unrouted connection gives the client: nothing
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._reply(refusal.status, refusal.body, list(refusal.headers))

    def _account_settings(self) -> None:
        quota = self.server.lambda_concurrency_quota
        settings = {
            "AccountLimit": {
                "TotalCodeSize": 80530636800,
                "CodeSizeUnzipped": 262144000,
                "CodeSizeZipped": 52428800,
                "ConcurrentExecutions": quota,
                "UnreservedConcurrentExecutions": quota - self.server.reserved_concurrency,
            },
            "AccountUsage": {"TotalCodeSize": 0, "FunctionCount": 0},
        }
        self._reply(200, json.dumps(settings).encode(), [("Content-Type", "application/json")])

    def _handle(self) -> None:
        body = self._body()
        if self._refused(body):
            return
        if self.command == "GET" and re.fullmatch(r"/\d{4}-\d{2}-\d{2}/account-settings/?", self.path.split("?")[0]):
            self._account_settings()
            return
        if self.command == "POST" and body[:7] == b"Action=":
            params = dict(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
            if self._lifecycle(params.get("Action", ""), params):
                return
            if params.get("Action") in ("DescribeAutoScalingInstances", "DescribeAutoScalingGroups"):
                self._forward(body, rewrite_states=True)
                return
        self._forward(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle  # noqa: N815


class MotoAws:
    """``moto_server`` + the lifecycle proxy; ``client(service)`` gives boto3 clients pointing at the proxy."""

    def __init__(
        self,
        log_dir: Path,
        backend: LifecycleBackend,
        *,
        authorizer: Authorizer | None = None,
        lambda_concurrency_quota: int = 1000,
        reserved_concurrency: int = 0,
    ) -> None:
        if lambda_concurrency_quota < 1 or not 0 <= reserved_concurrency <= lambda_concurrency_quota:
            raise ValueError(
                f"lambda_concurrency_quota={lambda_concurrency_quota} must be positive and reserved_concurrency="
                f"{reserved_concurrency} within it"
            )
        self.log_dir = log_dir
        self.moto_port = free_port()
        self.faults = Faults()
        self._process: subprocess.Popen[bytes] | None = None
        self._server = _Proxy(("127.0.0.1", 0), _Handler)
        self._server.backend = backend
        self._server.moto_port = self.moto_port
        self._server.faults = self.faults
        self._server.ddb_lock = threading.Lock()
        self._server.authorizer = authorizer
        self._server.lambda_concurrency_quota = lambda_concurrency_quota
        self._server.reserved_concurrency = reserved_concurrency
        self.authorizer: Authorizer | None = None
        self._deactivate: Callable[[], None] | None = None
        if authorizer is not None:
            self.enforce(authorizer)
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._session = boto3.session.Session(region_name=REGION, **DUMMY_CREDENTIALS)

    def enforce(self, authorizer: Authorizer) -> None:
        """Authorise every request from now on (call before :meth:`start`: instance processes and Lambdas take
        their principals' credentials from it)."""
        if authorizer.lookup is None:
            moto = boto3.session.Session(region_name=REGION, **DUMMY_CREDENTIALS)
            moto_url = f"http://127.0.0.1:{self.moto_port}"
            authorizer.lookup = MotoLookup(lambda service: moto.client(service, endpoint_url=moto_url))
        self.authorizer = authorizer
        self._server.authorizer = authorizer

    def start(self) -> MotoAws:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).with_name("moto_server")
        log = (self.log_dir / "moto.log").open("ab")
        self._process = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(self.moto_port)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.moto_port}/moto-api/", timeout=2).close()
                break
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start; see {self.log_dir / 'moto.log'}") from None
                time.sleep(0.1)
        threading.Thread(target=self._server.serve_forever, name="aws-proxy", daemon=True).start()
        self._deactivate = activate(self.principals)  # the in-process Lambdas' roles (twin.events)
        return self

    def stop(self) -> None:
        if self._deactivate is not None:
            self._deactivate()
            self._deactivate = None
        self._server.shutdown()
        self._server.server_close()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()

    @property
    def principals(self) -> PrincipalBook:
        return self.authorizer.principals if self.authorizer is not None else PrincipalBook()

    def client(self, service: str, principal: str | None = None) -> Any:
        """A boto3 client of the twin's AWS, signing as ``principal`` (default, or without IAM enforced: the
        unrestricted harness)."""
        if principal is None or self.authorizer is None:
            return self._session.client(service, endpoint_url=self.endpoint_url)
        creds = self.principals[principal].credentials()
        return boto3.session.Session(region_name=REGION, **creds).client(service, endpoint_url=self.endpoint_url)

    def environment(self) -> dict[str, str]:
        """What a process needs so that its boto3 clients talk to the twin's AWS (as the harness)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": DUMMY_CREDENTIALS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": DUMMY_CREDENTIALS["aws_secret_access_key"],
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def principal_environment(self, principal: str) -> dict[str, str]:
        """:meth:`environment` with ``principal``'s credentials (an instance process: its instance role's); the
        harness's without IAM enforced."""
        if self.authorizer is None:
            return self.environment()
        return {**self.environment(), **self.principals[principal].environment()}

    def iam_report(self) -> dict[str, Any]:
        """Denied calls, unreachable services and granted-but-unused permissions of this run (empty without IAM)."""
        if self.authorizer is None:
            return {"denied": [], "unreachable": [], "unused_permissions": {}}
        return self.authorizer.report()

    @staticmethod
    def apply_environment(env: dict[str, str]) -> Callable[[], None]:
        """Set ``env`` in this process (the in-process Lambda handlers read it); returns an undo.

        In-process boto3 clients do not sign with the environment's credentials: boto3's default session is
        replaced by one that signs each request with the running Lambda invocation's principal
        (:func:`twin.principals.install_default_session`), and the environment holds the ``unattributed``
        key, so a session a handler builds itself gets no unrestricted credentials either."""
        from twin.principals import UNATTRIBUTED_PRINCIPAL

        env = {**env, **UNATTRIBUTED_PRINCIPAL.environment()}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        undo_session = install_default_session(env.get("AWS_REGION", REGION))

        def undo() -> None:
            undo_session()
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

        return undo
