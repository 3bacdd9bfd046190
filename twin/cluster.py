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
import dataclasses
import ipaddress
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
from tests.agent.kubeadm_emulator import STATIC_PODS
from twin.apiserver import FileApiServer
from twin.authorizer import twin_authorizer
from twin.aws import REGION, MotoAws
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
from twin.loadbalancer import LoadBalancer, TargetGroupSettings
from twin.observe import EtcdObserver, Sample, Timeline
from twin.template import CLUSTER_STACK, GroupSpec, HookSpec, TemplateCloud, synthesized_templates
from twin.timing import DEFAULT_TIME_SCALE, TwinTiming, systemd_timer_seconds

REPO = Path(__file__).resolve().parent.parent
# The AMI the image pipeline writes to SSM (K8sClusterStack reads it as a parameter): moto's default image.
AMI = "ami-12c6146b"
CDK_BOOTSTRAP_VERSION = "30"  # what `cdk bootstrap` writes to /cdk-bootstrap/hnb659fds/version


def cold_start_lambdas() -> None:
    """Forget imported Lambda modules so this twin's handlers import afresh (a new deployment's cold start):
    clients or secrets a handler module caches at import time then belong to this twin's AWS endpoint."""
    for name in [m for m in sys.modules if m == "lambdas" or m.startswith("lambdas.")]:
        del sys.modules[name]


@dataclass(frozen=True)
class TwinOptions:
    """The twin's shape; every duration comes from the template/agent times ``time_scale`` (twin/timing.py)."""

    cluster_name: str = "twin"
    control_planes: int = 3
    workers: int = 2
    root: Path | None = None
    keep_root: bool = False
    time_scale: float = DEFAULT_TIME_SCALE
    sample_interval: float = 0.25  # the twin's own observer (measurement, not the stack): unscaled
    snapshots: bool = False  # run the agent's snapshot timer (every snapshotIntervalMinutes, scaled)
    snapshot_interval_minutes: int = 30  # the context key (cdk.json snapshotIntervalMinutes; 5..1440)
    addon_upgrades: bool = False  # run the agent's upgrade-addons timer (imagebuilder/systemd, scaled)
    context: dict[str, Any] = field(default_factory=dict)  # further cdk.json context overrides
    template: dict[str, Any] | None = None  # a K8sClusterStack template to run instead of the synthesized one
    enforce_iam: bool = True  # IAM and VPC endpoints of the synthesized stacks, in the AWS proxy (twin/authorizer.py)
    lambda_concurrency_quota: int = 1000  # the account's Lambda concurrency quota (lambda:GetAccountSettings)

    def app_context(self) -> dict[str, Any]:
        return {
            "clusterName": self.cluster_name,
            "region": REGION,
            "availabilityZones": [f"{REGION}{z}" for z in "abc"],
            "controlPlaneCount": self.control_planes,
            "workerGroups": [
                {
                    "name": "general",
                    "instanceType": "m6i.large",
                    "minSize": self.workers,
                    "maxSize": max(self.workers, 1) + 1,
                    "desiredCapacity": self.workers,
                }
            ],
            "snapshotIntervalMinutes": self.snapshot_interval_minutes,
            "irsa": False,  # IRSA's issuer is proven by its own tests; the twin runs no pod identity webhook
            **self.context,
        }


def esm_concurrency(maximum_concurrency: int | None, reserved: int | None) -> int:
    """How many invocations the SQS event source runs at once: its ScalingConfig MaximumConcurrency, never more
    than the function's reserved concurrency; with neither, Lambda starts with five concurrent batches ("Using
    Lambda with Amazon SQS", Scaling and processing) -- the twin stays at five."""
    limits = [n for n in (maximum_concurrency, reserved) if n is not None]
    return min(limits) if limits else 5


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
        self.cfg = ClusterConfig.from_mapping(self.options.app_context())
        self.root = self.options.root or Path(tempfile.mkdtemp(prefix="dk8s-twin-"))
        self.kubernetes_version = self.cfg.kubernetes_version  # the AMI's version new launches run (twin/upgrade.py)
        self.second_octet = random.SystemRandom().randint(32, 250)
        self.aws = MotoAws(
            self.root / "aws", backend=self, lambda_concurrency_quota=self.options.lambda_concurrency_quota
        )
        self.procs: dict[str, Proc] = {}
        self.used_ips: set[str] = set()
        self.next_launch_fail: dict[str, dict[str, str]] = {}  # role -> emulator failure for the next launch
        self.lose_events_for: set[str] = set()
        self.lost_events: list[str] = []
        self.unrouted_events: list[dict[str, Any]] = []
        self.reconciler_enabled = True
        self.reconciler_runs = 0
        self.reconciler_errors: list[str] = []
        self._undo_env: Callable[[], None] | None = None
        self._observer: EtcdObserver | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.machine = LifecycleMachine([], provider=self, on_event=self._on_event)
        self.cloud: TemplateCloud | None = None
        self.group_specs: dict[str, GroupSpec] = {}
        self.lambda_timeouts: dict[str, float] = {}
        self.timing: TwinTiming | None = None
        self.load_balancer: LoadBalancer | None = None
        self.agent_settings: dict[str, float] = {}
        self.timers: dict[str, float] = {}
        self.timeline = Timeline(self._sample, self.options.sample_interval, on_sample=self._on_sample)
        self._last_names: tuple[str, ...] | None = None
        self.delivery: QueueDelivery | None = None
        self.reconciler: Timer | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        self.api_file = self.root / "apiserver.json"
        self.api = FileApiServer(self.api_file)

    # -- lifecycle of the twin ----------------------------------------------------------------------------
    def __enter__(self) -> Twin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def templates(self) -> dict[str, dict[str, Any]]:
        """Every synthesized stack (IamStack's roles for the IAM model, K8sClusterStack for the cloud)."""
        return synthesized_templates(self.options.app_context())

    def template(self) -> dict[str, Any]:
        if self.options.template is not None:
            return self.options.template
        return self.templates()[CLUSTER_STACK]

    def lambda_handler(self, function_name: str) -> str:
        """``module:function`` of the template's function of that name."""
        assert self.cloud is not None
        return next(s.handler for s in self.cloud.lambdas.values() if s.name == function_name)

    def start(self) -> Twin:
        t0 = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        template = self.template()
        if self.options.enforce_iam:
            self.aws.enforce(twin_authorizer({**self.templates(), CLUSTER_STACK: template}, self.cfg))
        self.aws.start()
        ssm = self.aws.client("ssm")  # what exists in the account before the deploy (image pipeline, cdk bootstrap)
        ssm.put_parameter(Name=self.cfg.ami, Value=AMI, Type="String")
        ssm.put_parameter(Name="/cdk-bootstrap/hnb659fds/version", Value=CDK_BOOTSTRAP_VERSION, Type="String")
        self.cloud = TemplateCloud(template, octet=self.second_octet, time_scale=self.options.time_scale)
        self.timing = TwinTiming(self.cloud)
        self.agent_settings = self.timing.agent_settings()
        self.timers = {
            "snapshot": self.timing.timer("snapshot", self.cfg.snapshot_interval_minutes * 60.0,
                                          "agent config snapshotIntervalMinutes (dedicated-k8s-enable-timers)"),
            "upgrade-addons": self.timing.timer("upgrade-addons",
                                                systemd_timer_seconds("dedicated-k8s-upgrade-addons.timer"),
                                                "imagebuilder/systemd/dedicated-k8s-upgrade-addons.timer"),
        }  # fmt: skip
        self._prepare_load_balancer()
        # The Lambdas' environment must be in place before the groups launch: the handlers run in this process.
        self.cloud.create(self.aws, self)
        self.timing.queue_visibility()
        self._start_lambdas()
        self.timeline.start()
        t = threading.Thread(target=self._tick_loop, name="asg-tick", daemon=True)
        t.start()
        self._threads.append(t)
        self.progress(
            f"twin up in {time.monotonic() - t0:.1f}s: moto at {self.aws.endpoint_url}, "
            f"VPC {self.cloud.addresses.to_twin(self.cloud.addresses.template_cidr)} "
            f"(the template's {self.cloud.addresses.template_cidr}), time x{self.options.time_scale}, root {self.root}"
        )
        return self

    def _prepare_load_balancer(self) -> None:
        """The NLB model (twin/loadbalancer.py) configured from the template's target group; its state is a file
        every instance process shares. Created after the template is read (needs the DNS name): see group_created."""
        self._lb_path = self.root / "nlb.json"

    def _ensure_load_balancer(self) -> LoadBalancer | None:
        if self.load_balancer is not None or self.cloud is None or not self.cloud.target_groups:
            return self.load_balancer
        assert self.timing is not None
        (logical_id,) = self.cloud.target_groups
        settings = TargetGroupSettings(**self.timing.target_group(logical_id))
        dns = next(m.attrs["DNSName"] for m in self.cloud.made.values() if "DNSName" in m.attrs)
        self.load_balancer = LoadBalancer(dns, settings, path=self._lb_path)
        return self.load_balancer

    def _start_lambdas(self) -> None:
        assert self.cloud is not None and self.timing is not None
        lambdas = {spec.name: spec for spec in self.cloud.lambdas.values()}
        if len({json.dumps(s.environment, sort_keys=True) for s in lambdas.values()}) > 1:
            raise TwinError("the twin runs every Lambda in one process with one environment; the template's differ")
        (esm,) = self.cloud.event_sources
        function = self.cloud.lambdas[esm.function]
        self.lifecycle_function = function
        if esm.batch_size != 1 or esm.batching_window != 0:
            raise TwinError(
                f"{function.name}: BatchSize={esm.batch_size}, MaximumBatchingWindowInSeconds="
                f"{esm.batching_window}: the twin's event source delivers one message at a time"
            )
        if "ReportBatchItemFailures" not in esm.response_types:
            raise TwinError(
                f"{function.name}: FunctionResponseTypes {list(esm.response_types)}: the twin's event source "
                "honours batchItemFailures, which AWS ignores without ReportBatchItemFailures"
            )
        env = self.timing.lambda_environment(function)
        self._lambda_env = {**env, "DRAIN_NODES": "false"}
        self._undo_env = MotoAws.apply_environment({**self.aws.environment(), **self._lambda_env})
        cold_start_lambdas()
        self.delivery = QueueDelivery(
            self.aws.client("sqs", function.name),  # the event source polls with the function's execution role
            esm.queue_url,
            esm.queue_arn,
            lambda: load_handler(function.handler),
            function.name,
            on_event=self._on_event,
            concurrency=esm_concurrency(esm.maximum_concurrency, function.reserved_concurrency),
        )
        self.lambda_timeouts = {s.name: self.timing.lambda_timeout(s) for s in lambdas.values()}
        self.delivery.timeout_s = self.lambda_timeouts[function.name]
        self.delivery.start()
        scheduled = [r for r in self.cloud.rules if r.schedule]
        self.reconciler_function = lambdas[scheduled[0].targets[0].rsplit(":", 1)[1]]
        interval = self.timing.schedule(scheduled[0].name, str(scheduled[0].schedule))
        self.reconciler = Timer(interval, self.run_reconciler, "reconciler").start()

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
        """The template's environment of the lifecycle function, its durations scaled. One deviation: the twin's
        API server is a JSON file, not an HTTPS Kubernetes API, so the Lambda does not drain (DRAIN_NODES=false;
        the drain is proven in tests/lambdas/test_drain.py)."""
        return dict(self._lambda_env)

    # -- creation (twin/template.py calls these in CloudFormation's order) ------------------------------------
    def group_created(self, spec: GroupSpec) -> None:
        assert self.timing is not None
        hooks = {h.launching: self._hook(spec.name, h) for h in spec.hooks}
        self.group_specs[spec.name] = spec
        self._ensure_load_balancer()
        self.machine.add_group(Group(spec.name, spec.role, tuple(spec.subnets), spec.desired, hooks.get(True),
                                     hooks.get(False), spec.retain_on_abandon))  # fmt: skip

    def hook_created(self, group_name: str, hook: HookSpec) -> None:
        self.machine.put_hook(group_name, self._hook(group_name, hook), launching=hook.launching)

    def _hook(self, group: str, h: HookSpec) -> Hook:
        assert self.timing is not None
        return Hook(h.name, self.timing.hook_timeout(group, h.name, h.heartbeat_timeout), h.default_result)

    def removal_deadline(self) -> float:
        return float(self.lambda_environment()["REMOVAL_DEADLINE_SECONDS"])

    def terminate_hook_timeout(self, role: str) -> float:
        hooks = [g.terminate_hook for g in self.machine.groups.values() if g.role == role and g.terminate_hook]
        return max(h.heartbeat_timeout for h in hooks)

    @property
    def snapshot_bucket(self) -> str:
        return str(self.group_specs[self.cfg.control_plane_group_names[0]].agent_config["snapshotBucket"])

    @property
    def events_queue_url(self) -> str:
        assert self.cloud is not None
        return self.cloud.event_sources[0].queue_url

    def _tick_loop(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.machine.tick()
                if self.load_balancer is not None:
                    # Answers taken before the check: the check holds the NLB's lock, and a probe that took the
                    # machine's lock inside it deadlocked against a transition deregistering under the machine's.
                    answers = self._api_servers_answering()
                    self.load_balancer.check(answers.__contains__)
            except Exception as err:
                self._on_event("tick-error", error=f"{type(err).__name__}: {err}")

    def _api_servers_answering(self) -> set[str]:
        """The addresses that pass the NLB's TCP health check of port 6443: the instance's process is alive and
        its kubeadm emulator runs the control-plane static pods (the simulated API server listens)."""
        pods = [k for k in self.api.objects if k.startswith(STATIC_PODS)]
        out = set()
        for inst in self.machine.snapshot():
            proc = self.procs.get(inst.instance_id)
            if inst.state == TERMINATED or proc is None or proc.popen.poll() is not None:
                continue
            if any(k.startswith(f"{STATIC_PODS}{inst.instance_id}") for k in pods):
                out.add(inst.ip)
        return out

    # -- the lifecycle backend the proxy calls (Auto Scaling API) -------------------------------------------
    def complete_action(self, group: str, hook: str, instance_id: str, token: str, result: str) -> None:
        self.machine.complete_action(group, hook, instance_id, token, result)

    def heartbeat(self, group: str, hook: str, instance_id: str, token: str) -> None:
        self.machine.heartbeat(group, hook, instance_id, token)

    def terminate_in_group(self, instance_id: str, decrement: bool) -> str:
        return self.machine.terminate_in_group(instance_id, decrement)

    def lifecycle_state(self, instance_id: str) -> str | None:
        with self.machine.lock:
            inst = self.machine.instances.get(instance_id)
        return inst.state if inst is not None else None

    def terminate(self, instance_id: str) -> None:
        """What ``aws autoscaling terminate-instance-in-auto-scaling-group --no-should-decrement...`` does."""
        self.aws.client("autoscaling").terminate_instance_in_auto_scaling_group(
            InstanceId=instance_id, ShouldDecrementDesiredCapacity=False
        )

    # -- the Provider the state machine calls ---------------------------------------------------------------
    def _choose_subnet(self, group: Group) -> tuple[str, str]:
        """Auto Scaling balances a group across its zones: the zone with the fewest of the group's instances."""
        live = [i for i in self.machine.snapshot() if i.group == group.name and i.state != TERMINATED]
        zones = [self.procs[i.instance_id].spec["zone"] for i in live if i.instance_id in self.procs]
        return min(group.subnets, key=lambda zs: zones.count(zs[0]))

    def _allocate_ip(self, subnet_id: str) -> str:
        """A free host address of the subnet (AWS reserves the first four and the last), bindable on loopback."""
        assert self.cloud is not None
        cidr = next(m.attrs["CidrBlock"] for m in self.cloud.made.values() if m.ref == subnet_id)
        hosts = list(ipaddress.IPv4Network(cidr).hosts())[3:-1]
        rng = random.SystemRandom()
        for _ in range(500):
            ip = str(rng.choice(hosts))
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
        raise TwinError(f"no free loopback address in {cidr}")

    def launch(self, group: Group) -> tuple[str, str]:
        ec2, asg = self.aws.client("ec2"), self.aws.client("autoscaling")
        spec = self.group_specs[group.name]
        zone, subnet_id = self._choose_subnet(group)
        ip = self._allocate_ip(subnet_id)
        tags = [{"Key": t["Key"], "Value": t["Value"]} for t in spec.tags if t.get("PropagateAtLaunch")]
        tags.append({"Key": "aws:autoscaling:groupName", "Value": group.name})
        inst = ec2.run_instances(
            MinCount=1,
            MaxCount=1,
            SubnetId=subnet_id,
            PrivateIpAddress=ip,
            LaunchTemplate={"LaunchTemplateId": spec.launch_template_id},
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
        config_path.write_text(json.dumps(self.agent_json(group.name)))
        lb = self.load_balancer
        proc_spec = {
            "instanceId": iid,
            "ip": ip,
            "region": REGION,
            "zone": zone,
            "group": group.name,
            "root": str(root),
            "configPath": str(config_path),
            "apiServerFile": str(self.api_file),
            "settings": self.agent_settings,
            "fail": self.next_launch_fail.pop(group.role, None),
            "snapshotEverySeconds": self.timers["snapshot"] if self.options.snapshots else 0.0,
            "upgradeAddonsEverySeconds": self.timers["upgrade-addons"] if self.options.addon_upgrades else 0.0,
            "loadBalancer": {"path": str(self._lb_path), "dnsName": lb.dns_name, **dataclasses.asdict(lb.settings)}
            if lb is not None
            else None,
        }
        (root / "spec.json").write_text(json.dumps(proc_spec))
        log = (root / "agent.log").open("ab")
        aws_env = self.aws.principal_environment(group.role)  # the instance role's credentials
        env = {**os.environ, **aws_env, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        popen = subprocess.Popen(
            [sys.executable, "-m", "twin.instance", str(root / "spec.json")],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs[iid] = Proc(popen, root, proc_spec)
        return iid, ip

    def agent_json(self, group_name: str) -> dict[str, Any]:
        """The agent config the launch template's user data writes (twin/template.py reads it), with the version
        of the AMI new launches run (twin/upgrade.py's "new AMI")."""
        return {**self.group_specs[group_name].agent_config, "kubernetesVersion": self.kubernetes_version}

    def terminating(self, inst: Instance, group: Group, hook: Hook) -> None:
        """Auto Scaling emits the lifecycle event to EventBridge; each ENABLED rule whose pattern matches sends it
        to its targets (the template's rules; an event no rule matches goes nowhere, as on AWS)."""
        assert self.cloud is not None
        if inst.instance_id in self.lose_events_for:
            self.lose_events_for.discard(inst.instance_id)
            self.lost_events.append(inst.instance_id)
            self._on_event("event-lost", instance_id=inst.instance_id)
            return
        event = terminate_lifecycle_event(
            group=group.name, hook=hook.name, instance_id=inst.instance_id, token=inst.hook_token
        )
        queues = {q["arn"]: q["url"] for q in self.cloud.queues.values()}
        targets = [t for r in self.cloud.rules if r.matches(event) for t in r.targets]
        if not targets:
            self.unrouted_events.append(event)
            self._on_event("event-unrouted", instance_id=inst.instance_id, group=group.name)
        for target in targets:
            if target not in queues:
                raise TwinError(f"rule target {target}: the twin delivers lifecycle events to SQS queues only")
            self.aws.client("sqs").send_message(QueueUrl=queues[target], MessageBody=json.dumps(event))

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
        fn = self.reconciler_function
        try:
            load_handler(fn.handler)(
                scheduled_event(f"{self.cfg.resource_prefix}-reconcile"),
                LambdaContext(fn.name, self.lambda_timeouts[fn.name]),
            )
        except Exception as err:
            self.reconciler_errors.append(f"{type(err).__name__}: {err}")
            self._on_event("reconciler-error", error=f"{type(err).__name__}: {err}")

    def ops(self, action: str, **payload: Any) -> Any:
        """Invoke the cluster-ops Lambda in-process (the canary's status/put/get)."""
        from twin.events import LambdaContext

        name = self.cfg.cluster_ops_function_name
        spec = next(s for s in self.cloud.lambdas.values() if s.name == name)  # type: ignore[union-attr]
        return load_handler(spec.handler)(
            {"action": action, **payload}, LambdaContext(name, self.lambda_timeouts[name])
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
            self._load_balancer_follows(fields["instance_id"], fields["group"], state, fields["ip"])
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

    def _load_balancer_follows(self, instance_id: str, group: str, state: str, ip: str) -> None:
        """The group registers an instance with its target groups when it enters InService and deregisters it
        when it leaves ("How lifecycle hooks work in Auto Scaling groups"; "Use Elastic Load Balancing to
        distribute incoming application traffic in your Auto Scaling group")."""
        spec = self.group_specs.get(group)
        if self.load_balancer is None or spec is None or not spec.target_groups:
            return
        if state == IN_SERVICE:
            self.load_balancer.register(instance_id, ip)
        elif state in (TERMINATING_WAIT, TERMINATED, RETAINED):
            self.load_balancer.deregister(instance_id)

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
