"""Invariant 7 as a table: restore only when every last member's instance is proven gone."""

from __future__ import annotations

from typing import Any

import pytest

from node_agent.election import ClusterState, MemberRecord, Phase
from node_agent.recovery import describe_instance_states, disaster_recovery_needed

A, B, C = (MemberRecord(f"i-{x}", f"https://10.0.0.{n}:2380", str(n)) for n, x in ((1, "a"), (2, "b"), (3, "c")))
THREE = ClusterState(phase=Phase.INITIALISED, generation=1, last_membership=(A, B, C))


@pytest.mark.parametrize(
    ("state", "instances", "reachable", "expected"),
    [
        pytest.param(THREE, {"i-a": "terminated", "i-b": "terminated", "i-c": "terminated"}, False, True,
                     id="all terminated, nothing answers -> restore"),
        pytest.param(THREE, {"i-a": "not-found", "i-b": "shutting-down", "i-c": "terminated"}, False, True,
                     id="gone in every way EC2 says it -> restore"),
        pytest.param(THREE, {"i-a": "terminated", "i-b": "terminated", "i-c": "running"}, False, False,
                     id="one merely unreachable but running -> never"),
        pytest.param(THREE, {"i-a": "terminated", "i-b": "terminated", "i-c": "stopped"}, False, False,
                     id="a stopped instance keeps its disk -> never"),
        pytest.param(THREE, {"i-a": "terminated", "i-b": "terminated"}, False, False,
                     id="an instance of unknown state -> never"),
        pytest.param(THREE, {"i-a": "terminated", "i-b": "terminated", "i-c": "terminated"}, True, False,
                     id="something still answers -> never"),
        pytest.param(ClusterState(phase=Phase.UNINITIALISED), {}, False, False,
                     id="never initialised -> init, not restore"),
        pytest.param(ClusterState(phase=Phase.INITIALISED, generation=1), {}, False, False,
                     id="no recorded membership -> nothing proven"),
        pytest.param(ClusterState(phase=Phase.RESTORING, generation=1, last_membership=(A,)), {"i-a": "terminated"},
                     False, True, id="a restore interrupted by a dead restorer -> restore again"),
    ],
)  # fmt: skip
def test_disaster_recovery_needed(
    state: ClusterState, instances: dict[str, str], reachable: bool, expected: bool
) -> None:
    assert disaster_recovery_needed(state, instances, reachable) is expected


def test_instance_states_come_from_ec2_and_unknown_ids_are_not_found(aws: dict[str, Any]) -> None:
    ec2 = aws["ec2"]
    ids = [i["InstanceId"] for i in ec2.run_instances(ImageId="ami-12c6146b", MinCount=2, MaxCount=2)["Instances"]]
    ec2.terminate_instances(InstanceIds=[ids[0]])
    states = describe_instance_states(ec2, [*ids, "i-0000000000000dead"])
    assert states == {ids[0]: "terminated", ids[1]: "running", "i-0000000000000dead": "not-found"}
