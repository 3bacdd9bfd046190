"""A small Kubernetes API client: just what a node drain needs, stdlib only (HTTPS with a client certificate).

Same reasoning as :mod:`lambdas.common.etcd_client`: the Lambda asset is a copy of our sources with no
third-party package, so the few calls a drain makes are plain REST over ``urllib``:

* ``GET /api/v1/nodes``                                          find the Node of an instance
* ``PATCH /api/v1/nodes/{name}`` (merge-patch)                   cordon: ``spec.unschedulable = true``
* ``GET /api/v1/pods?fieldSelector=spec.nodeName=...``           the pods bound to that node
* ``POST /api/v1/namespaces/{ns}/pods/{name}/eviction``          policy/v1 Eviction (PDBs are enforced
                                                                 by the API server: 429 while one blocks)
* ``DELETE /api/v1/nodes/{name}``                                remove the Node object

The client certificate (CN ``dedicated-k8s:lifecycle-drainer``) is bound to a ClusterRole with nodes
get/list/patch/delete, pods list, pods/eviction create and apps daemonsets get. Only wire concerns live
here; what to evict and when to give up is :mod:`lambdas.common.drain`.
"""

from __future__ import annotations

import enum
import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from lambdas.common.etcd_client import TlsMaterial

MIRROR_ANNOTATION = "kubernetes.io/config.mirror"


class KubeError(Exception):
    """Base class: something went wrong talking to the Kubernetes API."""


class KubeUnavailableError(KubeError):
    """The API server did not answer (connection refused, timeout, TLS failure, 5xx from a proxy)."""


class KubeRequestError(KubeError):
    """The API server answered and refused; ``message`` is its own Status message."""

    def __init__(self, message: str, *, status: int, reason: str = "") -> None:
        super().__init__(f"HTTP {status} {reason}: {message}".strip())
        self.message = message
        self.status = status
        self.reason = reason


class KubeUnauthorizedError(KubeRequestError):
    """401 (the certificate is not trusted) or 403 (RBAC does not allow the call)."""


class KubeNotFoundError(KubeRequestError):
    """404: the object does not exist (already deleted)."""


class EvictionOutcome(enum.Enum):
    EVICTED = "evicted"  # 201/200: the pod is now terminating gracefully
    BLOCKED = "blocked"  # 429: a PodDisruptionBudget does not allow it now (or API rate limiting): try later
    GONE = "gone"  # 404: the pod no longer exists


@dataclass(frozen=True)
class Node:
    name: str
    provider_id: str
    unschedulable: bool

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Node:
        spec = raw.get("spec") or {}
        return cls(
            name=str((raw.get("metadata") or {}).get("name", "")),
            provider_id=str(spec.get("providerID", "") or ""),
            unschedulable=bool(spec.get("unschedulable", False)),
        )

    def belongs_to(self, instance_id: str) -> bool:
        """Node names carry the instance ID (``i-0abc....ec2.internal``, ``i-0abc....<region>.compute.internal``,
        see :class:`node_agent.instance.InstanceIdentity`); the cloud provider sets ``aws:///<az>/<instance-id>``."""
        return (
            self.name == instance_id
            or self.name.startswith(f"{instance_id}.")
            or (self.provider_id.startswith("aws://") and self.provider_id.rsplit("/", 1)[-1] == instance_id)
        )


@dataclass(frozen=True)
class OwnerRef:
    kind: str
    name: str
    controller: bool


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    phase: str
    terminating: bool  # metadata.deletionTimestamp is set
    annotations: dict[str, str]
    owners: tuple[OwnerRef, ...]

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Pod:
        meta = raw.get("metadata") or {}
        return cls(
            namespace=str(meta.get("namespace", "default")),
            name=str(meta.get("name", "")),
            phase=str((raw.get("status") or {}).get("phase", "") or ""),
            terminating=bool(meta.get("deletionTimestamp")),
            annotations={str(k): str(v) for k, v in (meta.get("annotations") or {}).items()},
            owners=tuple(
                OwnerRef(str(o.get("kind", "")), str(o.get("name", "")), bool(o.get("controller", False)))
                for o in meta.get("ownerReferences") or []
            ),
        )

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def is_mirror(self) -> bool:
        """A static pod's mirror: the kubelet owns it; evicting it does nothing (kubectl drain skips it too)."""
        return MIRROR_ANNOTATION in self.annotations

    @property
    def daemon_set(self) -> str | None:
        for owner in self.owners:
            if owner.controller and owner.kind == "DaemonSet":
                return owner.name
        return None

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


class KubeClient:
    """One API endpoint (the internal NLB in production) with mutual TLS."""

    def __init__(self, base_url: str, tls: TlsMaterial, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.tls = tls
        self.timeout = timeout

    # -- wire ------------------------------------------------------------------------------------------------
    def _call(
        self, method: str, path: str, body: Any = None, *, content_type: str = "application/json"
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method, headers=headers)  # noqa: S310 (https URL from config)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.tls.context()) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as err:
            raise _request_error(err) from err
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # refused, DNS, TLS, timeout, cut
            raise KubeUnavailableError(f"{method} {self.base_url}{path}: {err}") from err
        if not raw:
            return {}
        try:
            parsed = json.loads(raw)
        except ValueError as err:
            raise KubeUnavailableError(f"{method} {path}: the answer is not JSON") from err
        return parsed if isinstance(parsed, dict) else {}

    # -- nodes -----------------------------------------------------------------------------------------------
    def list_nodes(self) -> list[Node]:
        return [Node.from_json(item) for item in self._call("GET", "/api/v1/nodes").get("items") or []]

    def node_for_instance(self, instance_id: str) -> Node | None:
        """The Node whose name or providerID carries ``instance_id``; None if the cluster has none."""
        return next((node for node in self.list_nodes() if node.belongs_to(instance_id)), None)

    def get_node(self, name: str) -> Node | None:
        try:
            return Node.from_json(self._call("GET", f"/api/v1/nodes/{_quote(name)}"))
        except KubeNotFoundError:
            return None

    def cordon(self, name: str) -> None:
        self._call(
            "PATCH",
            f"/api/v1/nodes/{_quote(name)}",
            {"spec": {"unschedulable": True}},
            content_type="application/merge-patch+json",
        )

    def delete_node(self, name: str) -> bool:
        """True if deleted now, False if it was already gone."""
        try:
            self._call("DELETE", f"/api/v1/nodes/{_quote(name)}")
        except KubeNotFoundError:
            return False
        return True

    # -- pods ------------------------------------------------------------------------------------------------
    def pods_on_node(self, node_name: str) -> list[Pod]:
        query = urllib.parse.urlencode({"fieldSelector": f"spec.nodeName={node_name}"})
        return [Pod.from_json(item) for item in self._call("GET", f"/api/v1/pods?{query}").get("items") or []]

    def evict(self, pod: Pod) -> tuple[EvictionOutcome, str]:
        """policy/v1 Eviction; the API server checks PodDisruptionBudgets exactly as for ``kubectl drain``."""
        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": pod.name, "namespace": pod.namespace},
        }
        path = f"/api/v1/namespaces/{_quote(pod.namespace)}/pods/{_quote(pod.name)}/eviction"
        try:
            self._call("POST", path, body)
        except KubeNotFoundError:
            return EvictionOutcome.GONE, "the pod no longer exists"
        except KubeRequestError as err:
            if err.status == 429:
                return EvictionOutcome.BLOCKED, err.message
            raise
        return EvictionOutcome.EVICTED, ""


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _request_error(err: urllib.error.HTTPError) -> KubeError:
    try:
        status_body = json.loads(err.read() or b"{}")
    except ValueError:
        status_body = {}
    if not isinstance(status_body, dict):
        status_body = {}
    message = str(status_body.get("message") or err.reason or "")
    reason = str(status_body.get("reason") or "")
    if err.code in (401, 403):
        return KubeUnauthorizedError(message, status=err.code, reason=reason)
    if err.code == 404:
        return KubeNotFoundError(message, status=err.code, reason=reason)
    if err.code in (502, 503, 504):
        return KubeUnavailableError(f"HTTP {err.code}: {message}")
    return KubeRequestError(message, status=err.code, reason=reason)
