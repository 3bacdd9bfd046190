"""The cluster-ops function: read-only etcd status for the canary and operators, and the canary's
sentinel key (put/get, only under ``/dedicated-k8s/canary/``). Invoked synchronously.

``{"action": "status"}`` -> members (name, instance, learner, started, healthy, leader, raft index),
voters, healthy voters, quorum, quorum margin, desired members; ``{"error": ...}`` if etcd is unreachable.
"""

from __future__ import annotations

from typing import Any

from lambdas.common.cluster_aws import ClusterAws, default_cluster_aws
from lambdas.common.etcd_client import EtcdUnavailableError
from lambdas.common.membership import observe
from lambdas.common.observability import Logger

LOGGER = Logger("cluster-ops")
SENTINEL_PREFIX = "/dedicated-k8s/canary/"


class BadRequestError(ValueError):
    """The request is not one this function serves."""


def cluster_aws() -> ClusterAws:
    """Created on first use, kept for warm invocations; tests and the twin point it elsewhere."""
    return default_cluster_aws()


def _key(event: dict[str, Any]) -> str:
    key = event.get("key")
    if not isinstance(key, str) or not key.startswith(SENTINEL_PREFIX) or len(key) > 512:
        raise BadRequestError(f"key must be a string under {SENTINEL_PREFIX!r} (got {key!r})")
    return key


def handle(event: Any, context: Any) -> dict[str, Any]:
    if not isinstance(event, dict) or event.get("action") not in ("status", "put", "get"):
        raise BadRequestError("expected {'action': 'status' | 'put' | 'get', ...}")
    action = event["action"]
    key = _key(event) if action in ("put", "get") else None
    if action == "put" and not isinstance(event.get("value"), str):
        raise BadRequestError("put needs a string 'value'")
    aws = cluster_aws()
    tls = aws.etcd_tls()
    if tls is None:
        return {"error": "the cluster was never initialised (no etcd client certificate yet)", "members": []}
    client = aws.etcd_client(tls)
    endpoints = aws.etcd_endpoints()
    try:
        if action == "status":
            view = observe(client, endpoints)
            return {**view.to_json(), "desired_members": aws.settings.desired_members}
        assert key is not None
        if action == "put":
            revision = client.put(endpoints, key, event["value"])
            LOGGER.info("sentinel written", key=key, revision=revision)
            return {"key": key, "revision": revision}
        return {"key": key, "value": client.get(endpoints, key)}
    except EtcdUnavailableError as err:
        LOGGER.error("etcd unreachable", action=action, error=str(err))
        return {"error": f"etcd unreachable: {err}", "members": []}
