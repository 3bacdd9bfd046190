"""Three control-plane nodes start at once: exactly one initialises, the others join (invariants 2, 3).

Every trial runs on real etcd (TLS, loopback addresses; :class:`~tests.agent.harness.EmulatedNode`: the agent
with the production etcd adapter, kubeadm's etcd effects performed for real) and moto. A trial is three agents
started concurrently with random jitter; it ends with exactly one ``kubeadm init``, two joins, a three-member
etcd cluster with no learner left, and the cluster-state item ``initialised`` at generation 1.

The 50 randomized trials are split into batches (one test each, so ``pytest -n`` spreads them over workers);
the trials of a batch overlap in time (each is mostly waiting: etcd refuses a second learner add until the first
joiner has been connected for 5 s, its strict reconfiguration check, left on). ``AGENT_ELECTION_TRIALS``
changes the total (default 50, the acceptance figure), ``AGENT_ELECTION_PARALLEL`` the overlap (default 5).
Measured on 2 shared cores under ``pytest -n 2``: the 50 trials take ~110 s wall and ~160 s CPU (etcd,
etcdctl and openssl processes included).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from node_agent.config import AgentConfig
from node_agent.election import ClusterStateStore, Phase
from tests.agent.conftest import config_values
from tests.agent.harness import EmulatedNode, etcd_nodes, launch_concurrently
from tests.agent.kubeadm_emulator import SimulatedApiServer

pytestmark = pytest.mark.etcd

TRIALS = int(os.environ.get("AGENT_ELECTION_TRIALS", "50"))
BATCHES = 10
PER_BATCH = -(-TRIALS // BATCHES)
PARALLEL = max(int(os.environ.get("AGENT_ELECTION_PARALLEL", "5")), 1)
# Deadlines with room for a loaded CI machine: they only bound a failing trial (a passing one takes ~8 s). The
# lease is the harness's 10 s: with a 2 s lease a trial on a saturated machine once saw the initialiser's renewals
# starve, so it lost the lock after storing the secrets and abandoned (its group killing its etcd) while another
# node was adopting that etcd: all three abandoned.
ROOMY: dict[str, Any] = {"join_deadline_seconds": 90.0, "health_timeout_seconds": 60.0}
INIT_FAILURE = "[wait-control-plane] timed out waiting for the API server"


def _trial_config(aws: dict[str, Any], trial: int) -> AgentConfig:
    """Each trial is its own cluster: its own table and secrets (the agent creates the secrets it writes)."""
    cfg = AgentConfig.from_mapping(
        config_values(
            clusterStateTable=f"state-{trial}",
            pkiSecretName=f"t{trial}/pki",
            etcdClientSecretName=f"t{trial}/etcd-client",
            joinSecretName=f"t{trial}/worker-join",
            kubeClientSecretName=f"t{trial}/lifecycle-kube-client",
        )
    )
    aws["dynamodb"].create_table(
        TableName=cfg.cluster_state_table,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    return cfg


def _run_trials(
    aws: dict[str, Any],
    root: Path,
    trials: range,
    trial: Callable[[int, list[EmulatedNode]], Any],
    **node_options: Any,
) -> list[Any]:
    """Three nodes per trial, created up front on this thread (moto's EC2 backend is not written to
    concurrently), then up to PARALLEL trials at a time. Every node is discarded at the end, pass or fail."""
    with etcd_nodes() as all_nodes:
        per_trial: dict[int, list[EmulatedNode]] = {}
        for t in trials:
            cfg, api = _trial_config(aws, t), SimulatedApiServer()
            per_trial[t] = [EmulatedNode(aws, root / f"t{t}", api, cfg, **ROOMY, **node_options) for _ in range(3)]
            all_nodes.extend(per_trial[t])

        def run(t: int) -> Any:
            try:
                return trial(t, per_trial[t])
            finally:  # a finished trial stops its etcd at once (idle members still heartbeat) and frees its disk
                for n in per_trial[t]:
                    n.discard()

        with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
            futures = [pool.submit(run, t) for t in trials]
            return [f.result() for f in futures]


def _assert_one_cluster(aws: dict[str, Any], trial: int, nodes: list[EmulatedNode]) -> None:
    """One ``kubeadm init`` in all, a promoted voter per successful node, the table initialised at generation 1."""
    live = [n for n in nodes if n.hook.result == "CONTINUE"]
    assert sum(len(n.runner.commands("kubeadm init")) for n in live) == 1, trial
    members = live[0].members()
    assert sorted(m.name for m in members) == sorted(n.identity.node_name for n in live), trial
    assert not any(m.is_learner for m in members), f"trial {trial}: a learner was left unpromoted"
    state = ClusterStateStore(aws["dynamodb"], nodes[0].cfg.cluster_state_table).read()
    assert (state.phase, state.generation, state.holder) == (Phase.INITIALISED, 1, None), trial
    assert sorted(m.instance_id for m in state.last_membership) == sorted(n.identity.instance_id for n in live)


@pytest.mark.slow
@pytest.mark.parametrize("batch", range(BATCHES))
def test_randomized_concurrent_starts_elect_exactly_one_initialiser(
    aws: dict[str, Any], tmp_path: Path, batch: int
) -> None:
    def trial(t: int, nodes: list[EmulatedNode]) -> None:
        outcomes = launch_concurrently(nodes, random.Random(20261125 + t))
        assert sorted(o.action for o in outcomes) == ["initialised", "joined", "joined"], (t, outcomes)
        assert sum(len(n.runner.commands("kubeadm init")) for n in nodes) == 1, t
        assert sum(len(n.runner.commands("kubeadm join")) for n in nodes) == 2, t
        for n, o in zip(nodes, outcomes, strict=True):
            assert n.hook.calls == [("CONTINUE", o.action)], (t, n.hook.calls)
            ran = "kubeadm init" if o.action == "initialised" else "kubeadm join"
            assert len(n.runner.commands(ran)) == 1, (t, n.runner.calls)
        _assert_one_cluster(aws, t, nodes)

    _run_trials(aws, tmp_path, range(batch * PER_BATCH, min((batch + 1) * PER_BATCH, TRIALS)), trial)


def test_a_late_node_never_initialises_again(aws: dict[str, Any], tmp_path: Path, nodes: list[Any]) -> None:
    cfg = AgentConfig.from_mapping(config_values())
    api = SimulatedApiServer()
    first, second = EmulatedNode(aws, tmp_path, api, cfg), EmulatedNode(aws, tmp_path, api, cfg)
    nodes += [first, second]
    assert first.agent.run_launch().action == "initialised"
    assert second.agent.run_launch().action == "joined"
    assert second.runner.commands("kubeadm init") == []
    join_argv = second.runner.commands("kubeadm join")[0]
    assert join_argv == ["kubeadm", "join", "--config", str(second.settings.state_dir / "kubeadm-join.yaml")]
    assert sorted(m.name for m in first.members()) == sorted([first.identity.node_name, second.identity.node_name])
    # The initialiser stored everything a joiner needs.
    store = second.agent.secrets
    assert set(store.read_pki(cfg.pki_secret_name)) >= {"ca.crt", "etcd/ca.key", "sa.pub"}
    assert store.read_join(cfg.join_secret_name).ca_cert_hash.startswith("sha256:")
    assert set(store.read_json(cfg.etcd_client_secret_name, ("ca", "cert", "key"))) == {"ca", "cert", "key"}


@pytest.mark.slow
@pytest.mark.parametrize("batch", range(3))
def test_randomized_starts_where_one_node_fails_its_init_still_give_exactly_one_cluster(
    aws: dict[str, Any], tmp_path: Path, batch: int
) -> None:
    """A node whose ``kubeadm init`` fails abandons and its group terminates it; the others take over its half
    state (its instance is gone from EC2, nothing listens) and exactly one of them initialises. In most trials
    the failing node starts first and the others only once it holds the bootstrap lock (an event, not a time:
    a fixed 100-150 ms head start lost the race on a loaded CI machine), so it is the one that holds the lock
    when it fails; in the rest all three start together and any of them may win."""
    trials = range(100 + 5 * batch, 105 + 5 * batch)
    rng = random.Random(7 + batch)
    flaky = {t: rng.randrange(3) for t in trials}
    head_start = {t: t % 3 != 0 for t in trials}

    def trial(t: int, nodes: list[EmulatedNode]) -> bool:
        bad = nodes[flaky[t]]
        bad.runner.fail["kubeadm init"] = INIT_FAILURE
        store = ClusterStateStore(aws["dynamodb"], bad.cfg.cluster_state_table)

        def bad_holds_the_lock() -> bool:
            state = store.read()
            return state.holder is not None or state.attempt is not None or state.phase != Phase.UNINITIALISED

        outcomes = launch_concurrently(nodes, random.Random(t), head_start=flaky[t] if head_start[t] else None,
                                       others_wait_for=bad_holds_the_lock)  # fmt: skip
        assert [o.action for o in outcomes].count("initialised") == 1, (t, outcomes)
        for i, o in enumerate(outcomes):
            if i != flaky[t]:
                assert o.ok, (t, i, o)
        if not outcomes[flaky[t]].ok:
            assert INIT_FAILURE in outcomes[flaky[t]].reason
            assert bad.hook.calls == [("ABANDON", outcomes[flaky[t]].reason)]
            assert len(bad.runner.commands("kubeadm init")) == 1 and bad.runner.commands("kubeadm join") == []
            assert bad.runner.process is None, "terminated by its group"
        _assert_one_cluster(aws, t, nodes)
        return not outcomes[flaky[t]].ok

    abandoned = _run_trials(aws, tmp_path, trials, trial, terminate_on_abandon=True)
    early = [a for t, a in zip(trials, abandoned, strict=True) if head_start[t]]
    assert early and all(early), f"the failing node must hold the lock and abandon in head-start trials: {abandoned}"
