"""The scheduled reconciler: observe etcd and the control-plane groups, then enqueue removal requests for
the lifecycle Lambda (:mod:`lambdas.common.reconcile`). Also publishes the membership metrics the alarms
watch (members, healthy voters, quorum margin, learners)."""

from __future__ import annotations

from typing import Any

from lambdas.common.cluster_aws import ClusterAws, default_cluster_aws
from lambdas.common.etcd_client import EtcdUnavailableError
from lambdas.common.membership import observe
from lambdas.common.observability import Logger, Metrics
from lambdas.common.reconcile import plan_reconcile

LOGGER = Logger("etcd-reconciler")


def cluster_aws() -> ClusterAws:
    """Created on first use, kept for warm invocations; tests and the twin point it elsewhere."""
    return default_cluster_aws()


def handle(event: Any, context: Any) -> dict[str, Any]:
    aws = cluster_aws()
    settings = aws.settings
    metrics = Metrics(settings.metrics_namespace)
    LOGGER.reset()
    LOGGER.bind(request_id=getattr(context, "aws_request_id", None))
    tls = aws.etcd_tls()
    if tls is None:
        LOGGER.info("cluster not initialised yet: nothing to reconcile")
        return {"initialised": False, "requests": 0}
    try:
        view = observe(aws.etcd_client(tls), aws.etcd_endpoints())
    except EtcdUnavailableError as err:
        LOGGER.error("etcd unreachable: no change requested", error=str(err))
        metrics.add("EtcdUnreachable", 1)
        metrics.flush({"ClusterName": settings.cluster_name})
        return {"initialised": True, "error": str(err), "requests": 0}
    group_instances = aws.group_instances()
    in_groups = {gi.instance_id for gi in group_instances}
    outside = [m.instance_id for m in view.members if m.instance_id and m.instance_id not in in_groups]
    states = aws.instance_states(outside) if outside else {}
    hooks = {group: aws.terminate_hook_name(group) for group in settings.control_plane_groups}
    plan = plan_reconcile(view, group_instances, hooks, states)
    for request in plan.requests:
        aws.enqueue(request)
        LOGGER.info("removal requested", **request["detail"])
    for note in plan.notes:
        LOGGER.info("observed", note=note)
    metrics.add("EtcdMembers", len(view.members), "Count")
    metrics.add("HealthyVoters", len(view.healthy_voters), "Count")
    metrics.add("QuorumMargin", view.quorum_margin, "Count")
    metrics.add("Learners", len(view.learners), "Count")
    metrics.add("ReconcileRequests", len(plan.requests), "Count")
    # A terminate hook abandoned (past the Lambda's deadline, or timed out with its ABANDON default) leaves
    # the instance Retained: running, outside capacity, its member possibly still in etcd. An operator decides.
    metrics.add("RetainedInstances", sum("Retained" in gi.lifecycle_state for gi in group_instances), "Count")
    metrics.add("TerminatingWaits", sum(gi.lifecycle_state == "Terminating:Wait" for gi in group_instances), "Count")
    metrics.flush({"ClusterName": settings.cluster_name})
    return {"initialised": True, "requests": len(plan.requests), "members": len(view.members), "notes": plan.notes}
