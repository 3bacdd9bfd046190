"""The smoke checks: small functions over the official kubernetes client, each returning a CheckResult.

What each check proves, and what it cannot:

* control-plane nodes: exactly ``expect_control_plane`` nodes labelled ``node-role.kubernetes.io/control-plane``
  and every one of them Ready;
* workers: at least ``expect_workers`` Ready nodes without that label;
* system pods: every pod in kube-system is Succeeded, or Running with every container ready (the others are
  listed with their phase or their unready containers, e.g. ``coredns (Running, not ready: coredns CrashLoopBackOff)``);
* CNI: the calico-node DaemonSet is scheduled and ready on every node, and the test pod gets an IP from the
  pod CIDR;
* DNS: the kube-dns Service has a cluster IP and ready endpoints (EndpointSlices). No pre-pulled image can
  resolve a name from inside a pod (the AMI pre-pulls only the images of ``imagebuilder/versions.json``:
  CoreDNS and the CNI are distroless or carry no resolver tool, pause is a single binary; the cluster is
  air-gapped, so nothing else can be pulled), so in-pod resolution is not checked;
* test pod: a pod of the pre-pulled pause image (``imagePullPolicy: Never``) is scheduled, runs and is deleted;
  it is deleted whatever happens;
* IRSA: a pod whose ServiceAccount carries ``eks.amazonaws.com/role-arn`` comes back from admission with
  AWS_ROLE_ARN (that role) and AWS_WEB_IDENTITY_TOKEN_FILE injected by the pod identity webhook. Exchanging
  the token for credentials (STS) is not tried: no pre-pulled image carries an AWS client.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from imagebuilder.versions import VERSIONS_FILE

CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane"
IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"
IRSA_ENV = ("AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")
SMOKE_LABEL = {"app.kubernetes.io/name": "dedicated-k8s-smoke"}
# kubeadm's podSubnet (stages/cluster_stack.py POD_CIDR; a test keeps the two equal).
DEFAULT_POD_CIDR = "192.168.0.0/16"
DEFAULT_CNI_DAEMONSET = "kube-system/calico-node"
SYSTEM_NAMESPACE = "kube-system"
DNS_SERVICE = "kube-dns"

Log = Callable[[str], None]


def pause_image() -> str:
    """The pause image the AMI pre-pulls: it runs (and does nothing) without any registry."""
    return str(json.loads(VERSIONS_FILE.read_text())["images"]["pause"])


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    skipped: bool = False

    @property
    def status(self) -> str:
        return "SKIP" if self.skipped else ("PASS" if self.ok else "FAIL")


@dataclass(frozen=True)
class SmokeOptions:
    expect_control_plane: int = 3
    expect_workers: int = 1
    namespace: str = "default"
    timeout_s: float = 180.0
    poll_interval_s: float = 2.0
    pod_cidr: str = DEFAULT_POD_CIDR
    image: str = field(default_factory=pause_image)
    cni_daemonset: str = DEFAULT_CNI_DAEMONSET
    irsa_role_arn: str | None = None  # None: the IRSA check is skipped


@dataclass
class Cluster:
    """The API groups the checks use, over one configured ApiClient."""

    core: client.CoreV1Api
    apps: client.AppsV1Api
    discovery: client.DiscoveryV1Api

    @classmethod
    def from_kubeconfig(cls, path: str, context: str | None = None) -> Cluster:
        api = config.new_client_from_config(config_file=path, context=context, persist_config=False)
        return cls(client.CoreV1Api(api), client.AppsV1Api(api), client.DiscoveryV1Api(api))


def _api_error(err: Exception) -> str:
    if isinstance(err, ApiException):
        return f"API error {err.status} {err.reason}".strip()
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


# --- nodes ----------------------------------------------------------------------------------------


def _name(obj: Any) -> str:
    return str(obj.metadata.name) if obj.metadata is not None else "?"


def _ready(node: Any) -> bool:
    conditions = (node.status.conditions if node.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def check_control_plane_nodes(cluster: Cluster, expected: int) -> CheckResult:
    name = "control-plane nodes Ready"
    nodes = cluster.core.list_node(label_selector=CONTROL_PLANE_LABEL).items
    not_ready = sorted(_name(n) for n in nodes if not _ready(n))
    ready = len(nodes) - len(not_ready)
    detail = f"{ready}/{len(nodes)} Ready, expected {expected}"
    if not_ready:
        detail += f"; not Ready: {', '.join(not_ready)}"
    return CheckResult(name, ok=ready == expected and len(nodes) == expected, detail=detail)


def check_worker_nodes(cluster: Cluster, expected: int) -> CheckResult:
    name = "worker nodes Ready"
    nodes = cluster.core.list_node(label_selector=f"!{CONTROL_PLANE_LABEL}").items
    not_ready = sorted(_name(n) for n in nodes if not _ready(n))
    ready = len(nodes) - len(not_ready)
    detail = f"{ready}/{len(nodes)} Ready, expected at least {expected}"
    if not_ready:
        detail += f"; not Ready: {', '.join(not_ready)}"
    return CheckResult(name, ok=ready >= expected, detail=detail)


# --- system pods, CNI, DNS ------------------------------------------------------------------------


def _pod_problem(pod: Any) -> str | None:
    """Why a kube-system pod is not healthy: its phase, or (Running) the containers that are not ready."""
    phase = (pod.status.phase if pod.status else None) or "Unknown"
    if phase == "Succeeded":
        return None
    if phase != "Running":
        return phase
    statuses = (pod.status.container_statuses if pod.status else None) or []
    waiting = [
        f"{s.name} {s.state.waiting.reason or 'waiting'}" if s.state and s.state.waiting else s.name
        for s in statuses
        if not s.ready
    ]
    return f"Running, not ready: {', '.join(waiting)}" if waiting else None


def check_system_pods(cluster: Cluster) -> CheckResult:
    name = "kube-system pods running"
    pods = cluster.core.list_namespaced_pod(SYSTEM_NAMESPACE).items
    bad = sorted(f"{_name(p)} ({problem})" for p in pods if (problem := _pod_problem(p)) is not None)
    if not pods:
        return CheckResult(name, ok=False, detail="no pods in kube-system")
    if bad:
        return CheckResult(name, ok=False, detail=f"{len(bad)}/{len(pods)} not running: {', '.join(bad)}")
    return CheckResult(name, ok=True, detail=f"{len(pods)}/{len(pods)} Running or Succeeded")


def check_cni_daemonset(cluster: Cluster, daemonset: str) -> CheckResult:
    name = "CNI DaemonSet ready on every node"
    namespace, _, ds_name = daemonset.rpartition("/")
    nodes = len(cluster.core.list_node().items)
    try:
        ds = cluster.apps.read_namespaced_daemon_set(ds_name, namespace or SYSTEM_NAMESPACE)
    except ApiException as err:
        if err.status == 404:
            return CheckResult(name, ok=False, detail=f"DaemonSet {daemonset} not found")
        raise
    status = ds.status
    desired = status.desired_number_scheduled if status else 0
    ready = (status.number_ready if status else 0) or 0
    detail = f"{daemonset}: {ready} ready, {desired} scheduled, {nodes} nodes"
    return CheckResult(name, ok=desired == nodes and ready == nodes and nodes > 0, detail=detail)


def check_dns_service(cluster: Cluster) -> CheckResult:
    name = "DNS service has ready endpoints"
    try:
        service = cluster.core.read_namespaced_service(DNS_SERVICE, SYSTEM_NAMESPACE)
    except ApiException as err:
        if err.status == 404:
            return CheckResult(name, ok=False, detail=f"Service {SYSTEM_NAMESPACE}/{DNS_SERVICE} not found")
        raise
    cluster_ip = service.spec.cluster_ip if service.spec else None
    slices = cluster.discovery.list_namespaced_endpoint_slice(
        SYSTEM_NAMESPACE, label_selector=f"kubernetes.io/service-name={DNS_SERVICE}"
    ).items
    endpoints = [e for s in slices for e in (s.endpoints or [])]
    ready = [e for e in endpoints if e.conditions is None or e.conditions.ready is not False]
    ok = bool(cluster_ip) and cluster_ip != "None" and bool(ready)
    detail = f"{DNS_SERVICE} {cluster_ip or 'no cluster IP'}: {len(ready)}/{len(endpoints)} endpoints ready"
    return CheckResult(name, ok=ok, detail=detail)


# --- the test pod ---------------------------------------------------------------------------------


def _pod(name: str, options: SmokeOptions, service_account: str | None = None) -> client.V1Pod:
    return client.V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=client.V1ObjectMeta(name=name, labels=dict(SMOKE_LABEL)),
        spec=client.V1PodSpec(
            restart_policy="Never",
            termination_grace_period_seconds=0,
            automount_service_account_token=service_account is not None,
            service_account_name=service_account,
            security_context=client.V1PodSecurityContext(run_as_non_root=True, run_as_user=65535),
            containers=[
                client.V1Container(
                    name="pause",
                    image=options.image,
                    image_pull_policy="Never",  # air-gapped: only what the AMI pre-pulled
                    resources=client.V1ResourceRequirements(
                        requests={"cpu": "10m", "memory": "16Mi"}, limits={"memory": "32Mi"}
                    ),
                    security_context=client.V1SecurityContext(
                        allow_privilege_escalation=False,
                        read_only_root_filesystem=True,
                        capabilities=client.V1Capabilities(drop=["ALL"]),
                    ),
                )
            ],
        ),
    )


def _wait(options: SmokeOptions, probe: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + options.timeout_s
    while True:
        if probe():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(options.poll_interval_s)


def _gone(cluster: Cluster, name: str, namespace: str) -> bool:
    try:
        cluster.core.read_namespaced_pod(name, namespace)
    except ApiException as err:
        if err.status == 404:
            return True
        raise
    return False


def _delete_pod(cluster: Cluster, name: str, options: SmokeOptions) -> CheckResult:
    check = "test pod deleted"
    try:
        cluster.core.delete_namespaced_pod(name, options.namespace, grace_period_seconds=0)
    except ApiException as err:
        if err.status != 404:
            return CheckResult(check, ok=False, detail=f"{name}: delete failed: {_api_error(err)}")
    except Exception as err:
        return CheckResult(check, ok=False, detail=f"{name}: delete failed: {_api_error(err)}")
    try:
        gone = _wait(options, lambda: _gone(cluster, name, options.namespace))
    except Exception as err:
        return CheckResult(check, ok=False, detail=f"{name}: {_api_error(err)} while waiting for deletion")
    return CheckResult(check, ok=gone, detail=f"{name} deleted" if gone else f"{name} still present after delete")


@contextmanager
def _test_pod(cluster: Cluster, options: SmokeOptions, deleted: list[CheckResult], **kwargs: Any) -> Iterator[Any]:
    """Create a pod; delete it on the way out, whatever happened (the result goes to ``deleted``)."""
    name = f"smoke-{secrets.token_hex(4)}"
    created = cluster.core.create_namespaced_pod(options.namespace, _pod(name, options, **kwargs))
    try:
        yield created
    finally:
        deleted.append(_delete_pod(cluster, name, options))


def check_test_pod(cluster: Cluster, options: SmokeOptions, log: Log) -> list[CheckResult]:
    """Scheduled, Running, an IP from the pod CIDR, deleted: four rows."""
    results: list[CheckResult] = []
    deleted: list[CheckResult] = []
    network = ipaddress.ip_network(options.pod_cidr)
    try:
        with _test_pod(cluster, options, deleted) as created:
            name = created.metadata.name
            log(f"created test pod {options.namespace}/{name} ({options.image})")
            seen: dict[str, Any] = {}

            def running() -> bool:
                pod = cluster.core.read_namespaced_pod(name, options.namespace)
                seen["pod"] = pod
                return bool(pod.status and pod.status.phase == "Running" and pod.status.pod_ip)

            is_running = _wait(options, running)
            pod = seen["pod"]
            node = pod.spec.node_name if pod.spec else None
            phase = (pod.status.phase if pod.status else None) or "Unknown"
            results.append(
                CheckResult(
                    "test pod scheduled", ok=bool(node), detail=f"{name} on {node}" if node else f"{name} unscheduled"
                )
            )
            results.append(
                CheckResult(
                    "test pod Running",
                    ok=is_running,
                    detail=f"{name} {phase}" + ("" if is_running else f" after {options.timeout_s:g}s"),
                )
            )
            ip = pod.status.pod_ip if pod.status else None
            in_cidr = ip is not None and ipaddress.ip_address(ip) in network
            results.append(
                CheckResult(
                    "CNI pod IP from pod CIDR",
                    ok=in_cidr,
                    detail=f"{name} has {ip or 'no IP'}"
                    + (f", not in {network}" if ip and not in_cidr else f" ({network})"),
                )
            )
    except Exception as err:
        results.append(CheckResult("test pod Running", ok=False, detail=_api_error(err)))
    return results + deleted


def check_irsa(cluster: Cluster, options: SmokeOptions, log: Log) -> list[CheckResult]:
    name = "IRSA credentials injected"
    if options.irsa_role_arn is None:
        return [CheckResult(name, ok=True, skipped=True, detail="skipped (--skip-irsa)")]
    account = f"smoke-irsa-{secrets.token_hex(4)}"
    results: list[CheckResult] = []
    deleted: list[CheckResult] = []
    body = client.V1ServiceAccount(
        api_version="v1",
        kind="ServiceAccount",
        metadata=client.V1ObjectMeta(
            name=account, labels=dict(SMOKE_LABEL), annotations={IRSA_ANNOTATION: options.irsa_role_arn}
        ),
    )
    try:
        cluster.core.create_namespaced_service_account(options.namespace, body)
        try:
            with _test_pod(cluster, options, deleted, service_account=account) as created:
                log(f"created IRSA test pod {options.namespace}/{created.metadata.name} (service account {account})")
                pod = cluster.core.read_namespaced_pod(created.metadata.name, options.namespace)
                env = {
                    e.name: e.value for c in ((pod.spec.containers if pod.spec else None) or []) for e in (c.env or [])
                }
                missing = [k for k in IRSA_ENV if not env.get(k)]
                if missing:
                    detail = f"not injected: {', '.join(missing)} (is the pod identity webhook running?)"
                    results.append(CheckResult(name, ok=False, detail=detail))
                elif env["AWS_ROLE_ARN"] != options.irsa_role_arn:
                    results.append(CheckResult(name, ok=False, detail=f"AWS_ROLE_ARN is {env['AWS_ROLE_ARN']}"))
                else:
                    detail = f"AWS_ROLE_ARN={env['AWS_ROLE_ARN']}, token {env['AWS_WEB_IDENTITY_TOKEN_FILE']}"
                    results.append(CheckResult(name, ok=True, detail=detail))
        finally:
            try:
                cluster.core.delete_namespaced_service_account(account, options.namespace)
            except Exception as err:
                results.append(CheckResult("IRSA service account deleted", ok=False, detail=_api_error(err)))
    except Exception as err:
        results.append(CheckResult(name, ok=False, detail=_api_error(err)))
    return results + [CheckResult(f"IRSA {r.name}", r.ok, r.detail) for r in deleted]


# --- all of them ----------------------------------------------------------------------------------


def run_checks(cluster: Cluster, options: SmokeOptions, log: Log) -> list[CheckResult]:
    """Every check in order; an API error fails that check (named) and the others still run."""
    results: list[CheckResult] = []
    single: list[tuple[str, Callable[[], CheckResult]]] = [
        ("control-plane nodes Ready", lambda: check_control_plane_nodes(cluster, options.expect_control_plane)),
        ("worker nodes Ready", lambda: check_worker_nodes(cluster, options.expect_workers)),
        ("kube-system pods running", lambda: check_system_pods(cluster)),
        ("CNI DaemonSet ready on every node", lambda: check_cni_daemonset(cluster, options.cni_daemonset)),
        ("DNS service has ready endpoints", lambda: check_dns_service(cluster)),
    ]
    for name, check in single:
        log(f"checking {name} ...")
        try:
            results.append(check())
        except Exception as err:
            results.append(CheckResult(name, ok=False, detail=_api_error(err)))
        log(f"  {results[-1].status} {results[-1].detail}")
    for name, many in (
        ("test pod", lambda: check_test_pod(cluster, options, log)),
        ("IRSA", lambda: check_irsa(cluster, options, log)),
    ):
        log(f"checking {name} ...")
        for result in many():
            results.append(result)
            log(f"  {result.status} {result.name}: {result.detail}")
    return results
