"""A worker's terminate hook goes through the real lifecycle Lambda in the twin and is completed by it with
CONTINUE (never by the hook's timeout), without any etcd membership change.

The twin has no HTTPS Kubernetes API (its API server is a shared file), so the Lambda runs with
DRAIN_NODES=false here: the drain itself is proven in tests/lambdas/test_drain.py against tests/kube_api_sim.py.
"""

from __future__ import annotations

import pytest

from twin.cluster import Twin
from twin.lifecycle import IN_SERVICE


@pytest.mark.twin_options(workers=1)
def test_a_worker_terminate_hook_is_completed_by_the_lifecycle_lambda(real_twin: Twin) -> None:
    real_twin.wait_bootstrapped(120)
    assert real_twin.machine is not None
    (worker,) = [i for i in real_twin.machine.snapshot() if i.role == "worker" and i.state == IN_SERVICE]
    observer = real_twin.observer()
    assert observer is not None
    members_before = sorted(m.name for m in observer.members(real_twin.etcd_endpoints()))

    real_twin.terminate(worker.instance_id)

    def hooks() -> list[dict[str, object]]:
        return [
            e
            for e in real_twin.timeline.events
            if e.get("instance_id") == worker.instance_id and e["kind"] == "hook" and e["state"] == "Terminating:Wait"
        ]

    real_twin.wait_for("the worker's terminate hook", lambda: bool(hooks()), timeout=25)
    assert [(h["source"], h["result"]) for h in hooks()] == [("complete", "CONTINUE")], "the Lambda completed it"
    members_after = sorted(m.name for m in observer.members(real_twin.etcd_endpoints()))
    assert members_after == members_before, "a worker never touches etcd"
