"""The version skew guard: may a node (or AMI) of version ``new`` join a cluster running ``running``?

One rule, used at synth (``stages/config.py``, with ``deployedKubernetesVersion``) and at node boot
(``node_agent/bootstrap.py``, against the version recorded in the cluster-state item):

* same minor, same or newer patch (``1.34.2`` -> ``1.34.2`` or ``1.34.5``): allowed;
* exactly one minor ahead, any patch (``1.34.2`` -> ``1.35.0``): allowed, this is an upgrade step;
* older in any way (``1.34.2`` -> ``1.34.1`` or ``1.33.9``): refused, kubeadm does not downgrade a cluster;
* two or more minors ahead (``1.34.2`` -> ``1.36.0``), or another major: refused.

Why: the Kubernetes version skew policy (kubernetes.io/releases/version-skew-policy) keeps the newest and
oldest kube-apiserver of an HA control plane within one minor version, and kubeadm upgrades one minor at
a time (skipping a minor is not supported). A replacement rollout runs old and new control-plane nodes
side by side, so a new AMI may be at most one minor ahead of the cluster it joins.

Pure stdlib: imported by the CDK app and by the node agent on the AMI.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")

RULE = (
    "a new node may run the cluster's minor version (same or newer patch) or exactly one minor version "
    "ahead; never older, never two or more minors ahead"
)


class VersionSkewError(ValueError):
    """The new version may not join (or upgrade) a cluster of the running version; the message says why."""


class KubernetesVersion(NamedTuple):
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def parse_version(value: str) -> KubernetesVersion:
    """``1.34.2`` (or ``v1.34.2``, as kubeadm writes it) as numbers; anything else is a VersionSkewError."""
    match = _VERSION.match(value.strip()) if isinstance(value, str) else None
    if not match:
        raise VersionSkewError(f"{value!r} is not a Kubernetes version such as '1.34.2'")
    major, minor, patch = (int(part) for part in match.groups())
    return KubernetesVersion(major, minor, patch)


def skew_problem(running: str, new: str) -> str | None:
    """Why ``new`` may not join a cluster running ``running``, or None if it may."""
    old, nxt = parse_version(running), parse_version(new)
    prefix = f"Kubernetes {nxt} cannot join a cluster running {old}"
    if nxt.major != old.major:
        return f"{prefix}: a major version change is not an upgrade by replacement ({RULE})"
    if nxt.minor < old.minor or (nxt.minor == old.minor and nxt.patch < old.patch):
        return f"{prefix}: it is older than the cluster, and kubeadm does not downgrade a cluster ({RULE})"
    if nxt.minor > old.minor + 1:
        return (
            f"{prefix}: it is {nxt.minor - old.minor} minor versions ahead; upgrade one minor at a time "
            f"(first to {old.major}.{old.minor + 1}.x) ({RULE})"
        )
    return None


WORKER_RULE = (
    "a worker runs the cluster's minor version, same or newer patch: its kubelet may never be newer than the "
    "API server (version skew policy) and, by the AMI rule above, never older than the cluster"
)


def worker_skew_problem(cluster: str, worker: str) -> str | None:
    """Why a worker of version ``worker`` may not join a cluster whose control plane runs ``cluster``, or None.
    During a control-plane rollout a worker launched from the new AMI waits (abandons; its group retries) until
    the cluster records the new version: workers follow the control plane, never lead it."""
    api, kubelet = parse_version(cluster), parse_version(worker)
    prefix = f"a Kubernetes {kubelet} worker cannot join a cluster running {api}"
    if (kubelet.major, kubelet.minor) > (api.major, api.minor):
        return f"{prefix}: its kubelet would be newer than the API server ({WORKER_RULE})"
    if kubelet < api:
        return f"{prefix}: it is older than the cluster ({WORKER_RULE})"
    return None


def check_upgrade(running: str, new: str) -> None:
    """Raise :class:`VersionSkewError` naming both versions and the rule unless ``new`` may join ``running``."""
    problem = skew_problem(running, new)
    if problem is not None:
        raise VersionSkewError(problem)
