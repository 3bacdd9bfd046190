"""Structured JSON log lines on stdout (journald keeps them) and CloudWatch embedded-metric-format lines.

EMF lines go to stdout and to the CloudWatch agent's local EMF listener, which turns them into metrics:
no API call, no internet (:mod:`node_agent.telemetry`).
"""

from __future__ import annotations

import json
import logging
import socket
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
    """Writes one EMF JSON line per metric to ``stream`` (stdout in production: journald keeps it) and, when
    ``emf_endpoint`` is set, sends the same line to the CloudWatch agent's local EMF listener (UDP, best
    effort: a metric must never fail the agent), which delivers it to ``log_group`` as a metric."""

    def __init__(
        self,
        cluster_name: str,
        stream: IO[str] | None = None,
        namespace: str = METRICS_NAMESPACE,
        *,
        emf_endpoint: tuple[str, int] | None = None,
        log_group: str | None = None,
    ) -> None:
        self.cluster_name = cluster_name
        self.stream = stream
        self.namespace = namespace
        self.emf_endpoint = emf_endpoint
        self.log_group = log_group

    def put(self, name: str, value: float, unit: str = "Count", **dimensions: str) -> dict[str, Any]:
        dims = {"ClusterName": self.cluster_name, **dimensions}
        meta: dict[str, Any] = {
            "Timestamp": int(time.time() * 1000),
            "CloudWatchMetrics": [
                {"Namespace": self.namespace, "Dimensions": [list(dims)], "Metrics": [{"Name": name, "Unit": unit}]}
            ],
        }
        if self.log_group:
            meta["LogGroupName"] = self.log_group
        doc: dict[str, Any] = {"_aws": meta, **dims, name: value}
        line = json.dumps(doc)
        stream = self.stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()
        if self.emf_endpoint is not None:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.sendto(line.encode() + b"\n", self.emf_endpoint)
            except OSError:
                pass  # the CloudWatch agent is down: the line is still in the journal
        return doc
