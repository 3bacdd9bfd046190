"""The API's internal Network Load Balancer: one TCP listener, one target group of *instance* targets.

A model as unkind as the real thing where the control plane depends on it (invariant 9 of
docs/architecture.md), each behaviour from the Elastic Load Balancing documentation:

* **Registration at InService, not before.** An Auto Scaling group registers an instance with its target
  groups only after its launch lifecycle hook completes (Amazon EC2 Auto Scaling user guide, "How lifecycle
  hooks work in Auto Scaling groups", step 3). The owner calls :meth:`LoadBalancer.register` then.
* **Health checks.** A registered target starts ``initial`` and receives no traffic until it passes
  ``healthy_threshold`` consecutive checks; ``unhealthy_threshold`` consecutive failures make it
  ``unhealthy`` (ELB, "Health checks for Network Load Balancer target groups": "The load balancer starts
  routing requests to a newly registered target as soon as ... the targets pass the initial health checks").
  Checks run every ``interval_seconds`` when the owner calls :meth:`LoadBalancer.check` on its clock, with a
  probe that says whether the target's API server answers.
* **Fail open.** When no target is healthy and some registered target has failed its checks, the NLB routes
  to every registered target regardless of health (same page: "If all targets fail health checks at the
  same time in all enabled Availability Zones, the load balancer fails open ... allow traffic to all
  targets"). Targets still ``initial`` never failed a check: with only those, there is no healthy target
  and the connection fails (the less available reading, kept on purpose).
* **Deregistration.** :meth:`LoadBalancer.deregister` puts the target in ``draining`` for
  ``deregistration_delay_seconds``: new connections stop at once, then the target is gone (ELB, "Edit target
  group attributes for your Network Load Balancer", Deregistration delay).
* **Cross-zone, random.** A connection goes to a random eligible target in any zone (cross-zone load
  balancing on; flow hash modelled as a fair random choice).
* **Hairpin.** With client IP preservation on (the default for instance targets, same attributes page), a
  target whose connection through an internal NLB is routed back to itself is dropped: source and
  destination are the same address and the connection times out (ELB, "Troubleshoot your Network Load
  Balancer": "Requests from a target to its load balancer time out"; AWS re:Post knowledge center
  "target-connection-fails-load-balancer").

State is a JSON document: in memory for unit tests (``path=None``) or a file under an ``flock`` (as
:mod:`twin.apiserver` does) so that every instance process of the twin sees one load balancer.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INITIAL, HEALTHY, UNHEALTHY, DRAINING = "initial", "healthy", "unhealthy", "draining"


class NoHealthyTargetError(ConnectionError):
    """The NLB has no target to send the connection to: the client sees a reset or a timeout."""


class HairpinError(ConnectionError):
    """The NLB routed a target's connection back to that target with client IP preservation on: dropped."""


@dataclass(frozen=True)
class TargetGroupSettings:
    """The target group's settings, as the template declares them (the caller reads them from it)."""

    interval_seconds: float
    healthy_threshold: int
    unhealthy_threshold: int
    deregistration_delay_seconds: float
    preserve_client_ip: bool
    port: int = 6443

    def __post_init__(self) -> None:
        problems = []
        if not self.interval_seconds > 0:
            problems.append(f"interval_seconds = {self.interval_seconds!r}: must be > 0")
        for name in ("healthy_threshold", "unhealthy_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 10:
                problems.append(f"{name} = {value!r}: must be a whole number from 2 to 10 (the ELB API's range)")
        if self.deregistration_delay_seconds < 0:
            problems.append(f"deregistration_delay_seconds = {self.deregistration_delay_seconds!r}: must be >= 0")
        if problems:
            raise ValueError("invalid target group settings: " + "; ".join(problems))


class _State:
    """One JSON document, read and written under a lock: a dict in memory, or a file under an flock."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._memory: dict[str, Any] = {"targets": {}, "last_check": None}
        self._thread_lock = threading.RLock()

    @contextmanager
    def edit(self) -> Iterator[dict[str, Any]]:
        with self._thread_lock:
            if self.path is None:
                yield self._memory
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_suffix(".lock"), "a+") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                try:
                    doc = (
                        json.loads(self.path.read_text()) if self.path.exists() else {"targets": {}, "last_check": None}
                    )
                    yield doc
                    tmp = self.path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(doc))
                    tmp.replace(self.path)
                finally:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


class LoadBalancer:
    """The internal NLB at ``dns_name``: register/deregister instance targets, run health checks, connect."""

    def __init__(
        self,
        dns_name: str,
        settings: TargetGroupSettings,
        *,
        path: Path | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if not dns_name or dns_name != dns_name.strip():
            raise ValueError(f"load balancer DNS name {dns_name!r}: must be a non-empty name")
        self.dns_name = dns_name
        self.settings = settings
        self.clock = clock  # wall clock by default: the stamps are shared between processes
        self.rng = rng or random.SystemRandom()
        self._state = _State(path)

    # -- targets -------------------------------------------------------------------------------------------
    def register(self, instance_id: str, ip: str) -> None:
        """The group registers an instance that became InService: ``initial`` until it passes its checks.
        Registering a registered target again changes nothing (RegisterTargets is idempotent)."""
        if not instance_id.startswith("i-"):
            raise ValueError(f"instance target {instance_id!r}: must be an EC2 instance ID (i-...)")
        ipaddress.ip_address(ip)  # raises ValueError naming the bad address
        with self._state.edit() as doc:
            current = doc["targets"].get(instance_id)
            if current is not None and current["state"] != DRAINING:
                return
            doc["targets"][instance_id] = {"ip": ip, "state": INITIAL, "passes": 0, "fails": 0, "until": None}

    def deregister(self, instance_id: str) -> None:
        """No new connection goes to the target from now on; it is forgotten after the deregistration delay."""
        with self._state.edit() as doc:
            target = doc["targets"].get(instance_id)
            if target is None or target["state"] == DRAINING:
                return
            target["state"] = DRAINING
            target["until"] = self.clock() + self.settings.deregistration_delay_seconds

    def states(self) -> dict[str, str]:
        """instance ID -> initial | healthy | unhealthy | draining (DescribeTargetHealth)."""
        with self._state.edit() as doc:
            self._expire(doc)
            return {i: t["state"] for i, t in doc["targets"].items()}

    # -- health checks -------------------------------------------------------------------------------------
    def check(self, probe: Callable[[str], bool], *, force: bool = False) -> bool:
        """One round of health checks if ``interval_seconds`` passed since the last (or ``force``): ``probe(ip)``
        says whether that target's API server answers. Returns whether a round ran."""
        with self._state.edit() as doc:
            now = self.clock()
            last = doc.get("last_check")
            if not force and last is not None and now - last < self.settings.interval_seconds:
                return False
            doc["last_check"] = now
            self._expire(doc)
            for target in doc["targets"].values():
                if target["state"] == DRAINING:
                    continue
                if probe(target["ip"]):
                    target["passes"], target["fails"] = target["passes"] + 1, 0
                    if target["passes"] >= self.settings.healthy_threshold:
                        target["state"] = HEALTHY
                else:
                    target["passes"], target["fails"] = 0, target["fails"] + 1
                    if target["fails"] >= self.settings.unhealthy_threshold:
                        target["state"] = UNHEALTHY
            return True

    def _expire(self, doc: dict[str, Any]) -> None:
        now = self.clock()
        for instance_id in [i for i, t in doc["targets"].items() if t["state"] == DRAINING and t["until"] <= now]:
            del doc["targets"][instance_id]

    # -- traffic -------------------------------------------------------------------------------------------
    def connect(self, source_ip: str, port: int) -> str:
        """A new TCP connection from ``source_ip`` to the listener on ``port``: the target IP it reaches.

        Raises :class:`NoHealthyTargetError` or :class:`HairpinError` (both ``ConnectionError``) naming why."""
        if port != self.settings.port:
            raise ConnectionRefusedError(
                f"{self.dns_name}:{port}: no listener on that port (only {self.settings.port})"
            )
        with self._state.edit() as doc:
            self._expire(doc)
            live = [t for t in doc["targets"].values() if t["state"] != DRAINING]
            eligible = [t for t in live if t["state"] == HEALTHY]
            if not eligible and any(t["state"] == UNHEALTHY for t in live):
                eligible = live  # fail open: every registered target, whatever its health
            if not eligible:
                described = ", ".join(f"{i}={t['state']}" for i, t in doc["targets"].items()) or "none registered"
                raise NoHealthyTargetError(
                    f"{self.dns_name}:{port}: no healthy target (targets: {described}); the NLB resets the connection"
                )
            chosen = str(self.rng.choice(eligible)["ip"])
        if self.settings.preserve_client_ip and chosen == source_ip:
            raise HairpinError(
                f"{self.dns_name}:{port}: hairpin: a target's connection to itself through the NLB is dropped "
                f"({source_ip} -> {chosen} with client IP preservation on; the connection times out)"
            )
        return chosen
