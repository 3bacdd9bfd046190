"""Disaster recovery is proven, not guessed (invariant 7).

The one rule, as a named predicate: restore from a snapshot only when the cluster was initialised
and every member of the last known membership belongs to an instance that is gone (EC2 says
``terminated``/``shutting-down``, or does not know the instance). A member that is merely unreachable
while its instance runs (a network partition, a reboot, a stopped instance) never triggers a restore:
restoring then would fork the cluster and lose writes acknowledged since the snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from botocore.exceptions import ClientError

from node_agent.election import ClusterState, Phase

GONE = frozenset({"terminated", "shutting-down", "not-found"})


def disaster_recovery_needed(state: ClusterState, instance_states: Mapping[str, str], etcd_reachable: bool) -> bool:
    """True only if initialised, nothing answers, and every last member's instance is proven gone.

    ``instance_states`` maps instance ID -> EC2 state name, or ``"not-found"``; an instance missing
    from the mapping is unknown, and unknown is never "gone".
    """
    if state.phase not in (Phase.INITIALISED, Phase.RESTORING) or not state.last_membership:
        return False
    if etcd_reachable:
        return False
    return all(instance_states.get(m.instance_id) in GONE for m in state.last_membership)


def describe_instance_states(ec2: Any, instance_ids: Iterable[str]) -> dict[str, str]:
    """EC2 state per instance; ``not-found`` when EC2 no longer knows it (long-terminated)."""
    ids = sorted(set(instance_ids))
    states: dict[str, str] = {}
    for instance_id in ids:  # one call each: a batch call fails as a whole if any ID is unknown
        try:
            resp = ec2.describe_instances(InstanceIds=[instance_id])
        except ClientError as err:
            if err.response.get("Error", {}).get("Code", "").startswith("InvalidInstanceID"):
                states[instance_id] = "not-found"
                continue
            raise
        found = [i for r in resp.get("Reservations", []) for i in r.get("Instances", [])]
        states[instance_id] = str(found[0]["State"]["Name"]) if found else "not-found"
    return states
