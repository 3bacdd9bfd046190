"""The agent's etcd adapter (over the shared membership module) on a real 3-member TLS etcd cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.etcd import EtcdTls, client_url_for
from node_agent.etcd_membership import MembershipEtcd, UnsafeRemovalError
from tests.etcd_cluster import EtcdCluster, etcd_cluster

pytestmark = pytest.mark.etcd


def _adapter(cluster: EtcdCluster) -> MembershipEtcd:
    return MembershipEtcd(EtcdTls(cluster.pki / "ca.crt", cluster.pki / "client.crt", cluster.pki / "client.key"))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path, 3) as started:
        yield started


def test_a_stale_member_with_my_peer_url_is_removed_and_a_learner_is_seen_as_a_change(cluster: EtcdCluster) -> None:
    etcd = _adapter(cluster)
    assert etcd.reachable(cluster.endpoints) and not etcd.membership_change_in_progress(cluster.endpoints)
    stale = cluster.add_learner_node(start=False)  # an earlier instance with my IP, which died mid-join
    assert etcd.membership_change_in_progress(cluster.endpoints)
    removed = etcd.remove_stale_member(cluster.endpoints, stale.peer_url, keep_name="i-0123456789abcdef0.x")
    assert removed == stale.member_id and len(etcd.members(cluster.endpoints)) == 3
    assert etcd.remove_stale_member(cluster.endpoints, stale.peer_url, keep_name=None) is None, "idempotent"


def test_removing_a_healthy_voter_while_another_is_down_is_refused(cluster: EtcdCluster) -> None:
    etcd = _adapter(cluster)
    nodes = list(cluster.nodes.values())
    cluster.kill(nodes[1].name)
    with pytest.raises(UnsafeRemovalError):
        etcd.remove_stale_member([nodes[2].client_url], nodes[0].peer_url, keep_name=None)
    assert len(etcd.members([nodes[2].client_url])) == 3


def test_member_ready_means_started_voter_and_healthy(cluster: EtcdCluster) -> None:
    etcd = _adapter(cluster)
    node = cluster.add_learner_node()
    cluster.wait_healthy([node.name])
    assert not etcd.member_ready(cluster.endpoints, node.name), "a learner is not ready"
    cluster.promote_when_ready(node)
    assert etcd.member_ready(cluster.endpoints, node.name)


def test_client_url_is_derived_from_the_peer_url() -> None:
    assert client_url_for("https://10.0.1.5:2380") == "https://10.0.1.5:2379"
