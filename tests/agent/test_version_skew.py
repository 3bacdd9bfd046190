"""The boot-time version skew guard: the cluster-state item records the cluster's Kubernetes version, and a
control-plane node whose version may not join it abandons its launch before touching anything.

No etcd here: the refusal happens before the agent reads secrets or speaks to etcd, which these tests prove
by failing on any such call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from node_agent.bootstrap import Agent
from node_agent.config import AgentConfig
from node_agent.election import Attempt, ClusterStateStore, MemberRecord, Phase, parse_item
from node_agent.etcd import EtcdAccess, EtcdTls
from node_agent.lifecycle import RecordingLaunchHook
from node_agent.runner import CommandResult
from tests.agent.conftest import config_values
from tests.agent.harness import build_agent, fast_settings, identity

TABLE = "dk8s-demo-cluster-state"
ME = identity(7)
PEER = MemberRecord(instance_id="i-0000000000000000a", peer_url="https://10.0.0.10:2380", name="i-0000000000000000a")


class NoCommands:
    """A runner that fails the test if the agent runs any command (kubeadm, etcdctl)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def run(self, argv: Any, *, env: Any = None, timeout: Any = None) -> CommandResult:
        self.calls.append(tuple(argv))
        raise AssertionError(f"no command may run: {argv}")


class Touches:
    """Records every etcd client creation and probe; etcd creation fails unless ``etcd`` is given."""

    def __init__(self, etcd: Any = None) -> None:
        self.etcd = etcd
        self.etcd_requests: list[EtcdTls] = []
        self.probes: list[str] = []

    def etcd_for(self, tls: EtcdTls) -> EtcdAccess:
        self.etcd_requests.append(tls)
        if self.etcd is None:
            raise AssertionError("etcd may not be contacted")
        return self.etcd

    def probe(self, url: str) -> bool:
        self.probes.append(url)
        return True  # etcd answers: no disaster recovery, a plain join


def _put_state(aws: dict[str, Any], *, version: str | None, members: list[MemberRecord] | None = None) -> None:
    item: dict[str, Any] = {
        "pk": {"S": "cluster"},
        "state": {"S": Phase.INITIALISED.value},
        "generation": {"N": "1"},
        "last_membership": {"L": [m.to_item() for m in (members or [PEER])]},
    }
    if version is not None:
        item["kubernetes_version"] = {"S": version}
    aws["dynamodb"].put_item(TableName=TABLE, Item=item)


def _raw(aws: dict[str, Any]) -> dict[str, Any]:
    return dict(aws["dynamodb"].get_item(TableName=TABLE, Key={"pk": {"S": "cluster"}}, ConsistentRead=True)["Item"])


def _agent(
    aws: dict[str, Any], tmp_path: Path, version: str, touches: Touches
) -> tuple[Agent, RecordingLaunchHook, NoCommands]:
    cfg = AgentConfig.from_mapping(config_values(kubernetesVersion=version))
    runner = NoCommands()
    agent, hook = build_agent(
        aws, cfg, ident=ME, settings=fast_settings(tmp_path, join_deadline_seconds=2.0), runner=runner,
        etcd_for=touches.etcd_for, probe=touches.probe,
    )  # fmt: skip
    return agent, hook, runner


# -- the store: the version is recorded at init and only ever raised ------------------------------------


def test_complete_records_the_initialisers_version(aws: dict[str, Any]) -> None:
    store = ClusterStateStore(aws["dynamodb"], TABLE)
    store.ensure_item()
    assert store.try_acquire("i-a", 60)
    store.begin("i-a", Phase.INITIALISING, Attempt("i-a", "i-a", "https://10.0.0.1:2379", "initialising"), store.read())
    assert store.complete("i-a", Phase.INITIALISING, 1, [PEER], kubernetes_version="1.34.2")
    assert store.read().kubernetes_version == "1.34.2"


def test_an_item_written_before_versions_were_recorded_reads_as_unrecorded(aws: dict[str, Any]) -> None:
    _put_state(aws, version=None)
    state = ClusterStateStore(aws["dynamodb"], TABLE).read()
    assert state.phase == Phase.INITIALISED and state.kubernetes_version == ""
    assert parse_item(None).kubernetes_version == ""


def test_raise_version_only_from_the_version_the_writer_saw(aws: dict[str, Any]) -> None:
    _put_state(aws, version="1.34.2")
    store = ClusterStateStore(aws["dynamodb"], TABLE)
    assert not store.raise_version("1.35.0", expected="1.34.1"), "a stale view is refused"
    assert not store.raise_version("1.35.0", expected=""), "'unrecorded' is not what the item says"
    assert store.raise_version("1.35.0", expected="1.34.2")
    assert store.read().kubernetes_version == "1.35.0"
    _put_state(aws, version=None)
    assert store.raise_version("1.34.2", expected=""), "an unrecorded version can be recorded"
    assert store.read().kubernetes_version == "1.34.2"


# -- the agent: refuse before join, abandon with the reason, touch nothing -------------------------------


@pytest.mark.parametrize(
    ("running", "mine", "why"),
    [
        pytest.param("1.34.2", "1.36.0", "2 minor versions ahead", id="two minors ahead"),
        pytest.param("1.34.2", "1.34.1", "older", id="patch downgrade"),
        pytest.param("1.35.0", "1.34.9", "older", id="minor downgrade"),
    ],
)
def test_an_incompatible_node_abandons_its_launch_before_touching_anything(
    aws: dict[str, Any], tmp_path: Path, running: str, mine: str, why: str
) -> None:
    _put_state(aws, version=running)
    before = _raw(aws)
    touches = Touches()
    agent, hook, runner = _agent(aws, tmp_path, mine, touches)
    outcome = agent.run_launch()
    assert not outcome.ok and outcome.action == "abandoned"
    assert hook.calls == [("ABANDON", outcome.reason)]
    assert outcome.reason.startswith("VersionSkewError: ")
    assert f"Kubernetes {mine} cannot join a cluster running {running}" in outcome.reason and why in outcome.reason
    assert runner.calls == [] and touches.etcd_requests == [] and touches.probes == []
    assert _raw(aws) == before, "the cluster-state item is unchanged"


@pytest.mark.parametrize(
    ("recorded", "mine"),
    [
        pytest.param("1.34.2", "1.34.2", id="same version"),
        pytest.param("1.34.2", "1.35.0", id="one minor ahead"),
        pytest.param(None, "1.36.0", id="unrecorded version: check skipped"),
    ],
)
def test_a_compatible_node_passes_the_guard_and_goes_on_to_join(
    aws: dict[str, Any], tmp_path: Path, recorded: str | None, mine: str
) -> None:
    # The next step after the guard reads the PKI secret, which still holds the stack's placeholder here:
    # the launch abandons for that reason, proving the guard let it through.
    _put_state(aws, version=recorded)
    touches = Touches()
    agent, hook, _ = _agent(aws, tmp_path, mine, touches)
    outcome = agent.run_launch()
    assert hook.result == "ABANDON"
    assert "VersionSkew" not in outcome.reason and "Secret" in outcome.reason
    assert touches.probes, "the agent went past the guard to the disaster-recovery probe"


class ReadyMember:
    """The member answers as a healthy voter (an agent restart after a completed join)."""

    def member_ready(self, endpoints: Any, name: str) -> bool:
        return name == ME.node_name


def test_an_already_joined_older_node_is_not_evicted_by_an_agent_restart(aws: dict[str, Any], tmp_path: Path) -> None:
    me = MemberRecord(instance_id=ME.instance_id, peer_url=f"https://{ME.private_ip}:2380", name=ME.node_name)
    _put_state(aws, version="1.35.0", members=[PEER, me])  # a newer node joined and raised the version
    touches = Touches(etcd=ReadyMember())
    agent, hook, _ = _agent(aws, tmp_path, "1.34.2", touches)
    tls = agent.lambda_client_tls
    tls.cert.parent.mkdir(parents=True)
    tls.cert.write_text("client cert from the earlier join")
    outcome = agent.run_launch()
    assert outcome.ok and hook.calls == [("CONTINUE", "already-member")]


# -- after a join: a newer node raises the recorded version, never lowers it ------------------------------


@pytest.mark.parametrize(
    ("recorded", "mine", "after"),
    [
        pytest.param("1.34.2", "1.35.0", "1.35.0", id="newer minor raises it"),
        pytest.param("1.34.2", "1.34.5", "1.34.5", id="newer patch raises it"),
        pytest.param("1.35.0", "1.35.0", "1.35.0", id="same version leaves it"),
        pytest.param(None, "1.34.2", "1.34.2", id="unrecorded gets recorded"),
    ],
)
def test_a_joined_node_records_a_newer_cluster_version(
    aws: dict[str, Any], tmp_path: Path, recorded: str | None, mine: str, after: str
) -> None:
    _put_state(aws, version=recorded)
    agent, _, _ = _agent(aws, tmp_path, mine, Touches())
    agent._record_cluster_version(agent.store.read())
    assert agent.store.read().kubernetes_version == after


def test_a_joined_node_never_lowers_the_version_another_node_raised(aws: dict[str, Any], tmp_path: Path) -> None:
    _put_state(aws, version="1.34.2")
    agent, _, _ = _agent(aws, tmp_path, "1.35.0", Touches())
    seen = agent.store.read()
    _put_state(aws, version="1.35.1")  # another node raised it meanwhile
    agent._record_cluster_version(seen)
    assert agent.store.read().kubernetes_version == "1.35.1"


# -- workers: the join secret carries the cluster's version (workers may not read the cluster-state table) ---


def _worker(aws: dict[str, Any], tmp_path: Path, mine: str, join_version: str) -> tuple[Agent, RecordingLaunchHook]:
    cfg = AgentConfig.from_mapping(config_values(role="worker", kubernetesVersion=mine))
    join = {"token": "abcdef.0123456789abcdef", "caCertHash": "sha256:" + "0" * 64,
            "expiresAt": "2099-01-01T00:00:00Z", "apiEndpoint": "api:6443"}  # fmt: skip
    if join_version:
        join["kubernetesVersion"] = join_version
    aws["secretsmanager"].put_secret_value(SecretId=cfg.join_secret_name, SecretString=json.dumps(join))
    agent, hook = build_agent(aws, cfg, ident=ME, settings=fast_settings(tmp_path), runner=NoCommands(),
                              etcd_for=Touches().etcd_for, probe=Touches().probe)  # fmt: skip
    return agent, hook


@pytest.mark.parametrize(
    ("cluster", "mine", "why"),
    [
        pytest.param("1.34.2", "1.35.0", "newer than the API server", id="worker a minor ahead"),
        pytest.param("1.35.0", "1.34.9", "older than the cluster", id="worker a minor behind"),
        pytest.param("1.34.2", "1.34.1", "older than the cluster", id="worker an older patch"),
    ],
)
def test_an_incompatible_worker_abandons_before_running_anything(
    aws: dict[str, Any], tmp_path: Path, cluster: str, mine: str, why: str
) -> None:
    agent, hook = _worker(aws, tmp_path, mine, cluster)
    outcome = agent.run_launch()
    assert not outcome.ok and hook.calls == [("ABANDON", outcome.reason)]
    assert outcome.reason.startswith("VersionSkewError: ")
    assert f"a Kubernetes {mine} worker cannot join a cluster running {cluster}" in outcome.reason
    assert why in outcome.reason


@pytest.mark.parametrize(("cluster", "mine"), [("1.34.2", "1.34.2"), ("1.34.2", "1.34.5"), ("", "1.36.0")])
def test_a_compatible_worker_or_an_unversioned_secret_goes_on_to_join(
    aws: dict[str, Any], tmp_path: Path, cluster: str, mine: str
) -> None:
    agent, _ = _worker(aws, tmp_path, mine, cluster)
    outcome = agent.run_launch()
    # It passed the guard: the first command it runs is kubeadm join (refused by NoCommands, so it abandons).
    assert not outcome.ok and "no command may run: ['kubeadm', 'join'" in outcome.reason


def test_the_initialiser_and_the_token_rotation_write_the_clusters_version(aws: dict[str, Any]) -> None:
    from node_agent.secrets import JoinSecret, SecretStore

    store = SecretStore(aws["secretsmanager"], kms_key_id=aws["kms_key_id"])
    store.write_join("v/join", JoinSecret("abcdef.0123456789abcdef", "sha256:x", "t", "e", "1.34.2"))
    assert store.read_join("v/join").kubernetes_version == "1.34.2"
    store.write_join("v/old", JoinSecret("abcdef.0123456789abcdef", "sha256:x", "t", "e"))
    assert "kubernetesVersion" not in json.loads(
        aws["secretsmanager"].get_secret_value(SecretId="v/old")["SecretString"]
    )
    assert store.read_join("v/old").kubernetes_version == ""
