"""The reconciler on real etcd and moto: a lost event and a stale member are repaired through the lifecycle
Lambda's queue (the single writer); a member that is merely unreachable is never touched."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lambdas.common.cluster_aws import SettingsError
from lambdas.common.join_watch import JoinTimings
from lambdas.common.join_withdrawal import WithdrawalRequest
from lambdas.etcd_lifecycle import handler as lifecycle
from lambdas.reconciler import handler as reconciler
from tests.lambdas.conftest import TABLE, Env, sqs_event

pytestmark = pytest.mark.etcd


class Ctx:
    aws_request_id = "test-request"


def reconcile(env: Env) -> dict[str, Any]:
    return reconciler.handle({"detail-type": "Scheduled Event", "source": "aws.events", "detail": {}}, Ctx())


def test_a_lost_terminate_event_is_recovered_by_the_reconciler(handlers: Env) -> None:
    env = handlers
    leaving = env.instance_ids[0]
    env.begin_termination(leaving)  # Terminating:Wait, and the EventBridge event never arrives
    assert reconcile(env)["requests"] == 1
    requests = env.queued()
    assert [r["detail"]["kind"] for r in requests] == ["terminating"]
    assert requests[0]["detail"]["EC2InstanceId"] == leaving
    assert lifecycle.handle(sqs_event(*requests), Ctx()) == {"batchItemFailures": []}
    assert env.hooks.results(leaving) == ["CONTINUE"]
    assert not any(leaving in n for n in env.etcd.member_names())


def test_a_member_whose_instance_is_terminated_is_removed(handlers: Env) -> None:
    env = handlers
    gone = env.instance_ids[2]
    env.aws.autoscaling.detach_instances(
        InstanceIds=[gone], AutoScalingGroupName=env.group_of[gone], ShouldDecrementDesiredCapacity=True
    )
    env.terminate_in_ec2(gone)
    env.etcd.kill(env.etcd.node_for(gone).name)
    assert reconcile(env)["requests"] == 1
    requests = env.queued()
    assert [r["detail"]["kind"] for r in requests] == ["stale-member"]
    lifecycle.handle(sqs_event(*requests), Ctx())
    assert len(env.etcd.member_names()) == 2 and not any(gone in n for n in env.etcd.member_names())
    assert env.hooks.calls == [], "no hook is involved for a stale member"


def test_an_unreachable_member_of_a_running_instance_is_never_removed(handlers: Env) -> None:
    env = handlers
    env.etcd.kill(env.etcd.node_for(env.instance_ids[1]).name)
    assert reconcile(env)["requests"] == 0
    assert env.queued() == [] and len(env.etcd.member_names()) == 3


def test_a_stale_member_request_for_a_running_instance_is_ignored(handlers: Env) -> None:
    """Even if asked, the Lambda re-checks EC2: nothing is removed on a guess."""
    env = handlers
    alive = env.instance_ids[1]
    request = {"source": "dedicated-k8s.reconciler", "detail-type": "Control-plane Member Cleanup",
               "detail": {"EC2InstanceId": alive, "kind": "stale-member", "reason": "test"}}  # fmt: skip
    lifecycle.handle(sqs_event(request), Ctx())
    assert len(env.etcd.member_names()) == 3


def test_the_reconciler_publishes_the_membership_metrics(handlers: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env = handlers
    env.etcd.kill(env.etcd.node_for(env.instance_ids[0]).name)
    reconcile(env)
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    metrics = docs[-1]
    assert metrics["EtcdMembers"] == 3 and metrics["HealthyVoters"] == 2 and metrics["QuorumMargin"] == 0
    assert metrics["ClusterName"] == "lambdatest" and metrics["RetainedInstances"] == 0
    assert metrics["TerminatingWaits"] == 0
    assert {m["Name"] for m in metrics["_aws"]["CloudWatchMetrics"][0]["Metrics"]} >= {"EtcdMembers", "QuorumMargin"}


@pytest.mark.parametrize(
    ("env", "named"),
    [
        pytest.param({"LEARNER_STALL_SECONDS": "300"}, "JOIN_TIMEOUT_SECONDS", id="join timeout missing"),
        pytest.param(
            {"JOIN_TIMEOUT_SECONDS": "900", "LEARNER_STALL_SECONDS": "-5"}, "LEARNER_STALL_SECONDS", id="negative stall"
        ),
        pytest.param(
            {"JOIN_TIMEOUT_SECONDS": "900", "LEARNER_STALL_SECONDS": "900"},
            "LEARNER_STALL_SECONDS",
            id="stall not shorter than a join",
        ),
    ],
)
def test_join_timings_that_make_no_sense_are_refused_naming_the_setting(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        JoinTimings.from_env(env)


@pytest.mark.parametrize(
    ("detail", "named"),
    [
        pytest.param(
            {"MemberId": "deadbeef", "PeerUrl": "https://10.0.0.9:2380", "why": "stalled"},
            "MemberId",
            id="member ID not decimal",
        ),
        pytest.param(
            {"MemberId": "42", "PeerUrl": "http://10.0.0.9:2380", "why": "stalled"}, "PeerUrl", id="peer URL not https"
        ),
        pytest.param(
            {"MemberId": "42", "PeerUrl": "https://10.0.0.9:2380", "why": "because"}, "why", id="unknown reason"
        ),
    ],
)
def test_a_malformed_withdrawal_is_refused_naming_the_field_and_nothing_is_removed(
    handlers: Env, detail: dict[str, str], named: str
) -> None:
    env = handlers
    body = {"source": "dedicated-k8s.reconciler", "detail-type": "Control-plane Member Cleanup",
            "detail": {"kind": "withdraw-join", **detail}}  # fmt: skip
    with pytest.raises(ValueError, match=named):
        WithdrawalRequest.parse(body)
    assert lifecycle.handle(sqs_event(body), Ctx()) == {"batchItemFailures": [{"itemIdentifier": "m-0"}]}
    assert len(env.etcd.member_names()) == 3


def test_an_unreadable_join_record_is_an_error_never_a_first_sight(handlers: Env) -> None:
    """The records measure how long a join has been abandoned: a corrupt item read as "nothing seen yet" would
    restart every clock and keep an abandoned join forever, so the run fails (Lambda error metric, alarm)."""
    env = handlers
    env.dynamodb.put_item(TableName=TABLE, Item={"pk": {"S": "join-watch"}, "members": {"S": '{"1": {"member_'},
                                                 "version": {"N": "3"}})  # fmt: skip
    env.etcd.add_learner_node(start=False)
    with pytest.raises(ValueError, match="join-watch"):
        reconcile(env)
