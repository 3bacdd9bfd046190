"""Three control-plane nodes start at once: exactly one initialises, the others join (invariants 2, 3).

These trials record kubeadm (tests/agent/fakes.py); the same flow on real etcd learners is in
test_bootstrap_real_etcd.py.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from node_agent.bootstrap import Agent, LaunchOutcome
from node_agent.config import AgentConfig
from node_agent.election import ClusterStateStore, Phase
from node_agent.lifecycle import RecordingLaunchHook
from tests.agent.conftest import config_values
from tests.agent.fakes import FakeEtcd, FakeEtcdCluster, RecordingRunner
from tests.agent.harness import build_agent, fast_settings, identity

TRIALS = 50


def _create_table(aws: dict[str, Any], name: str) -> None:
    aws["dynamodb"].create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )


def _trial_config(trial: int) -> AgentConfig:
    return AgentConfig.from_mapping(
        config_values(
            clusterStateTable=f"state-{trial}",
            pkiSecretName=f"t{trial}/pki",
            etcdClientSecretName=f"t{trial}/etcd-client",
            joinSecretName=f"t{trial}/worker-join",
        )
    )


def _agents(aws: dict[str, Any], tmp: Path, cfg: AgentConfig, cluster: FakeEtcdCluster, count: int = 3,
            **settings: Any) -> list[tuple[Agent, RecordingLaunchHook, RecordingRunner]]:  # fmt: skip
    out = []
    for n in range(1, count + 1):
        ident = identity(n)
        s = fast_settings(tmp / f"node{n}", **settings)
        runner = RecordingRunner(cluster, ident.node_name, ident.private_ip, s.pki_dir)
        agent, hook = build_agent(
            aws,
            cfg,
            ident=ident,
            settings=s,
            runner=runner,
            etcd_for=lambda _tls: FakeEtcd(cluster),
            probe=cluster.alive_at,
        )
        out.append((agent, hook, runner))
    return out


def _run_concurrently(agents: list[Agent], rng: random.Random, head_start: int | None = None) -> list[LaunchOutcome]:
    """Start all agents at once with random jitter; ``head_start`` lets one start 40-60 ms before the others."""
    results: list[LaunchOutcome | None] = [None] * len(agents)
    delays = [rng.uniform(0, 0.03) + (0 if head_start in (None, i) else rng.uniform(0.04, 0.06))
              for i in range(len(agents))]  # fmt: skip

    def go(i: int) -> None:
        time.sleep(delays[i])
        results[i] = agents[i].run_launch()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(agents))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


@pytest.mark.slow
def test_fifty_randomized_concurrent_starts_elect_exactly_one_initialiser(aws: dict[str, Any], tmp_path: Path) -> None:
    rng = random.Random(20261125)
    for trial in range(TRIALS):
        cfg = _trial_config(trial)
        _create_table(aws, cfg.cluster_state_table)
        cluster = FakeEtcdCluster()
        nodes = _agents(aws, tmp_path / f"t{trial}", cfg, cluster)
        outcomes = _run_concurrently([a for a, _, _ in nodes], rng)

        actions = sorted(o.action for o in outcomes)
        assert actions == ["initialised", "joined", "joined"], (trial, outcomes)
        assert len(cluster.inits) == 1 and len(cluster.joins) == 2, trial
        init_runs = [r for _, _, r in nodes if r.commands("kubeadm init")]
        assert len(init_runs) == 1
        assert all(h.calls == [("CONTINUE", o.action)] for (_, h, _), o in zip(nodes, outcomes, strict=True))
        state = ClusterStateStore(aws["dynamodb"], cfg.cluster_state_table).read()
        assert (state.phase, state.generation, state.holder) == (Phase.INITIALISED, 1, None)
        assert sorted(m.instance_id for m in state.last_membership) == sorted(a.me for a, _, _ in nodes), trial


def test_a_late_node_never_initialises_again(aws: dict[str, Any], tmp_path: Path) -> None:
    cfg = AgentConfig.from_mapping(config_values())
    cluster = FakeEtcdCluster()
    first, second = _agents(aws, tmp_path, cfg, cluster, count=2)
    assert first[0].run_launch().action == "initialised"
    assert second[0].run_launch().action == "joined"
    assert second[2].commands("kubeadm init") == []
    join_argv = second[2].commands("kubeadm join")[0]
    assert join_argv == ["kubeadm", "join", "--config", str(second[0].settings.state_dir / "kubeadm-join.yaml")]
    # The initialiser stored everything a joiner needs.
    store = second[0].secrets
    assert set(store.read_pki(cfg.pki_secret_name)) >= {"ca.crt", "etcd/ca.key", "sa.pub"}
    assert store.read_join(cfg.join_secret_name).ca_cert_hash.startswith("sha256:")
    assert set(store.read_json(cfg.etcd_client_secret_name, ("ca", "cert", "key"))) == {"ca", "cert", "key"}


def test_randomized_starts_where_one_node_fails_its_init_still_give_exactly_one_cluster(
    aws: dict[str, Any], tmp_path: Path
) -> None:
    """A node whose ``kubeadm init`` fails abandons; the others take over its half state (its instance is gone
    from EC2, nothing listens) and exactly one of them initialises."""
    rng = random.Random(7)
    abandoned = 0
    for trial in range(15):
        cfg = _trial_config(100 + trial)
        _create_table(aws, cfg.cluster_state_table)
        cluster = FakeEtcdCluster()
        nodes = _agents(aws, tmp_path / f"f{trial}", cfg, cluster)
        flaky = rng.randrange(3)
        nodes[flaky][2].fail["kubeadm init"] = "[wait-control-plane] timed out waiting for the API server"
        outcomes = _run_concurrently([a for a, _, _ in nodes], rng, head_start=flaky if trial % 3 else None)
        abandoned += not outcomes[flaky].ok

        assert len(cluster.inits) == 1, (trial, outcomes)
        assert [o.action for o in outcomes].count("initialised") == 1
        for i, o in enumerate(outcomes):
            if i != flaky:
                assert o.ok, (trial, i, o)
        if not outcomes[flaky].ok:
            assert "timed out waiting for the API server" in outcomes[flaky].reason
            assert nodes[flaky][1].calls == [("ABANDON", outcomes[flaky].reason)]
        state = ClusterStateStore(aws["dynamodb"], cfg.cluster_state_table).read()
        assert state.phase == Phase.INITIALISED and state.generation == 1
    assert abandoned >= 5, "the failing node won the lock (and was taken over) in most head-start trials"
