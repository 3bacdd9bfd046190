"""Day-2 observability in the synthesized cluster template: every alarm the operator needs, what it watches,
its threshold, the dashboard, the alarm topic and the node log groups (audit log retention from config)."""

from __future__ import annotations

from typing import Any

import pytest
from aws_cdk.assertions import Template

from stages.observability import CA_EXPIRY_ALARM_DAYS, CERTIFICATE_EXPIRY_ALARM_DAYS
from tests.stacks.conftest import default_context


def _alarms(template: Template) -> dict[str, dict[str, Any]]:
    """Alarm properties by the alarm's construct name (the logical ID carries it)."""
    found = template.find_resources("AWS::CloudWatch::Alarm")
    return {logical_id: resource["Properties"] for logical_id, resource in found.items()}


def _alarm(template: Template, name: str) -> dict[str, Any]:
    matches = [props for logical_id, props in _alarms(template).items() if f"Observability{name}" in logical_id]
    assert len(matches) == 1, f"one alarm named {name}: {sorted(_alarms(template))}"
    return matches[0]


def _metric_names(props: dict[str, Any]) -> set[str]:
    names = {props["MetricName"]} if "MetricName" in props else set()
    names |= {q["MetricStat"]["Metric"]["MetricName"] for q in props.get("Metrics", []) if "MetricStat" in q}
    return names


@pytest.mark.parametrize(
    ("name", "metrics", "operator", "threshold"),
    [
        ("ControlPlaneInstancesUnhealthy", {"GroupInServiceInstances"}, "LessThanThreshold", 3),
        ("ApiUnhealthyTargets", {"UnHealthyHostCount"}, "GreaterThanOrEqualToThreshold", 1),
        ("EtcdMemberCount", {"EtcdMembers"}, "GreaterThanOrEqualToThreshold", 1),
        ("QuorumMargin", {"QuorumMargin"}, "LessThanOrEqualToThreshold", 0),
        ("LifecycleFunctionErrors", {"Errors"}, "GreaterThanOrEqualToThreshold", 1),
        ("LifecycleDurationNearTimeout", {"Duration"}, "GreaterThanOrEqualToThreshold", 48000),
        ("RetainedControlPlaneInstances", {"RetainedInstances"}, "GreaterThanOrEqualToThreshold", 1),
        ("RemovalAbandoned", {"RemovalAbandoned"}, "GreaterThanOrEqualToThreshold", 1),
        ("DrainDeadlinePassed", {"DrainDeadlinePassed"}, "GreaterThanOrEqualToThreshold", 1),
        ("BackupAge", {"SnapshotUploaded"}, "LessThanThreshold", 1),
        ("ClusterStateThrottles", {"ReadThrottleEvents", "WriteThrottleEvents"}, "GreaterThanOrEqualToThreshold", 1),
        ("ClusterCaExpiry", {"ClusterCaExpiryDays"}, "LessThanThreshold", CA_EXPIRY_ALARM_DAYS),
        ("CertificateExpiry", {"CertificateExpiryDays"}, "LessThanThreshold", CERTIFICATE_EXPIRY_ALARM_DAYS),
    ],
)
def test_each_day_two_alarm_watches_its_signal_and_notifies_the_topic(
    cluster_template: Template, name: str, metrics: set[str], operator: str, threshold: float
) -> None:
    props = _alarm(cluster_template, name)
    assert _metric_names(props) == metrics
    assert props["ComparisonOperator"] == operator
    assert props["Threshold"] == threshold
    topics = cluster_template.find_resources("AWS::SNS::Topic")
    assert [a["Ref"] for a in props["AlarmActions"]] == list(topics), "alarms go to the stack's own topic"


def test_the_ca_alarm_fires_a_year_ahead() -> None:
    assert CA_EXPIRY_ALARM_DAYS >= 365


def test_backup_age_alarm_is_two_snapshot_intervals_and_missing_snapshots_count_as_breaching(
    cluster_template: Template,
) -> None:
    props = _alarm(cluster_template, "BackupAge")
    interval = default_context().get("snapshotIntervalMinutes", 30)
    assert props["Period"] == interval * 60
    assert props["EvaluationPeriods"] == props["DatapointsToAlarm"] == 2
    assert props["TreatMissingData"] == "breaching", "no metric at all means no snapshot at all"
    assert {d["Name"]: d["Value"] for d in props["Dimensions"]}["Role"] == "control-plane"


def test_the_unhealthy_control_plane_alarm_sums_every_control_plane_group(cluster_template: Template) -> None:
    props = _alarm(cluster_template, "ControlPlaneInstancesUnhealthy")
    stats = [q["MetricStat"] for q in props["Metrics"] if "MetricStat" in q]
    groups = [d["Value"] for s in stats for d in s["Metric"]["Dimensions"] if d["Name"] == "AutoScalingGroupName"]
    assert len(groups) == 3 and len(set(map(str, groups))) == 3


def test_the_dashboard_shows_membership_control_plane_backups_and_alarms(cluster_template: Template) -> None:
    dashboards = cluster_template.find_resources("AWS::CloudWatch::Dashboard")
    assert len(dashboards) == 1
    body = str(next(iter(dashboards.values()))["Properties"]["DashboardBody"])
    for needle in ("etcd membership", "Control plane", "Backups and certificates", "UnHealthyHostCount",
                   "SnapshotUploaded", "LastSnapshotAgeSeconds", "ClusterCaExpiryDays", "alarm"):  # fmt: skip
        assert needle in body, needle


def test_alarm_topic_is_encrypted_and_subscribes_the_configured_addresses(synth: Any) -> None:
    template = synth({"alarmEmails": ["ops@example.com", "oncall@example.com"]})["K8sClusterStack"]
    topic = next(iter(template.find_resources("AWS::SNS::Topic").values()))["Properties"]
    assert "KmsMasterKeyId" in topic
    subscriptions = template.find_resources("AWS::SNS::Subscription")
    assert sorted(s["Properties"]["Endpoint"] for s in subscriptions.values()) == [
        "oncall@example.com",
        "ops@example.com",
    ]


def test_audit_and_metrics_log_groups_are_encrypted_with_configured_retention(synth: Any) -> None:
    template = synth({"auditLogRetentionDays": 731})["K8sClusterStack"]
    groups = {
        g["Properties"]["LogGroupName"]: g["Properties"]
        for g in template.find_resources("AWS::Logs::LogGroup").values()
    }
    cluster = default_context()["clusterName"]
    for kind in ("audit", "metrics"):
        props = groups[f"/dedicated-k8s/{cluster}/{kind}"]
        assert props["RetentionInDays"] == 731
        assert "KmsKeyId" in props
