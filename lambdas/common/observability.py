"""Structured logs and CloudWatch metrics for the Lambdas, stdlib only.

The shape follows Powertools for AWS Lambda (one JSON object per line with level, message, service and
the request ID; metrics in CloudWatch Embedded Metric Format on stdout, which Lambda's log pipeline turns
into metrics without an API call or a VPC endpoint). We do not ship Powertools itself: the asset stays a
copy of our own sources (see README, dependency notes).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}


class Logger:
    def __init__(self, service: str, stream: TextIO | None = None) -> None:
        self.service = service
        self.stream = stream
        self.context: dict[str, Any] = {}
        self.level = LEVELS.get(os.environ.get("LOG_LEVEL", "INFO").upper(), 20)

    def bind(self, **fields: Any) -> None:
        """Fields added to every line until the next :meth:`reset` (request ID, instance ID ...)."""
        self.context.update({k: v for k, v in fields.items() if v is not None})

    def reset(self) -> None:
        self.context = {}

    def log(self, level: str, message: str, **fields: Any) -> dict[str, Any]:
        line = {
            "level": level,
            "message": message,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "service": self.service,
            **self.context,
            **{k: v for k, v in fields.items() if v is not None},
        }
        if LEVELS[level] >= self.level:
            print(json.dumps(line, default=str), file=self.stream or sys.stdout, flush=True)
        return line

    def info(self, message: str, **fields: Any) -> dict[str, Any]:
        return self.log("INFO", message, **fields)

    def warning(self, message: str, **fields: Any) -> dict[str, Any]:
        return self.log("WARNING", message, **fields)

    def error(self, message: str, **fields: Any) -> dict[str, Any]:
        return self.log("ERROR", message, **fields)


class Metrics:
    """Collects metrics during one invocation and writes them as one EMF document on :meth:`flush`."""

    def __init__(self, namespace: str | None = None, stream: TextIO | None = None) -> None:
        self.namespace = namespace or os.environ.get("METRICS_NAMESPACE", "DedicatedK8s")
        self.stream = stream
        self.values: dict[str, tuple[float, str]] = {}
        self.dimensions: dict[str, str] = {}

    def add(self, name: str, value: float, unit: str = "Count") -> None:
        if name in self.values and unit == "Count":
            value += self.values[name][0]
        self.values[name] = (value, unit)

    def flush(self, dimensions: Mapping[str, str] | None = None) -> dict[str, Any] | None:
        if not self.values:
            return None
        dims = {**self.dimensions, **(dimensions or {})}
        doc: dict[str, Any] = {
            "_aws": {
                "Timestamp": int(time.time() * 1000),
                "CloudWatchMetrics": [
                    {
                        "Namespace": self.namespace,
                        "Dimensions": [sorted(dims)],
                        "Metrics": [{"Name": n, "Unit": u} for n, (_, u) in sorted(self.values.items())],
                    }
                ],
            },
            **dims,
            **{n: v for n, (v, _) in self.values.items()},
        }
        print(json.dumps(doc), file=self.stream or sys.stdout, flush=True)
        self.values = {}
        return doc
