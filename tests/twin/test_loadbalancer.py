"""The API NLB model (twin/loadbalancer.py): each test names the Elastic Load Balancing behaviour it stands for."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from twin.loadbalancer import (
    DRAINING,
    HEALTHY,
    INITIAL,
    UNHEALTHY,
    HairpinError,
    LoadBalancer,
    NoHealthyTargetError,
    TargetGroupSettings,
)

NAME = "dk8s-demo-api-0123456789.elb.eu-west-1.amazonaws.com"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lb(clock: Clock, *, preserve: bool = True, path: Path | None = None, seed: int = 7) -> LoadBalancer:
    settings = TargetGroupSettings(interval_seconds=10, healthy_threshold=3, unhealthy_threshold=2,
                                   deregistration_delay_seconds=30, preserve_client_ip=preserve)  # fmt: skip
    return LoadBalancer(NAME, settings, path=path, clock=clock, rng=random.Random(seed))


def _checks(lb: LoadBalancer, clock: Clock, rounds: int, probe: object = lambda ip: True) -> None:
    for _ in range(rounds):
        clock.now += lb.settings.interval_seconds
        assert lb.check(probe)  # type: ignore[arg-type]


def test_a_registered_target_gets_no_traffic_until_it_passed_the_healthy_threshold() -> None:
    """ELB "Health checks for Network Load Balancer target groups": routing to a newly registered target starts
    once it passes the initial health checks (HealthyThresholdCount consecutive successes)."""
    clock = Clock()
    lb = _lb(clock)
    with pytest.raises(NoHealthyTargetError, match=r"no healthy target .*none registered"):
        lb.connect("10.0.0.9", 6443)
    lb.register("i-0000000000000000a", "10.0.0.1")
    _checks(lb, clock, 2)
    assert lb.states() == {"i-0000000000000000a": INITIAL}
    with pytest.raises(NoHealthyTargetError, match="i-0000000000000000a=initial"):
        lb.connect("10.0.0.9", 6443)
    _checks(lb, clock, 1)
    assert lb.states() == {"i-0000000000000000a": HEALTHY}
    assert lb.connect("10.0.0.9", 6443) == "10.0.0.1"


def test_checks_run_on_the_interval_only() -> None:
    """HealthCheckIntervalSeconds: one round per interval, however often the owner's clock ticks."""
    clock = Clock()
    lb = _lb(clock)
    lb.register("i-0000000000000000a", "10.0.0.1")
    assert lb.check(lambda ip: True)
    clock.now += 9.9
    assert not lb.check(lambda ip: True)
    assert lb.check(lambda ip: True, force=True)


def test_consecutive_failures_make_a_target_unhealthy_and_a_pass_resets_the_count() -> None:
    """UnhealthyThresholdCount consecutive failures mark a target unhealthy; the count is of consecutive checks."""
    clock = Clock()
    lb = _lb(clock)
    lb.register("i-0000000000000000a", "10.0.0.1")
    lb.register("i-0000000000000000b", "10.0.0.2")
    _checks(lb, clock, 3)
    answers = {"10.0.0.1": iter([False, True, False, False]), "10.0.0.2": iter([True] * 4)}
    _checks(lb, clock, 2, lambda ip: next(answers[ip]))
    assert lb.states()["i-0000000000000000a"] == HEALTHY  # fail, pass: no two in a row
    _checks(lb, clock, 2, lambda ip: next(answers[ip]))
    assert lb.states() == {"i-0000000000000000a": UNHEALTHY, "i-0000000000000000b": HEALTHY}
    assert {lb.connect("10.0.0.9", 6443) for _ in range(30)} == {"10.0.0.2"}


def test_all_targets_unhealthy_fails_open_to_every_registered_target() -> None:
    """ELB health checks page: "If all targets fail health checks at the same time in all enabled Availability
    Zones, the load balancer fails open" (traffic to all targets, whatever their health)."""
    clock = Clock()
    lb = _lb(clock)
    lb.register("i-0000000000000000a", "10.0.0.1")
    lb.register("i-0000000000000000b", "10.0.0.2")
    _checks(lb, clock, 2, lambda ip: False)
    assert set(lb.states().values()) == {UNHEALTHY}
    assert {lb.connect("10.0.0.9", 6443) for _ in range(40)} == {"10.0.0.1", "10.0.0.2"}


def test_cross_zone_choice_spreads_over_the_healthy_targets() -> None:
    """Cross-zone load balancing: each connection may reach any healthy target (flow hash ~ fair random)."""
    clock = Clock()
    lb = _lb(clock, preserve=False)
    for n in range(3):
        lb.register(f"i-000000000000000{n}a", f"10.0.{n}.1")
    _checks(lb, clock, 3)
    reached = [lb.connect("10.0.9.9", 6443) for _ in range(300)]
    assert {ip: reached.count(ip) for ip in set(reached)}.keys() == {"10.0.0.1", "10.0.1.1", "10.0.2.1"}
    assert min(reached.count(ip) for ip in set(reached)) > 60  # ~100 each


def test_a_targets_connection_to_itself_is_dropped_with_client_ip_preservation() -> None:
    """ELB "Troubleshoot your Network Load Balancer" (requests from a target to its load balancer time out):
    an internal NLB with instance targets preserves the client IP, so a connection routed back to its source
    is dropped; it succeeds only when routed to another target. Off: the source is the NLB's own address."""
    clock = Clock()
    lb = _lb(clock)
    lb.register("i-0000000000000000a", "10.0.0.1")
    lb.register("i-0000000000000000b", "10.0.0.2")
    _checks(lb, clock, 3)
    outcomes = []
    for _ in range(200):
        try:
            outcomes.append(lb.connect("10.0.0.1", 6443))
        except HairpinError as err:
            assert "hairpin: a target's connection to itself through the NLB is dropped" in str(err)
            outcomes.append("dropped")
    assert set(outcomes) == {"10.0.0.2", "dropped"}
    assert 60 < outcomes.count("dropped") < 140  # about half of the time with two targets
    lb_off = _lb(clock, preserve=False)
    lb_off.register("i-0000000000000000a", "10.0.0.1")
    _checks(lb_off, clock, 3)
    assert lb_off.connect("10.0.0.1", 6443) == "10.0.0.1"


def test_deregistration_stops_new_connections_at_once_and_forgets_after_the_delay() -> None:
    """ELB target group attributes, "Deregistration delay": a deregistering target gets no new connections while
    draining, and leaves the group when the delay ends."""
    clock = Clock()
    lb = _lb(clock)
    lb.register("i-0000000000000000a", "10.0.0.1")
    lb.register("i-0000000000000000b", "10.0.0.2")
    _checks(lb, clock, 3)
    lb.deregister("i-0000000000000000a")
    assert lb.states()["i-0000000000000000a"] == DRAINING
    assert {lb.connect("10.0.0.9", 6443) for _ in range(30)} == {"10.0.0.2"}
    clock.now += 29
    assert "i-0000000000000000a" in lb.states()
    clock.now += 1
    assert lb.states() == {"i-0000000000000000b": HEALTHY}


def test_bad_input_is_refused_by_name_and_changes_nothing() -> None:
    clock = Clock()
    lb = _lb(clock)
    with pytest.raises(ValueError, match="EC2 instance ID"):
        lb.register("web-1", "10.0.0.1")
    with pytest.raises(ValueError, match=r"10\.0\.0\.300"):
        lb.register("i-0000000000000000a", "10.0.0.300")
    assert lb.states() == {}
    with pytest.raises(ConnectionRefusedError, match="no listener on that port"):
        lb.connect("10.0.0.9", 443)
    with pytest.raises(ValueError, match="healthy_threshold = 1"):
        TargetGroupSettings(interval_seconds=10, healthy_threshold=1, unhealthy_threshold=2,
                            deregistration_delay_seconds=0, preserve_client_ip=True)  # fmt: skip


def test_state_in_a_file_is_one_load_balancer_for_every_process(tmp_path: Path) -> None:
    """The twin runs each instance as a process: two LoadBalancer objects on one file see the same targets."""
    clock = Clock()
    path = tmp_path / "nlb.json"
    group, instance = _lb(clock, path=path), _lb(clock, path=path)
    group.register("i-0000000000000000a", "10.0.0.1")
    _checks(group, clock, 3)
    assert instance.states() == {"i-0000000000000000a": HEALTHY}
    assert instance.connect("10.0.0.9", 6443) == "10.0.0.1"
    group.deregister("i-0000000000000000a")
    with pytest.raises(NoHealthyTargetError):
        instance.connect("10.0.0.9", 6443)
