"""A small Kubernetes API simulation for the drain tests: we cannot run an API server here.

What is real: HTTPS with mutual TLS (a throwaway CA, a server certificate with the loopback address as SAN and
the drainer's client certificate ``CN=dedicated-k8s:lifecycle-drainer``, all made by openssl as for the etcd
tests), the REST paths, verbs, content types and Status bodies the drain uses (node list/get/merge-patch/
delete, pod list with ``fieldSelector=spec.nodeName=...``, policy/v1 Eviction on ``pods/{name}/eviction``).

What is simulated: the API server's state is a dict of nodes and pods; a PodDisruptionBudget is modelled as
"this pod may not be evicted now" (429 with the API server's message) until the test allows it; the
kubelet's part (an evicted pod finishing its graceful termination) happens at once (``grace="instant"``)
or when the test calls :meth:`KubeApiSim.finish_terminating`. RBAC is one rule: only the drainer's CN is
authorized (403 otherwise). Every request is logged, and :attr:`journal` records the state changes in
order (shared with the tests' other recorders to assert ordering across etcd, the API and Auto Scaling).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from lambdas.common.etcd_client import TlsMaterial
from tests.agent.kubeadm_emulator import free_loopback_ip, make_ca, make_leaf

DRAINER_CN = "dedicated-k8s:lifecycle-drainer"
PDB_MESSAGE = "Cannot evict pod as it would violate the pod's disruption budget."


def node_json(name: str, instance_id: str, az: str = "us-east-1a") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "spec": {"providerID": f"aws:///{az}/{instance_id}"},
    }


def pod_json(
    namespace: str,
    name: str,
    node: str,
    *,
    owner: tuple[str, str] | None = ("ReplicaSet", "web-7d9f"),
    annotations: dict[str, str] | None = None,
    phase: str = "Running",
) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": namespace, "name": name, "annotations": annotations or {}}
    if owner:
        meta["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1], "controller": True, "uid": "u-" + name}
        ]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"nodeName": node}, "status": {"phase": phase}}


@dataclass
class KubeApiSim:
    root: Path
    grace: str = "instant"  # "instant": an evicted pod is gone at once; "manual": finish_terminating()
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    pdb_blocked: set[tuple[str, str]] = field(default_factory=set)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path with query)
    journal: list[tuple[str, str]] = field(default_factory=list)  # ("cordon", node), ("evict", "ns/pod"), ...
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        pki = self.root / "kube-pki"
        self.ca_cert, ca_key = pki / "ca.crt", pki / "ca.key"
        make_ca(self.ca_cert, ca_key, "kubernetes")
        self.ip = free_loopback_ip(ports=())
        server_cert, server_key = pki / "apiserver.crt", pki / "apiserver.key"
        make_leaf(self.ca_cert, ca_key, server_cert, server_key, cn="kube-apiserver", sans=[f"IP:{self.ip}"])
        client_cert, client_key = pki / "drainer.crt", pki / "drainer.key"
        make_leaf(self.ca_cert, ca_key, client_cert, client_key, cn=DRAINER_CN)
        other_cert, other_key = pki / "other.crt", pki / "other.key"
        make_leaf(self.ca_cert, ca_key, other_cert, other_key, cn="system:anonymous-ish")
        self.tls = TlsMaterial.from_files(self.ca_cert, client_cert, client_key)
        self.unauthorized_tls = TlsMaterial.from_files(self.ca_cert, other_cert, other_key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(server_cert), str(server_key))
        context.load_verify_locations(cafile=str(self.ca_cert))
        context.verify_mode = ssl.CERT_REQUIRED
        sim = self

        class Handler(_Handler):
            api = sim

        self.server = ThreadingHTTPServer((self.ip, 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://{self.ip}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="kube-api-sim", daemon=True)
        self._thread.start()

    def secret_value(self) -> str:
        """The lifecycle-kube-client secret as the node agent writes it."""
        return json.dumps({"ca": self.tls.ca_pem, "cert": self.tls.cert_pem, "key": self.tls.key_pem})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- test controls ----------------------------------------------------------------------------------------
    def add_node(self, name: str, instance_id: str) -> None:
        with self.lock:
            self.nodes[name] = node_json(name, instance_id)

    def add_pod(self, pod: dict[str, Any]) -> None:
        with self.lock:
            self.pods[(pod["metadata"]["namespace"], pod["metadata"]["name"])] = pod

    def block(self, namespace: str, name: str) -> None:
        """A PodDisruptionBudget does not allow evicting this pod now."""
        self.pdb_blocked.add((namespace, name))

    def allow(self, namespace: str, name: str) -> None:
        self.pdb_blocked.discard((namespace, name))

    def finish_terminating(self) -> None:
        """The kubelet finished every graceful termination in progress."""
        with self.lock:
            for key in [k for k, p in self.pods.items() if p["metadata"].get("deletionTimestamp")]:
                del self.pods[key]

    def pod_names(self, node: str) -> set[str]:
        with self.lock:
            return {f"{ns}/{n}" for (ns, n), p in self.pods.items() if p["spec"]["nodeName"] == node}

    def count(self, method: str, fragment: str) -> int:
        return sum(1 for m, p in self.requests if m == method and fragment in p)

    def actions(self) -> list[tuple[str, str]]:
        return list(self.journal)


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386 JSON merge patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


class _Handler(BaseHTTPRequestHandler):
    api: KubeApiSim
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    # -- plumbing --------------------------------------------------------------------------------------------
    def _send(self, code: int, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                          "reason": reason, "code": code})  # fmt: skip

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length", "0") or 0)
        return json.loads(self.rfile.read(length) or b"null") if length else None

    def _authorized(self) -> bool:
        cert = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        subject: Any = (cert or {}).get("subject", ())  # ((("commonName", "..."),), ...)
        names = [str(pair[1]) for rdn in subject for pair in rdn if pair[0] == "commonName"]
        user = names[0] if names else None
        if user != DRAINER_CN:
            self._status(403, "Forbidden", f"User {user!r} cannot access this resource")
            return False
        return True

    def _route(self, method: str) -> None:
        api = self.api
        api.requests.append((method, self.path))
        if not self._authorized():
            return
        parsed = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in parsed.path.strip("/").split("/")]
        query = urllib.parse.parse_qs(parsed.query)
        with api.lock:
            if parts[:3] == ["api", "v1", "nodes"]:
                self._nodes(method, parts[3] if len(parts) > 3 else None)
            elif parts == ["api", "v1", "pods"] and method == "GET":
                selector = (query.get("fieldSelector") or [""])[0]
                node = selector.removeprefix("spec.nodeName=") if selector.startswith("spec.nodeName=") else None
                items = [p for p in api.pods.values() if node is None or p["spec"]["nodeName"] == node]
                self._send(200, {"kind": "PodList", "apiVersion": "v1", "items": items})
            elif len(parts) == 7 and parts[:3] == ["api", "v1", "namespaces"] and parts[4:7:2] == ["pods", "eviction"]:
                self._evict(method, parts[3], parts[5])
            else:
                self._status(404, "NotFound", f"the server could not find the requested resource {parsed.path}")

    def _nodes(self, method: str, name: str | None) -> None:
        api = self.api
        if name is None:
            if method != "GET":
                self._status(405, "MethodNotAllowed", method)
                return
            self._send(200, {"kind": "NodeList", "apiVersion": "v1", "items": list(api.nodes.values())})
            return
        node = api.nodes.get(name)
        if node is None:
            self._status(404, "NotFound", f'nodes "{name}" not found')
            return
        if method == "GET":
            self._send(200, node)
        elif method == "PATCH":
            if self.headers.get("Content-Type") != "application/merge-patch+json":
                self._status(415, "UnsupportedMediaType", f"unsupported patch type {self.headers.get('Content-Type')}")
                return
            patch = self._body()
            _merge(node, patch)
            if (patch or {}).get("spec", {}).get("unschedulable") is True:
                api.journal.append(("cordon", name))
            self._send(200, node)
        elif method == "DELETE":
            del api.nodes[name]
            api.journal.append(("delete-node", name))
            self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        else:
            self._status(405, "MethodNotAllowed", method)

    def _evict(self, method: str, namespace: str, name: str) -> None:
        api = self.api
        body = self._body() or {}
        if method != "POST":
            self._status(405, "MethodNotAllowed", method)
            return
        if (body.get("apiVersion"), body.get("kind")) != ("policy/v1", "Eviction") or body.get("metadata", {}).get(
            "name"
        ) != name:
            self._status(400, "BadRequest", f"not a policy/v1 Eviction for {namespace}/{name}: {body}")
            return
        pod = api.pods.get((namespace, name))
        if pod is None:
            self._status(404, "NotFound", f'pods "{name}" not found')
            return
        if (namespace, name) in api.pdb_blocked:
            api.journal.append(("eviction-refused", f"{namespace}/{name}"))
            self._status(429, "TooManyRequests", PDB_MESSAGE)
            return
        api.journal.append(("evict", f"{namespace}/{name}"))
        if api.grace == "instant":
            del api.pods[(namespace, name)]
        else:
            pod["metadata"]["deletionTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._send(201, {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201})

    def do_GET(self) -> None:
        self._route("GET")

    def do_PATCH(self) -> None:
        self._route("PATCH")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")
