"""The etcd lifecycle Lambda on a real 3-member TLS etcd cluster and moto: each case asserts the membership
that results and the lifecycle action sent (see conftest for what the harness drives)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from lambdas.common.termination import RETRY_KEY
from lambdas.etcd_lifecycle import handler as lifecycle
from tests.lambdas.conftest import HOOK, Env, sqs_event, terminate_event

pytestmark = pytest.mark.etcd


class Ctx:
    aws_request_id = "test-request"


def run(env: Env, *bodies: dict[str, Any] | str) -> dict[str, Any]:
    return lifecycle.handle(sqs_event(*bodies), Ctx())


def drain(env: Env, until: Any, timeout: float = 20.0) -> None:
    """Deliver the queue's (delayed) retries to the handler, as the SQS event source would, until ``until()``."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the retries did not get there in time"
        bodies = env.queued(wait=0.3)
        if bodies:
            run(env, *bodies)


def names(env: Env) -> list[str]:
    return env.etcd.member_names()


def test_normal_removal_removes_the_member_then_continues(handlers: Env) -> None:
    env = handlers
    leaving = env.instance_ids[0]
    result = run(env, env.begin_termination(leaving))
    assert result == {"batchItemFailures": []}
    assert not any(leaving in n for n in names(env)) and len(names(env)) == 2
    assert env.hooks.results(leaving) == ["CONTINUE"]
    env.etcd.kill(env.etcd.node_for(leaving).name)  # the instance goes away: the other two keep quorum
    assert env.etcd.client.put(env.etcd.endpoints, "/after", "ok") > 0


def test_a_member_already_removed_is_success(handlers: Env) -> None:
    env = handlers
    leaving = env.instance_ids[1]
    node = env.etcd.node_for(leaving)
    member_id = next(m.id for m in env.etcd.client.member_list(env.etcd.endpoints) if m.name == node.name)
    others = [n.client_url for n in env.etcd.nodes.values() if n is not node]
    env.etcd.client.member_remove(others, member_id)
    before = names(env)
    assert run(env, env.begin_termination(leaving)) == {"batchItemFailures": []}
    assert names(env) == before
    assert env.hooks.results(leaving) == ["CONTINUE"]


def test_a_terminating_member_that_is_already_down_is_removed(handlers: Env) -> None:
    env = handlers
    leaving = env.instance_ids[2]
    env.etcd.kill(env.etcd.node_for(leaving).name)
    run(env, env.begin_termination(leaving))
    assert len(names(env)) == 2 and not any(leaving in n for n in names(env))
    assert env.hooks.results(leaving) == ["CONTINUE"]


def test_removal_waits_while_another_member_is_down(handlers: Env) -> None:
    env = handlers
    leaving, down = env.instance_ids[0], env.instance_ids[1]
    env.etcd.kill(env.etcd.node_for(down).name)
    event = env.begin_termination(leaving)
    assert run(env, event) == {"batchItemFailures": []}
    assert len(names(env)) == 3, "removing a healthy member with another one down would lose quorum"
    assert env.hooks.results(leaving) == [], "the hook is not completed"
    assert ("heartbeat", leaving, "") in env.hooks.calls, "the hook is kept alive"
    retries = env.queued(wait=1.2)  # RETRY_DELAY_SECONDS=1: the retry is a delayed message
    assert len(retries) == 1 and retries[0][RETRY_KEY]["attempt"] == 2
    assert retries[0]["detail"] == event["detail"]
    env.etcd.restart(env.etcd.node_for(down).name)  # the other member is back: the retry removes
    run(env, retries[0])
    drain(env, lambda: env.hooks.results(leaving) == ["CONTINUE"])
    assert len(names(env)) == 2


def test_still_unsafe_past_the_deadline_abandons_and_keeps_the_member(handlers: Env) -> None:
    """The deadline runs from the first sight the cluster-state table recorded for this lifecycle action."""
    env = handlers
    leaving, down = env.instance_ids[0], env.instance_ids[2]
    env.etcd.kill(env.etcd.node_for(down).name)
    event = env.begin_termination(leaving)
    env.aws.first_seen(leaving, env.group_of[leaving], HOOK, time.time() - 3600)  # an hour ago
    event[RETRY_KEY] = {"attempt": 120, "firstSeen": time.time() - 3600}
    run(env, event)
    assert env.hooks.results(leaving) == ["ABANDON"], "the group retains on abandon: an operator decides"
    assert len(names(env)) == 3
    assert env.queued(wait=1.2) == []


def test_a_learner_is_removed_even_while_it_has_not_started(handlers: Env) -> None:
    env = handlers
    iid, ip = env.launch_instance(env.group_of[env.instance_ids[0]])
    env.etcd.add_learner_node(iid, ip, start=False)  # kubeadm added it, then the instance died before etcd ran
    assert len(names(env)) == 4
    run(env, env.begin_termination(iid))
    assert len(env.etcd.current_members()) == 3, "the unstarted learner is matched by peer URL"
    assert env.hooks.results(iid) == ["CONTINUE"]


def test_two_terminations_at_once_never_go_below_a_quorum_of_the_desired_size(handlers: Env) -> None:
    env = handlers
    first, second, staying = env.instance_ids
    run(env, env.begin_termination(first), env.begin_termination(second))
    assert env.hooks.results(first) == ["CONTINUE"] and env.hooks.results(second) == []
    voters = env.etcd.voter_names()
    assert len(voters) == 2 and any(second in n for n in voters), "the second removal waits"
    env.etcd.kill(env.etcd.node_for(first).name)
    # the first one's replacement joins as a learner and is promoted; only then can the second go
    iid, ip = env.launch_instance(env.group_of[first])
    node = env.etcd.add_learner_node(iid, ip)
    retry = env.queued(wait=1.2)
    run(env, *retry)
    assert env.hooks.results(second) == [], "not while a learner is in (one membership change at a time)"
    env.etcd.promote_when_ready(node)
    env.etcd.wait_healthy([node.name])
    drain(env, lambda: env.hooks.results(second) == ["CONTINUE"])
    assert sorted(env.etcd.voter_names()) == sorted([env.etcd.node_for(staying).name, node.name])


def test_a_crash_between_removal_and_completion_is_finished_by_the_redelivery(
    handlers: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = handlers
    leaving = env.instance_ids[1]
    event = env.begin_termination(leaving)

    def crash(*args: Any, **kwargs: Any) -> bool:
        raise ConnectionError("the Lambda's network went away after the removal")

    with monkeypatch.context() as patch:
        patch.setattr(env.aws, "complete", crash)
        result = run(env, event)
    assert result == {"batchItemFailures": [{"itemIdentifier": "m-0"}]}, "SQS will redeliver it"
    assert len(names(env)) == 2 and env.hooks.results(leaving) == []
    assert run(env, event) == {"batchItemFailures": []}  # the redelivery: member already gone
    assert env.hooks.results(leaving) == ["CONTINUE"] and len(names(env)) == 2


@pytest.mark.parametrize(
    "body",
    [
        "this is not JSON",
        {"detail-type": "EC2 Instance-terminate Lifecycle Action", "source": "aws.autoscaling", "detail": {}},
        {"detail-type": "EC2 Instance Launch Successful", "source": "aws.autoscaling",
         "detail": {"EC2InstanceId": "i-0123456789abcdef0"}},
    ],
    ids=["not-json", "no-instance", "wrong-event"],
)  # fmt: skip
def test_a_malformed_event_changes_nothing_and_goes_to_the_dead_letter_queue(
    handlers: Env, body: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    env = handlers
    before = names(env)
    assert run(env, body) == {"batchItemFailures": [{"itemIdentifier": "m-0"}]}
    assert names(env) == before and env.hooks.calls == []
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert any(line.get("message") == "rejected: malformed request" and line["level"] == "ERROR" for line in lines)


def test_an_unknown_group_changes_nothing_and_is_consumed(handlers: Env) -> None:
    """Rejected before any AWS call; consumed (a redelivery would be rejected again), logged."""
    env = handlers
    leaving = env.instance_ids[0]
    env.hooks.waiting[leaving] = "t"
    event = terminate_event("some-other-team-asg", leaving, "t")
    assert run(env, event) == {"batchItemFailures": []}
    assert len(names(env)) == 3 and env.hooks.calls == []


def test_unreachable_etcd_keeps_the_hook_alive_and_removes_nothing(handlers: Env) -> None:
    env = handlers
    leaving = env.instance_ids[0]
    for node in list(env.etcd.nodes.values()):
        env.etcd.kill(node.name)
    run(env, env.begin_termination(leaving))
    assert env.hooks.results(leaving) == [] and ("heartbeat", leaving, "") in env.hooks.calls
    assert len(env.queued(wait=1.2)) == 1
    for node in list(env.etcd.nodes.values()):
        env.etcd._start(node, "", "existing")
    env.etcd.wait_healthy(list(env.etcd.nodes))
    assert len(names(env)) == 3, "nothing was removed on a guess"


def test_a_leaving_leader_hands_leadership_off_before_removal(handlers: Env) -> None:
    env = handlers
    from lambdas.common.membership import observe

    view = observe(env.etcd.client, env.etcd.endpoints)
    assert view.leader is not None and view.leader.instance_id is not None
    leaving = view.leader.instance_id
    run(env, env.begin_termination(leaving))
    assert env.hooks.results(leaving) == ["CONTINUE"]
    others = [n.client_url for n in env.etcd.nodes.values() if n.instance_id != leaving]
    after = observe(env.etcd.client, others)
    assert after.leader is not None and after.leader.instance_id != leaving and len(after.members) == 2


def test_a_cluster_never_initialised_lets_termination_continue(handlers: Env) -> None:
    """No cluster-state item (node_agent.election: never initialised) and the stack's placeholder secret."""
    env = handlers
    env.forget_initialisation()
    env.aws.secretsmanager.put_secret_value(
        SecretId=env.aws.settings.etcd_client_secret_name, SecretString="placeholder"
    )
    leaving = env.instance_ids[0]
    run(env, env.begin_termination(leaving))
    assert env.hooks.results(leaving) == ["CONTINUE"] and len(names(env)) == 3
