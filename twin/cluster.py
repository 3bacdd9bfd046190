"""The local cluster twin: moto (through :mod:`twin.aws`), the lifecycle state machine (:mod:`twin.lifecycle`),
instances as processes running the real node agent (:mod:`twin.instance`), lifecycle events delivered to the
real Lambda handlers (:mod:`twin.events`) and an independent etcd timeline (:mod:`twin.observe`).

    with Twin(TwinOptions(control_planes=3, workers=2)) as twin:
        twin.wait_bootstrapped()
        twin.terminate(twin.control_plane_instances()[0].instance_id)
        twin.wait_converged()
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.config import ClusterConfig
from twin.apiserver import FileApiServer
from twin.aws import REGION, MotoAws
from twin.cloud import AMI, CloudNames, create_cloud, create_groups
from twin.events import QueueDelivery, Timer, load_handler, scheduled_event, terminate_lifecycle_event
from twin.lifecycle import (
    IN_SERVICE,
    PENDING_WAIT,
    RETAINED,
    TERMINATED,
    TERMINATING_WAIT,
    WAIT_STATES,
    Group,
    Hook,
    Instance,
    LifecycleMachine,
)
from twin.observe import EtcdObserver, Sample, Timeline

REPO = Path(__file__).resolve().parent.parent
LIFECYCLE_HANDLER = "lambdas.etcd_lifecycle.handler:handle"
RECONCILER_HANDLER = "lambdas.reconciler.handler:handle"
OPS_HANDLER = "lambdas.cluster_ops.handler:handle"

FAST_AGENT = {
    "lease_seconds": 3.0,
    "renew_interval_seconds": 0.5,
    "poll_interval_seconds": 0.2,
    "join_deadline_seconds": 100.0,
    "health_timeout_seconds": 60.0,
}


def cold_start_lambdas() -> None:
    """Forget imported Lambda modules so this twin's handlers import afresh (a new deployment's cold start):
    clients or secrets a handler module caches at import time then belong to this twin's AWS endpoint."""
    for name in [m for m in sys.modules if m == "lambdas" or m.startswith("lambdas.")]:
        del sys.modules[name]


@dataclass(frozen=True)
class TwinOptions:
    cluster_name: str = "twin"
    control_planes: int = 3
    workers: int = 2
    root: Path | None = None
    keep_root: bool = False
    launch_hook_timeout: float = 120.0
    terminate_hook_timeout: float = 30.0
    terminate_default_result: str = "ABANDON"  # the stack's control-plane default (with retain-on-abandon)
    retain_on_abandon: bool = True
    reconcile_interval: float = 4.0
    retry_delay_seconds: int = 1
    removal_deadline_seconds: int = 120
    sample_interval: float = 0.25
    snapshot_every_seconds: float = 0.0
    upgrade_addons_every_seconds: float = 0.0  # the agent's upgrade-addons timer (0: off)
    agent_settings: dict[str, float] = field(default_factory=lambda: dict(FAST_AGENT))


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    root: Path
    spec: dict[str, Any]


class TwinError(AssertionError):
    pass


class Twin:
    def __init__(self, options: TwinOptions | None = None, progress: Callable[[str], None] | None = None) -> None:
        self.options = options or TwinOptions()
        self.progress = progress or (lambda line: None)
        self.cfg = ClusterConfig.from_mapping(
            {
                "clusterName": self.options.cluster_name,
                "region": REGION,
                "controlPlaneCount": self.options.control_planes,
                "workerGroups": [
                    {
                        "name": "general",
                        "instanceType": "m6i.large",
                        "minSize": self.options.workers,
                        "maxSize": max(self.options.workers, 1) + 1,
                        "desiredCapacity": self.options.workers,
                    }
                ],
            }
        )
        self.root = self.options.root or Path(tempfile.mkdtemp(prefix="dk8s-twin-"))
        self.kubernetes_version = self.cfg.kubernetes_version  # the AMI's version new launches run (twin/upgrade.py)
        self.second_octet = random.SystemRandom().randint(32, 250)
        self.aws = MotoAws(self.root / "aws", backend=self)
        self.procs: dict[str, Proc] = {}
        self.used_ips: set[str] = set()
        self.next_launch_fail: dict[str, dict[str, str]] = {}  # role -> emulator failure for the next launch
        self.lose_events_for: set[str] = set()
        self.lost_events: list[str] = []
        self.reconciler_enabled = True
        self.reconciler_runs = 0
        self.reconciler_errors: list[str] = []
        self._undo_env: Callable[[], None] | None = None
        self._observer: EtcdObserver | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.machine: LifecycleMachine | None = None
        self.cloud: CloudNames | None = None
        self.timeline = Timeline(self._sample, self.options.sample_interval, on_sample=self._on_sample)
        self._last_names: tuple[str, ...] | None = None
        self.delivery: QueueDelivery | None = None
        self.reconciler: Timer | None = None

    # -- lifecycle of the twin ----------------------------------------------------------------------------
    def __enter__(self) -> Twin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Twin:
        t0 = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        self.aws.start()
        self.cloud = create_cloud(self.aws, self.cfg, self.second_octet)
        groups = create_groups(
            self.aws,
            self.cfg,
            self.cloud,
            launch_timeout=self.options.launch_hook_timeout,
            terminate_timeout=self.options.terminate_hook_timeout,
            terminate_default=self.options.terminate_default_result,
            retain_on_abandon=self.options.retain_on_abandon,
        )
        self.api_file = self.root / "apiserver.json"
        self.api = FileApiServer(self.api_file)
        self._undo_env = MotoAws.apply_environment({**self.aws.environment(), **self.lambda_environment()})
        cold_start_lambdas()
        self.machine = LifecycleMachine(groups, provider=self, on_event=self._on_event)
        self.delivery = QueueDelivery(
            self.aws.client("sqs"),
            self.cloud.events_queue_url,
            self.cloud.events_queue_arn,
            lambda: load_handler(LIFECYCLE_HANDLER),
            self.cfg.etcd_lifecycle_function_name,
            on_event=self._on_event,
            concurrency=1,  # the stack reserves concurrency 1: membership changes one at a time
        ).start()
        self.reconciler = Timer(self.options.reconcile_interval, self.run_reconciler, "reconciler").start()
        self.timeline.start()
        t = threading.Thread(target=self._tick_loop, name="asg-tick", daemon=True)
        t.start()
        self._threads.append(t)
        self.progress(
            f"twin up in {time.monotonic() - t0:.1f}s: moto at {self.aws.endpoint_url}, "
            f"VPC 127.{self.second_octet}.0.0/16, root {self.root}"
        )
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self.timeline.stop()
        if self.reconciler is not None:
            self.reconciler.stop()
        if self.delivery is not None:
            self.delivery.stop()
        for proc in list(self.procs.values()):
            self._kill(proc)
        self.aws.stop()
        if self._undo_env is not None:
            self._undo_env()
        if not self.options.keep_root and self.options.root is None:
            shutil.rmtree(self.root, ignore_errors=True)

    def lambda_environment(self) -> dict[str, str]:
        assert self.cloud is not None
        return {
            "CLUSTER_NAME": self.cfg.cluster_name,
            "CLUSTER_TAG_KEY": self.cfg.CLUSTER_TAG_KEY,
            "ROLE_TAG_KEY": self.cfg.ROLE_TAG_KEY,
            "CONTROL_PLANE_GROUP_NAMES": ",".join(self.cfg.control_plane_group_names),
            "ETCD_CLIENT_SECRET_NAME": self.cfg.etcd_client_secret_name,
            "RETRY_QUEUE_URL": self.cloud.events_queue_url,
            "RETRY_DELAY_SECONDS": str(self.options.retry_delay_seconds),
            "REMOVAL_DEADLINE_SECONDS": str(self.options.removal_deadline_seconds),
            "DESIRED_MEMBERS": str(self.options.control_planes),
            "DRAIN_NODES": "false",  # the twin's API server is a JSON file, not an HTTPS Kubernetes API
            # Worker terminate hooks reach the Lambda too (twin/cluster.py: terminating): with the drain off it
            # completes them with CONTINUE at once, as production does after the drain.
            "WORKER_GROUP_NAMES": ",".join(self.cfg.worker_group_name(g) for g in self.cfg.worker_groups),
            "METRICS_NAMESPACE": "DedicatedK8s",
            "POWERTOOLS_METRICS_NAMESPACE": "DedicatedK8s",
            "POWERTOOLS_SERVICE_NAME": "twin",
        }

    def _tick_loop(self) -> None:
        while not self._stop.wait(0.1):
            try:
                assert self.machine is not None
                self.machine.tick()
            except Exception as err:
                self._on_event("tick-error", error=f"{type(err).__name__}: {err}")

    # -- the lifecycle backend the proxy calls (Auto Scaling API) -------------------------------------------
    def complete_action(self, group: str, hook: str, instance_id: str, token: str, result: str) -> None:
        assert self.machine is not None
        self.machine.complete_action(group, hook, instance_id, token, result)

    def heartbeat(self, group: str, hook: str, instance_id: str, token: str) -> None:
        assert self.machine is not None
        self.machine.heartbeat(group, hook, instance_id, token)

    def terminate_in_group(self, instance_id: str, decrement: bool) -> str:
        assert self.machine is not None
        return self.machine.terminate_in_group(instance_id, decrement)

    def lifecycle_state(self, instance_id: str) -> str | None:
        assert self.machine is not None
        with self.machine.lock:
            inst = self.machine.instances.get(instance_id)
        return inst.state if inst is not None else None

    def terminate(self, instance_id: str) -> None:
        """What ``aws autoscaling terminate-instance-in-auto-scaling-group --no-should-decrement...`` does."""
        self.aws.client("autoscaling").terminate_instance_in_auto_scaling_group(
            InstanceId=instance_id, ShouldDecrementDesiredCapacity=False
        )

    # -- the Provider the state machine calls ---------------------------------------------------------------
    def _allocate_ip(self, group: Group) -> str:
        assert self.cloud is not None
        base = 64 * list(self.cloud.subnets).index(group.zone)
        rng = random.SystemRandom()
        for _ in range(500):
            ip = f"127.{self.second_octet}.{base + rng.randint(0, 63)}.{rng.randint(2, 254)}"
            if ip in self.used_ips:
                continue
            try:
                for port in (2379, 2380):
                    with socket.socket() as s:
                        s.bind((ip, port))
            except OSError:
                continue
            self.used_ips.add(ip)
            return ip
        raise TwinError("no free loopback address")

    def launch(self, group: Group) -> tuple[str, str]:
        assert self.cloud is not None
        ec2, asg = self.aws.client("ec2"), self.aws.client("autoscaling")
        ip = self._allocate_ip(group)
        tags = [
            {"Key": self.cfg.CLUSTER_TAG_KEY, "Value": self.cfg.cluster_name},
            {"Key": self.cfg.ROLE_TAG_KEY, "Value": group.role},
            {"Key": "aws:autoscaling:groupName", "Value": group.name},
            {"Key": "Name", "Value": f"{self.cfg.resource_prefix}-{group.role}"},
        ]
        inst = ec2.run_instances(
            ImageId=AMI,
            MinCount=1,
            MaxCount=1,
            SubnetId=group.subnet_id,
            PrivateIpAddress=ip,
            LaunchTemplate={"LaunchTemplateName": f"{self.cfg.resource_prefix}-{group.role}"},
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )["Instances"][0]
        iid = inst["InstanceId"]
        try:
            asg.attach_instances(InstanceIds=[iid], AutoScalingGroupName=group.name)
        except Exception:
            ec2.terminate_instances(InstanceIds=[iid])
            raise
        root = self.root / "instances" / iid
        root.mkdir(parents=True, exist_ok=True)
        config_path = root / "agent.json"
        config_path.write_text(json.dumps(self.agent_json(group.role)))
        spec = {
            "instanceId": iid,
            "ip": ip,
            "region": REGION,
            "zone": group.zone,
            "group": group.name,
            "root": str(root),
            "configPath": str(config_path),
            "apiServerFile": str(self.api_file),
            "settings": self.options.agent_settings,
            "fail": self.next_launch_fail.pop(group.role, None),
            "snapshotEverySeconds": self.options.snapshot_every_seconds,
            "upgradeAddonsEverySeconds": self.options.upgrade_addons_every_seconds,
        }
        (root / "spec.json").write_text(json.dumps(spec))
        log = (root / "agent.log").open("ab")
        env = {**os.environ, **self.aws.environment(), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        popen = subprocess.Popen(
            [sys.executable, "-m", "twin.instance", str(root / "spec.json")],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs[iid] = Proc(popen, root, spec)
        return iid, ip

    def agent_json(self, role: str) -> dict[str, Any]:
        assert self.cloud is not None
        return {
            "clusterName": self.cfg.cluster_name,
            "role": role,
            "region": REGION,
            "kubernetesVersion": self.kubernetes_version,
            "apiEndpoint": f"{self.cfg.resource_prefix}-api.elb.{REGION}.amazonaws.com",
            "apiPort": 6443,
            "clusterStateTable": self.cfg.cluster_state_table_name,
            "snapshotBucket": self.cloud.bucket,
            "kmsKeyId": self.cloud.kms_key_arn,
            "pkiSecretName": self.cfg.pki_secret_name,
            "etcdClientSecretName": self.cfg.etcd_client_secret_name,
            "joinSecretName": self.cfg.join_secret_name,
            "snapshotIntervalMinutes": self.cfg.snapshot_interval_minutes,
            "snapshotRetentionDays": self.cfg.snapshot_retention_days,
            "launchHookName": self.cloud.launch_hook,
            "podCidr": "10.244.0.0/16",
            "serviceCidr": "10.96.0.0/12",
            "kubeClientSecretName": self.cfg.kube_client_secret_name,
            # Rendered into the termination handler's manifest only (the twin runs no pods).
            "terminationHandlerQueueUrl": f"https://sqs.{REGION}.amazonaws.com/123456789012/"
            f"{self.cfg.termination_handler_queue_name}",
            "vpcCidr": "127.0.0.0/8",
        }

    def terminating(self, inst: Instance, group: Group, hook: Hook) -> None:
        assert self.cloud is not None
        if inst.instance_id in self.lose_events_for:
            self.lose_events_for.discard(inst.instance_id)
            self.lost_events.append(inst.instance_id)
            self._on_event("event-lost", instance_id=inst.instance_id)
            return
        event = terminate_lifecycle_event(
            group=group.name, hook=hook.name, instance_id=inst.instance_id, token=inst.hook_token
        )
        self.aws.client("sqs").send_message(QueueUrl=self.cloud.events_queue_url, MessageBody=json.dumps(event))

    def retained(self, inst: Instance) -> None:
        """Retained on abandon: the instance (and its etcd) keeps running, outside the group's capacity."""
        self._on_event("retained", instance_id=inst.instance_id)
        try:
            self.aws.client("autoscaling").detach_instances(
                InstanceIds=[inst.instance_id], AutoScalingGroupName=inst.group, ShouldDecrementDesiredCapacity=True
            )
        except Exception as err:
            self._on_event("moto-error", error=str(err))

    def destroy(self, inst: Instance) -> None:
        if inst.role == "control-plane":  # was the member removed before the instance went away?
            obs = self.observer()
            names = [m.name for m in obs.members(self.etcd_endpoints())] if obs else []
            self._on_event(
                "destroy",
                instance_id=inst.instance_id,
                observed=bool(names),
                still_member=any(n.startswith(inst.instance_id) for n in names),
            )
        proc = self.procs.get(inst.instance_id)
        if proc is not None:
            self._kill(proc)
        node = f"{inst.instance_id}.{REGION}.compute.internal"
        with self.api.lock:
            self.api.etcd_endpoints.pop(node, None)
            self.api.nodes.pop(node, None)
        asg, ec2 = self.aws.client("autoscaling"), self.aws.client("ec2")
        try:
            asg.detach_instances(
                InstanceIds=[inst.instance_id], AutoScalingGroupName=inst.group, ShouldDecrementDesiredCapacity=True
            )
        except Exception as err:
            self._on_event("moto-error", error=str(err))
        ec2.terminate_instances(InstanceIds=[inst.instance_id])

    @staticmethod
    def _kill(proc: Proc) -> None:
        with contextlib.suppress(ProcessLookupError):  # the process group: the agent and its etcd (the instance dies)
            os.killpg(proc.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=10)

    # -- the Lambdas ---------------------------------------------------------------------------------------
    def run_reconciler(self) -> None:
        if not self.reconciler_enabled or not self.initialised():
            return
        from twin.events import LambdaContext

        self.reconciler_runs += 1
        try:
            load_handler(RECONCILER_HANDLER)(
                scheduled_event(f"{self.cfg.resource_prefix}-reconcile"),
                LambdaContext(self.cfg.reconciler_function_name),
            )
        except Exception as err:
            self.reconciler_errors.append(f"{type(err).__name__}: {err}")
            self._on_event("reconciler-error", error=f"{type(err).__name__}: {err}")

    def ops(self, action: str, **payload: Any) -> Any:
        """Invoke the cluster-ops Lambda in-process (the canary's status/put/get)."""
        from twin.events import LambdaContext

        return load_handler(OPS_HANDLER)(
            {"action": action, **payload}, LambdaContext(self.cfg.cluster_ops_function_name)
        )

    # -- observation -------------------------------------------------------------------------------------------
    def initialised(self) -> bool:
        return self.observer() is not None

    def observer(self) -> EtcdObserver | None:
        if self._observer is None:
            try:
                sm = self.aws.client("secretsmanager")
                value = json.loads(sm.get_secret_value(SecretId=self.cfg.etcd_client_secret_name)["SecretString"])
            except Exception:
                return None
            self._observer = EtcdObserver(value["ca"], value["cert"], value["key"], self.root / "observer")
        return self._observer

    def control_plane_instances(self, *states: str) -> list[Instance]:
        assert self.machine is not None
        insts = [i for i in self.machine.snapshot() if i.role == "control-plane"]
        return [i for i in insts if not states or i.state in states]

    def etcd_endpoints(self) -> list[str]:
        live = (PENDING_WAIT, IN_SERVICE, TERMINATING_WAIT, RETAINED)
        return [f"https://{i.ip}:2379" for i in self.control_plane_instances(*live)]

    def _sample(self) -> Sample | None:
        obs = self.observer()
        if obs is None:
            return None
        states = {i.instance_id: i.state for i in self.control_plane_instances() if i.state != TERMINATED}
        return obs.sample(self.etcd_endpoints(), states)

    def _on_sample(self, s: Sample) -> None:
        prev = self._last_names
        self._last_names = s.names
        if prev is None or s.members == 0:
            return
        for name in set(prev) - set(s.names):
            self.timeline.event("removal", member=name)
        for name in set(s.names) - set(prev):
            self.timeline.event("member-added", member=name)

    def _on_event(self, kind: str, **fields: Any) -> None:
        if kind == "state":
            state = fields["state"]
            if state == IN_SERVICE and fields.get("role") == "control-plane":
                self.timeline.event("join", **fields)
                self.progress(f"  {fields['instance_id']} ({fields['ip']}) InService")
            elif state == TERMINATING_WAIT:
                self.progress(f"  {fields['instance_id']} Terminating:Wait ({fields.get('cause')})")
            elif state in (TERMINATED, RETAINED):
                self.progress(f"  {fields['instance_id']} {state}")
            self.timeline.event("state", **fields)
        elif kind == "termination":
            self.timeline.event("termination", **fields)
        elif kind == "launch":
            self.progress(f"  launch {fields['instance_id']} {fields['role']} at {fields['ip']} ({fields['group']})")
            self.timeline.event("launch", **fields)
        elif kind in ("lambda-error", "reconciler-error", "tick-error", "esm-error"):
            self.timeline.event(kind, **fields)
            self.progress(f"  ! {kind}: {fields.get('error')}")
        else:
            self.timeline.event(kind, **fields)

    # -- waiting and checking -------------------------------------------------------------------------------------
    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float, interval: float = 0.25) -> float:
        t0 = time.monotonic()
        while True:
            if predicate():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TwinError(f"timed out after {timeout:.0f}s waiting for {what}; {self.describe()}")
            time.sleep(interval)

    def latest(self) -> Sample | None:
        with self.timeline.lock:
            return self.timeline.samples[-1] if self.timeline.samples else None

    def converged(self) -> bool:
        """Desired healthy voters, no learner, every member belongs to an InService instance, no waits."""
        assert self.machine is not None
        if any(i.state in WAIT_STATES for i in self.machine.snapshot()):
            return False
        in_service = self.control_plane_instances(IN_SERVICE)
        workers = [i for i in self.machine.snapshot() if i.role == "worker" and i.state == IN_SERVICE]
        if len(in_service) != self.options.control_planes or len(workers) != self.options.workers:
            return False
        obs = self.observer()
        if obs is None:
            return False
        members = obs.members(self.etcd_endpoints())
        ids = {i.instance_id for i in in_service}
        return (
            len(members) == self.options.control_planes
            and all(m.healthy and not m.is_learner for m in members)
            and {m.name.split(".", 1)[0] for m in members} == ids
        )

    def wait_converged(self, timeout: float = 120) -> float:
        return self.wait_for("convergence", self.converged, timeout, interval=0.5)

    def wait_bootstrapped(self, timeout: float = 120) -> float:
        return self.wait_converged(timeout)

    def launch_results(self) -> dict[str, dict[str, Any]]:
        out = {}
        for iid, proc in self.procs.items():
            path = proc.root / "launch-result.json"
            if path.exists():
                out[iid] = json.loads(path.read_text())
        return out

    def initialisers(self) -> list[str]:
        """Instances whose agent ran ``kubeadm init`` on a fresh cluster (a restore is counted apart)."""
        return [iid for iid, r in self.launch_results().items() if "kubeadm init" in r.get("kubeadm", [])]

    def restorers(self) -> list[str]:
        return [iid for iid, r in self.launch_results().items() if "kubeadm init --restore" in r.get("kubeadm", [])]

    def describe(self) -> str:
        assert self.machine is not None
        insts = ", ".join(
            f"{i.instance_id}:{i.role[:2]}:{i.state}" for i in self.machine.snapshot() if i.state != TERMINATED
        )
        s = self.latest()
        etcd = (
            (
                f"members={s.members} voters={s.voters} healthy={s.healthy_voters} learners={s.learners} "
                f"leader={s.leader[:19]}"
            )
            if s
            else "etcd not observed yet"
        )
        return f"instances [{insts}]; {etcd}"

    def report(self) -> dict[str, Any]:
        assert self.machine is not None
        return {
            "instances": [
                {k: v for k, v in vars(i).items() if k != "history"} | {"history": i.history}
                for i in self.machine.snapshot()
            ],
            "initialisers": self.initialisers(),
            "restorers": self.restorers(),
            "lambda_invocations": self.delivery.invocations if self.delivery else 0,
            "lambda_errors": self.delivery.errors if self.delivery else 0,
            "reconciler_runs": self.reconciler_runs,
            "lost_events": self.lost_events,
        }
