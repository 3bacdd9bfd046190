"""Takeover after a dead holder, stale members, healthy-before-InService, and bad input, on real etcd.

Every node is an :class:`~tests.agent.harness.EmulatedNode`: the agent with the production etcd adapter, its
kubeadm's etcd effects performed for real (TLS etcd on a loopback address), AWS in moto. A dead voter with my
IP (which needs a three-member cluster) is in test_bootstrap_real_etcd.py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from node_agent.config import AgentConfig
from node_agent.election import Attempt, ClusterStateStore, Phase
from node_agent.instance import InstanceIdentity
from tests.agent.conftest import REGION, config_values
from tests.agent.harness import EmulatedNode, NeverPromotingKubeadm, loopback_subnet
from tests.agent.kubeadm_emulator import SimulatedApiServer, free_loopback_ip

TABLE = "dk8s-demo-cluster-state"


def _node(aws: dict[str, Any], tmp: Path, api: SimulatedApiServer, nodes: list[Any], *,
          cfg: AgentConfig | None = None, **kwargs: Any) -> EmulatedNode:  # fmt: skip
    node = EmulatedNode(aws, tmp, api, cfg or AgentConfig.from_mapping(config_values()), **kwargs)
    nodes.append(node)
    return node


def _initialised(
    aws: dict[str, Any], tmp: Path, api: SimulatedApiServer, nodes: list[Any], **kwargs: Any
) -> EmulatedNode:
    first = _node(aws, tmp, api, nodes, **kwargs)
    outcome = first.agent.run_launch()
    assert outcome.action == "initialised", outcome
    return first


def _raw_item(aws: dict[str, Any]) -> dict[str, Any]:
    return aws["dynamodb"].get_item(TableName=TABLE, Key={"pk": {"S": "cluster"}}).get("Item", {})


def _moto_instance(aws: dict[str, Any], ip: str) -> InstanceIdentity:
    inst = aws["ec2"].run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0]
    return InstanceIdentity(inst["InstanceId"], ip, REGION)


def _dead_holder(aws: dict[str, Any], holder: InstanceIdentity, lease: float = 0.5) -> ClusterStateStore:
    """A node that took the lock, recorded its init attempt, and died (no renewals, no release)."""
    store = ClusterStateStore(aws["dynamodb"], TABLE)
    store.ensure_item()
    assert store.try_acquire(holder.instance_id, lease)
    attempt = Attempt(holder.instance_id, holder.instance_id, f"https://{holder.private_ip}:2379", "initialising")
    store.begin(holder.instance_id, Phase.INITIALISING, attempt, store.read())
    return store


def _add_unstarted_learner(node: EmulatedNode, ip: str) -> str:
    """``etcdctl member add --learner`` for a member that never starts (what kubeadm join leaves if it dies)."""
    proc = node.runner.etcdctl([node.agent.client_url], "member", "add", "never-started",
                               f"--peer-urls=https://{ip}:2380", "--learner", "-w", "json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return str(json.loads(proc.stdout)["member"]["ID"])


def test_takeover_after_the_holder_died_and_its_instance_is_gone(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    dead = _moto_instance(aws, free_loopback_ip())  # nothing listens at its address
    aws["ec2"].terminate_instances(InstanceIds=[dead.instance_id])
    node = _node(aws, tmp_path, SimulatedApiServer(), nodes)
    # Measured from just before the dead holder took its 0.5 s lease, so a slow machine cannot make the
    # takeover look early: the lower bound only depends on when the lease began.
    lease_taken = time.monotonic()
    store = _dead_holder(aws, dead)
    outcome = node.agent.run_launch()
    assert outcome.action == "initialised", outcome
    assert time.monotonic() - lease_taken >= 0.5, "waited for the dead holder's lease to expire"
    assert len(node.runner.commands("kubeadm init")) == 1
    assert node.runner.commands("kubeadm reset") == []
    state = store.read()
    assert (state.phase, state.generation, state.holder) == (Phase.INITIALISED, 1, None)
    assert node.hook.calls == [("CONTINUE", "initialised")]
    assert [m.name for m in node.members()] == [node.identity.node_name]


def test_no_takeover_while_the_dead_holders_instance_still_runs(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    holder = _moto_instance(aws, free_loopback_ip())  # running in EC2, nothing listens: maybe rebooting
    store = _dead_holder(aws, holder)
    node = _node(aws, tmp_path, SimulatedApiServer(), nodes, join_deadline_seconds=2.0)
    outcome = node.agent.run_launch()
    assert not outcome.ok
    assert node.runner.commands("kubeadm") == [], "never initialises beside a possibly-alive initialiser"
    assert node.runner.process is None, "no etcd was started"
    state = store.read()
    assert state.phase == Phase.INITIALISING and state.attempt is not None
    assert state.attempt.holder == holder.instance_id
    assert node.hook.result == "ABANDON"


class NoSecretWrites:
    """Secrets Manager that refuses writes (reads pass through): the initialiser dies before storing the PKI."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Any:
        if name in ("put_secret_value", "create_secret"):

            def refuse(**_: Any) -> Any:
                raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "PutSecretValue")

            return refuse
        return getattr(self.client, name)


def test_a_live_half_initialised_etcd_without_secrets_is_never_duplicated(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    api = SimulatedApiServer()
    holder = _node(aws, tmp_path, api, nodes)
    holder.agent.secrets.client = NoSecretWrites(holder.agent.secrets.client)
    failed = holder.agent.run_launch()
    assert not failed.ok and "AccessDeniedException" in failed.reason
    assert len(holder.runner.commands("kubeadm init")) == 1 and holder.runner.process is not None
    aws["ec2"].terminate_instances(InstanceIds=[holder.identity.instance_id])  # even so: its etcd answers
    before = _raw_item(aws)
    assert before["state"]["S"] == "initialising"

    node = _node(aws, tmp_path, api, nodes, join_deadline_seconds=2.0)
    assert not node.agent.run_launch().ok
    assert node.runner.commands("kubeadm") == [] and node.runner.process is None
    assert node.hook.result == "ABANDON"
    assert [m.name for m in holder.members()] == [holder.identity.node_name], "its etcd was left alone"
    assert _raw_item(aws)["attempt"] == before["attempt"]


def test_an_etcd_left_with_all_secrets_stored_is_adopted_and_joined(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    api = SimulatedApiServer()
    first = _initialised(aws, tmp_path, api, nodes)
    # Rewind the table to "initialising" as if the initialiser died just before writing "initialised".
    aws["dynamodb"].delete_item(TableName=TABLE, Key={"pk": {"S": "cluster"}})
    store = _dead_holder(aws, first.identity)
    node = _node(aws, tmp_path, api, nodes)
    outcome = node.agent.run_launch()
    assert outcome.action == "joined", outcome
    assert node.runner.commands("kubeadm init") == [] and len(node.runner.commands("kubeadm join")) == 1
    state = store.read()
    assert state.phase == Phase.INITIALISED and state.generation == 1
    assert {m.instance_id for m in state.last_membership} == {first.identity.instance_id, node.identity.instance_id}
    members = first.members()
    assert sorted(m.name for m in members) == sorted([first.identity.node_name, node.identity.node_name])
    assert not any(m.is_learner for m in members)


def test_the_launch_hook_is_abandoned_when_etcd_fails_to_start(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    api = SimulatedApiServer()
    first = _initialised(aws, tmp_path, api, nodes)
    node = _node(aws, tmp_path, api, nodes, fail={"kubeadm join": "[etcd] etcd member failed to start"})
    outcome = node.agent.run_launch()
    assert not outcome.ok
    assert node.hook.calls and node.hook.calls[0][0] == "ABANDON"
    assert "etcd member failed to start" in node.hook.calls[0][1]
    assert len(node.hook.calls) == 1, "never CONTINUE after ABANDON"
    assert [m.name for m in first.members()] == [first.identity.node_name]


def test_the_launch_hook_waits_for_promotion_and_abandons_if_it_never_comes(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    api = SimulatedApiServer()
    first = _initialised(aws, tmp_path, api, nodes)
    node = _node(aws, tmp_path, api, nodes, runner_class=NeverPromotingKubeadm, health_timeout_seconds=1.0)
    outcome = node.agent.run_launch()
    assert not outcome.ok and "promoted and healthy" in outcome.reason, outcome
    assert node.hook.calls == [("ABANDON", outcome.reason)]
    assert len(node.runner.commands("kubeadm join")) == 1
    # Its learner did start (etcd exits by itself, code 0, once it learns it was removed: it may be gone by now).
    assert node.runner.process is not None and node.runner.process.poll() in (None, 0), "its learner did start"
    members = first.members()
    assert [m.name for m in members] == [first.identity.node_name], "the unpromoted learner was withdrawn"


def test_an_unknown_cluster_state_abandons_and_changes_nothing(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    aws["dynamodb"].put_item(
        TableName=TABLE,
        Item={"pk": {"S": "cluster"}, "state": {"S": "migrating"}, "generation": {"N": "4"}},
    )
    before = _raw_item(aws)
    node = _node(aws, tmp_path, SimulatedApiServer(), nodes)
    outcome = node.agent.run_launch()
    assert not outcome.ok and "unknown state 'migrating'" in outcome.reason
    assert node.hook.calls == [("ABANDON", outcome.reason)]
    assert node.runner.calls == [] and node.runner.process is None
    assert _raw_item(aws) == before


def test_unreadable_secrets_abandon_the_join_and_change_nothing(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    api = SimulatedApiServer()
    cfg = AgentConfig.from_mapping(config_values())
    first = _initialised(aws, tmp_path, api, nodes, cfg=cfg)
    aws["secretsmanager"].put_secret_value(SecretId=cfg.pki_secret_name, SecretString=json.dumps({"ca.crt": "x"}))
    before_item, before_members = _raw_item(aws), first.members()
    node = _node(aws, tmp_path, api, nodes, cfg=cfg)
    outcome = node.agent.run_launch()
    assert not outcome.ok and "SecretUnreadableError" in outcome.reason and cfg.pki_secret_name in outcome.reason
    assert node.hook.calls == [("ABANDON", outcome.reason)]
    assert node.runner.calls == [] and node.runner.process is None
    assert first.members() == before_members
    assert _raw_item(aws) == before_item


def test_a_worker_joins_with_the_stored_token_once_the_kubelet_registers(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    api = SimulatedApiServer()
    first = _initialised(aws, tmp_path, api, nodes)
    cfg = AgentConfig.from_mapping(config_values(role="worker"))
    worker = _node(aws, tmp_path, api, nodes, cfg=cfg)
    assert worker.agent.run_launch().action == "worker-joined"
    assert worker.hook.calls == [("CONTINUE", "worker-joined")]
    kubelet_conf = str(worker.settings.kubernetes_dir / "kubelet.conf")
    name = worker.identity.node_name
    assert worker.runner.calls[-1] == ["kubectl", "--kubeconfig", kubelet_conf, "get", "node", name, "-o", "name"]
    text = (worker.settings.state_dir / "kubeadm-join.yaml").read_text()
    token = first.agent.secrets.read_join(cfg.join_secret_name).token
    assert token in text and "controlPlane" not in text
    assert api.nodes[name] == "worker"
    assert [m.name for m in first.members()] == [first.identity.node_name], "a worker adds no etcd member"


def test_an_agent_restart_after_a_completed_join_changes_nothing(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    api = SimulatedApiServer()
    _initialised(aws, tmp_path, api, nodes)
    joiner = _node(aws, tmp_path, api, nodes)
    assert joiner.agent.run_launch().action == "joined"
    me = joiner.identity.instance_id
    # The membership write was lost (say the agent crashed right after the join): a restart repairs it.
    store = ClusterStateStore(aws["dynamodb"], TABLE)
    state = store.read()
    assert store.update_membership(1, [m for m in state.last_membership if m.instance_id != me], state.membership_rev)
    members_before, calls_before = joiner.members(), len(joiner.runner.calls)
    again, hook = joiner.new_agent()
    assert again.run_launch().action == "already-member"
    assert hook.calls == [("CONTINUE", "already-member")]
    assert [c for c in joiner.runner.calls[calls_before:] if c[0] == "kubeadm"] == [], "no second join"
    assert me in {m.instance_id for m in store.read().last_membership}
    assert joiner.members() == members_before


def test_an_unrecorded_live_control_plane_member_blocks_disaster_recovery(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    api = SimulatedApiServer()
    subnet = loopback_subnet(aws)  # EC2 private IPs = the nodes' real etcd addresses, with the cluster tags
    first = _initialised(aws, tmp_path, api, nodes, subnet=subnet)
    unrecorded = _node(aws, tmp_path, api, nodes, subnet=subnet)
    assert unrecorded.agent.run_launch().action == "joined"
    # It joined, but lost the race to record itself (the table only knows the first member) ...
    store = ClusterStateStore(aws["dynamodb"], TABLE)
    state = store.read()
    mine = [m for m in state.last_membership if m.instance_id == first.identity.instance_id]
    assert store.update_membership(1, mine, state.membership_rev)
    # ... then the recorded member dies with its instance.
    first.terminate(aws, api)
    newcomer = _node(aws, tmp_path, api, nodes, subnet=subnet)
    state = store.read()
    assert [m.instance_id for m in state.last_membership] == [first.identity.instance_id]
    assert not newcomer.agent._dr_needed(state), "the unrecorded member's etcd answers: never restore beside it"
    unrecorded.runner.kill()
    assert newcomer.agent._dr_needed(state), "all recorded members terminated, nothing answers: restore"


def test_a_stale_unstarted_learner_with_my_ip_does_not_block_my_join(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    api = SimulatedApiServer()
    first = _initialised(aws, tmp_path, api, nodes)
    # An earlier instance with this IP died after kubeadm added its learner, before it ever started.
    ip = free_loopback_ip()
    stale_id = _add_unstarted_learner(first, ip)
    assert any(m.id == stale_id and m.is_learner and not m.started for m in first.members())
    node = _node(aws, tmp_path, api, nodes, ip=ip)
    assert node.agent.run_launch().action == "joined"
    members = first.members()
    assert stale_id not in {m.id for m in members}
    assert sorted(m.name for m in members) == sorted([first.identity.node_name, node.identity.node_name])
    assert not any(m.is_learner for m in members)
    assert node.hook.calls == [("CONTINUE", "joined")]


def test_someone_elses_learner_makes_me_wait_and_abandon_rather_than_join_beside_it(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    api = SimulatedApiServer()
    first = _initialised(aws, tmp_path, api, nodes)
    other_id = _add_unstarted_learner(first, free_loopback_ip())  # another node's join, in flight
    node = _node(aws, tmp_path, api, nodes, health_timeout_seconds=0.5)
    outcome = node.agent.run_launch()
    assert not outcome.ok and "no other etcd membership change in flight" in outcome.reason
    assert node.hook.result == "ABANDON"
    assert node.runner.commands("kubeadm join") == [], "one membership change at a time (invariant 4a)"
    assert other_id in {m.id for m in first.members()}


def test_a_worker_started_before_the_cluster_waits_for_the_join_secret(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    """Workers cannot read the cluster-state table: they wait while the join secret holds the placeholder."""
    api = SimulatedApiServer()
    cfg = AgentConfig.from_mapping(config_values(role="worker"))
    worker = _node(aws, tmp_path, api, nodes, cfg=cfg)
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(worker.agent.run_launch()), daemon=True)
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive() and worker.runner.calls == [], "nothing runs before the join secret is written"
    _initialised(aws, tmp_path, api, nodes)
    thread.join(timeout=30)
    assert result and result[0].action == "worker-joined"
    assert worker.hook.calls == [("CONTINUE", "worker-joined")]


class DeniedSecrets:
    def __init__(self, client: Any) -> None:
        self.client = client

    def get_secret_value(self, **kwargs: Any) -> Any:
        raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "not authorized"}}, "GetSecretValue")


def test_a_worker_that_may_not_read_the_join_secret_abandons_at_once(
    aws: dict[str, Any], tmp_path: Path, nodes: list[Any]
) -> None:
    cfg = AgentConfig.from_mapping(config_values(role="worker"))
    worker = _node(aws, tmp_path, SimulatedApiServer(), nodes, cfg=cfg)
    worker.agent.secrets.client = DeniedSecrets(worker.agent.secrets.client)
    started = time.monotonic()
    outcome = worker.agent.run_launch()
    assert not outcome.ok and "AccessDeniedException" in outcome.reason
    assert time.monotonic() - started < 2, "an access error is not worth waiting for"
    assert worker.hook.calls == [("ABANDON", outcome.reason)] and worker.runner.calls == []
