"""One control-plane replacement through the real Lambda: terminate -> Terminating:Wait -> the lifecycle Lambda
removes the member (quorum-safe) and completes the hook -> terminated -> the replacement joins as a learner,
is promoted, and only then completes its launch hook."""

from __future__ import annotations

import time

from twin.cluster import Twin
from twin.lifecycle import IN_SERVICE
from twin.replacements import replacements_from_timeline


def test_one_replacement_removes_the_member_before_termination_and_keeps_quorum(real_twin: Twin) -> None:
    real_twin.wait_bootstrapped(90)
    old = real_twin.control_plane_instances(IN_SERVICE)[0]
    real_twin.terminate(old.instance_id)
    took = real_twin.wait_converged(90)
    events = [e for e in real_twin.timeline.events if e.get("instance_id") == old.instance_id]
    hooks = [e for e in events if e["kind"] == "hook" and e["state"] == "Terminating:Wait"]
    assert [(h["source"], h["result"]) for h in hooks] == [("complete", "CONTINUE")], "the Lambda completed the hook"
    destroy = [e for e in events if e["kind"] == "destroy"]
    assert destroy and destroy[0]["observed"] and not destroy[0]["still_member"], "member removed before termination"
    assert real_twin.delivery is not None and real_twin.delivery.invocations >= 1
    rep = replacements_from_timeline(real_twin.timeline, 3)[0]
    assert rep.ok and rep.quorum_lost_samples == 0 and rep.min_healthy_voters is not None
    assert rep.min_healthy_voters >= 2
    assert len(real_twin.initialisers()) == 1
    new = [i for i in real_twin.control_plane_instances(IN_SERVICE) if i.launched_at > (old.terminating_at or 0)]
    assert len(new) == 1 and new[0].group == old.group and new[0].launch_result == "CONTINUE"
    assert took < 90 and time.time() - (old.terminating_at or 0) < 120
