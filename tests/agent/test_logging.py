"""Logs are JSON lines with structured fields; metrics are CloudWatch embedded-metric-format lines."""

from __future__ import annotations

import io
import json
import logging

from node_agent.log import Metrics, configure_logging, get_logger, log


def test_log_lines_are_json_with_the_fields_as_keys() -> None:
    stream = io.StringIO()
    configure_logging(stream)
    try:
        log(get_logger("test"), logging.WARNING, "removed a stale member", member_id="8e9e05c52164694d", peer_url="x")
    finally:
        logging.getLogger("node_agent").handlers.clear()
        logging.getLogger("node_agent").propagate = True
    line = json.loads(stream.getvalue().strip())
    assert line["level"] == "WARNING" and line["msg"] == "removed a stale member"
    assert line["member_id"] == "8e9e05c52164694d" and line["logger"] == "node_agent.test"
    assert line["ts"].endswith("Z")


def test_metrics_are_embedded_metric_format() -> None:
    stream = io.StringIO()
    Metrics("demo", stream).put("LaunchAbandoned", 1, Role="control-plane")
    doc = json.loads(stream.getvalue())
    directive = doc["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "DedicatedK8s"
    assert directive["Dimensions"] == [["ClusterName", "Role"]]
    assert directive["Metrics"] == [{"Name": "LaunchAbandoned", "Unit": "Count"}]
    assert doc["ClusterName"] == "demo" and doc["Role"] == "control-plane" and doc["LaunchAbandoned"] == 1
    assert isinstance(doc["_aws"]["Timestamp"], int)
