"""The canary's ClusterApi over the twin: the REAL cluster-ops Lambda handler (status/put/get, invoked
in-process as the canary would invoke the function) and the twin's Auto Scaling terminate (the same
``TerminateInstanceInAutoScalingGroup`` call, through the twin's AWS endpoint, that reaches the lifecycle
state machine)."""

from __future__ import annotations

from typing import Any

from twin.cluster import Twin
from twin.lifecycle import IN_SERVICE


class TwinClusterApi:
    def __init__(self, twin: Twin) -> None:
        self.twin = twin

    def status(self) -> Any:
        return self.twin.ops("status")

    def put(self, key: str, value: str) -> Any:
        return self.twin.ops("put", key=key, value=value)

    def get(self, key: str) -> Any:
        return self.twin.ops("get", key=key)

    def in_service_instances(self) -> list[str]:
        return sorted(i.instance_id for i in self.twin.control_plane_instances(IN_SERVICE))

    def terminate(self, instance_id: str) -> None:
        self.twin.terminate(instance_id)
