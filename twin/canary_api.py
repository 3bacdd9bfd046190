"""The canary's production ClusterApi (``pipeline.canary.Boto3ClusterApi``) pointed at the twin.

Only the Lambda service is replaced: :class:`InProcessLambda` answers ``lambda.invoke`` by running the REAL
cluster-ops handler in this process (moto's Lambda would need Docker) and returns the Invoke response shape
(``Payload`` stream, ``FunctionError`` on an unhandled exception). Auto Scaling is the twin's AWS endpoint:
``describe_auto_scaling_groups`` carries the twin's lifecycle states and
``terminate_instance_in_auto_scaling_group`` reaches the twin's lifecycle state machine.
"""

from __future__ import annotations

import io
import json
from typing import Any

from pipeline.canary import Boto3ClusterApi
from twin.cluster import Twin
from twin.events import LambdaContext, load_handler


class InProcessLambda:
    def __init__(self, handlers: dict[str, str]) -> None:
        self.handlers = handlers
        self.invocations = 0
        self.errors = 0

    def invoke(self, *, FunctionName: str, InvocationType: str = "RequestResponse", Payload: bytes = b"") -> Any:  # noqa: N803 (boto3's names)
        self.invocations += 1
        event = json.loads(Payload or b"null")
        response: dict[str, Any] = {"StatusCode": 200, "ExecutedVersion": "$LATEST"}
        try:
            result = load_handler(self.handlers[FunctionName])(event, LambdaContext(FunctionName))
        except Exception as err:
            self.errors += 1
            result = {"errorMessage": str(err), "errorType": type(err).__name__}
            response["FunctionError"] = "Unhandled"
        response["Payload"] = io.BytesIO(json.dumps(result, default=str).encode())
        return response


def twin_cluster_api(twin: Twin) -> Boto3ClusterApi:
    cfg = twin.cfg
    return Boto3ClusterApi(
        function_name=cfg.cluster_ops_function_name,
        group_names=list(cfg.control_plane_group_names),
        lambda_client=InProcessLambda(
            {cfg.cluster_ops_function_name: twin.lambda_handler(cfg.cluster_ops_function_name)}
        ),
        autoscaling_client=twin.aws.client("autoscaling"),
    )
