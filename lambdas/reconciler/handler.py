"""The scheduled reconciler: observe etcd and the control-plane groups, then enqueue removal requests for
the lifecycle Lambda (:mod:`lambdas.common.reconcile`), abandoned joins included (:mod:`lambdas.common.join_watch`,
whose records of the joins in flight it keeps in the cluster-state table). Also publishes the membership
metrics the alarms watch (members, healthy voters, quorum margin, learners, abandoned joins)."""

from __future__ import annotations

import time
from typing import Any

from lambdas.common.cluster_aws import GONE_STATES, ClusterAws, default_cluster_aws
from lambdas.common.etcd_client import EtcdUnavailableError
from lambdas.common.join_watch import AbandonedJoin, JoinTimings, JoinWatchStore, live_instances_by_ip, watch_joins
from lambdas.common.membership import ClusterView, observe
from lambdas.common.observability import Logger, Metrics
from lambdas.common.reconcile import plan_reconcile

LOGGER = Logger("etcd-reconciler")


def now() -> float:
    """The reconciler's clock (epoch seconds); the fault-injection tests move it to show time passing."""
    return time.time()


def watch_abandoned_joins(aws: ClusterAws, view: ClusterView, states: dict[str, str | None]) -> list[AbandonedJoin]:
    """This run's look at the joins in flight (:mod:`lambdas.common.join_watch`), its records kept in the
    cluster-state table for the next run. Without a join in flight nothing is read from EC2 or the table
    unless records of an earlier one are to be cleared."""
    store = JoinWatchStore(aws.dynamodb, aws.settings.cluster_state_table)
    previous, version = store.load()
    if not view.changes_in_flight() and not previous:
        return []
    settings = aws.settings
    holders = live_instances_by_ip(aws.ec2, settings.cluster_tag_key, settings.cluster_name)
    gone = {iid for iid, state in states.items() if state is None or state in GONE_STATES}
    watches, abandoned = watch_joins(view, previous, ip_holders=holders, gone_instance_ids=gone, now=now(),
                                     timings=JoinTimings.from_env())  # fmt: skip
    if not store.save(watches, version):
        LOGGER.warning("another reconciler run saved the join records first: this run's are dropped")
    return abandoned


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
    joining = [m.instance_id for m in view.changes_in_flight() if m.instance_id and m.instance_id not in outside]
    states = aws.instance_states([*outside, *joining]) if outside or joining else {}
    hooks = {group: aws.terminate_hook_name(group) for group in settings.control_plane_groups}
    abandoned = watch_abandoned_joins(aws, view, states)
    plan = plan_reconcile(view, group_instances, hooks, states, abandoned)
    for request in plan.requests:
        aws.enqueue(request)
        LOGGER.info("removal requested", **request["detail"])
    metrics.add("AbandonedJoins", len(abandoned), "Count")
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
