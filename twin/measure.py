"""Figures from the timeline: per replacement, time to healthy again and the fewest healthy voters seen;
and the chaos writer, which records every acknowledged write so the history can be checked."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twin.observe import EtcdObserver, Sample


@dataclass
class Replacement:
    label: str
    terminated: list[str]
    started: float
    healthy_at: float | None = None
    min_healthy_voters: int | None = None
    quorum_lost_samples: int = 0
    samples: int = 0
    members_after: int | None = None
    ok: bool = False
    note: str = ""

    @property
    def seconds(self) -> float | None:
        return None if self.healthy_at is None else self.healthy_at - self.started

    def measure(self, samples: Sequence[Sample]) -> None:
        window = [s for s in samples if self.started <= s.t <= (self.healthy_at or time.time())]
        self.samples = len(window)
        if window:
            self.min_healthy_voters = min(s.healthy_voters for s in window)
            self.quorum_lost_samples = sum(1 for s in window if not s.quorum)
            self.members_after = window[-1].members


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def summarize(replacements: Sequence[Replacement]) -> dict[str, Any]:
    times = [r.seconds for r in replacements if r.seconds is not None]
    return {
        "replacements": len(replacements),
        "survived": sum(1 for r in replacements if r.ok),
        "min_healthy_voters": min(
            (r.min_healthy_voters for r in replacements if r.min_healthy_voters is not None), default=None
        ),
        "quorum_lost_samples": sum(r.quorum_lost_samples for r in replacements),
        "time_to_healthy_median_s": round(statistics.median(times), 2) if times else None,
        "time_to_healthy_p95_s": round(p95, 2) if (p95 := percentile(times, 0.95)) is not None else None,
        "time_to_healthy_max_s": round(max(times), 2) if times else None,
    }


@dataclass
class Write:
    key: str
    value: str
    revision: int
    acked_at: float


@dataclass
class Writer:
    """Writes ``prefix/<seq>`` keys throughout the run; a write counts only once etcd acknowledged it."""

    observer: EtcdObserver
    endpoints: Callable[[], list[str]]
    prefix: str = "chaos/"
    interval: float = 0.1
    acked: list[Write] = field(default_factory=list)
    failed: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Writer:
        self._thread = threading.Thread(target=self._loop, name="writer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        seq = 0
        while not self._stop.wait(self.interval):
            seq += 1
            key, value = f"{self.prefix}{seq:08d}", f"v{seq}-{time.time():.3f}"
            try:
                rev = self.observer.put(self.endpoints(), key, value)
            except Exception:
                self.failed += 1
                continue
            self.acked.append(Write(key, value, rev, time.time()))

    def check(self, read: dict[str, str], required: Callable[[Write], bool] = lambda w: True) -> list[str]:
        """Every required acknowledged write is readable with its value; no value appears that was never written."""
        problems = []
        written = {w.key: w.value for w in self.acked}
        for w in self.acked:
            if required(w) and read.get(w.key) != w.value:
                problems.append(f"lost acknowledged write {w.key} (rev {w.revision}): read {read.get(w.key)!r}")
        for key, value in read.items():
            if key in written and value != written[key]:
                problems.append(f"{key} reads {value!r}, which was never written")
        return problems
