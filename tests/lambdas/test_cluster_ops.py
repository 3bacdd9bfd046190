"""The cluster-ops function the canary calls: status from real etcd, the sentinel key, and refusals."""

from __future__ import annotations

from typing import Any

import pytest

from lambdas.cluster_ops import handler as ops
from tests.lambdas.conftest import Env

pytestmark = pytest.mark.etcd


def call(event: Any) -> Any:
    return ops.handle(event, None)


def test_status_reports_every_member_with_health_learner_flag_and_leader(handlers: Env) -> None:
    env = handlers
    env.etcd.kill(env.etcd.node_for(env.instance_ids[2]).name)
    status = call({"action": "status"})
    assert status["voters"] == 3 and status["healthy_voters"] == 2 and status["has_quorum"]
    assert status["desired_members"] == 3 and status["quorum"] == 2
    by_instance = {m["instance_id"]: m for m in status["members"]}
    assert set(by_instance) == set(env.instance_ids)
    assert by_instance[env.instance_ids[2]]["healthy"] is False
    assert sum(m["is_leader"] for m in status["members"]) == 1
    assert all(m["is_learner"] is False and m["started"] for m in status["members"])
    assert all(isinstance(m["raft_index"], int) for m in status["members"] if m["healthy"])


def test_the_sentinel_is_written_and_read_back(handlers: Env) -> None:
    assert call({"action": "put", "key": "/dedicated-k8s/canary/abc", "value": "v1"})["revision"] > 0
    assert call({"action": "get", "key": "/dedicated-k8s/canary/abc"})["value"] == "v1"
    assert call({"action": "get", "key": "/dedicated-k8s/canary/missing"})["value"] is None


@pytest.mark.parametrize(
    "event",
    [{"action": "put", "key": "/registry/secrets/x", "value": "v"}, {"action": "delete"}, {"action": "get"}, "status"],
)
def test_keys_outside_the_canary_prefix_and_unknown_actions_are_refused(handlers: Env, event: Any) -> None:
    with pytest.raises(ops.BadRequestError):
        call(event)


def test_status_says_so_when_etcd_is_unreachable(handlers: Env) -> None:
    env = handlers
    for node in list(env.etcd.nodes.values()):
        env.etcd.kill(node.name)
    status = call({"action": "status"})
    assert status["members"] == [] and "unreachable" in status["error"]
