"""An upgrade by replacement on the twin: ``python -m twin.upgrade`` (``make twin-upgrade``).

The twin boots at the AMI's version N (``agentConfig.kubernetesVersion``), then "a new AMI" makes every new
launch run N+1 (:attr:`Twin.kubernetes_version`), and the pipeline's rollout program (:mod:`pipeline.rollout`,
unchanged) replaces the control-plane nodes one group at a time and then the workers, reading quorum through the
cluster-ops Lambda (in-process, as the canary does in the twin).

Simulated, and said so: **the instance refresh.** moto 5.2.5 has no StartInstanceRefresh,
DescribeInstanceRefreshes or CancelInstanceRefresh, so :class:`TwinInstanceRefresh` answers those three calls on
the twin's lifecycle machine, one step per DescribeInstanceRefreshes: an instance is stale when it was launched
with another version than the current one (``SkipMatching``); with ``MaxHealthyPercentage`` above 100 the group's
desired capacity is raised by one, the new instance must reach InService (its launch hook completed: a promoted,
healthy voter), then the old one is terminated through its terminate hook (the real lifecycle Lambda removes its
member) and the capacity is restored; one instance at a time (the twin's groups are small).

Checked, the chaos run's invariants: no timeline sample without quorum, no acknowledged write lost (a writer
writes throughout), the membership back to the desired healthy voters at the end; and the upgrade's own:
kube-system/kubeadm-config changed exactly once, by the first new control-plane node, before its join; the
add-ons upgraded exactly once, after the last old control-plane node's etcd member had left.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lambdas.common.version_skew import parse_version
from pipeline.rollout import RolloutOptions, RolloutResult
from pipeline.rollout import run as run_rollout
from tests.agent.kubeadm_emulator import ADDON_UPGRADES, CONFIG_WRITES, api_events, kubeadm_config_version
from twin.cluster import Twin, TwinOptions
from twin.lifecycle import IN_SERVICE, RETAINED, TERMINATED, WAIT_STATES
from twin.measure import Writer
from twin.observe import Sample

_IDS = itertools.count(1)


def next_minor(version: str) -> str:
    v = parse_version(version)
    return f"{v.major}.{v.minor + 1}.0"


@dataclass
class _Refresh:
    group: str
    preferences: dict[str, Any]
    refresh_id: str
    status: str = "InProgress"
    reason: str = ""
    phase: str = "next"
    old: str = ""
    before: set[str] = field(default_factory=set)
    desired: int = 0
    total: int = 0
    replaced: int = 0


class TwinInstanceRefresh:
    """StartInstanceRefresh / DescribeInstanceRefreshes / CancelInstanceRefresh on the twin (module docstring)."""

    def __init__(self, twin: Twin) -> None:
        self.twin = twin
        self.refreshes: list[_Refresh] = []
        self.cancelled: list[str] = []

    def version_of(self, instance_id: str) -> str:
        proc = self.twin.procs[instance_id]
        return str(json.loads((proc.root / "agent.json").read_text())["kubernetesVersion"])

    def _instances(self, group: str) -> list[Any]:
        assert self.twin.machine is not None
        return [i for i in self.twin.machine.snapshot() if i.group == group]

    def _stale(self, group: str) -> list[str]:
        target = self.twin.kubernetes_version
        live = [i for i in self._instances(group) if i.state == IN_SERVICE]
        return sorted(i.instance_id for i in live if self.version_of(i.instance_id) != target)

    def _set_desired(self, group: str, desired: int) -> None:
        machine = self.twin.machine
        assert machine is not None
        with machine.lock:
            machine.groups[group] = dataclasses.replace(machine.groups[group], desired=desired)

    def _moto_max_size(self, group: str, size: int) -> None:
        """moto refuses to attach an instance beyond the group's MaxSize (the twin's groups start at their size)."""
        self.twin.aws.client("autoscaling").update_auto_scaling_group(AutoScalingGroupName=group, MaxSize=size)

    def start_instance_refresh(self, *, AutoScalingGroupName: str, Preferences: dict[str, Any], **_: Any) -> Any:  # noqa: N803
        refresh = _Refresh(AutoScalingGroupName, dict(Preferences), f"twin-refresh-{next(_IDS):04d}")
        refresh.total = len(self._stale(AutoScalingGroupName))
        self.refreshes.append(refresh)
        return {"InstanceRefreshId": refresh.refresh_id}

    def describe_instance_refreshes(self, *, AutoScalingGroupName: str, InstanceRefreshIds: list[str]) -> Any:  # noqa: N803
        refresh = next(r for r in self.refreshes if r.refresh_id in InstanceRefreshIds)
        if refresh.status == "InProgress":
            self._step(refresh)
        done = 100 if refresh.total == 0 else refresh.replaced * 100 // refresh.total
        return {"InstanceRefreshes": [{"InstanceRefreshId": refresh.refresh_id, "Status": refresh.status,
                                       "StatusReason": refresh.reason, "PercentageComplete": done}]}  # fmt: skip

    def cancel_instance_refresh(self, *, AutoScalingGroupName: str) -> Any:  # noqa: N803
        for refresh in self.refreshes:
            if refresh.group == AutoScalingGroupName and refresh.status == "InProgress":
                refresh.status = "Cancelled"
                if refresh.desired:
                    self._set_desired(refresh.group, refresh.desired)
                self.cancelled.append(AutoScalingGroupName)
                return {"InstanceRefreshId": refresh.refresh_id}
        raise RuntimeError(f"ActiveInstanceRefreshNotFound: {AutoScalingGroupName}")

    def _step(self, r: _Refresh) -> None:
        assert self.twin.machine is not None
        group = self.twin.machine.groups[r.group]
        if r.phase == "next":
            if any(i.state in WAIT_STATES for i in self._instances(r.group)):
                return  # a launch or termination of this group is still in its hook
            stale = self._stale(r.group)
            if not stale:
                r.status = "Successful"
                return
            r.old, r.before, r.desired = stale[0], {i.instance_id for i in self._instances(r.group)}, group.desired
            if int(r.preferences.get("MaxHealthyPercentage", 100)) > 100:  # launch before terminate
                self._moto_max_size(r.group, group.desired + 1)
                self._set_desired(r.group, group.desired + 1)
                r.phase = "launching"
            else:
                self.twin.terminate(r.old)
                r.phase = "terminating"
            return
        if r.phase == "launching":
            new = [i for i in self._instances(r.group) if i.instance_id not in r.before and i.state == IN_SERVICE]
            if new:
                self.twin.terminate(r.old)
                self._set_desired(r.group, r.desired)  # the terminating old one still counts until it is gone
                r.phase = "terminating"
            return
        if r.phase == "terminating":
            state = next(i.state for i in self._instances(r.group) if i.instance_id == r.old)
            if state == TERMINATED:
                self._moto_max_size(r.group, r.desired)
                r.replaced += 1
                r.phase = "next"
            elif state == RETAINED:
                r.status, r.reason = "Failed", f"{r.old} was retained (its terminate hook abandoned)"


@dataclass
class UpgradeResult:
    old_version: str
    new_version: str
    rollout: RolloutResult
    violations: list[str] = field(default_factory=list)
    acked_writes: int = 0
    lost_writes: int = 0
    config_writes: list[dict[str, Any]] = field(default_factory=list)
    addon_upgrades: list[dict[str, Any]] = field(default_factory=list)
    first_new_control_plane: str = ""
    last_old_member_seen_at: float = 0.0  # the last timeline sample with an old control-plane node's etcd member
    runtime_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "versions": f"{self.old_version} -> {self.new_version}",
            "rollout_ok": self.rollout.ok,
            "rollout_failure": self.rollout.failure,
            "groups": [g.to_json() for g in self.rollout.groups],
            "violations": self.violations,
            "acked_writes": self.acked_writes,
            "lost_writes": self.lost_writes,
            "kubeadm_config_writes": self.config_writes,
            "addon_upgrades": self.addon_upgrades,
            "first_new_control_plane": self.first_new_control_plane,
            "runtime_s": round(self.runtime_s, 1),
        }


def run_upgrade(twin: Twin, new_version: str | None = None, *, progress: Any = print) -> UpgradeResult:
    """Boot (if needed), switch new launches to ``new_version``, roll it out, check the invariants."""
    t0 = time.monotonic()
    violations: list[str] = []

    def check(s: Sample) -> None:
        twin._on_sample(s)
        if not s.quorum:
            violations.append(f"{s.t:.2f}: quorum lost: {s.healthy_voters}/{s.voters} healthy")

    twin.timeline.on_sample = check
    twin.wait_bootstrapped(120)
    old_version = twin.kubernetes_version
    new_version = new_version or next_minor(old_version)
    old_control_planes = {i.instance_id for i in twin.control_plane_instances(IN_SERVICE)}
    obs = twin.observer()
    assert obs is not None
    writer = Writer(obs, lambda: [f"https://{i.ip}:2379" for i in twin.control_plane_instances(IN_SERVICE)])
    writer.prefix = "upgrade/"
    writer.start()
    progress(f"[upgrade] cluster at {old_version}; new launches now run {new_version}")
    twin.kubernetes_version = new_version  # the new AMI: the deploy pointed the groups at its launch template
    refresh = TwinInstanceRefresh(twin)
    options = RolloutOptions(poll_interval_s=0.5, status_grace_s=10, settle_timeout_s=60, group_timeout_s=180,
                             control_plane_warmup_s=0, worker_warmup_s=0)  # fmt: skip
    result = run_rollout(
        refresh,
        lambda: twin.ops("status"),
        control_plane_groups=twin.cfg.control_plane_group_names,
        worker_groups=[twin.cfg.worker_group_name(g) for g in twin.cfg.worker_groups] if twin.options.workers else [],
        options=options,
        log=lambda line: progress(f"[rollout] {line}"),
    )
    try:
        twin.wait_converged(60)
    except AssertionError as err:
        violations.append(f"not converged after the rollout: {err}")
    writer.stop()
    read = obs.get_prefix(twin.etcd_endpoints(), writer.prefix)
    problems = writer.check(read)
    violations += problems[:50]
    with twin.timeline.lock:
        samples = list(twin.timeline.samples)
    old_seen = [s.t for s in samples if any(n.split(".", 1)[0] in old_control_planes for n in s.names)]
    new_cps = sorted((i for i in twin.control_plane_instances() if i.instance_id not in old_control_planes),
                     key=lambda i: i.launched_at)  # fmt: skip
    upgrade = UpgradeResult(
        old_version,
        new_version,
        result,
        violations,
        acked_writes=len(writer.acked),
        lost_writes=sum(1 for p in problems if p.startswith("lost")),
        config_writes=api_events(twin.api, CONFIG_WRITES),
        addon_upgrades=api_events(twin.api, ADDON_UPGRADES),
        first_new_control_plane=new_cps[0].instance_id if new_cps else "",
        last_old_member_seen_at=max(old_seen, default=0.0),
        runtime_s=time.monotonic() - t0,
    )
    progress(f"[upgrade] kubeadm-config now {kubeadm_config_version(twin.api)}; {len(upgrade.addon_upgrades)} "
             f"add-on upgrade(s); {upgrade.acked_writes} writes acked, {upgrade.lost_writes} lost")  # fmt: skip
    return upgrade


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twin.upgrade", description=__doc__.splitlines()[0])
    parser.add_argument("--to", default=None, help="the new Kubernetes version (default: the next minor, x.y+1.0)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--report", type=Path, default=Path("reports/upgrade-report.json"))
    args = parser.parse_args(argv)
    options = TwinOptions(workers=args.workers, addon_upgrades=True)
    with Twin(options, progress=print) as twin:
        result = run_upgrade(twin, args.to)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(result.summary(), indent=2))
    ok = result.rollout.ok and not result.violations and len(result.config_writes) == 1
    ok = ok and len(result.addon_upgrades) == 1
    print(json.dumps(result.summary(), indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
