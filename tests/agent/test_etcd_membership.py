"""The interim etcd adapter's removal rule, one row per cluster shape (learners never count)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from node_agent.etcd import EtcdTls, Member, client_url_for
from node_agent.etcd_membership import MembershipEtcd


def _m(n: int, *, learner: bool = False, started: bool = True) -> Member:
    url = f"https://10.0.0.{n}:2379"
    return Member(
        str(n), f"i-{n}" if started else "", (f"https://10.0.0.{n}:2380",), (url,) if started else (), learner
    )


class Stubbed(MembershipEtcd):
    def __init__(self, healthy: set[int]) -> None:
        super().__init__(EtcdTls(Path("ca"), Path("c"), Path("k")))
        self.healthy = healthy

    def _status(self, url: str) -> dict[str, Any] | None:
        n = int(url.split(".")[3].split(":", maxsplit=1)[0])
        return {"leader": "1"} if n in self.healthy else None


@pytest.mark.parametrize(
    ("members", "healthy", "target", "expected"),
    [
        pytest.param([_m(1), _m(2), _m(3)], {1, 2, 3}, 3, True, id="3 healthy voters: remove one"),
        pytest.param([_m(1), _m(2), _m(3)], {1, 3}, 3, False, id="3 voters, 1 other down: 1 of 2 left is no quorum"),
        pytest.param([_m(1), _m(2), _m(3)], {1, 2}, 3, True, id="remove the dead one: 2 of 2 healthy"),
        pytest.param([_m(1), _m(2), _m(3), _m(4, learner=True)], {1, 3, 4}, 3, False,
                     id="a healthy learner never counts toward quorum"),
        pytest.param([_m(1), _m(2), _m(4, learner=True)], {1}, 4, True, id="removing a learner is always safe"),
        pytest.param([_m(1), _m(2), _m(4, started=False)], set(), 4, True, id="removing an unstarted member is safe"),
        pytest.param([_m(1)], {1}, 1, False, id="never remove the last voter"),
    ],
)  # fmt: skip
def test_can_remove(members: list[Member], healthy: set[int], target: int, expected: bool) -> None:
    etcd = Stubbed(healthy)
    assert etcd.can_remove(members, next(m for m in members if m.id == str(target))) is expected


def test_client_url_is_derived_from_the_peer_url() -> None:
    assert client_url_for("https://10.0.1.5:2380") == "https://10.0.1.5:2379"
