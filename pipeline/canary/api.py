"""What the canary needs from a cluster, and the AWS implementation of it.

The canary speaks to a cluster only through :class:`ClusterApi`. In the pipeline that is
:class:`Boto3ClusterApi` (the cluster-ops Lambda for etcd status and the sentinel key, Auto Scaling for
the control-plane instances); the local cluster twin provides its own (twin/canary_api.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol


class StatusUnavailableError(RuntimeError):
    """The cluster's etcd status could not be read (ops function error or etcd unreachable)."""


class ClusterApi(Protocol):
    def status(self) -> Any: ...

    def put(self, key: str, value: str) -> Any: ...

    def get(self, key: str) -> Any: ...

    def in_service_instances(self) -> list[str]: ...

    def terminate(self, instance_id: str) -> None: ...


class Boto3ClusterApi:
    """The cluster-ops Lambda (invoked synchronously) and the control-plane Auto Scaling groups."""

    def __init__(
        self,
        *,
        function_name: str,
        group_names: Sequence[str],
        lambda_client: Any = None,
        autoscaling_client: Any = None,
        region: str | None = None,
    ) -> None:
        import boto3

        self.function_name = function_name
        self.group_names = list(group_names)
        self._lambda = lambda_client or boto3.client("lambda", region_name=region)
        self._autoscaling = autoscaling_client or boto3.client("autoscaling", region_name=region)

    def _invoke(self, payload: dict[str, Any]) -> Any:
        response = self._lambda.invoke(
            FunctionName=self.function_name, InvocationType="RequestResponse", Payload=json.dumps(payload).encode()
        )
        body = response["Payload"].read()
        result = json.loads(body or b"null")
        if response.get("FunctionError"):
            raise StatusUnavailableError(f"{self.function_name} failed on {payload.get('action')}: {str(result)[:500]}")
        return result

    def status(self) -> Any:
        return self._invoke({"action": "status"})

    def put(self, key: str, value: str) -> Any:
        return self._invoke({"action": "put", "key": key, "value": value})

    def get(self, key: str) -> Any:
        return self._invoke({"action": "get", "key": key})

    def in_service_instances(self) -> list[str]:
        instances: list[str] = []
        paginator = self._autoscaling.get_paginator("describe_auto_scaling_groups")
        for page in paginator.paginate(AutoScalingGroupNames=self.group_names):
            for group in page["AutoScalingGroups"]:
                instances.extend(
                    i["InstanceId"] for i in group.get("Instances", []) if i.get("LifecycleState") == "InService"
                )
        return sorted(instances)

    def terminate(self, instance_id: str) -> None:
        # Capacity is kept: the group launches the replacement, exactly as an instance failure would.
        self._autoscaling.terminate_instance_in_auto_scaling_group(
            InstanceId=instance_id, ShouldDecrementDesiredCapacity=False
        )
