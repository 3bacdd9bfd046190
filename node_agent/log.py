"""Structured JSON log lines on stdout (journald keeps them) and CloudWatch embedded-metric-format lines.

EMF lines are plain stdout JSON that the CloudWatch agent turns into metrics: no API call, no internet.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

LOGGER_NAME = "node_agent"
METRICS_NAMESPACE = "DedicatedK8s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(stream: IO[str] | None = None, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger(LOGGER_NAME)
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}")


def log(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    """Log ``msg`` with structured ``fields`` (they become top-level JSON keys)."""
    logger.log(level, msg, extra={"fields": fields})


class Metrics:
    """Writes one EMF JSON line per metric to ``stream`` (stdout in production)."""

    def __init__(self, cluster_name: str, stream: IO[str] | None = None, namespace: str = METRICS_NAMESPACE) -> None:
        self.cluster_name = cluster_name
        self.stream = stream
        self.namespace = namespace

    def put(self, name: str, value: float, unit: str = "Count", **dimensions: str) -> dict[str, Any]:
        dims = {"ClusterName": self.cluster_name, **dimensions}
        doc: dict[str, Any] = {
            "_aws": {
                "Timestamp": int(time.time() * 1000),
                "CloudWatchMetrics": [
                    {"Namespace": self.namespace, "Dimensions": [list(dims)], "Metrics": [{"Name": name, "Unit": unit}]}
                ],
            },
            **dims,
            name: value,
        }
        stream = self.stream or sys.stdout
        stream.write(json.dumps(doc) + "\n")
        stream.flush()
        return doc
