"""An upgrade N -> N+1 by replacement on the twin (twin/upgrade.py): the pipeline's rollout program replaces the
control plane one group at a time (launch before terminate), then the worker, with the chaos run's invariants.
The instance refresh is driven on the twin's lifecycle machine (moto has none: see twin/upgrade.py)."""

from __future__ import annotations

import json

import pytest

from tests.agent.kubeadm_emulator import STATIC_PODS, kubeadm_config_version
from twin.cluster import Twin
from twin.lifecycle import IN_SERVICE
from twin.upgrade import next_minor, run_upgrade


@pytest.mark.twin_options(workers=1, addon_upgrades=True)
def test_an_upgrade_by_replacement_keeps_quorum_and_every_write_and_upgrades_config_and_addons_once(
    real_twin: Twin,
) -> None:
    lines: list[str] = []
    old = real_twin.kubernetes_version
    result = run_upgrade(real_twin, progress=lines.append)
    print("\n".join(lines[-40:]), result.summary())
    new = next_minor(old)
    assert result.rollout.ok, result.rollout.failure
    assert [g.kind for g in result.rollout.groups] == ["control-plane"] * 3 + ["worker"]
    assert all(g.min_margin is not None and g.min_margin >= 0 for g in result.rollout.groups)
    # The chaos run's invariants.
    assert result.violations == [], result.violations[:10]
    assert result.lost_writes == 0 and result.acked_writes > 0
    assert real_twin.converged() and len(real_twin.initialisers()) == 1
    # Every node now runs the new version, and the control plane renders its static pods at it.
    live = [i.instance_id for i in real_twin.machine.snapshot() if i.state == IN_SERVICE]
    versions = {
        iid: json.loads((real_twin.procs[iid].root / "agent.json").read_text())["kubernetesVersion"] for iid in live
    }
    assert set(versions.values()) == {new} and len(versions) == 4
    static_pods = {k.removeprefix(STATIC_PODS).split(".", 1)[0]: v for k, v in real_twin.api.objects.items()
                   if k.startswith(STATIC_PODS)}  # fmt: skip
    assert {static_pods[i.instance_id] for i in real_twin.control_plane_instances(IN_SERVICE)} == {f"v{new}"}
    # kubeadm-config: exactly once, by the first new control-plane node.
    assert kubeadm_config_version(real_twin.api) == f"v{new}"
    assert [(w["from"], w["to"]) for w in result.config_writes] == [(f"v{old}", f"v{new}")]
    assert result.config_writes[0]["node"].startswith(result.first_new_control_plane)
    # The add-ons: exactly once, after the last old control-plane node's etcd member had left (launch before
    # terminate: the last new node joined while it was still a member, so the upgrade-addons timer did it).
    assert [a["version"] for a in result.addon_upgrades] == [f"v{new}"], result.addon_upgrades
    # A sample is stamped when its status reads return (the observer's timeout is 0.6 s); an early upgrade would
    # have come at the last new node's join, seconds before the old member's removal.
    assert result.addon_upgrades[0]["at"] >= result.last_old_member_seen_at - 0.7 > 0
