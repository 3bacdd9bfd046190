"""One twin instance = one process: ``python -m twin.instance SPEC.json`` (the instance's "user data").

It runs the REAL node agent entry point (``node_agent.__main__.main(["run", "--config", ...])``) with the
production wiring of ``node_agent.__main__.production_agent`` except three things an EC2 instance has and
a loopback process has not:

* identity: a :class:`~node_agent.instance.StaticIdentity` (instance ID and private IP from the spec)
  instead of IMDSv2;
* kubeadm: the agent's kubeadm emulator (``tests.agent.kubeadm_emulator.KubeadmEmulator``), which performs
  kubeadm's etcd effects on a real TLS etcd started by this process on the instance's loopback address;
  the API server/kubelet it simulates is shared between processes through :class:`twin.apiserver.FileApiServer`;
* AWS: boto3 reaches the twin's moto server through ``AWS_ENDPOINT_URL`` (set by the twin).

Its settings (``spec["settings"]``) are AgentSettings' production defaults times the twin's one time scale
(twin/timing.py), and so are its timers (snapshot, add-on upgrade).

The launch hook is the production ``AutoScalingLaunchHook`` (its call reaches the twin's lifecycle state
machine through the proxy in :mod:`twin.aws`). After a successful launch the process stays alive as the
instance (its etcd is a child process in the same process group) and runs the snapshot timer every
``snapshotEverySeconds``. The twin terminates the instance by killing the whole process group.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import boto3

from node_agent.__main__ import main as agent_main
from node_agent.bootstrap import Agent
from node_agent.config import AgentConfig, AgentSettings
from node_agent.election import ClusterStateStore
from node_agent.etcd_membership import MembershipEtcd
from node_agent.instance import InstanceIdentity
from node_agent.lifecycle import AutoScalingLaunchHook
from node_agent.log import Metrics, configure_logging
from node_agent.secrets import SecretStore
from tests.agent.kubeadm_emulator import KubeadmEmulator
from twin.apiserver import FileApiServer
from twin.loadbalancer import LoadBalancer, TargetGroupSettings


def settings_from(spec: dict[str, Any]) -> AgentSettings:
    root = Path(spec["root"])
    return AgentSettings(
        kubernetes_dir=root / "etc-kubernetes",
        state_dir=root / "state",
        etcd_data_dir=root / "etcd-data",
        hosts_file=root / "hosts",  # the instance's own /etc/hosts (node_agent/hosts.py manages a block in it)
        **spec.get("settings", {}),
    )


def load_balancer_from(spec: dict[str, Any]) -> LoadBalancer:
    """The twin's NLB (file-backed state) as the twin configured it from the template's target group."""
    doc = spec.get("loadBalancer")
    if not doc:
        raise ValueError(f"instance spec {spec.get('instanceId')}: no loadBalancer (the template has no target group)")
    settings = {k: v for k, v in doc.items() if k not in ("path", "dnsName")}
    return LoadBalancer(doc["dnsName"], TargetGroupSettings(**settings), path=Path(doc["path"]))


def run(spec: dict[str, Any]) -> int:
    root = Path(spec["root"])
    identity = InstanceIdentity(spec["instanceId"], spec["ip"], spec["region"], spec.get("zone", ""))
    settings = settings_from(spec)
    # The NLB model every process shares (twin/loadbalancer.py): the emulator's kubeadm phases and kubectl calls
    # go where they go in production, through the NLB or (hosts file) to the node's own API server.
    lb = load_balancer_from(spec)
    runner = KubeadmEmulator(
        node_name=identity.node_name,
        ip=spec["ip"],
        kubernetes_dir=settings.kubernetes_dir,
        etcd_data_dir=settings.etcd_data_dir,
        api=FileApiServer(Path(spec["apiServerFile"])),  # type: ignore[arg-type]
        log_dir=root,
        fail=spec.get("fail") or {},
        hosts_file=settings.hosts_file,
        load_balancer=lb,
    )
    built: list[Agent] = []

    def factory(cfg: AgentConfig, agent_settings: AgentSettings) -> Agent:
        session = boto3.session.Session(region_name=cfg.region)
        agent = Agent(
            config=cfg,
            settings=agent_settings,
            identity=identity,
            runner=runner,
            store=ClusterStateStore(session.client("dynamodb"), cfg.cluster_state_table),
            secrets=SecretStore(
                session.client("secretsmanager"),
                kms_key_id=cfg.kms_key_id,
                tags={"dedicated-k8s:cluster": cfg.cluster_name},
            ),
            hook=AutoScalingLaunchHook(
                session.client("autoscaling"), cfg.launch_hook_name, identity.instance_id, spec["group"]
            ),
            etcd_for=MembershipEtcd,
            ec2=session.client("ec2"),
            s3=session.client("s3"),
            metrics=Metrics(cfg.cluster_name),
        )
        built.append(agent)
        return agent

    rc = agent_main(["run", "--config", spec["configPath"]], factory=factory, settings=settings)
    result = {
        "rc": rc,
        "instanceId": identity.instance_id,
        "kubeadm": [
            " ".join(c[:2]) + (" --restore" if "--ignore-preflight-errors" in " ".join(c) else "")
            for c in runner.calls
            if c[:1] == ["kubeadm"]
        ],
        "etcdPid": runner.process.pid if runner.process is not None else None,
        "finishedAt": time.time(),
    }
    (root / "launch-result.json").write_text(json.dumps(result))
    every = float(spec.get("snapshotEverySeconds") or 0)
    addons_every = float(spec.get("upgradeAddonsEverySeconds") or 0)
    agent = built[0] if built else None
    last = last_addons = time.monotonic()
    while True:  # the instance lives on until the twin kills its process group
        time.sleep(0.5)
        if rc == 0 and agent is not None and addons_every > 0 and agent.config.is_control_plane \
                and time.monotonic() - last_addons >= addons_every:  # fmt: skip
            last_addons = time.monotonic()  # the upgrade-addons timer (python -m node_agent upgrade-addons)
            try:
                agent.upgrade_addons_once()
            except Exception as err:
                print(json.dumps({"upgrade_addons_error": f"{type(err).__name__}: {err}"}), file=sys.stderr, flush=True)
        if (
            rc == 0
            and agent is not None
            and every > 0
            and agent.config.is_control_plane
            and time.monotonic() - last >= every
        ):
            last = time.monotonic()
            try:
                message = agent.snapshot_once()
                if message.startswith("uploaded"):
                    with (root / "snapshots.log").open("a") as f:
                        f.write(f"{time.time():.3f} {message}\n")
            except Exception as err:
                print(json.dumps({"snapshot_error": f"{type(err).__name__}: {err}"}), file=sys.stderr, flush=True)


if __name__ == "__main__":
    configure_logging()
    sys.exit(run(json.loads(Path(sys.argv[1]).read_text())))
