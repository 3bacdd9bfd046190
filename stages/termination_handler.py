"""TerminationHandlerQueue: the SQS queue aws-node-termination-handler (queue mode) reads, and its EventBridge rules.

Division of work (see node_agent/addons.py): ASG terminate lifecycle hooks go to the etcd lifecycle Lambda, which
drains the node and, for a control-plane node, removes its etcd member after the drain, then completes the hook.
This queue receives only the EC2 events that are *not* ASG hooks: Spot interruption warnings, rebalance
recommendations, instance state changes and AWS Health scheduled changes for EC2. No rule here matches
``aws.autoscaling``, so NTH never acts on an event the Lambda owns.

The queue is encrypted with the cluster key (whose policy lets EventBridge use it), refuses non-TLS access and
keeps messages for 5 minutes: these are warnings with a 2-minute (Spot) or longer lead time, a stale one is
worthless, so no dead-letter queue (NTH deletes what it handled or could not match to a node).
"""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from stages.config import ClusterConfig
from stages.nag import suppress

MESSAGE_RETENTION = cdk.Duration.minutes(5)
# (construct id, rule name suffix, description, event pattern)
RULES: tuple[tuple[str, str, str, events.EventPattern], ...] = (
    (
        "SpotInterruption",
        "spot-interruption",
        "EC2 Spot instance interruption warnings to the termination handler",
        events.EventPattern(source=["aws.ec2"], detail_type=["EC2 Spot Instance Interruption Warning"]),
    ),
    (
        "RebalanceRecommendation",
        "rebalance",
        "EC2 instance rebalance recommendations to the termination handler",
        events.EventPattern(source=["aws.ec2"], detail_type=["EC2 Instance Rebalance Recommendation"]),
    ),
    (
        "InstanceStateChange",
        "state-change",
        "EC2 instance state changes to the termination handler",
        events.EventPattern(source=["aws.ec2"], detail_type=["EC2 Instance State-change Notification"]),
    ),
    (
        "ScheduledChange",
        "scheduled-change",
        "AWS Health scheduled changes for EC2 to the termination handler",
        events.EventPattern(
            source=["aws.health"],
            detail_type=["AWS Health Event"],
            detail={"service": ["EC2"], "eventTypeCategory": ["scheduledChange"]},
        ),
    ),
)


class TerminationHandlerQueue(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, config: ClusterConfig, key: kms.IKey) -> None:
        super().__init__(scope, construct_id)
        self.queue = sqs.Queue(
            self,
            "Queue",
            queue_name=config.termination_handler_queue_name,
            encryption=sqs.QueueEncryption.KMS,
            encryption_master_key=key,
            enforce_ssl=True,
            retention_period=MESSAGE_RETENTION,
        )
        suppress(
            self.queue,
            "AwsSolutions-SQS3",
            "no dead-letter queue: interruption and health notices are only useful within minutes; NTH deletes "
            "every message it handled or could not match to a node, and retention is 5 minutes",
        )
        # targets.SqsQueue adds the queue policy statement letting events.amazonaws.com send (scoped to each rule).
        self.rules = [
            events.Rule(
                self,
                construct_id_,
                rule_name=f"{config.resource_prefix}-nth-{suffix}",
                description=description,
                event_pattern=pattern,
                targets=[targets.SqsQueue(self.queue)],
            )
            for construct_id_, suffix, description, pattern in RULES
        ]
