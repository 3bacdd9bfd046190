"""Builds agents for tests: identity, fast timings, moto clients, a recorded launch hook, real etcd nodes.

Each test cluster (one :class:`SimulatedApiServer`) has one API load balancer (:func:`cluster_load_balancer`,
the :class:`twin.loadbalancer.LoadBalancer` model) with client IP preservation ON, the unkind case: a node is
registered only when its launch hook completes with CONTINUE (:class:`InServiceHook`, as the Auto Scaling group
registers an instance at InService) and deregistered when it terminates. Health checks run on a clock, a daemon
thread per cluster every ``CHECK_INTERVAL`` seconds (thresholds of 2, the ELB minimum): nothing is marked
healthy by hand, a target is healthy after two passing rounds (~1 s) and the joiners' discovery retries.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from node_agent.bootstrap import Agent, LaunchOutcome
from node_agent.config import AgentConfig, AgentSettings
from node_agent.election import ClusterStateStore
from node_agent.etcd import EtcdAccess, EtcdTls, Member, listening
from node_agent.etcd_membership import MembershipEtcd
from node_agent.instance import InstanceIdentity
from node_agent.lifecycle import RecordingLaunchHook, Result
from node_agent.log import Metrics
from node_agent.runner import CommandRunner
from node_agent.secrets import SecretStore
from tests.agent.conftest import REGION
from tests.agent.kubeadm_emulator import (
    API_SERVERS,
    KubeadmEmulator,
    SimulatedApiServer,
    api_server_answers,
    free_loopback_ip,
)
from twin.loadbalancer import LoadBalancer, TargetGroupSettings

CLUSTER_TAG_KEY = "dedicated-k8s:cluster"
ROLE_TAG_KEY = "dedicated-k8s:role"


CHECK_INTERVAL = 0.5
_CLUSTERS_LOCK = threading.Lock()
_CLUSTERS: dict[int, tuple[Any, LoadBalancer, threading.Event]] = {}  # id(api) -> (api kept alive, NLB, stop)


def cluster_load_balancer(api: Any, cfg: AgentConfig, *, preserve_client_ip: bool = True) -> LoadBalancer:
    """The API NLB of the test cluster whose API server is ``api`` (created on first use, health checks started)."""
    with _CLUSTERS_LOCK:
        known = _CLUSTERS.get(id(api))
        if known is not None:
            return known[1]
        settings = TargetGroupSettings(interval_seconds=CHECK_INTERVAL, healthy_threshold=2, unhealthy_threshold=2,
                                       deregistration_delay_seconds=5.0, preserve_client_ip=preserve_client_ip,
                                       port=cfg.api_port)  # fmt: skip
        lb = LoadBalancer(cfg.api_endpoint, settings)
        stop = threading.Event()
        _CLUSTERS[id(api)] = (api, lb, stop)

    def health_checks() -> None:
        while not stop.wait(CHECK_INTERVAL):
            lb.check(lambda ip: api_server_answers(api, ip))

    threading.Thread(target=health_checks, name=f"nlb-health-{cfg.cluster_name}", daemon=True).start()
    return lb


def stop_load_balancer(api: Any) -> None:
    """The test cluster is gone: its health-check thread stops."""
    with _CLUSTERS_LOCK:
        known = _CLUSTERS.pop(id(api), None)
    if known is not None:
        known[2].set()


def fast_settings(root: Path, **overrides: Any) -> AgentSettings:
    base = AgentSettings(
        hosts_file=root / "etc-hosts",  # the node's own hosts file: never this machine's /etc/hosts
        kubernetes_dir=root / "etc-kubernetes",
        state_dir=root / "state",
        etcd_data_dir=root / "etcd-data",
        lease_seconds=2.0,
        renew_interval_seconds=0.3,
        poll_interval_seconds=0.02,
        join_deadline_seconds=30.0,
        health_timeout_seconds=20.0,
    )
    return replace(base, **overrides)


def identity(n: int, ip: str | None = None) -> InstanceIdentity:
    return InstanceIdentity(instance_id=f"i-{n:017x}", private_ip=ip or f"10.0.0.{n}", region=REGION)


def build_agent(
    aws: dict[str, Any],
    cfg: AgentConfig,
    *,
    ident: InstanceIdentity,
    settings: AgentSettings,
    runner: CommandRunner,
    etcd_for: Callable[[EtcdTls], EtcdAccess],
    probe: Callable[[str], bool],
    hook: RecordingLaunchHook | None = None,
) -> tuple[Agent, RecordingLaunchHook]:
    hook = hook or RecordingLaunchHook()
    agent = Agent(
        config=cfg,
        settings=settings,
        identity=ident,
        runner=runner,
        store=ClusterStateStore(aws["dynamodb"], cfg.cluster_state_table),
        secrets=SecretStore(aws["secretsmanager"], kms_key_id=aws["kms_key_id"]),
        hook=hook,
        etcd_for=etcd_for,
        ec2=aws["ec2"],
        s3=aws["s3"],
        probe=probe,
        metrics=Metrics(cfg.cluster_name, io.StringIO()),  # read back with emitted_metrics()
    )
    return agent, hook


def emitted_metrics(agent: Agent) -> list[tuple[str, float]]:
    """(name, value) of every EMF line the agent wrote, in order."""
    assert agent.metrics is not None and isinstance(agent.metrics.stream, io.StringIO)
    out = []
    for line in agent.metrics.stream.getvalue().splitlines():
        doc = json.loads(line)
        name = doc["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Name"]
        out.append((name, float(doc[name])))
    return out


class InServiceHook(RecordingLaunchHook):
    """CONTINUE puts the instance InService, and the group registers it with the API target group then (Amazon
    EC2 Auto Scaling user guide, "How lifecycle hooks work in Auto Scaling groups": the instance is registered
    with the load balancer after the launch hook completes, before InService); ABANDON registers nothing."""

    def __init__(self, on_in_service: Callable[[], None], on_abandon: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.on_in_service = on_in_service
        self.on_abandon = on_abandon

    def complete(self, result: Result, reason: str) -> None:
        super().complete(result, reason)
        if result == "CONTINUE":
            self.on_in_service()
        elif self.on_abandon is not None:
            self.on_abandon()


class NeverPromotingKubeadm(KubeadmEmulator):
    """A ``kubeadm join`` that adds the etcd learner and starts it, then returns without promoting it
    (as if the learner never caught up and kubeadm gave up waiting): the learner stays a learner in real etcd."""

    def _promote(self, endpoints: Sequence[str], member_id: str) -> None:
        return None


_LOOPBACK_LOCK = threading.Lock()
_LOOPBACK_TAKEN: set[str] = set()


def free_ip_in_network(network: str) -> str:
    """A free 127.N.x.y (the etcd ports bind), never handed out twice by this process."""
    rng = random.SystemRandom()
    for _ in range(500):
        ip = f"{network}.{rng.randint(0, 255)}.{rng.randint(2, 254)}"
        with _LOOPBACK_LOCK:
            if ip in _LOOPBACK_TAKEN:
                continue
            try:
                for port in (2379, 2380):
                    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                        s.bind((ip, port))
            except OSError:
                continue
            _LOOPBACK_TAKEN.add(ip)
            return ip
    raise RuntimeError(f"no free address in {network}.0.0/16")


def loopback_subnet(aws: dict[str, Any]) -> tuple[str, str]:
    """A moto VPC and subnet on a random 127.N.0.0/16: instances launched there have a private IP that is
    a real loopback address, so EC2's view (``PrivateIpAddress``) and the node's etcd address agree."""
    network = f"127.{random.SystemRandom().randint(2, 254)}"
    vpc = aws["ec2"].create_vpc(CidrBlock=f"{network}.0.0/16")["Vpc"]["VpcId"]
    subnet = aws["ec2"].create_subnet(VpcId=vpc, CidrBlock=f"{network}.0.0/16")["Subnet"]["SubnetId"]
    return network, subnet


class EmulatedNode:
    """One instance for the real-etcd tests and the local twin: a moto EC2 instance, a loopback address,
    a :class:`KubeadmEmulator` with real etcd, and an :class:`Agent` wired to moto.

    ``etcd_for`` defaults to the production adapter (:class:`MembershipEtcd`, etcd's JSON gateway);
    tests pass ``EtcdctlAccess`` to check the agent against an independent implementation.
    ``subnet`` = ``(network, subnet_id)`` from :func:`loopback_subnet` launches the instance there with the
    cluster and control-plane tags (EC2 then lists it among the cluster's control-plane instances at its real
    address). ``terminate_on_abandon`` plays the group's reaction to ABANDON (:meth:`terminate`).
    """

    def __init__(
        self,
        aws: dict[str, Any],
        root: Path,
        api: SimulatedApiServer,
        cfg: AgentConfig,
        *,
        ip: str | None = None,
        etcd_for: Callable[[EtcdTls], EtcdAccess] | None = None,
        subnet: tuple[str, str] | None = None,
        runner_class: type[KubeadmEmulator] = KubeadmEmulator,
        fail: dict[str, str] | None = None,
        terminate_on_abandon: bool = False,
        load_balancer: LoadBalancer | None = None,
        **settings: Any,
    ) -> None:
        if subnet is None:
            inst = aws["ec2"].run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0]
            ip = ip or free_loopback_ip()
        else:
            ip = ip or free_ip_in_network(subnet[0])
            tags = [{"Key": CLUSTER_TAG_KEY, "Value": cfg.cluster_name}, {"Key": ROLE_TAG_KEY, "Value": cfg.role}]
            inst = aws["ec2"].run_instances(
                ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=subnet[1], PrivateIpAddress=ip,
                TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
            )["Instances"][0]  # fmt: skip
        self.aws = aws
        self.api = api
        self.cfg = cfg
        self.identity = InstanceIdentity(inst["InstanceId"], ip, REGION)
        settings.setdefault("poll_interval_seconds", 0.1)  # each poll is an etcdctl process: spare the CPU
        # A holder that releases the lock never makes anyone wait for its lease, so a long one costs nothing; a 2 s
        # lease did starve on a saturated CI machine (the initialiser lost the lock mid-init and abandoned).
        settings.setdefault("lease_seconds", 10.0)
        settings.setdefault("renew_interval_seconds", 0.5)
        self.settings = fast_settings(root / self.identity.instance_id, **settings)
        self.load_balancer = load_balancer or cluster_load_balancer(api, cfg)
        self.runner = runner_class(
            node_name=self.identity.node_name,
            ip=ip,
            kubernetes_dir=self.settings.kubernetes_dir,
            etcd_data_dir=self.settings.etcd_data_dir,
            api=api,
            hosts_file=self.settings.hosts_file,
            load_balancer=self.load_balancer,
            fail=fail,
        )
        self.etcd_for: Callable[[EtcdTls], EtcdAccess] = etcd_for or MembershipEtcd
        self.terminate_on_abandon = terminate_on_abandon
        self.agent, self.hook = self.new_agent()

    def in_service(self) -> None:
        """The group puts the instance InService: it becomes a target of the API load balancer."""
        self.load_balancer.register(self.identity.instance_id, self.identity.private_ip)

    def new_agent(self, hook: RecordingLaunchHook | None = None) -> tuple[Agent, RecordingLaunchHook]:
        """A fresh agent process for this instance (same disk, same kubeadm, etcd left running): an agent restart."""
        if hook is None:
            on_abandon = (lambda: self.terminate(self.aws, self.api)) if self.terminate_on_abandon else None
            hook = InServiceHook(self.in_service, on_abandon)
        return build_agent(
            self.aws,
            self.cfg,
            ident=self.identity,
            settings=self.settings,
            runner=self.runner,
            etcd_for=self.etcd_for,
            probe=listening,
            hook=hook,
        )

    def members(self) -> list[Member]:
        """The real member list, asked through this node's etcd with kubeadm's API-server client certificate. A
        linearizable read first: etcd 3.4 lists members from the asked member's applied state, which may be a few
        milliseconds behind a promotion or removal that another member served; the read waits until it is not."""
        etcd = MembershipEtcd(EtcdTls.kubeadm_apiserver_client(self.settings.pki_dir))
        endpoints = [self.agent.client_url]
        etcd.client().get(endpoints, "dedicated-k8s-tests/barrier")
        return etcd.members(endpoints)

    def discard(self) -> None:
        """End of test: kill this node's etcd and delete its data dir. Every etcd member preallocates a 64 MB WAL,
        so the election trials' 150 members would otherwise leave ~10 GB per run in pytest's kept temp dirs (and
        pytest keeps three runs). Its log and certificates stay for debugging."""
        self.runner.kill()
        shutil.rmtree(self.settings.etcd_data_dir, ignore_errors=True)
        stop_load_balancer(self.api)

    def terminate(self, aws: dict[str, Any], api: SimulatedApiServer) -> None:
        """The instance dies: the group deregisters it from the load balancer first, then its etcd is killed, EC2 says
        terminated, the API server forgets its endpoint."""
        self.load_balancer.deregister(self.identity.instance_id)
        with api.lock:
            api.objects.pop(API_SERVERS + self.identity.private_ip, None)
        self.runner.kill()
        aws["ec2"].terminate_instances(InstanceIds=[self.identity.instance_id])
        with api.lock:
            api.etcd_endpoints.pop(self.identity.node_name, None)
            api.nodes.pop(self.identity.node_name, None)


@contextmanager
def etcd_nodes() -> Iterator[list[EmulatedNode]]:
    """A list to put nodes in; every node is discarded on the way out (etcd killed, data dir deleted), whatever
    happened."""
    nodes: list[EmulatedNode] = []
    try:
        yield nodes
    finally:
        for n in nodes:
            n.discard()


def launch_concurrently(
    nodes: Sequence[EmulatedNode], rng: random.Random | None = None, *, head_start: int | None = None,
    head_start_seconds: tuple[float, float] = (0.04, 0.06), others_wait_for: Callable[[], bool] | None = None,
    timeout: float = 120.0,
) -> list[LaunchOutcome]:  # fmt: skip
    """Start every node's launch at once, each after a random 0-30 ms jitter; ``head_start`` lets that node
    start ``head_start_seconds`` (a random value in that range) before the others. With ``others_wait_for`` the
    head start is an event, not a time: the others start (after their jitter) once that predicate holds, so a
    loaded machine cannot turn the head start into a race. Outcomes in node order."""
    rng = rng or random.Random()
    delays = []
    for i in range(len(nodes)):
        late = others_wait_for is None and head_start not in (None, i)
        delays.append(rng.uniform(0, 0.03) + (rng.uniform(*head_start_seconds) if late else 0))
    results: list[LaunchOutcome | None] = [None] * len(nodes)

    def go(i: int) -> None:
        if others_wait_for is not None and head_start not in (None, i):
            until = time.monotonic() + timeout / 2
            while not others_wait_for():
                assert time.monotonic() < until, "the head-start node never reached its event"
                time.sleep(0.005)
        time.sleep(delays[i])
        results[i] = nodes[i].agent.run_launch()

    threads = [threading.Thread(target=go, args=(i,), daemon=True) for i in range(len(nodes))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(timeout=max(deadline - time.monotonic(), 0))
    assert all(r is not None for r in results), f"a launch did not finish within {timeout}s: {results}"
    return [r for r in results if r is not None]
