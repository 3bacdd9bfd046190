"""A small etcd v3 client over etcd's JSON gateway (the client port, HTTPS with a client certificate).

Why not gRPC: python-etcd3 does not import with current protobuf and predates learners (no learner add,
no promote); its maintained fork has the same protos. The gateway that every etcd 3.4+ member serves on its
client port speaks the whole cluster API, learners included, so a stdlib client needs no third-party
package at all: the Lambda asset is a copy of our sources, imports in milliseconds, and the same code runs
on the nodes (see README, dependency notes).

Only wire concerns live here (URLs, TLS, JSON, base64, error mapping). Membership rules are in
:mod:`lambdas.common.membership`.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class EtcdError(Exception):
    """Base class: something went wrong talking to etcd."""


class EtcdUnavailableError(EtcdError):
    """No endpoint answered (connection refused, timeout, TLS failure): nothing is known about the cluster."""


class EtcdRequestError(EtcdError):
    """etcd answered and refused the request; ``message`` is etcd's own text."""

    def __init__(self, message: str, *, code: int | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


class MemberNotFoundError(EtcdRequestError):
    """etcd says the member does not exist (already removed): idempotent removal treats this as done."""


class UnhealthyClusterError(EtcdRequestError):
    """etcd's own reconfiguration guard (strict reconfig check) refused the change: the cluster has not been
    fully connected long enough, or the change would leave too few active members. Retry later."""


@dataclass(frozen=True)
class TlsMaterial:
    """PEM material for mutual TLS: the etcd CA and a client certificate/key it signed."""

    ca_pem: str
    cert_pem: str
    key_pem: str
    _cache: dict[str, ssl.SSLContext] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_files(cls, ca: Path, cert: Path, key: Path) -> TlsMaterial:
        return cls(ca.read_text(), cert.read_text(), key.read_text())

    @classmethod
    def from_secret(cls, value: dict[str, Any]) -> TlsMaterial:
        """The etcd-client secret's JSON: ``{"ca": PEM, "cert": PEM, "key": PEM}``."""
        missing = [
            k for k in ("ca", "cert", "key") if not isinstance(value.get(k), str) or "-----BEGIN" not in value[k]
        ]
        if missing:
            raise ValueError(f"etcd client secret lacks PEM for: {', '.join(missing)}")
        return cls(value["ca"], value["cert"], value["key"])

    def context(self) -> ssl.SSLContext:
        """One SSL context per material (thread-safe to share). ``load_cert_chain`` needs files: the key is
        written once to a private temporary directory (mode 0700/0600) and removed right after loading."""
        ctx = self._cache.get("ctx")
        if ctx is None:
            ctx = ssl.create_default_context(cadata=self.ca_pem)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            with tempfile.TemporaryDirectory(prefix="etcd-tls-") as tmp:
                cert, key = Path(tmp) / "client.crt", Path(tmp) / "client.key"
                cert.write_text(self.cert_pem)
                fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as handle:
                    handle.write(self.key_pem)
                ctx.load_cert_chain(str(cert), str(key))
            self._cache["ctx"] = ctx
        return ctx


@dataclass(frozen=True)
class MemberRecord:
    """A member as etcd lists it. ``id`` is the uint64 as a decimal string (the gateway's encoding)."""

    id: str
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    is_learner: bool

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> MemberRecord:
        return cls(
            id=str(raw.get("ID", "")),
            name=str(raw.get("name", "")),
            peer_urls=tuple(raw.get("peerURLs", []) or ()),
            client_urls=tuple(raw.get("clientURLs", []) or ()),
            is_learner=bool(raw.get("isLearner", False)),
        )


@dataclass(frozen=True)
class EndpointStatus:
    """``/v3/maintenance/status`` of one member."""

    endpoint: str
    member_id: str
    leader_id: str
    raft_index: int
    raft_term: int
    version: str
    errors: tuple[str, ...]
    is_learner: bool

    @property
    def has_leader(self) -> bool:
        return self.leader_id not in ("", "0")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


class EtcdClient:
    """Requests to etcd members' client URLs. ``endpoints`` are ``https://ip:2379`` (``http`` in no-TLS tests)."""

    def __init__(self, tls: TlsMaterial | None = None, *, timeout: float = 2.0) -> None:
        self.tls = tls
        self.timeout = timeout

    # -- wire -----------------------------------------------------------------------------------------------
    def call(self, endpoint: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST ``body`` to ``endpoint + path``; etcd's refusals raise :class:`EtcdRequestError`."""
        request = urllib.request.Request(  # noqa: S310 (etcd member URLs from EC2/etcd, http(s) only)
            endpoint.rstrip("/") + path,
            data=json.dumps(body or {}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        if not endpoint.startswith(("https://", "http://")):
            raise ValueError(f"not an etcd client URL: {endpoint!r}")
        context = self.tls.context() if self.tls is not None and endpoint.startswith("https://") else None
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=context) as response:  # noqa: S310
                text = response.read().decode() or "{}"
        except urllib.error.HTTPError as err:
            raise self._refusal(err) from err
        except (OSError, ssl.SSLError) as err:  # URLError, timeouts, refused, TLS handshake
            raise EtcdUnavailableError(f"{endpoint}: {getattr(err, 'reason', err)}") from err
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise EtcdRequestError(f"{endpoint}{path}: unexpected answer {text[:200]!r}")
        return doc

    @staticmethod
    def _refusal(err: urllib.error.HTTPError) -> EtcdRequestError:
        raw = err.read().decode(errors="replace")
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = {}
        message = str(doc.get("message") or doc.get("error") or raw[:300] or err.reason)
        code = doc.get("code") if isinstance(doc.get("code"), int) else None
        kind: type[EtcdRequestError] = EtcdRequestError
        if "member not found" in message:
            kind = MemberNotFoundError
        elif "unhealthy cluster" in message:
            kind = UnhealthyClusterError
        return kind(message, code=code, status=err.code)

    def call_any(self, endpoints: Sequence[str], path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """The first endpoint that answers; a refusal from etcd is raised at once (it is the cluster's answer,
        asking another member would get the same one); unreachable endpoints and learners are skipped."""
        failures: list[str] = []
        for endpoint in endpoints:
            try:
                return self.call(endpoint, path, body)
            except EtcdUnavailableError as err:
                failures.append(str(err))
            except EtcdRequestError as err:
                if "not supported for learner" not in err.message:
                    raise
                failures.append(f"{endpoint}: a learner (it serves no cluster requests)")
        raise EtcdUnavailableError("no etcd endpoint answered: " + ("; ".join(failures) or "no endpoints given"))

    # -- cluster API ------------------------------------------------------------------------------------------
    def member_list(self, endpoints: Sequence[str]) -> list[MemberRecord]:
        doc = self.call_any(endpoints, "/v3/cluster/member/list")
        return [MemberRecord.from_json(m) for m in doc.get("members", [])]

    def status(self, endpoint: str) -> EndpointStatus:
        doc = self.call(endpoint, "/v3/maintenance/status")
        header = doc.get("header", {}) or {}
        return EndpointStatus(
            endpoint=endpoint,
            member_id=str(header.get("member_id", "")),
            leader_id=str(doc.get("leader", "0")),
            raft_index=int(doc.get("raftIndex", 0) or 0),
            raft_term=int(doc.get("raftTerm", 0) or 0),
            version=str(doc.get("version", "")),
            errors=tuple(str(e) for e in doc.get("errors", []) or ()),
            is_learner=bool(doc.get("isLearner", False)),
        )

    def member_remove(self, endpoints: Sequence[str], member_id: str) -> None:
        self.call_any(endpoints, "/v3/cluster/member/remove", {"ID": member_id})

    def member_add_learner(self, endpoints: Sequence[str], peer_urls: Sequence[str]) -> MemberRecord:
        doc = self.call_any(endpoints, "/v3/cluster/member/add", {"peerURLs": list(peer_urls), "isLearner": True})
        return MemberRecord.from_json(doc.get("member", {}) or {})

    def member_promote(self, endpoints: Sequence[str], member_id: str) -> None:
        self.call_any(endpoints, "/v3/cluster/member/promote", {"ID": member_id})

    def move_leader(self, leader_endpoint: str, target_id: str) -> None:
        """MoveLeader must be sent to the current leader."""
        self.call(leader_endpoint, "/v3/maintenance/transfer-leadership", {"targetID": target_id})

    # -- keys (the canary's sentinel) --------------------------------------------------------------------------
    def put(self, endpoints: Sequence[str], key: str, value: str) -> int:
        doc = self.call_any(endpoints, "/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
        return int((doc.get("header", {}) or {}).get("revision", 0) or 0)

    def get(self, endpoints: Sequence[str], key: str) -> str | None:
        """Linearizable read (the gateway's default): a value acknowledged before is always seen."""
        doc = self.call_any(endpoints, "/v3/kv/range", {"key": _b64(key)})
        kvs = doc.get("kvs") or []
        return _unb64(kvs[0].get("value", "")) if kvs else None
