"""A CommandRunner that reproduces what kubeadm does to etcd, for real (the agent's test and twin runner).

Real: TLS certificates (openssl), etcd server processes on a loopback address per node, etcd membership
(member add as learner, ``--initial-cluster-state existing``, promotion once caught up, as kubeadm 1.31+
does with EtcdLearnerMode), etcdctl/etcdutl/openssl commands (passed through).
Simulated: the API server and the kubelet. :class:`SimulatedApiServer` is a shared in-memory object that
keeps registered nodes and bootstrap tokens; "the API server answers" means "this node's etcd answers",
and ``kubeadm join`` checks the discovery token and CA hash against it, as kubeadm's discovery would.
Etcd timing flags from the generated ClusterConfiguration are replaced by fast loopback values
(``heartbeat-interval=50``, ``election-timeout=500``) so tests do not wait 2.5 s per election.
``etcdctl``/``etcdutl`` are the real etcd 3.5.30 binaries (scripts/install-etcd.sh), passed through unchanged.

Upgrades (:mod:`node_agent.upgrade`), simulated API server objects kept in ``api.objects``:
``kube-system/kubeadm-config`` (init uploads its ClusterConfiguration; ``kubectl get``/``replace`` with
resourceVersion conflicts), the version a control-plane join renders its static pods with (read from that
ConfigMap, as ``kubeadm join`` does), the ConfigMap writes and the add-on upgrades (``kubeadm upgrade node
phase addon all``, which renders CoreDNS/kube-proxy from the ConfigMap's version) as event lists the tests read.
``kubeadm kubeconfig user`` needs the cluster CA on disk and returns a kubeconfig naming the client and its
organisation (no certificate: the simulated API server authorises by that organisation).

**Where each call goes** (invariant 9, docs/architecture.md). Every API call is a connection
(:meth:`KubeadmEmulator.connect`, recorded in ``connections``) to a server URL; a name is resolved through THIS
node's hosts file (``hosts_file``, the agent's ``settings.hosts_file``) first, as the node's resolver would;
the load balancer's DNS name otherwise reaches the :class:`twin.loadbalancer.LoadBalancer` model (no healthy
target, hairpin drops), any other name does not resolve. A reached address answers only if a control-plane API
server runs there (its static pod started and its etcd accepts connections). kubeadm writes admin.conf and
kubelet.conf with ``server: https://<controlPlaneEndpoint>``, and so does the emulator; kubectl calls go to
their ``--server`` or their kubeconfig's server. kubeadm 1.34's phases and the client each uses (source:
kubernetes/kubernetes cmd/kubeadm/app/cmd/init.go ``initData.Client`` = admin.conf via
``EnsureAdminClusterRoleBinding``, ``initData.WaitControlPlaneClient`` = admin.conf with the server replaced by
``https://<localAPIEndpoint.advertiseAddress>:<bindPort>``; cmd/kubeadm/app/cmd/join.go ``joinData.Client`` =
the admin.conf join wrote, ``TLSBootstrapCfg`` = cluster-info's server; phases in cmd/kubeadm/app/cmd/phases/):

=====================================  ==========================================  ==============================
phase (file)                           client                                      endpoint reached
=====================================  ==========================================  ==============================
init preflight, certs, kubeconfig,     none (files, static pod manifests)          --
etcd, control-plane, kubelet-start
init wait-control-plane                WaitControlPlaneClient                      local: https://<advertise>:6443
(init/waitcontrolplane.go)
init upload-config (uploadconfig.go)   Client (admin.conf)                         controlPlaneEndpoint
init mark-control-plane                Client (admin.conf); waits for the Node     controlPlaneEndpoint
(markcontrolplane.go)                  the kubelet registers (kubelet.conf)
init bootstrap-token                   Client (admin.conf)                         controlPlaneEndpoint
(bootstraptoken.go)
init addon coredns/kube-proxy          Client (admin.conf)                         controlPlaneEndpoint
(addons.go)
join preflight: discovery              anonymous cluster-info                      discovery.bootstrapToken
(discovery/token)                                                                  .apiServerEndpoint
join preflight: kubeadm-config         TLSBootstrapCfg (cluster-info's server)     controlPlaneEndpoint
(join/preflight.go, join.go InitCfg)
join control-plane-prepare             none (certs, kubeconfigs, manifests)        --
(join/controlplaneprepare.go)
join control-plane-join etcd           Client: the members' etcd URLs from the     controlPlaneEndpoint, then
(join/controlplanejoin.go)             API, then etcd member add on them           the etcd client URLs directly
join wait-control-plane                WaitControlPlaneClient                      local: https://<advertise>:6443
(join/waitcontrolplane.go)
join mark-control-plane                Client (admin.conf)                         controlPlaneEndpoint
join kubelet TLS bootstrap (worker)    bootstrap-kubelet.conf                      controlPlaneEndpoint
(join/kubelet.go)
=====================================  ==========================================  ==============================

A phase retries its API call for ``api_call_timeout`` (kubeadm retries until ``timeouts.kubernetesAPICall``,
1 minute; scaled down), discovery for ``discovery_timeout`` (kubeadm's token discovery retries until
``timeouts.discovery``); kubectl and ``kubeadm token`` make one connection (the agent's loops retry them).
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from node_agent import hosts
from node_agent.etcd import listening
from node_agent.kubeadm import ca_cert_hash_from_public_key_pem
from node_agent.runner import CommandResult
from twin.loadbalancer import LoadBalancer

FAST_ETCD = {"heartbeat-interval": "50", "election-timeout": "500"}
PASSED_ETCD_ARGS = ("heartbeat-interval", "election-timeout", "quota-backend-bytes", "auto-compaction-mode",
                    "auto-compaction-retention")  # fmt: skip
_ALLOCATED: set[str] = set()
_ALLOC_LOCK = threading.Lock()


def free_loopback_ip(ports: Sequence[int] = (2379, 2380)) -> str:
    """A random 127.x.y.z where the etcd ports are free (never 127.0.0.1, where a system etcd may run)."""
    rng = random.SystemRandom()
    for _ in range(200):
        ip = f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}"
        with _ALLOC_LOCK:
            if ip in _ALLOCATED:
                continue
            try:
                for port in ports:
                    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                        s.bind((ip, port))
            except OSError:
                continue
            _ALLOCATED.add(ip)
            return ip
    raise RuntimeError("no free loopback address found")


def _openssl(*args: str, stdin: bytes | None = None) -> str:
    proc = subprocess.run(["openssl", *args], capture_output=True, input=stdin, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.decode()[-300:]}")
    return proc.stdout.decode()


def make_ca(cert: Path, key: Path, cn: str) -> None:
    cert.parent.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={cn}", "-days", "2",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip


def make_leaf(ca_cert: Path, ca_key: Path, cert: Path, key: Path, *, cn: str, sans: Sequence[str] = ()) -> None:
    cert.parent.mkdir(parents=True, exist_ok=True)
    csr = cert.with_suffix(".csr")
    ext = cert.with_suffix(".ext")
    lines = ["keyUsage=critical,digitalSignature,keyEncipherment", "extendedKeyUsage=serverAuth,clientAuth"]
    if sans:
        lines.append("subjectAltName=" + ",".join(sans))
    ext.write_text("\n".join(lines) + "\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}")  # fmt: skip
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
             "-set_serial", str(random.SystemRandom().randint(1, 2**62)), "-days", "2",
             "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    csr.unlink()
    ext.unlink()


@dataclass
class SimulatedApiServer:
    """What the API server would know: registered nodes, bootstrap tokens, control-plane etcd endpoints."""

    nodes: dict[str, str] = field(default_factory=dict)  # node name -> "control-plane" | "worker"
    tokens: set[str] = field(default_factory=set)
    etcd_endpoints: dict[str, str] = field(default_factory=dict)  # node name -> etcd client URL
    objects: dict[str, str] = field(default_factory=dict)  # simulated API objects and event lists, JSON text
    lock: threading.Lock = field(default_factory=threading.Lock)


KUBEADM_CONFIG = "kube-system/configmap/kubeadm-config"
CONFIG_WRITES = "events/kubeadm-config-writes"
ADDON_UPGRADES = "events/addon-upgrades"
STATIC_PODS = "static-pods/"  # + node name -> the Kubernetes version its control-plane static pods run
API_SERVERS = "apiservers/"  # + IP -> {"node", "etcd"}: a kube-apiserver static pod runs at that address


@dataclass(frozen=True)
class Connection:
    """One API connection a node made: what made it, the server it asked for, how the name resolved, where it
    arrived (``via`` is ``address`` for an IP, ``hosts file`` or ``load balancer`` for a name)."""

    what: str
    server: str
    via: str
    target_ip: str


def api_server_answers(api: Any, ip: str) -> bool:
    """A kube-apiserver answers at ``ip``: its static pod was started there and its local etcd accepts
    connections (the API server serves nothing without etcd). The load balancer's health probe in the tests."""
    raw = api.objects.get(API_SERVERS + ip)
    return raw is not None and listening(json.loads(raw)["etcd"], timeout=1.0)


_VALUE_FLAGS = {"--kubeconfig", "--server", "--namespace", "--ttl", "--description", "--output", "--filename", "-f"}


def _command_words(argv: Sequence[str]) -> str:
    """``kubectl --kubeconfig X apply --server-side -f D`` -> ``kubectl apply``: the command, not its flags."""
    words, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-"):
            words.append(arg)
    return " ".join(words[:3])


def kubeconfig_server(path: Path) -> str:
    """The ``server`` of a kubeconfig's (first) cluster, as kubectl reads it; kubectl's error when unreadable."""
    try:
        doc = yaml.safe_load(path.read_text())
        return str(doc["clusters"][0]["cluster"]["server"])
    except FileNotFoundError as err:
        raise RuntimeError(f"error loading config file {str(path)!r}: no such file or directory") from err
    except (KeyError, IndexError, TypeError) as err:
        raise RuntimeError(f"error loading config file {str(path)!r}: no cluster server in it") from err


def write_kubeconfig(path: Path, server: str, user: str) -> None:
    """A kubeconfig as kubeadm writes it (the simulated API server needs no real credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "default",
        "clusters": [{"name": "kubernetes", "cluster": {"server": server, "certificate-authority-data": "simulated"}}],
        "contexts": [{"name": "default", "context": {"cluster": "kubernetes", "user": user}}],
        "users": [{"name": user, "user": {"client-certificate-data": "simulated"}}],
    }))  # fmt: skip
    path.chmod(0o600)


def api_events(api: Any, name: str) -> list[dict[str, Any]]:
    """An event list of the simulated API server (``CONFIG_WRITES``, ``ADDON_UPGRADES``)."""
    return list(json.loads(api.objects.get(name, "[]")))


def _append_event(api: Any, name: str, event: dict[str, Any]) -> None:
    with api.lock:
        api.objects[name] = json.dumps([*api_events(api, name), {**event, "at": time.time()}])


def kubeadm_config_version(api: Any) -> str:
    """The kubernetesVersion in the simulated kube-system/kubeadm-config ("" before init)."""
    raw = api.objects.get(KUBEADM_CONFIG)
    if raw is None:
        return ""
    config = yaml.safe_load(json.loads(raw)["data"]["ClusterConfiguration"])
    return str(config["kubernetesVersion"])


class KubeadmEmulator:
    """One node's kubeadm, with real etcd. Construct with the node's address, directories and the shared API."""

    def __init__(
        self,
        *,
        node_name: str,
        ip: str,
        kubernetes_dir: Path,
        etcd_data_dir: Path,
        api: SimulatedApiServer,
        hosts_file: Path,
        load_balancer: LoadBalancer,
        client_port: int = 2379,
        peer_port: int = 2380,
        log_dir: Path | None = None,
        fail: Mapping[str, str] | None = None,
        promote_timeout: float = 30.0,
        discovery_timeout: float = 20.0,
        api_call_timeout: float = 3.0,
    ) -> None:
        if hosts_file.resolve() == Path("/etc/hosts").resolve():
            raise ValueError("the emulator's hosts file must be the test node's own, never this machine's /etc/hosts")
        self.hosts_file = hosts_file
        self.load_balancer = load_balancer
        self.discovery_timeout = discovery_timeout
        self.api_call_timeout = api_call_timeout
        self.connections: list[Connection] = []
        self.node_name = node_name
        self.ip = ip
        self.kubernetes_dir = kubernetes_dir
        self.pki = kubernetes_dir / "pki"
        self.data_dir = etcd_data_dir
        self.api = api
        self.client_url = f"https://{ip}:{client_port}"
        self.peer_url = f"https://{ip}:{peer_port}"
        self.log_dir = log_dir or kubernetes_dir.parent
        self.fail = dict(fail or {})
        self.promote_timeout = promote_timeout
        self.calls: list[list[str]] = []
        self.applied: list[dict[str, Any]] = []  # every document a ``kubectl apply`` sent (node_agent.addons)
        self.process: subprocess.Popen[bytes] | None = None

    # -- CommandRunner ----------------------------------------------------------------------------------
    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float | None = None
    ) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        key = " ".join(argv[:2])
        if key in self.fail:
            return CommandResult(tuple(argv), 1, "", self.fail[key])
        try:
            return self._dispatch(argv, env or {}, timeout)
        except Exception as err:  # a kubeadm failure is a non-zero exit with a message, never a crash
            return CommandResult(tuple(argv), 1, "", f"{type(err).__name__}: {err}")

    def commands(self, prefix: str) -> list[list[str]]:
        return [c for c in self.calls if " ".join(c).startswith(prefix)]

    # -- where a call goes -------------------------------------------------------------------------------------
    def connect(self, what: str, server: str) -> str:
        """Open ``server`` (``https://host:port``) from this node: the address whose API server answered.

        Raises ``ConnectionError`` as the client would see it: the NLB's "no healthy target" or hairpin drop,
        an unknown name, or nothing answering at the address."""
        parts = urlsplit(server)
        host, port = parts.hostname or "", parts.port or 443
        try:
            ipaddress.ip_address(host)
            ip, via = host, "address"
        except ValueError:
            mapped = hosts.resolve(self.hosts_file, host)
            if mapped is not None:
                ip, via = mapped, "hosts file"
            elif host == self.load_balancer.dns_name:
                ip, via = self.load_balancer.connect(self.ip, port), "load balancer"
            else:
                raise ConnectionError(f"dial tcp: lookup {host}: no such host") from None
        self.connections.append(Connection(what, server, via, ip))
        if not self._answers(ip):
            raise ConnectionError(f"dial tcp {ip}:{port}: connect: connection refused (no API server there)")
        return ip

    def _answers(self, ip: str) -> bool:
        if ip == self.ip and (self.process is None or self.process.poll() is not None):
            return False
        return api_server_answers(self.api, ip)

    def _call(self, what: str, server: str, *, retry: bool = True) -> str:
        """A kubeadm phase's API call, retried until ``api_call_timeout`` as kubeadm retries its API calls
        (``timeouts.kubernetesAPICall``, scaled down); then the phase fails with the last connection error."""
        deadline = time.monotonic() + (self.api_call_timeout if retry else 0)
        while True:
            try:
                return self.connect(what, server)
            except ConnectionError as err:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"[{what}] error execution phase: {err}") from err
            time.sleep(0.1)

    def _kubectl_server(self, argv: list[str]) -> str:
        """kubectl/kubeadm: ``--server`` wins over the kubeconfig's cluster server."""
        if "--server" in argv:
            return argv[argv.index("--server") + 1]
        return kubeconfig_server(Path(argv[argv.index("--kubeconfig") + 1]))

    def _route(self, argv: list[str]) -> str:
        """kubectl and ``kubeadm token``: one connection, no retry (the agent's own loops retry)."""
        return self._call(_command_words(argv), self._kubectl_server(argv), retry=False)

    def _control_plane_endpoint(self) -> str:
        raw = self.api.objects.get(KUBEADM_CONFIG)
        if raw is None:
            raise RuntimeError("kubeadm-config is not in the cluster: no controlPlaneEndpoint known")
        config = yaml.safe_load(json.loads(raw)["data"]["ClusterConfiguration"])
        return f"https://{config['controlPlaneEndpoint']}"

    def _start_api_server(self) -> None:
        """The kube-apiserver static pod on this node (kubeadm's control-plane phase, the kubelet starts it)."""
        self.api.objects[API_SERVERS + self.ip] = json.dumps({"node": self.node_name, "etcd": self.client_url})

    def _write_kubeconfigs(self, server: str, *, control_plane: bool) -> None:
        if control_plane:
            write_kubeconfig(self.kubernetes_dir / "admin.conf", server, "kubernetes-admin")
        write_kubeconfig(self.kubernetes_dir / "kubelet.conf", server, f"system:node:{self.node_name}")

    def _register_node(self, role: str) -> None:
        """The kubelet registers its Node through kubelet.conf's server (it retries forever; kubeadm's
        mark-control-plane waits for the Node, so a kubelet that cannot reach the API fails the phase)."""
        self._call("kubelet: register the Node", kubeconfig_server(self.kubernetes_dir / "kubelet.conf"))
        with self.api.lock:
            self.api.nodes[self.node_name] = role

    def _dispatch(self, argv: list[str], env: Mapping[str, str], timeout: float | None) -> CommandResult:  # noqa: PLR0911
        ok = lambda out="": CommandResult(tuple(argv), 0, out, "")  # noqa: E731
        if argv[:2] == ["kubeadm", "init"]:
            self._init(Path(argv[argv.index("--config") + 1]))
            return ok("Your Kubernetes control-plane has initialized successfully!\n")
        if argv[:2] == ["kubeadm", "join"]:
            self._join(Path(argv[argv.index("--config") + 1]))
            return ok("This node has joined the cluster\n")
        if argv[:2] == ["kubeadm", "reset"]:
            self.reset()
            return ok()
        if argv[:3] == ["kubeadm", "token", "create"]:
            self._route(argv)
            with self.api.lock:
                self.api.tokens.add(argv[3])
            return ok(argv[3] + "\n")
        if argv[:3] == ["kubeadm", "kubeconfig", "user"]:
            return ok(self._kubeconfig_user(argv))
        if argv[:6] == ["kubeadm", "upgrade", "node", "phase", "addon", "all"]:
            self._authorise(argv)
            self._route(argv)
            version = kubeadm_config_version(self.api)
            _append_event(self.api, ADDON_UPGRADES, {"node": self.node_name, "version": version})
            return ok(f"[upgrade/addon] Applied essential addons CoreDNS and kube-proxy for {version}\n")
        if argv[0] == "kubectl" and "configmap" in argv and "get" in argv:
            self._authorise(argv)
            self._route(argv)
            raw = self.api.objects.get(KUBEADM_CONFIG)
            if raw is None:
                return CommandResult(tuple(argv), 1, "", 'configmaps "kubeadm-config" not found')
            return ok(raw)
        if argv[0] == "kubectl" and "replace" in argv:
            self._authorise(argv)
            self._route(argv)
            return self._replace_configmap(argv)
        if argv[:3] == ["kubeadm", "token", "delete"]:
            self._route(argv)
            with self.api.lock:
                self.api.tokens = {t for t in self.api.tokens if not t.startswith(argv[3] + ".")}
            return ok(f'bootstrap token "{argv[3]}" deleted\n')
        if argv[0] == "kubectl" and "apply" in argv:
            return ok(self._apply(argv))
        if argv[0] == "kubectl" and "/readyz" in argv:
            try:
                self.connect("kubectl get --raw /readyz", self._kubectl_server(argv))
            except ConnectionError as err:
                return CommandResult(tuple(argv), 1, "", str(err))
            return ok("ok")
        if argv[0] == "kubectl" and "node" in argv:
            self._route(argv)
            name = argv[argv.index("node") + 1]
            if name in self.api.nodes:
                return ok(f"node/{name}\n")
            return CommandResult(tuple(argv), 1, "", f'nodes "{name}" not found')
        if argv[0] in ("openssl", "etcdctl", "etcdutl"):
            proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env, "ETCDCTL_API": "3"},
                                  timeout=timeout, check=False)  # fmt: skip
            return CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
        if argv[0].endswith("/amazon-cloudwatch-agent-ctl"):
            # The CloudWatch agent cannot run here: the start is recorded (runner.calls) and its config checked.
            config = json.loads(Path(argv[argv.index("-c") + 1].removeprefix("file:")).read_text())
            return ok(f"cloudwatch agent configured for {config['agent']['region']}\n")
        raise RuntimeError(f"the emulator does not know {argv[:3]}")

    # -- upgrades (simulated API server objects) -----------------------------------------------------------
    def _kubeconfig_user(self, argv: list[str]) -> str:
        missing = [f for f in ("ca.crt", "ca.key") if not (self.pki / f).exists()]
        if missing:
            raise RuntimeError(f"couldn't load the CA certificate authority from {self.pki}: missing {missing}")
        client, org = argv[argv.index("--client-name") + 1], argv[argv.index("--org") + 1]
        cluster = self._documents(Path(argv[argv.index("--config") + 1]))["ClusterConfiguration"]
        server = f"https://{cluster['controlPlaneEndpoint']}"  # kubeadm: the ClusterConfiguration's endpoint
        return yaml.safe_dump({"apiVersion": "v1", "kind": "Config",
                               "clusters": [{"name": "kubernetes", "cluster": {"server": server}}],
                               "users": [{"name": client, "user": {"client-certificate-data": "simulated",
                                                                    "organization": org}}]})  # fmt: skip

    def _authorise(self, argv: list[str]) -> None:
        """admin.conf of a control-plane node that joined or initialised, or a cluster-admins kubeconfig."""
        path = Path(argv[argv.index("--kubeconfig") + 1])
        if path.name == "admin.conf" and self.api.nodes.get(self.node_name) == "control-plane":
            return
        if path.exists() and "kubeadm:cluster-admins" in path.read_text():
            return
        raise RuntimeError(f"Unauthorized: {path} is neither admin.conf nor a kubeadm:cluster-admins kubeconfig")

    def _replace_configmap(self, argv: list[str]) -> CommandResult:
        new = json.loads(Path(argv[argv.index("--filename") + 1]).read_text())
        with self.api.lock:
            old = json.loads(self.api.objects[KUBEADM_CONFIG])
            if new["metadata"].get("resourceVersion") != old["metadata"]["resourceVersion"]:
                return CommandResult(tuple(argv), 1, "", "Operation cannot be fulfilled on configmaps "
                                     '"kubeadm-config": the object has been modified')  # fmt: skip
            new["metadata"]["resourceVersion"] = str(int(old["metadata"]["resourceVersion"]) + 1)
            self.api.objects[KUBEADM_CONFIG] = json.dumps(new)
        before = yaml.safe_load(old["data"]["ClusterConfiguration"])["kubernetesVersion"]
        after = yaml.safe_load(new["data"]["ClusterConfiguration"])["kubernetesVersion"]
        _append_event(self.api, CONFIG_WRITES, {"node": self.node_name, "from": before, "to": after})
        return CommandResult(tuple(argv), 0, "configmap/kubeadm-config replaced\n", "")

    def _upload_config(self, cluster: dict[str, Any]) -> None:
        """kubeadm init's upload-config phase: the ClusterConfiguration into kube-system/kubeadm-config."""
        with self.api.lock:
            previous = self.api.objects.get(KUBEADM_CONFIG)
            version = int(json.loads(previous)["metadata"]["resourceVersion"]) + 1 if previous else 1
            self.api.objects[KUBEADM_CONFIG] = json.dumps({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "kubeadm-config", "namespace": "kube-system", "resourceVersion": str(version)},
                "data": {"ClusterConfiguration": yaml.safe_dump(cluster, sort_keys=False)},
            })  # fmt: skip
            self.api.objects[STATIC_PODS + self.node_name] = str(cluster["kubernetesVersion"])

    # -- kubectl apply (the add-ons) ---------------------------------------------------------------------------
    def _apply(self, argv: list[str]) -> str:
        """``kubectl --kubeconfig admin.conf apply --server-side --force-conflicts -f <dir>``: the API server of a
        control-plane node that initialised or joined; every file parses as YAML and every document names its
        apiVersion, kind and metadata.name (what the API server would refuse otherwise)."""
        kubeconfig = Path(argv[argv.index("--kubeconfig") + 1])
        if kubeconfig != self.kubernetes_dir / "admin.conf" or self.api.nodes.get(self.node_name) != "control-plane":
            raise RuntimeError(f"Unauthorized: {kubeconfig} is not this control-plane node's admin.conf")
        self._route(argv)
        if "--server-side" not in argv:
            raise RuntimeError("the add-ons are applied server-side")
        target = Path(argv[argv.index("-f") + 1])
        files = sorted(target.glob("*.yaml")) if target.is_dir() else [target]
        if not files:
            raise RuntimeError(f"error: no objects passed to apply ({target})")
        out = []
        for path in files:
            for doc in yaml.safe_load_all(path.read_text()):
                if not doc:
                    continue
                if not (doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name")):
                    raise RuntimeError(f"error: {path.name}: a document without apiVersion/kind/metadata.name")
                self.applied.append(doc)
                out.append(f"{doc['kind'].lower()}/{doc['metadata']['name']} serverside-applied")
        return "\n".join(out) + "\n"

    # -- kubeadm init / join / reset ---------------------------------------------------------------------------
    @staticmethod
    def _documents(path: Path) -> dict[str, dict[str, Any]]:
        return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}

    def _ensure_shared_pki(self) -> None:
        """kubeadm's certs phase: create each CA and the SA key pair only if not already on disk."""
        cas = (("ca.crt", "ca.key", "kubernetes"), ("front-proxy-ca.crt", "front-proxy-ca.key", "front-proxy-ca"),
               ("etcd/ca.crt", "etcd/ca.key", "etcd-ca"))  # fmt: skip
        for cert, key, cn in cas:
            if not (self.pki / cert).exists():
                make_ca(self.pki / cert, self.pki / key, cn)
        if not (self.pki / "sa.key").exists():
            _openssl(
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-out",
                str(self.pki / "sa.key"),
            )
            _openssl("pkey", "-in", str(self.pki / "sa.key"), "-pubout", "-out", str(self.pki / "sa.pub"))

    def _node_certs(self) -> None:
        ca, cakey = self.pki / "etcd" / "ca.crt", self.pki / "etcd" / "ca.key"
        sans = [f"IP:{self.ip}", f"DNS:{self.node_name}", "DNS:localhost"]
        etcd = self.pki / "etcd"
        make_leaf(ca, cakey, etcd / "server.crt", etcd / "server.key", cn=self.node_name, sans=sans)
        make_leaf(ca, cakey, etcd / "peer.crt", etcd / "peer.key", cn=self.node_name, sans=sans)
        make_leaf(ca, cakey, self.pki / "apiserver-etcd-client.crt", self.pki / "apiserver-etcd-client.key",
                  cn="kube-apiserver-etcd-client")  # fmt: skip

    def _init(self, config: Path) -> None:
        docs = self._documents(config)
        init, cluster = docs["InitConfiguration"], docs["ClusterConfiguration"]
        assert init["nodeRegistration"]["name"] == self.node_name
        self._ensure_shared_pki()  # certs
        self._node_certs()
        endpoint = f"https://{cluster['controlPlaneEndpoint']}"
        self._write_kubeconfigs(endpoint, control_plane=True)  # kubeconfig
        extra = {a["name"]: a["value"] for a in cluster["etcd"]["local"].get("extraArgs", [])}
        self.start_etcd(initial_cluster=f"{self.node_name}={self.peer_url}", state="new", extra=extra)  # etcd
        self._wait_healthy()
        self._start_api_server()  # control-plane
        local = init["localAPIEndpoint"]
        self._call("init wait-control-plane", f"https://{local['advertiseAddress']}:{local['bindPort']}")
        admin = kubeconfig_server(self.kubernetes_dir / "admin.conf")
        self._call("init upload-config", admin)
        self._upload_config(cluster)
        with self.api.lock:
            self.api.etcd_endpoints[self.node_name] = self.client_url  # the API server pod's etcd annotation
        self._register_node("control-plane")
        self._call("init mark-control-plane", admin)
        self._call("init bootstrap-token", admin)
        with self.api.lock:
            self.api.tokens.update(t["token"] for t in init.get("bootstrapTokens", []))
        self._call("init addon", admin)

    def _join(self, config: Path) -> None:
        join = self._documents(config)["JoinConfiguration"]
        assert join["nodeRegistration"]["name"] == self.node_name
        discovery = join["discovery"]["bootstrapToken"]
        self._discover(f"https://{discovery['apiServerEndpoint']}")
        if discovery["token"] not in self.api.tokens:
            raise RuntimeError("[discovery] the bootstrap token is unknown or expired")
        endpoint = self._control_plane_endpoint()  # cluster-info's kubeconfig names controlPlaneEndpoint
        if "controlPlane" not in join:
            write_kubeconfig(self.kubernetes_dir / "bootstrap-kubelet.conf", endpoint, "tls-bootstrap-token-user")
            self._call("join kubelet-start: TLS bootstrap", endpoint)
            self._write_kubeconfigs(endpoint, control_plane=False)
            self._register_node("worker")
            return
        self._call("join preflight: kubeadm-config", endpoint)
        shared = ("ca.crt", "ca.key", "sa.key", "sa.pub", "front-proxy-ca.crt", "etcd/ca.crt", "etcd/ca.key")
        missing = [f for f in shared if not (self.pki / f).exists()]
        if missing:
            raise RuntimeError(f"[preflight] shared certificates missing (no --certificate-key given): {missing}")
        ca_hash = ca_cert_hash_from_public_key_pem(
            _openssl("x509", "-in", str(self.pki / "ca.crt"), "-noout", "-pubkey")
        )
        if ca_hash not in discovery["caCertHashes"]:
            raise RuntimeError("[discovery] cluster CA found does not match any of the caCertHashes")
        self._node_certs()
        self._write_kubeconfigs(endpoint, control_plane=True)  # control-plane-prepare kubeconfig
        self._call("join control-plane-join etcd: the members' etcd endpoints", endpoint)
        endpoints = [u for n, u in self.api.etcd_endpoints.items() if n != self.node_name]
        for url in endpoints:
            self.connections.append(Connection("join etcd member add", url, "address", urlsplit(url).hostname or ""))
        member_id, initial_cluster = self._add_learner(endpoints)
        self.start_etcd(initial_cluster=initial_cluster, state="existing", extra={})
        self._promote(endpoints, member_id)
        with self.api.lock:
            if KUBEADM_CONFIG in self.api.objects:  # the static pods of the version in the cluster's kubeadm-config
                self.api.objects[STATIC_PODS + self.node_name] = kubeadm_config_version(self.api)
            self.api.etcd_endpoints[self.node_name] = self.client_url
        self._start_api_server()
        local = join["controlPlane"]["localAPIEndpoint"]
        self._call("join wait-control-plane", f"https://{local['advertiseAddress']}:{local['bindPort']}")
        self._register_node("control-plane")
        self._call("join mark-control-plane", kubeconfig_server(self.kubernetes_dir / "admin.conf"))

    def _discover(self, server: str) -> None:
        """Token discovery fetches cluster-info, retrying until its timeout as kubeadm does."""
        deadline = time.monotonic() + self.discovery_timeout
        while True:
            try:
                self.connect("join preflight: discovery (cluster-info)", server)
                return
            except ConnectionError as err:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"[discovery] failed to request cluster-info from {server}: {err}") from err
            time.sleep(0.1)

    def reset(self) -> None:
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        with self.api.lock:
            self.api.etcd_endpoints.pop(self.node_name, None)
            self.api.objects.pop(API_SERVERS + self.ip, None)

    # -- etcd ------------------------------------------------------------------------------------------------
    def etcdctl(self, endpoints: Sequence[str], *args: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        argv = ["etcdctl", "--endpoints", ",".join(endpoints), "--cacert", str(self.pki / "etcd" / "ca.crt"),
                "--cert", str(self.pki / "apiserver-etcd-client.crt"),
                "--key", str(self.pki / "apiserver-etcd-client.key"),
                "--dial-timeout", "2s", "--command-timeout", "5s", *args]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"},
                              timeout=timeout, check=False)  # fmt: skip

    def _add_learner(self, endpoints: Sequence[str]) -> tuple[str, str]:
        deadline = time.monotonic() + self.promote_timeout
        while True:  # kubeadm retries the add (etcd allows one learner at a time)
            proc = self.etcdctl(endpoints, "member", "add", self.node_name, f"--peer-urls={self.peer_url}",
                                "--learner", "-w", "json")  # fmt: skip
            if proc.returncode == 0:
                doc = json.loads(proc.stdout)
                member_id = format(int(doc["member"]["ID"]), "x")
                parts = []
                for m in doc["members"]:
                    name = m.get("name") or (self.node_name if m["peerURLs"] == [self.peer_url] else "")
                    parts += [f"{name}={u}" for u in m["peerURLs"]] if name else []
                return member_id, ",".join(parts)
            if time.monotonic() > deadline:
                raise RuntimeError(f"[etcd] member add failed: {proc.stderr.strip()[-300:]}")
            time.sleep(0.2)

    def _promote(self, endpoints: Sequence[str], member_id: str) -> None:
        deadline = time.monotonic() + self.promote_timeout
        while True:  # "can only promote a learner member which is in sync with leader": retry until caught up
            proc = self.etcdctl(endpoints, "member", "promote", member_id)
            if proc.returncode == 0:
                return
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError("[etcd] the local etcd member exited before it could be promoted")
            if time.monotonic() > deadline:
                raise RuntimeError(f"[etcd] learner not promoted: {proc.stderr.strip()[-300:]}")
            time.sleep(0.1)

    def start_etcd(self, *, initial_cluster: str, state: str, extra: Mapping[str, str]) -> None:
        args = {**extra, **FAST_ETCD}
        etcd_dir = self.pki / "etcd"
        argv = [
            "etcd", "--name", self.node_name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster, "--initial-cluster-state", state,
            "--client-cert-auth", "--trusted-ca-file", str(etcd_dir / "ca.crt"),
            "--cert-file", str(etcd_dir / "server.crt"), "--key-file", str(etcd_dir / "server.key"),
            "--peer-client-cert-auth", "--peer-trusted-ca-file", str(etcd_dir / "ca.crt"),
            "--peer-cert-file", str(etcd_dir / "peer.crt"), "--peer-key-file", str(etcd_dir / "peer.key"),
            "--logger", "zap", "--log-level", "warn",
            *[f"--{k}={v}" for k, v in args.items() if k in PASSED_ETCD_ARGS],
        ]  # fmt: skip
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"etcd-{self.ip}.log").open("ab")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _etcd_healthy(self) -> bool:
        proc = self.etcdctl([self.client_url], "endpoint", "health", timeout=8)
        return proc.returncode == 0

    def _wait_healthy(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"[etcd] etcd exited with {self.process.returncode}; see {self.log_dir}")
            if self._etcd_healthy():
                return
            time.sleep(0.1)
        raise RuntimeError("[etcd] etcd did not become healthy")

    def kill(self) -> None:
        """Crash this node's etcd (SIGKILL) -- the instance dying."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
