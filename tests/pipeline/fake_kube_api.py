"""A local fake Kubernetes API server for the smoke test: http.server on a loopback address.

It answers the requests the official kubernetes client makes for the smoke checks with the JSON shapes of
the real API (v1 NodeList, PodList, Pod, Service, ServiceAccount, apps/v1 DaemonSet, discovery.k8s.io/v1
EndpointSliceList, Status for errors), checks the bearer token of the generated kubeconfig, and records every
request. A :class:`Scenario` sets what the cluster looks like and what goes wrong.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "smoke-test-token"
CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane"


@dataclass
class Scenario:
    control_plane_ready: list[bool] = field(default_factory=lambda: [True, True, True])
    workers_ready: list[bool] = field(default_factory=lambda: [True, True])
    # kube-system pods beyond the healthy defaults: name -> phase
    extra_system_pods: dict[str, str] = field(default_factory=dict)
    crashlooping_system_pods: list[str] = field(default_factory=list)  # Running, container not ready
    calico_ready: int | None = None  # None: ready on every node
    dns_service: bool = True
    dns_ready_endpoints: int = 2
    dns_unready_endpoints: int = 0
    schedule_test_pods: bool = True
    reads_before_running: int = 1  # GETs of a new pod that still see it Pending
    pod_ip_prefix: str = "192.168.7."  # the test pod's IP is this prefix + a counter
    irsa_webhook: bool = True
    delete_lingers_reads: int = 0  # GETs after DELETE that still find the pod
    fail_path: str | None = None  # a regex: matching requests get 500
    fail_pod_reads_until_deleted: bool = False  # GET of a created pod answers 500 until it is deleted


class FakeKubeApi:
    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.requests: list[tuple[str, str]] = []
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.service_accounts: dict[tuple[str, str], dict[str, Any]] = {}
        self.deleted_pods: list[str] = []
        self.created_pods: list[str] = []
        self.client_subjects: list[dict[str, str]] = []  # verified client certificates (TLS)
        self._reads: dict[tuple[str, str], int] = {}
        self._lingering: dict[tuple[str, str], int] = {}
        self._ip = 10
        self._lock = threading.Lock()

    # --- the cluster's objects ----------------------------------------------------------------------

    def nodes(self) -> list[dict[str, Any]]:
        s = self.scenario
        nodes = [_node(f"cp-{i}", ready, {CONTROL_PLANE_LABEL: ""}) for i, ready in enumerate(s.control_plane_ready, 1)]
        nodes += [_node(f"worker-{i}", ready, {}) for i, ready in enumerate(s.workers_ready, 1)]
        return nodes

    def system_pods(self) -> list[dict[str, Any]]:
        phases = {
            "coredns-5d78c9869d-abcde": "Running",
            "coredns-5d78c9869d-fghij": "Running",
            "kube-apiserver-cp-1": "Running",
            "kube-proxy-x1": "Running",
            "calico-node-x1": "Running",
            "cluster-autoscaler-job-1": "Succeeded",
        }
        phases.update(self.scenario.extra_system_pods)
        pods = []
        for name, phase in phases.items():
            ready = name not in self.scenario.crashlooping_system_pods
            status: dict[str, Any] = {"phase": phase}
            if phase == "Running":
                state = {"running": {}} if ready else {"waiting": {"reason": "CrashLoopBackOff"}}
                status["containerStatuses"] = [
                    {"name": "main", "ready": ready, "restartCount": 0 if ready else 7, "state": state,
                     "image": "registry.k8s.io/pause:3.10.1", "imageID": "sha256:0123"}
                ]  # fmt: skip
            pods.append(_pod_object(name, "kube-system", status))
        return pods

    # --- request handling ---------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, body: Any) -> tuple[int, Any]:
        url = urlsplit(raw_path)
        path, query = url.path, {k: v[0] for k, v in parse_qs(url.query).items()}
        with self._lock:
            self.requests.append((method, raw_path))
            if self.scenario.fail_path and re.search(self.scenario.fail_path, path):
                return 500, _status(500, "InternalError", "injected failure")
            return self._route(method, path, query, body)

    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:  # noqa: PLR0911
        s = self.scenario
        if method == "GET" and path == "/api/v1/nodes":
            items = [n for n in self.nodes() if _selected(n, query.get("labelSelector"))]
            return 200, {"kind": "NodeList", "apiVersion": "v1", "metadata": {}, "items": items}
        if method == "GET" and path == "/api/v1/namespaces/kube-system/pods":
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": self.system_pods()}
        if method == "GET" and path == "/apis/apps/v1/namespaces/kube-system/daemonsets/calico-node":
            count = len(self.nodes())
            ready = count if s.calico_ready is None else s.calico_ready
            status = {"desiredNumberScheduled": count, "currentNumberScheduled": count, "numberReady": ready,
                      "numberMisscheduled": 0}  # fmt: skip
            labels = {"k8s-app": "calico-node"}
            spec = {
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "calico-node", "image": "quay.io/calico/node:v3.30.3"}]},
                },
            }
            return 200, {"kind": "DaemonSet", "apiVersion": "apps/v1",
                         "metadata": {"name": "calico-node", "namespace": "kube-system"}, "spec": spec,
                         "status": status}  # fmt: skip
        if method == "GET" and path == "/api/v1/namespaces/kube-system/services/kube-dns":
            if not s.dns_service:
                return 404, _status(404, "NotFound", 'services "kube-dns" not found')
            return 200, {"kind": "Service", "apiVersion": "v1",
                         "metadata": {"name": "kube-dns", "namespace": "kube-system"},
                         "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 53, "protocol": "UDP"}]}}  # fmt: skip
        if method == "GET" and path == "/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices":
            endpoints = [{"addresses": [f"192.168.0.{i}"], "conditions": {"ready": True}}
                         for i in range(s.dns_ready_endpoints)]  # fmt: skip
            endpoints += [{"addresses": [f"192.168.1.{i}"], "conditions": {"ready": False}}
                          for i in range(s.dns_unready_endpoints)]  # fmt: skip
            selected = query.get("labelSelector") == "kubernetes.io/service-name=kube-dns"
            items = [{"metadata": {"name": "kube-dns-abcde", "labels": {"kubernetes.io/service-name": "kube-dns"}},
                      "addressType": "IPv4", "endpoints": endpoints}] if selected else []  # fmt: skip
            return 200, {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1", "metadata": {},
                         "items": items}  # fmt: skip
        match = re.fullmatch(r"/api/v1/namespaces/([^/]+)/(pods|serviceaccounts)(?:/([^/]+))?", path)
        if match:
            namespace, kind, name = match.groups()
            if kind == "serviceaccounts":
                return self._service_accounts(method, namespace, name, body)
            return self._pods(method, namespace, name, body)
        return 404, _status(404, "NotFound", f"the fake API does not serve {method} {path}")

    def _service_accounts(self, method: str, namespace: str, name: str | None, body: Any) -> tuple[int, Any]:
        if method == "POST" and name is None:
            account = {**body, "metadata": {**body["metadata"], "namespace": namespace, "uid": "sa-uid"}}
            self.service_accounts[(namespace, account["metadata"]["name"])] = account
            return 201, account
        if method == "DELETE" and name is not None:
            if (namespace, name) not in self.service_accounts:
                return 404, _status(404, "NotFound", f'serviceaccounts "{name}" not found')
            return 200, self.service_accounts.pop((namespace, name))
        return 405, _status(405, "MethodNotAllowed", method)

    def _pods(self, method: str, namespace: str, name: str | None, body: Any) -> tuple[int, Any]:  # noqa: PLR0911
        s = self.scenario
        if method == "POST" and name is None:
            pod = json.loads(json.dumps(body))
            pod["metadata"].update(namespace=namespace, uid=f"uid-{len(self.created_pods)}")
            pod["status"] = {"phase": "Pending"}
            account = pod["spec"].get("serviceAccountName")
            role = (self.service_accounts.get((namespace, account or ""), {}).get("metadata", {})
                    .get("annotations", {}).get("eks.amazonaws.com/role-arn"))  # fmt: skip
            if account and (namespace, account) not in self.service_accounts:
                return 403, _status(403, "Forbidden", f'serviceaccount "{account}" not found')
            if role and s.irsa_webhook:  # what the pod identity webhook's mutation adds
                for container in pod["spec"]["containers"]:
                    container.setdefault("env", []).extend(
                        [{"name": "AWS_ROLE_ARN", "value": role},
                         {"name": "AWS_WEB_IDENTITY_TOKEN_FILE",
                          "value": "/var/run/secrets/eks.amazonaws.com/serviceaccount/token"}]
                    )  # fmt: skip
            key = (namespace, pod["metadata"]["name"])
            self.pods[key] = pod
            self._reads[key] = 0
            self.created_pods.append(pod["metadata"]["name"])
            return 201, pod
        if name is None:
            return 405, _status(405, "MethodNotAllowed", method)
        key = (namespace, name)
        if method == "GET" and s.fail_pod_reads_until_deleted and key in self.pods and name not in self.deleted_pods:
            return 500, _status(500, "InternalError", "etcdserver: request timed out")
        if method == "GET":
            if key in self._lingering:
                self._lingering[key] -= 1
                if self._lingering[key] < 0:
                    del self._lingering[key]
                    self.pods.pop(key, None)
            pod = self.pods.get(key)
            if pod is None:
                return 404, _status(404, "NotFound", f'pods "{name}" not found')
            self._reads[key] += 1
            if s.schedule_test_pods and pod["status"]["phase"] == "Pending":
                pod["spec"]["nodeName"] = "worker-1"
                if self._reads[key] > s.reads_before_running:
                    self._ip += 1
                    pod["status"] = {"phase": "Running", "podIP": f"{s.pod_ip_prefix}{self._ip}"}
            return 200, pod
        if method == "DELETE":
            pod = self.pods.get(key)
            if pod is None or key in self._lingering:
                return 404, _status(404, "NotFound", f'pods "{name}" not found')
            self.deleted_pods.append(name)
            if s.delete_lingers_reads:
                self._lingering[key] = s.delete_lingers_reads
            else:
                del self.pods[key]
            return 200, pod
        return 405, _status(405, "MethodNotAllowed", method)


def _node(name: str, ready: bool, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **labels}},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                   "reason": "KubeletReady" if ready else "KubeletNotReady"}]},
    }  # fmt: skip


def _pod_object(name: str, namespace: str, status: dict[str, Any]) -> dict[str, Any]:
    container = {"name": "main", "image": "registry.k8s.io/pause:3.10.1"}
    return {"metadata": {"name": name, "namespace": namespace}, "spec": {"containers": [container]}, "status": status}


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}  # fmt: skip


def _selected(obj: dict[str, Any], selector: str | None) -> bool:
    """Label selectors of the forms the smoke test sends: ``key``, ``!key``, ``key=value`` (comma-joined)."""
    labels = obj["metadata"].get("labels", {})
    for term in filter(None, (selector or "").split(",")):
        if term.startswith("!"):
            if term[1:] in labels:
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key) != value:
                return False
        elif term not in labels:
            return False
    return True


def _handler(api: FakeKubeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            peer = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
            if peer:  # verified against the cluster CA by the TLS layer (CERT_REQUIRED)
                subject: Any = peer["subject"]  # ((("commonName", "..."),), ...)
                api.client_subjects.append({str(k): str(v) for rdn in subject for k, v in rdn})
            elif self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._reply(401, _status(401, "Unauthorized", "Unauthorized"))
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            code, payload = api.handle(self.command, self.path, body)
            self._reply(code, payload)

        def _reply(self, code: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def serve(
    scenario: Scenario, tmp: Path, *, tls: tuple[Path, Path, Path] | None = None
) -> Iterator[tuple[FakeKubeApi, Path]]:
    """Start the fake API on 127.0.0.1 (a free port) and write a bearer-token kubeconfig for it; yield both.

    With ``tls`` (server certificate, its key, the client CA) it serves HTTPS and requires a client certificate
    signed by that CA, as the API server does.
    """
    api = FakeKubeApi(scenario)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    scheme = "http"
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls[0], tls[1])
        context.load_verify_locations(tls[2])
        context.verify_mode = ssl.CERT_REQUIRED
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    kubeconfig = tmp / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": f"{scheme}://{host!s}:{port}"}}],
                "users": [{"name": "smoke", "user": {"token": TOKEN}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "smoke"}}],
                "current-context": "fake",
            }
        )
    )
    try:
        yield api, kubeconfig
    finally:
        server.shutdown()
        server.server_close()
