"""Auto Scaling instance refresh, driven explicitly: moto 5.2.5 has no StartInstanceRefresh,
DescribeInstanceRefreshes or CancelInstanceRefresh (it raises NotImplementedError), so this wrapper of a moto
autoscaling client answers those three calls and performs the refresh on moto's groups itself.

Everything else goes to moto unchanged. The refresh advances one step per DescribeInstanceRefreshes call:

* which instances: those whose AMI is not the group launch template's current one (``SkipMatching``;
  moto records every instance's launch template version as the group's first, but its ImageId right);
* a batch is ``desired * (MaxHealthyPercentage - MinHealthyPercentage) / 100`` instances (at least one);
* ``MaxHealthyPercentage`` above 100 launches before it terminates: one step raises the desired capacity by
  the batch (moto launches the new instances from the group's current launch template version), the next
  terminates that many old instances with the capacity decremented; at 100 it terminates first, then launches.

``on_step`` lets a test act between steps (a voter fails, the refresh fails).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_IDS = itertools.count(1)


@dataclass
class Refresh:
    group: str
    preferences: dict[str, Any]
    refresh_id: str
    status: str = "Pending"
    total: int = 0
    replaced: int = 0
    phase: str = "start"
    batch: list[str] = field(default_factory=list)
    reason: str = ""
    max_before: int = 0


class DrivenInstanceRefresh:
    def __init__(self, autoscaling: Any, ec2: Any, on_step: Callable[[Refresh], None] | None = None) -> None:
        self._asg = autoscaling
        self._ec2 = ec2
        self.on_step = on_step
        self.refreshes: list[Refresh] = []
        self.cancelled: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._asg, name)

    # -- the three calls moto lacks ---------------------------------------------------------------------
    def start_instance_refresh(self, *, AutoScalingGroupName: str, Preferences: dict[str, Any], **_: Any) -> Any:  # noqa: N803
        active = self._active(AutoScalingGroupName)
        if active:
            raise RuntimeError(f"InstanceRefreshInProgress: {AutoScalingGroupName} already has {active[0].refresh_id}")
        refresh = Refresh(AutoScalingGroupName, dict(Preferences), f"refresh-{next(_IDS):04d}")
        self.refreshes.append(refresh)
        return {"InstanceRefreshId": refresh.refresh_id}

    def describe_instance_refreshes(self, *, AutoScalingGroupName: str, InstanceRefreshIds: list[str]) -> Any:  # noqa: N803
        refresh = next(r for r in self.refreshes if r.refresh_id in InstanceRefreshIds)
        if refresh.status in ("Pending", "InProgress"):
            self._step(refresh)
        if self.on_step is not None:
            self.on_step(refresh)
        percentage = 100 if refresh.total == 0 else refresh.replaced * 100 // refresh.total
        return {"InstanceRefreshes": [{
            "InstanceRefreshId": refresh.refresh_id, "AutoScalingGroupName": refresh.group, "Status": refresh.status,
            "StatusReason": refresh.reason, "PercentageComplete": percentage,
        }]}  # fmt: skip

    def cancel_instance_refresh(self, *, AutoScalingGroupName: str) -> Any:  # noqa: N803
        active = self._active(AutoScalingGroupName)
        if not active:
            raise RuntimeError(f"ActiveInstanceRefreshNotFound: {AutoScalingGroupName}")
        active[0].status = "Cancelled"
        self.cancelled.append(AutoScalingGroupName)
        return {"InstanceRefreshId": active[0].refresh_id}

    def _active(self, group: str) -> list[Refresh]:
        return [r for r in self.refreshes if r.group == group and r.status in ("Pending", "InProgress")]

    # -- the refresh itself ------------------------------------------------------------------------------
    def group(self, name: str) -> dict[str, Any]:
        return dict(self._asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0])

    def current_ami(self, group: dict[str, Any]) -> str:
        spec = group["LaunchTemplate"]
        versions = self._ec2.describe_launch_template_versions(LaunchTemplateId=spec["LaunchTemplateId"])
        chosen = max(versions["LaunchTemplateVersions"], key=lambda v: v["VersionNumber"])
        if spec.get("Version") not in (None, "$Latest"):
            chosen = next(v for v in versions["LaunchTemplateVersions"] if str(v["VersionNumber"]) == spec["Version"])
        return str(chosen["LaunchTemplateData"]["ImageId"])

    def stale(self, name: str) -> list[str]:
        group = self.group(name)
        ami = self.current_ami(group)
        ids = [i["InstanceId"] for i in group["Instances"] if i["LifecycleState"] == "InService"]
        if not ids:
            return []
        reservations = self._ec2.describe_instances(InstanceIds=ids)["Reservations"]
        return sorted(i["InstanceId"] for r in reservations for i in r["Instances"] if i["ImageId"] != ami)

    def _step(self, refresh: Refresh) -> None:
        prefs = refresh.preferences
        low, high = int(prefs.get("MinHealthyPercentage", 90)), int(prefs.get("MaxHealthyPercentage", 100))
        group = self.group(refresh.group)
        desired, max_size = int(group["DesiredCapacity"]), int(group["MaxSize"])
        if refresh.phase == "start":
            refresh.status = "InProgress"
            refresh.total = len(self.stale(refresh.group)) if prefs.get("SkipMatching") else desired
            refresh.phase = "next"
        if refresh.phase == "next":
            stale = self.stale(refresh.group)
            if not stale:
                refresh.status = "Successful"
                return
            size = max(1, desired * (high - low) // 100)
            refresh.batch = stale[:size]
            if high > 100:  # launch before terminate: the group goes above its desired (and maximum) capacity
                refresh.max_before = max_size
                self._asg.update_auto_scaling_group(AutoScalingGroupName=refresh.group,
                                                    MaxSize=max(max_size, desired + len(refresh.batch)),
                                                    DesiredCapacity=desired + len(refresh.batch))  # fmt: skip
                refresh.phase = "terminate"
            else:
                self._terminate(refresh, decrement=False)
                refresh.phase = "next"
            return
        if refresh.phase == "terminate":
            self._terminate(refresh, decrement=True)
            self._asg.update_auto_scaling_group(AutoScalingGroupName=refresh.group, MaxSize=refresh.max_before)
            refresh.phase = "next"

    def _terminate(self, refresh: Refresh, *, decrement: bool) -> None:
        for instance_id in refresh.batch:
            self._asg.terminate_instance_in_auto_scaling_group(
                InstanceId=instance_id, ShouldDecrementDesiredCapacity=decrement
            )
            refresh.replaced += 1
        refresh.batch = []
