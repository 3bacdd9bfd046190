"""Issue 15, "Found by fault injection on the twin": each fault replayed on real etcd (3.5, mutual TLS) and the
real reconciler and lifecycle Lambda over moto, with the stack's timings (stages/control_plane.py,
stages/etcd_lifecycle.py).

What is simulated, and how it is kept as unkind as AWS:

* time passing between reconciler runs: the reconciler's clock (``reconciler.now``) is moved, one run per
  simulated minute (the stack's schedule); etcd and moto run in real time.
* a terminated instance's address: AWS deletes the primary network interface at termination (its
  DeleteOnTermination is true) and "deleting a network interface ... releases any private IP addresses ... to be
  used by another instance" (Amazon EC2 User Guide, "Delete a network interface"). moto keeps the address taken
  until its instance object is garbage collected, so :func:`terminate_like_aws` frees it the way AWS does.
* a terminate hook's timeout: :class:`HookClock` expires a waiting action whose last heartbeat (or start) is more
  than its HeartbeatTimeout ago ("If the heartbeat timeout elapses, the instance ... takes the default action",
  Amazon EC2 Auto Scaling User Guide, "Amazon EC2 Auto Scaling lifecycle hooks"); moto has no lifecycle actions.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends

from lambdas.common.etcd_client import MemberRecord
from lambdas.common.membership import MembershipChangeInFlightError, add_learner
from lambdas.etcd_lifecycle import handler as lifecycle
from lambdas.reconciler import handler as reconciler
from stages.control_plane import CONTROL_PLANE_LAUNCH_TIMEOUT, CONTROL_PLANE_TERMINATE_TIMEOUT
from stages.etcd_lifecycle import FUNCTION_TIMEOUT, LEARNER_STALL_SECONDS, RECONCILE_EVERY
from tests.etcd_cluster import free_ip_in
from tests.lambdas.conftest import REGION, Env, _run_instance, sqs_event

pytestmark = pytest.mark.etcd

MINUTE = int(RECONCILE_EVERY.to_seconds())
START = 1_900_000_000.0  # the simulated clock's first reconciler run (epoch seconds)


class Ctx:
    aws_request_id = "fault-injection"


@pytest.fixture
def faults(handlers: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """The stack's join timings in the Lambdas' environment, as stages/etcd_lifecycle.py sets them."""
    monkeypatch.setenv("JOIN_TIMEOUT_SECONDS", str(CONTROL_PLANE_LAUNCH_TIMEOUT))
    monkeypatch.setenv("LEARNER_STALL_SECONDS", str(LEARNER_STALL_SECONDS))
    yield handlers


def reconcile_at(monkeypatch: pytest.MonkeyPatch, at: float) -> None:
    """One reconciler run at simulated time ``at`` (its requests go to the lifecycle queue)."""
    monkeypatch.setattr(reconciler, "now", lambda: at)
    reconciler.handle({"detail-type": "Scheduled Event", "source": "aws.events", "detail": {}}, Ctx())


def requests_of(env: Env) -> list[dict[str, Any]]:
    """What the reconciler asked the lifecycle Lambda for since the last look (the queue, drained)."""
    return env.queued()


def deliver(requests: list[dict[str, Any]]) -> dict[str, Any]:
    return lifecycle.handle(sqs_event(*requests), Ctx()) if requests else {"batchItemFailures": []}


def terminate_like_aws(env: Env, instance_id: str) -> None:
    """Terminate in moto, then free the address as AWS does when it deletes the primary interface."""
    described = env.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    env.terminate_in_ec2(instance_id)
    subnet = ec2_backends[DEFAULT_ACCOUNT_ID][REGION].get_subnet(env.subnet_id)
    subnet.del_subnet_ip(described["PrivateIpAddress"])


def member_ids(env: Env) -> set[str]:
    return {m.id for m in env.etcd.current_members()}


def add_unstarted_voter(env: Env, ip: str) -> str:
    """``etcdctl member add`` without --learner: a voting member that has not started (no name, no client URL)."""
    doc = env.etcd.client.call_any(env.etcd.endpoints, "/v3/cluster/member/add", {"peerURLs": [f"https://{ip}:2380"]})
    return MemberRecord.from_json(doc["member"]).id


# -- 1. a stray unstarted member -------------------------------------------------------------------------------------
def test_a_stray_unstarted_member_is_withdrawn_once_no_live_instance_held_its_address_longer_than_a_join_can_take(
    faults: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that died between its ``member add`` and its etcd starting leaves an unstarted member (etcd lists it
    with no name and no client URLs: "Member list", etcd v3 API). etcd keeps no creation time, so the reconciler
    measures from its own first sight, kept in the cluster-state table. While the member stays, every later join
    is refused (one change at a time); once no live instance has held its address for longer than a join can take
    (the launch hook's timeout), the lifecycle Lambda removes it, and the next join goes in."""
    env = faults
    stray_ip = free_ip_in(env.network)  # no instance holds it: its joiner is gone
    stray = add_unstarted_voter(env, stray_ip)
    endpoints = env.etcd.endpoints
    with pytest.raises(MembershipChangeInFlightError):
        add_learner(env.etcd.client, endpoints, f"https://{free_ip_in(env.network)}:2380")
    for minute in range(CONTROL_PLANE_LAUNCH_TIMEOUT // MINUTE + 1):
        reconcile_at(monkeypatch, START + minute * MINUTE)
        assert requests_of(env) == [], f"minute {minute}: still within a join's time"
    assert stray in member_ids(env)
    reconcile_at(monkeypatch, START + CONTROL_PLANE_LAUNCH_TIMEOUT + MINUTE)
    requests = requests_of(env)
    assert [(r["detail"]["kind"], r["detail"]["MemberId"], r["detail"]["why"]) for r in requests] == [
        ("withdraw-join", stray, "unclaimed")
    ]
    assert deliver(requests) == {"batchItemFailures": []}
    assert stray not in member_ids(env) and len(env.etcd.member_names()) == 3
    learner = add_learner(env.etcd.client, endpoints, f"https://{free_ip_in(env.network)}:2380")
    assert learner.id in member_ids(env), "the next join is no longer blocked"


def test_an_unstarted_member_whose_address_a_live_instance_holds_is_a_join_in_progress(
    faults: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same unstarted member, its address held by a running instance of the cluster: never asked for, however
    long; the clock starts when that instance is gone (terminated: AWS frees its address)."""
    env = faults
    joiner_ip = free_ip_in(env.network)
    joiner = _run_instance(env.ec2, env.subnet_id, joiner_ip)
    member = add_unstarted_voter(env, joiner_ip)
    for minute in (0, 15, 30, 45):
        reconcile_at(monkeypatch, START + minute * MINUTE)
        assert requests_of(env) == []
    terminate_like_aws(env, joiner)
    gone_at = START + 46 * MINUTE
    reconcile_at(monkeypatch, gone_at)
    reconcile_at(monkeypatch, gone_at + CONTROL_PLANE_LAUNCH_TIMEOUT)
    assert requests_of(env) == [], "not yet longer than a join can take since the address was last held"
    reconcile_at(monkeypatch, gone_at + CONTROL_PLANE_LAUNCH_TIMEOUT + MINUTE)
    requests = requests_of(env)
    assert [r["detail"]["MemberId"] for r in requests] == [member]
    deliver(requests)
    assert member not in member_ids(env)


def test_a_withdrawal_whose_address_a_new_instance_took_meanwhile_is_refused(
    faults: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Lambda looks again before removing: a request decided a run ago, for an address a live instance holds
    now, is someone's join in progress: deferred, the member stays."""
    env = faults
    ip = free_ip_in(env.network)
    member = add_unstarted_voter(env, ip)
    reconcile_at(monkeypatch, START)
    reconcile_at(monkeypatch, START + CONTROL_PLANE_LAUNCH_TIMEOUT + MINUTE)
    requests = requests_of(env)
    assert len(requests) == 1
    _run_instance(env.ec2, env.subnet_id, ip)  # a new joiner took the address after the request was sent
    deliver(requests)
    assert member in member_ids(env)


# -- 2. a redelivered event must not remove the newcomer's member by IP ----------------------------------------------
def test_a_late_request_for_a_gone_instance_does_not_remove_the_unstarted_member_of_a_newcomer_at_its_ip(
    faults: Env,
) -> None:
    """EC2 reuses private IPs. The leaving instance's member is removed and the instance terminated; a new
    instance gets the same address and its ``member add`` leaves an unstarted member there. A request for the old
    instance arriving again (a redelivery, a stale reconciler request) finds no member by name, and must not take
    the newcomer's by peer URL: EC2 shows another live instance holding the address."""
    env = faults
    leaving = env.instance_ids[0]
    leaving_ip = env.etcd.node_for(leaving).ip
    event = env.begin_termination(leaving)
    assert deliver([event]) == {"batchItemFailures": []}
    assert env.hooks.results(leaving) == ["CONTINUE"]
    env.etcd.kill(env.etcd.node_for(leaving).name)
    env.aws.autoscaling.detach_instances(
        InstanceIds=[leaving], AutoScalingGroupName=env.group_of[leaving], ShouldDecrementDesiredCapacity=True
    )
    terminate_like_aws(env, leaving)
    newcomer = _run_instance(env.ec2, env.subnet_id, leaving_ip)
    joining = env.etcd.add_learner_node(newcomer, leaving_ip, start=False)
    stale = {"source": "dedicated-k8s.reconciler", "detail-type": "Control-plane Member Cleanup",
             "detail": {"EC2InstanceId": leaving, "kind": "stale-member", "reason": "redelivered"}}  # fmt: skip
    deliver([stale])
    assert joining.member_id in member_ids(env), "the newcomer's join must survive the old instance's request"


# -- 3. a lost event behind another change: the waiting hook is kept alive -------------------------------------------
@dataclass
class HookClock:
    """Auto Scaling's HeartbeatTimeout on the harness's hooks, on the simulated clock: an action whose last
    heartbeat (or start) is more than ``timeout`` ago takes its default result (ABANDON: retained)."""

    env: Env
    timeout: int
    now: float = START
    last: dict[str, float] = field(default_factory=dict)
    timed_out: list[str] = field(default_factory=list)

    def start(self, instance_id: str) -> None:
        self.env.begin_termination(instance_id)
        self.last[instance_id] = self.now

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        recorder = self.env.hooks
        beat = recorder.heartbeat

        def heartbeat(instance_id: str, token: str | None) -> None:
            beat(instance_id, token)
            self.last[instance_id] = self.now

        monkeypatch.setattr(recorder, "heartbeat", heartbeat)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for iid in list(self.env.hooks.waiting):
            if self.now - self.last.get(iid, self.now) > self.timeout:
                del self.env.hooks.waiting[iid]
                self.timed_out.append(iid)


def test_a_lost_event_waiting_behind_another_change_is_kept_alive_until_its_removal_is_decided(
    faults: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stack's timings: terminate hook 300 s, default ABANDON with retain-on-abandon, reconciler every
    minute, one change at a time. An instance whose terminate event was lost waits behind a join in flight (a
    replacement's learner catching up) for longer than the hook's timeout. Every reconciler request the Lambda
    defers heartbeats the hook ("RecordLifecycleActionHeartbeat ... extends the timeout", Amazon EC2 Auto Scaling
    API Reference), so the hook outlives the wait and the removal completes CONTINUE once the learner is promoted:
    no Retained voter."""
    env = faults
    clock = HookClock(env, CONTROL_PLANE_TERMINATE_TIMEOUT)
    clock.install(monkeypatch)
    learner_ip = free_ip_in(env.network)
    replacement = _run_instance(env.ec2, env.subnet_id, learner_ip)
    learner = env.etcd.add_learner_node(replacement, learner_ip)  # started: it catches up, it does not stall
    leaving = env.instance_ids[1]
    clock.start(leaving)  # Terminating:Wait; its EventBridge event is lost
    for _ in range(2 * CONTROL_PLANE_TERMINATE_TIMEOUT // MINUTE):
        reconcile_at(monkeypatch, clock.now)
        requests = requests_of(env)
        assert [r["detail"]["kind"] for r in requests] == ["terminating"], "the learner is a join in progress"
        deliver(requests)
        assert any(leaving in n for n in env.etcd.member_names()), "not while the learner is in flight"
        clock.advance(MINUTE)
    assert clock.timed_out == [] and leaving in env.hooks.waiting
    env.etcd.promote_when_ready(learner)
    # Right after the promotion etcd's strict reconfiguration check refuses a removal until the new voter has been
    # connected for 5 s of real time ("etcdserver: unhealthy cluster"); the reconciler's next runs (a minute apart in
    # production) ask again, each deferral heartbeating the hook.
    deadline = time.monotonic() + 30
    while not env.hooks.results(leaving) and time.monotonic() < deadline:
        reconcile_at(monkeypatch, clock.now)
        deliver(requests_of(env))
        if not env.hooks.results(leaving):
            time.sleep(1)
            clock.advance(MINUTE)
    assert clock.timed_out == []
    assert env.hooks.results(leaving) == ["CONTINUE"]
    assert not any(leaving in n for n in env.etcd.member_names())


# -- 4. a joiner killed right after its member add -------------------------------------------------------------------
def test_a_joiner_killed_right_after_its_member_add_is_withdrawn_well_before_its_launch_hook_times_out(
    faults: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kubeadm's join adds the learner (``member add --learner``), then starts etcd. Killed in between, the
    learner never starts and never makes progress; while it stays, no removal may go on (one change at a time) and
    a leaving voter waits. The reconciler finds the learner stalled (no raft progress for LEARNER_STALL_SECONDS) and
    has it withdrawn; the voter's removal then proceeds, all well before the 900 s launch hook timeout."""
    env = faults
    joiner_ip = free_ip_in(env.network)
    joiner = _run_instance(env.ec2, env.subnet_id, joiner_ip)
    learner = env.etcd.add_learner_node(joiner, joiner_ip, start=False)
    terminate_like_aws(env, joiner)  # killed right after its member add
    leaving = env.instance_ids[2]
    env.begin_termination(leaving)  # event lost, as in the twin's run
    withdrawn_at = None
    for minute in range(CONTROL_PLANE_LAUNCH_TIMEOUT // MINUTE):
        at = START + minute * MINUTE
        reconcile_at(monkeypatch, at)
        requests = requests_of(env)
        deliver(requests)
        if learner.member_id not in member_ids(env):
            withdrawn_at = at - START
            break
    assert withdrawn_at is not None, "the dead joiner's learner was never withdrawn"
    assert withdrawn_at <= LEARNER_STALL_SECONDS + MINUTE
    # withdrawn, then the waiting removal on the next run (+ the Lambda's time): well inside the launch hook's 900 s
    assert withdrawn_at + 2 * MINUTE + FUNCTION_TIMEOUT.to_seconds() < CONTROL_PLANE_LAUNCH_TIMEOUT
    reconcile_at(monkeypatch, START + withdrawn_at + MINUTE)
    deliver(requests_of(env))
    assert env.hooks.results(leaving) == ["CONTINUE"] and not any(leaving in n for n in env.etcd.member_names())


def test_a_started_learner_whose_instance_is_terminated_is_withdrawn_at_the_next_run(
    faults: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A learner that started carries its instance ID in its name: EC2 reporting that instance terminated is proof
    its join is over, so no stall has to be waited out."""
    env = faults
    ip = free_ip_in(env.network)
    joiner = _run_instance(env.ec2, env.subnet_id, ip)
    learner = env.etcd.add_learner_node(joiner, ip)
    env.etcd.wait_healthy([learner.name])
    reconcile_at(monkeypatch, START)
    assert requests_of(env) == [], "a live learner catching up is a join in progress"
    env.etcd.kill(learner.name)
    terminate_like_aws(env, joiner)
    reconcile_at(monkeypatch, START + MINUTE)
    requests = requests_of(env)
    assert [(r["detail"]["MemberId"], r["detail"]["why"]) for r in requests] == [(learner.member_id, "instance-gone")]
    deliver(requests)
    assert learner.member_id not in member_ids(env)


def test_a_live_caught_up_learner_is_never_withdrawn(faults: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A learner that has caught up with the leader is waiting for its promotion, not stalled, however long."""
    env = faults
    ip = free_ip_in(env.network)
    joiner = _run_instance(env.ec2, env.subnet_id, ip)
    learner = env.etcd.add_learner_node(joiner, ip)
    env.etcd.wait_healthy([learner.name])
    for minute in range(0, 3 * CONTROL_PLANE_LAUNCH_TIMEOUT // MINUTE, 5):
        reconcile_at(monkeypatch, START + minute * MINUTE)
    assert requests_of(env) == [] and learner.member_id in member_ids(env)
