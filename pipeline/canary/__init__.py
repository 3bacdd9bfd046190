"""The quorum canary: a rolling replacement of every control-plane node that must keep etcd quorum.

The pipeline runs it after each deployment (``python -m pipeline.canary``); the local cluster twin
runs the same code through its own :class:`~pipeline.canary.api.ClusterApi`.
"""

from pipeline.canary.api import Boto3ClusterApi, ClusterApi, StatusUnavailableError
from pipeline.canary.runner import CanaryCheckError, CanaryOptions, CanaryResult, run

__all__ = [
    "Boto3ClusterApi",
    "CanaryCheckError",
    "CanaryOptions",
    "CanaryResult",
    "ClusterApi",
    "StatusUnavailableError",
    "run",
]
