"""Observability: the alarm topic, alarms and the cluster dashboard."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from stages.config import ClusterConfig

METRICS_NAMESPACE = "DedicatedK8s"


class AlarmTopic(Construct):
    """The SNS topic every alarm and ASG notification goes to (created first: groups notify it)."""

    def __init__(self, scope: Construct, construct_id: str, *, config: ClusterConfig, key: kms.IKey) -> None:
        super().__init__(scope, construct_id)
        self.topic = sns.Topic(
            self, "Topic", topic_name=f"{config.resource_prefix}-alarms", master_key=key, enforce_ssl=True
        )
        for email in config.alarm_emails:
            self.topic.add_subscription(subscriptions.EmailSubscription(email))


class ClusterObservability(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: ClusterConfig,
        topic: sns.ITopic,
        lifecycle_function: lambda_.IFunction,
        reconciler_function: lambda_.IFunction,
        dead_letter_queue: sqs.IQueue,
    ) -> None:
        super().__init__(scope, construct_id)
        action = cw_actions.SnsAction(topic)
        dimensions = {"ClusterName": config.cluster_name}

        def cluster_metric(name: str, statistic: str = "Minimum") -> cloudwatch.Metric:
            return cloudwatch.Metric(
                namespace=METRICS_NAMESPACE,
                metric_name=name,
                dimensions_map=dimensions,
                statistic=statistic,
                period=cdk.Duration.minutes(5),
            )

        self.alarms: dict[str, cloudwatch.Alarm] = {}

        def alarm(name: str, description: str, **kwargs: object) -> None:
            created = cloudwatch.Alarm(self, name, alarm_description=description, **kwargs)  # type: ignore[arg-type]
            created.add_alarm_action(action)
            self.alarms[name] = created

        alarm(
            "LifecycleFunctionErrors",
            "the etcd lifecycle Lambda failed",
            metric=lifecycle_function.metric_errors(period=cdk.Duration.minutes(5)),
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        alarm(
            "ReconcilerErrors",
            "the etcd reconciler failed",
            metric=reconciler_function.metric_errors(period=cdk.Duration.minutes(15)),
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        alarm(
            "LifecycleDeadLetters",
            "a terminate lifecycle event could not be processed: a hook may be stuck",
            metric=dead_letter_queue.metric_approximate_number_of_messages_visible(period=cdk.Duration.minutes(5)),
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        alarm(
            "RemovalAbandoned",
            "an etcd removal stayed unsafe past its deadline; the instance is Retained and needs an operator",
            metric=cluster_metric("RemovalAbandoned", "Sum"),
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        alarm(
            "RetainedControlPlaneInstances",
            "a control-plane terminate hook was abandoned or timed out: the instance is Retained (running, outside "
            "the group's capacity) and its etcd member may remain; check the etcd lifecycle logs, then terminate it",
            metric=cluster_metric("RetainedInstances", "Maximum"),
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        members = cluster_metric("EtcdMembers", "Maximum")
        alarm(
            "EtcdMemberCount",
            f"etcd member count differs from the desired {config.control_plane_count} for 15 minutes",
            metric=cloudwatch.MathExpression(
                expression=f"ABS(members - {config.control_plane_count})",
                using_metrics={"members": members},
                period=cdk.Duration.minutes(5),
            ),
            threshold=1,
            evaluation_periods=3,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.BREACHING,
        )
        alarm(
            "QuorumMargin",
            "healthy etcd voters minus quorum reached 0: one more failure loses quorum",
            metric=cluster_metric("QuorumMargin"),
            threshold=0,
            evaluation_periods=2,
            comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.BREACHING,
        )

        self.dashboard = cloudwatch.Dashboard(self, "Dashboard", dashboard_name=f"{config.resource_prefix}-cluster")
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="etcd membership",
                left=[members, cluster_metric("HealthyVoters"), cluster_metric("QuorumMargin")],
            ),
            cloudwatch.GraphWidget(
                title="Lifecycle Lambda",
                left=[lifecycle_function.metric_invocations(), lifecycle_function.metric_errors()],
                right=[lifecycle_function.metric_duration()],
            ),
            cloudwatch.AlarmStatusWidget(title="Alarms", alarms=list(self.alarms.values())),
        )
