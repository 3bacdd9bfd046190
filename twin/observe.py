"""An independent view of etcd and a timeline: what the twin measures is not what the code under test says.

:class:`EtcdObserver` talks to every control-plane instance's etcd directly over its v3 JSON gateway (HTTPS,
the Lambda's client certificate) -- not through the membership module under test. :class:`Timeline` samples
it (default 4/s), records events, and plots healthy voters, learners and members over time.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class MemberView:
    id: str
    name: str
    peer_url: str
    client_url: str
    is_learner: bool
    healthy: bool


@dataclass(frozen=True)
class Sample:
    t: float
    members: int
    voters: int
    healthy_voters: int
    learners: int
    leader: str
    quorum: bool
    names: tuple[str, ...]
    instances: dict[str, str] = field(default_factory=dict)  # instance id -> lifecycle state (control plane)

    @property
    def needed(self) -> int:
        return self.voters // 2 + 1


def _leads(status: dict[str, Any]) -> bool:
    """The answering member is the leader (its own ID is the leader ID it reports)."""
    return str((status.get("header") or {}).get("member_id", "")) == str(status.get("leader", "0"))


class EtcdObserver:
    def __init__(self, ca: str, cert: str, key: str, workdir: Path, timeout: float = 0.6) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, pem in (("ca.crt", ca), ("client.crt", cert), ("client.key", key)):
            (workdir / name).write_text(pem)
            paths.append(str(workdir / name))
        self.ctx = ssl.create_default_context(cafile=paths[0])
        self.ctx.load_cert_chain(paths[1], paths[2])
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=6, thread_name_prefix="observe")

    def post(self, url: str, path: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        req = urllib.request.Request(  # noqa: S310 (https URLs of etcd members)
            url + path,
            data=json.dumps(body or {}).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout or self.timeout, context=self.ctx) as resp:  # noqa: S310
            return json.loads(resp.read().decode() or "{}")

    def _status(self, url: str) -> dict[str, Any] | None:
        try:
            st = self.post(url, "/v3/maintenance/status")
        except Exception:
            return None
        return None if st.get("errors") or str(st.get("leader", "0")) == "0" else dict(st)

    def sample(self, endpoints: Sequence[str], instances: dict[str, str] | None = None) -> Sample:
        """One sample; a sample without quorum is taken again at once and only the second one counts.

        A sample is not atomic: the statuses are asked in parallel, then the member list, while a removal or a
        leadership hand-off may commit in between (seen: "2/4 healthy" in the one sample taken as a member was
        removed right after leadership moved off it; the writer lost nothing, etcd kept quorum throughout). A
        real quorum loss in the twin is a majority of etcd processes dead or stopped, which lasts seconds (an
        instance's replacement, a restore), so a second look a few milliseconds later still sees it."""
        first = self._sample_once(endpoints, instances)
        return first if first.quorum else self._sample_once(endpoints, instances)

    def _sample_once(self, endpoints: Sequence[str], instances: dict[str, str] | None) -> Sample:
        statuses = dict(zip(endpoints, self._pool.map(self._status, endpoints), strict=True))
        members = self._member_list(statuses)
        views, leader = [], ""
        leaders = {str(st.get("leader")) for st in statuses.values() if st}
        for m in members:
            client = (m.get("clientURLs") or [""])[0]
            st = statuses.get(client)
            if st is None and client and client not in statuses:
                st = self._status(client)
            mid = str(m.get("ID", ""))
            views.append(
                MemberView(
                    mid,
                    str(m.get("name", "")),
                    (m.get("peerURLs") or [""])[0],
                    client,
                    bool(m.get("isLearner", False)),
                    st is not None,
                )
            )
            if mid in leaders:
                leader = str(m.get("name", "")) or mid
        voters = [v for v in views if not v.is_learner]
        healthy = [v for v in voters if v.healthy]
        return Sample(
            time.time(),
            len(views),
            len(voters),
            len(healthy),
            len(views) - len(voters),
            leader,
            bool(voters) and len(healthy) >= len(voters) // 2 + 1 and bool(leader),
            tuple(sorted(v.name or f"<unstarted {v.id}>" for v in views)),
            dict(instances or {}),
        )

    def _member_list(self, statuses: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
        """The member list, the leader's first: etcd 3.4 lists members from the asked member's applied state, and
        a follower (or a member just removed) may still list a member that is gone."""
        answering = [(url, st) for url, st in statuses.items() if st is not None]
        for url, _ in sorted(answering, key=lambda pair: not _leads(pair[1])):
            try:
                return list(self.post(url, "/v3/cluster/member/list").get("members", []))
            except Exception:  # noqa: S112 (another member may answer)
                continue
        return []

    def members(self, endpoints: Sequence[str]) -> list[MemberView]:
        """Full views (for convergence checks)."""
        return [
            MemberView(
                str(m.get("ID", "")),
                str(m.get("name", "")),
                (m.get("peerURLs") or [""])[0],
                (m.get("clientURLs") or [""])[0],
                bool(m.get("isLearner", False)),
                self._status((m.get("clientURLs") or [""])[0]) is not None,
            )
            for m in self._member_list({u: self._status(u) for u in endpoints})
        ]

    # -- keys (the canary sentinel is written by the ops Lambda; the chaos writer writes here) -------------
    def put(self, endpoints: Sequence[str], key: str, value: str) -> int:
        """A write acknowledged by etcd (raft-committed); returns its revision. Raises if not acknowledged."""
        body = {"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(value.encode()).decode()}
        last: Exception | None = None
        for url in endpoints:
            try:
                doc = self.post(url, "/v3/kv/put", body, timeout=2.0)
                return int(doc["header"]["revision"])
            except Exception as err:
                last = err
        raise ConnectionError(f"no endpoint acknowledged the write: {last}")

    def get_prefix(self, endpoints: Sequence[str], prefix: str) -> dict[str, str]:
        """A linearizable range read of every key under ``prefix``."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        body = {"key": base64.b64encode(prefix.encode()).decode(), "range_end": base64.b64encode(end.encode()).decode()}
        last: Exception | None = None
        for url in endpoints:
            try:
                doc = self.post(url, "/v3/kv/range", body, timeout=3.0)
                return {
                    base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
                    for kv in doc.get("kvs", [])
                }
            except Exception as err:
                last = err
        raise ConnectionError(f"no endpoint answered the read: {last}")


class Timeline:
    """Samples at ``interval`` seconds in a thread; ``event()`` records lifecycle events."""

    def __init__(
        self,
        sample: Callable[[], Sample | None],
        interval: float = 0.25,
        on_sample: Callable[[Sample], None] | None = None,
    ) -> None:
        self._sample = sample
        self.interval = interval
        self.on_sample = on_sample
        self.samples: list[Sample] = []
        self.events: list[dict[str, Any]] = []
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="timeline", daemon=True)
        self.lock = threading.Lock()

    def start(self) -> Timeline:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def event(self, kind: str, **fields: Any) -> None:
        with self.lock:
            self.events.append({"t": time.time(), "kind": kind, **fields})

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                s = self._sample()
            except Exception:
                s = None
            if s is not None:
                with self.lock:
                    self.samples.append(s)
                if self.on_sample is not None:
                    self.on_sample(s)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))

    def samples_between(self, t0: float, t1: float) -> list[Sample]:
        with self.lock:
            return [s for s in self.samples if t0 <= s.t <= t1]

    def to_json(self) -> dict[str, Any]:
        with self.lock:
            return {"started": self.started, "samples": [asdict(s) for s in self.samples], "events": list(self.events)}

    def plot(self, path: Path, title: str = "etcd membership over time") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with self.lock:
            samples, events = list(self.samples), list(self.events)
        t0 = self.started
        ts = [s.t - t0 for s in samples]
        fig, ax = plt.subplots(figsize=(11, 4.5), dpi=110)
        ax.step(ts, [s.members for s in samples], where="post", label="members", color="tab:gray", lw=2.5, alpha=0.6)
        ax.step(ts, [s.healthy_voters for s in samples], where="post", label="healthy voters", color="tab:blue", lw=2)
        ax.step(ts, [s.learners for s in samples], where="post", label="learners", color="tab:orange", lw=1.5)
        ax.step(ts, [s.needed for s in samples], where="post", label="quorum needed", color="tab:red", lw=1, ls=":")
        marks = {"termination": ("tab:red", "--", "terminate"), "join": ("tab:green", "-", "join")}
        seen: set[str] = set()
        for e in events:
            if e["kind"] in marks:
                color, ls, label = marks[e["kind"]]
                ax.axvline(e["t"] - t0, color=color, ls=ls, lw=1, alpha=0.8, label=None if label in seen else label)
                seen.add(label)
        ax.set_xlabel("seconds since the twin started")
        ax.set_ylabel("count")
        ax.set_ylim(-0.2, max([s.members for s in samples] + [3]) + 1.2)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", ncol=3, fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
