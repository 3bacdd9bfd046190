"""The shared membership module: the removal rule, one row per cluster shape (pure, on a ClusterView as
``observe`` builds it), identity matching, and removals on real 5-member TLS etcd."""

from __future__ import annotations

from pathlib import Path

import pytest

from lambdas.common.membership import (
    ClusterView,
    Member,
    RemovalOutcome,
    can_remove_member,
    committed_member_list,
    find_member_for_instance,
    observe,
    quorum,
    remove_member_safely,
)
from tests.etcd_cluster import etcd_cluster


def _m(n: int, *, healthy: bool = True, learner: bool = False, started: bool = True) -> Member:
    return Member(
        id=str(n),
        name=f"i-0000000000000000{n}.ec2.internal" if started else "",
        peer_urls=(f"https://10.0.0.{n}:2380",),
        client_urls=(f"https://10.0.0.{n}:2379",) if started else (),
        is_learner=learner,
        healthy=healthy and started,
    )


def _view(*members: Member) -> ClusterView:
    return ClusterView(members=members, leader_id=next((m.id for m in members if m.healthy), None))


@pytest.mark.parametrize(
    ("members", "target", "desired", "safe"),
    [
        pytest.param([_m(1), _m(2), _m(3)], 3, 3, True, id="3 healthy voters: remove one"),
        pytest.param([_m(1), _m(2, healthy=False), _m(3)], 3, 3, False, id="another member down: must wait"),
        pytest.param([_m(1), _m(2), _m(3, healthy=False)], 3, 3, True, id="the leaving member is down: remove it"),
        pytest.param(
            [_m(1), _m(2), _m(3), _m(4, learner=True)], 3, 3, False, id="a learner is in: one change at a time"
        ),
        pytest.param([_m(1), _m(2), _m(3), _m(4, learner=True)], 4, 3, True, id="removing the learner itself is safe"),
        pytest.param(
            [_m(1), _m(2), _m(3), _m(4, started=False)], 4, 3, True, id="removing an unstarted member is safe"
        ),
        pytest.param([_m(1), _m(2)], 2, 3, False, id="2 of desired 3 left: a healthy one waits for its replacement"),
        pytest.param([_m(1), _m(2)], 2, None, True, id="without a desired size only quorum counts"),
        pytest.param([_m(1), _m(2, healthy=False)], 2, 3, False, id="no quorum now: decide nothing"),
        pytest.param([_m(1)], 1, 1, False, id="never remove the last voter"),
        pytest.param([_m(1), _m(2), _m(3), _m(4), _m(5)], 5, 5, True, id="5 members: remove one"),
        pytest.param([_m(1), _m(2), _m(3), _m(4)], 4, 5, True, id="5 desired, 4 left: a second one may go (3 >= 3)"),
        pytest.param([_m(1), _m(2), _m(3)], 3, 5, False, id="5 desired, 3 left: the third one waits"),
    ],
)
def test_the_removal_rule(members: list[Member], target: int, desired: int | None, safe: bool) -> None:
    view = _view(*members)
    decision = can_remove_member(view, next(m for m in members if m.id == str(target)), desired_voters=desired)
    assert decision.safe is safe, decision.reason


def test_quorum_arithmetic() -> None:
    assert [quorum(n) for n in range(1, 8)] == [1, 2, 2, 3, 3, 4, 4]
    view = _view(_m(1), _m(2), _m(3, healthy=False), _m(4, learner=True))
    assert view.quorum == 2 and view.quorum_margin == 0 and view.has_quorum and len(view.learners) == 1


def test_an_instance_is_matched_by_name_first_and_by_peer_url_only_for_a_nameless_member() -> None:
    reused = Member("9", "i-0000000000000000a.ec2.internal", ("https://10.0.0.1:2380",), ("https://10.0.0.1:2379",),
                    False, True)  # fmt: skip
    view = _view(reused, _m(2))
    assert find_member_for_instance(view, "i-0000000000000000b", "10.0.0.1") is None, "IPs are reused, IDs are not"
    assert find_member_for_instance(view, "i-0000000000000000a") is reused
    unstarted = _m(7, started=False)
    two = _view(_m(1), unstarted)
    leaving = "i-0000000000000000c"
    assert find_member_for_instance(two, leaving, "10.0.0.7", ip_holders=[leaving]) is unstarted
    assert find_member_for_instance(two, leaving, "10.0.0.7", ip_holders=[]) is unstarted, "no one else holds it"


def test_an_unstarted_member_at_an_address_another_live_instance_holds_is_not_the_leaving_instances() -> None:
    """EC2 reuses private IPs: a redelivered event for an instance whose member is already gone, while a new
    instance with the same IP is joining, must not take the newcomer's unstarted member (issue 15). By peer
    URL only if EC2 shows no other live instance holding the address; not asking EC2 (None) is no answer."""
    newcomer = _m(7, started=False)
    view = _view(_m(1), _m(2), newcomer)
    leaving, joining = "i-0000000000000000c", "i-0000000000000000d"
    assert find_member_for_instance(view, leaving, "10.0.0.7", ip_holders=[joining]) is None
    assert find_member_for_instance(view, leaving, "10.0.0.7", ip_holders=[leaving, joining]) is None
    assert find_member_for_instance(view, leaving, "10.0.0.7") is None, "nobody asked EC2: no attribution by IP"


@pytest.mark.etcd
def test_two_of_five_members_leave_one_after_the_other_and_a_third_must_wait(tmp_path: Path) -> None:
    with etcd_cluster(tmp_path, 5) as cluster:
        nodes = list(cluster.nodes.values())
        endpoints = [n.client_url for n in nodes[2:]]
        for node in nodes[:2]:
            result = remove_member_safely(cluster.client, endpoints, instance_id=node.instance_id, desired_voters=5)
            assert result.outcome is RemovalOutcome.REMOVED, result.reason
            cluster.kill(node.name)
        third = remove_member_safely(cluster.client, endpoints, instance_id=nodes[2].instance_id, desired_voters=5)
        assert third.outcome is RemovalOutcome.UNSAFE
        view = observe(cluster.client, endpoints)
        assert len(view.voters) == 3 and view.has_quorum
        again = remove_member_safely(cluster.client, endpoints, instance_id=nodes[0].instance_id, desired_voters=5)
        assert again.outcome is RemovalOutcome.ALREADY_GONE


@pytest.mark.etcd
def test_every_member_lists_a_change_committed_through_another_member_at_once(tmp_path: Path) -> None:
    """etcd 3.4 lists members from the asked member's applied state; ``committed_member_list`` makes it catch up
    first, so a learner added (or removed) through one member is seen through every other one right away, and a
    member that cannot serve the read (no quorum behind it) still answers with its own list."""
    with etcd_cluster(tmp_path, 3) as cluster:
        first, second, third = (n.client_url for n in cluster.nodes.values())
        for i in range(10):
            learner = cluster.client.member_add_learner([first], [f"https://127.0.0.1:{23800 + i}"])
            assert learner.id in {m.id for m in committed_member_list(cluster.client, [third])}
            assert learner.id in {m.id for m in committed_member_list(cluster.client, [second])}
            cluster.client.member_remove([first], learner.id)
            assert learner.id not in {m.id for m in committed_member_list(cluster.client, [third])}
        names = list(cluster.nodes)
        cluster.kill(names[0])
        cluster.kill(names[1])
        assert len(committed_member_list(cluster.client, [third])) == 3
