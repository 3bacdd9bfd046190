"""The lifecycle Lambda acts only on what AWS itself confirms (lambdas/common/verify.py, issue 15): on a real
3-member TLS etcd cluster and moto, with conftest's HookRecorder as Auto Scaling's lifecycle actions and states.

Modelled AWS behaviour, and where it is documented:

* DescribeAutoScalingInstances reports each instance's group and LifecycleState (``InService``,
  ``Terminating:Wait`` while a terminate hook holds it, ``Terminating:Proceed`` once completed):
  AutoScalingInstanceDetails, Amazon EC2 Auto Scaling API Reference; "How lifecycle hooks work in Amazon EC2
  Auto Scaling groups", Amazon EC2 Auto Scaling User Guide. moto says InService always; conftest's
  HarnessAws gives the state the hook is in.
* RecordLifecycleActionHeartbeat succeeds only for a live lifecycle action of that hook, token and instance
  ("Records a heartbeat for the lifecycle action associated with the specified token or instance",
  RecordLifecycleActionHeartbeat, Amazon EC2 Auto Scaling API Reference); otherwise a ValidationError "No
  active Lifecycle Action found".
* A DynamoDB PutItem with ``attribute_not_exists(pk)`` writes only when no item has that key, atomically
  ("Condition expressions", Amazon DynamoDB Developer Guide): the first sight of a lifecycle action is kept.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from lambdas.common.cluster_aws import ClusterStateError, CredentialsUnreadableError
from lambdas.common.termination import RETRY_KEY, MalformedRetryKeyError, TerminationRequest
from lambdas.etcd_lifecycle import handler as lifecycle
from lambdas.reconciler import handler as reconciler
from tests.lambdas.conftest import GROUPS, HOOK, REGION, TABLE, Env, settings, sqs_event, terminate_event
from tests.lambdas.test_drain import DrainEnv, drain_env, kube, node_name  # noqa: F401 (fixtures)

pytestmark = pytest.mark.etcd


class Ctx:
    aws_request_id = "test-request"


def run(*bodies: dict[str, Any] | str) -> dict[str, Any]:
    return lifecycle.handle(sqs_event(*bodies), Ctx())


def rejections(out: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("message") == "termination rejected"]


def test_a_replayed_event_and_a_stale_member_request_for_a_running_voter_remove_nothing(
    handlers: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """A terminate event for an InService instance (stale, replayed or forged: Auto Scaling reports it
    InService) and a stale-member request for a running instance: nothing removed, no hook call, each
    rejection one ERROR line naming instance, group, AWS's state and the reason, both consumed."""
    env = handlers
    voter, running = env.instance_ids[0], env.instance_ids[1]
    replayed = terminate_event(env.group_of[voter], voter, "token-from-last-week")
    stale = {"source": "dedicated-k8s.reconciler", "detail-type": "Control-plane Member Cleanup",
             "detail": {"EC2InstanceId": running, "kind": "stale-member", "reason": "forged"}}  # fmt: skip
    assert run(replayed, stale) == {"batchItemFailures": []}, "consumed: a redelivery would be rejected again"
    assert len(env.etcd.member_names()) == 3 and len(env.etcd.voter_names()) == 3
    assert env.hooks.calls == []
    logged = {line["instance_id"]: line for line in rejections(capsys.readouterr().out)}
    assert set(logged) == {voter, running}
    assert logged[voter]["level"] == "ERROR" and logged[voter]["group"] == env.group_of[voter]
    assert logged[voter]["aws_state"] == "InService" and "not leaving" in logged[voter]["reason"]
    assert logged[running]["aws_state"] == "running" and "on a guess" in logged[running]["reason"]


def test_an_event_naming_another_group_or_a_dead_token_removes_nothing(handlers: Env) -> None:
    """The instance really waits in Terminating:Wait, but the message names a group Auto Scaling does not put
    it in, or a token that is not its live action's (the heartbeat is refused): rejected, member kept."""
    env = handlers
    leaving = env.instance_ids[1]
    real = env.begin_termination(leaving)
    wrong_group = terminate_event(GROUPS[0], leaving, real["detail"]["LifecycleActionToken"])
    dead_token = terminate_event(env.group_of[leaving], leaving, "token-of-an-earlier-action")
    assert run(wrong_group, dead_token) == {"batchItemFailures": []}
    assert len(env.etcd.member_names()) == 3 and env.hooks.results(leaving) == []
    assert [c for c in env.hooks.calls if c[0] == "heartbeat"] == [], "the refused heartbeat changed nothing"
    assert run(real) == {"batchItemFailures": []}  # the real one still goes through
    assert env.hooks.results(leaving) == ["CONTINUE"] and len(env.etcd.member_names()) == 2
    assert run(real) == {"batchItemFailures": []}  # redelivered after completion: Terminating:Proceed, no hook
    assert env.hooks.results(leaving) == ["CONTINUE"] and len(env.etcd.member_names()) == 2


def test_a_running_worker_sent_for_a_control_plane_group_is_not_drained(drain_env: DrainEnv) -> None:  # noqa: F811
    """A worker InService in its worker group, its ID in a terminate event for a control-plane group: no
    cordon, no eviction, its Node kept, no etcd call, no hook call."""
    d = drain_env
    worker = d.launch_worker()
    d.env.aws.autoscaling.attach_instances(InstanceIds=[worker], AutoScalingGroupName=d.env.group_of[worker])
    d.kube.add_node(node_name(worker), worker)
    d.env.hooks.waiting[worker] = "forged"  # even a token the recorder would accept
    assert d.run(terminate_event(GROUPS[0], worker, "forged")) == {"batchItemFailures": []}
    assert d.journal == [] and node_name(worker) in d.kube.nodes
    assert d.env.hooks.calls == [] and len(d.env.etcd.member_names()) == 3


def _retry_keyed(event: dict[str, Any], key: Any) -> str:
    return json.dumps({**event, RETRY_KEY: key})  # NaN goes out as the bare NaN token, as json.dumps writes it


def test_malformed_retry_keys_are_consumed_and_the_good_record_of_the_batch_succeeds(handlers: Env) -> None:
    """Six bad keys for one waiting instance and one good event for another, in one batch: the good one is
    removed and continued, each bad one rejected and consumed, and nothing is done for its instance."""
    env = handlers
    forged_for, leaving = env.instance_ids[0], env.instance_ids[2]
    bad_event = env.begin_termination(forged_for)
    now = time.time()
    bad = [
        _retry_keyed(bad_event, {"attempt": "two", "firstSeen": now}),
        _retry_keyed(bad_event, {"attempt": 1.5, "firstSeen": now}),
        _retry_keyed(bad_event, {"attempt": 2, "firstSeen": "yesterday"}),
        _retry_keyed(bad_event, {"attempt": 2, "firstSeen": math.nan}),
        _retry_keyed(bad_event, {"attempt": 2, "firstSeen": 0}),
        _retry_keyed(bad_event, {"attempt": 2, "firstSeen": now + 86400}),
    ]
    assert run(*bad, env.begin_termination(leaving)) == {"batchItemFailures": []}
    assert env.hooks.results(leaving) == ["CONTINUE"] and not any(leaving in n for n in env.etcd.member_names())
    assert any(forged_for in n for n in env.etcd.member_names())
    assert [c for c in env.hooks.calls if c[1] == forged_for] == []


def test_a_message_claiming_an_old_first_sight_does_not_move_the_deadline(handlers: Env) -> None:
    """Unsafe now (a member down): a message claiming it was first seen an hour ago (past the 600 s deadline
    of the harness) is retried, not abandoned, because the table recorded its first sight just now."""
    env = handlers
    leaving, down = env.instance_ids[0], env.instance_ids[1]
    env.etcd.kill(env.etcd.node_for(down).name)
    event = env.begin_termination(leaving)
    event[RETRY_KEY] = {"attempt": 3, "firstSeen": time.time() - 3600}
    assert run(event) == {"batchItemFailures": []}
    assert env.hooks.results(leaving) == [] and ("heartbeat", leaving, "") in env.hooks.calls
    assert len(env.etcd.member_names()) == 3
    (retry,) = env.queued(wait=1.2)
    assert retry[RETRY_KEY]["attempt"] == 4


def test_a_truncated_etcd_client_secret_on_an_initialised_cluster_is_an_error_not_a_skip(handlers: Env) -> None:
    """The cluster-state item says initialised: a truncated secret fails the record (SQS redelivers it, then
    the DLQ, alarmed) instead of completing CONTINUE with the member still voting; the reconciler fails too
    instead of reporting "never initialised". Once the secret is whole again the redelivery removes."""
    env = handlers
    name = env.aws.settings.etcd_client_secret_name
    whole = env.aws.secretsmanager.get_secret_value(SecretId=name)["SecretString"]
    env.aws.secretsmanager.put_secret_value(SecretId=name, SecretString=whole[: len(whole) // 2])
    leaving = env.instance_ids[0]
    event = env.begin_termination(leaving)
    assert run(event) == {"batchItemFailures": [{"itemIdentifier": "m-0"}]}
    assert env.hooks.results(leaving) == [] and len(env.etcd.member_names()) == 3
    with pytest.raises(CredentialsUnreadableError, match=name):
        reconciler.handle({"detail-type": "Scheduled Event", "source": "aws.events", "detail": {}}, Ctx())
    env.aws.secretsmanager.put_secret_value(SecretId=name, SecretString=whole)
    assert run(event) == {"batchItemFailures": []}
    assert env.hooks.results(leaving) == ["CONTINUE"] and len(env.etcd.member_names()) == 2


# -- without etcd: the parse and the first-sight record -----------------------------------------------------


@pytest.mark.parametrize(
    ("key", "field"),
    [
        ({"attempt": "2", "firstSeen": 1.0}, "attempt"),
        ({"attempt": True, "firstSeen": 1.0}, "attempt"),
        ({"attempt": 0, "firstSeen": 1.0}, "attempt"),
        ({"attempt": 2, "firstSeen": None}, "firstSeen"),
        ({"attempt": 2, "firstSeen": math.inf}, "firstSeen"),
        ({"attempt": 2, "firstSeen": -5}, "firstSeen"),
        ("attempt=2", RETRY_KEY),
    ],
)
def test_a_retry_key_we_never_wrote_is_refused_by_name(key: Any, field: str) -> None:
    event = terminate_event(GROUPS[0], "i-0123456789abcdef0", "t")
    with pytest.raises(MalformedRetryKeyError, match=field):
        TerminationRequest.parse({**event, RETRY_KEY: key}, time.time())
    now = time.time()
    ours = TerminationRequest.parse({**event, RETRY_KEY: {"attempt": 3, "firstSeen": now - 60}}, now)
    assert ours.attempt == 3 and ours.first_seen == now - 60


@pytest.fixture
def state_table(moto_env: None) -> Iterator[Any]:
    dynamodb = boto3.client("dynamodb", region_name=REGION)
    dynamodb.create_table(
        TableName=TABLE, KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST",
    )  # fmt: skip
    yield dynamodb


def test_the_first_sight_of_a_lifecycle_action_is_written_once_and_read_back(state_table: Any) -> None:
    from lambdas.common.cluster_aws import ClusterAws

    aws = ClusterAws(settings("https://queue"), ec2=None, autoscaling=None, secretsmanager=None, sqs=None,
                     dynamodb=state_table)  # fmt: skip
    iid, other = "i-0123456789abcdef0", "i-0fedcba9876543210"
    assert aws.first_seen(iid, GROUPS[0], HOOK, 1000.0) == 1000.0
    assert aws.first_seen(iid, GROUPS[0], HOOK, 5000.0) == 1000.0, "a later sight does not move it"
    assert aws.first_seen(other, GROUPS[0], HOOK, 5000.0) == 5000.0, "another instance: its own record"
    keys = sorted(i["pk"]["S"] for i in state_table.scan(TableName=TABLE)["Items"])
    assert keys == [f"first-seen/{iid}/{GROUPS[0]}/{HOOK}", f"first-seen/{other}/{GROUPS[0]}/{HOOK}"]
    # DynamoDB itself refuses a NaN number ("cannot be converted to a numeric value"); a record of the wrong
    # type is the corrupt case left, and it is an error, never "no deadline".
    state_table.put_item(TableName=TABLE, Item={"pk": {"S": keys[0]}, "first_seen": {"S": "soon"}})
    with pytest.raises(ClusterStateError, match="first-seen"):
        aws.first_seen(iid, GROUPS[0], HOOK, 6000.0)
