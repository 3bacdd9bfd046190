"""The launch of one node: initialise, join or restore, then complete the launch hook (invariants 2, 3, 5, 7).

Safe to run at any moment on any node, any number of times: every decision comes from the cluster-state
item, from etcd and from EC2, never from local memory (the kOps etcd-manager rule).

Control-plane launch, one loop, each pass reads the world and takes at most one risky step:

* ``initialised`` -> if I am already a ready member (agent restart): done. If my Kubernetes version may
  not join the cluster's recorded version (:mod:`lambdas.common.version_skew`): abandon, nothing written.
  If disaster recovery is proven needed (:func:`~node_agent.recovery.disaster_recovery_needed`):
  restore under the lock. Else
  join: wait until no other membership change is in flight, remove a stale member carrying my peer URL,
  ``kubeadm join`` (etcd learner, promoted when caught up), wait until my member is a healthy voter and
  the API server answers, record the membership.
* ``uninitialised`` -> take the lock, record the attempt (my client URL), ``kubeadm init``, store PKI,
  the Lambda's etcd client certificate and the worker join token, write ``initialised`` + generation.
* lock held by another live lease -> wait and read again.

A control-plane node reaches its own API server by the endpoint name (invariant 9, :mod:`node_agent.hosts`): the
name is mapped to its IP before ``kubeadm init``/restore and right after ``kubeadm join`` (the join itself, and the
upgrade's kubeadm-config write before it, go through the load balancer to the existing members); readiness asks
this node's API server by address. Workers never map it.

**Takeover rule** (state ``initialising``/``restoring`` left by another holder whose lease expired):

1. Something listens at the recorded client URL and all three secrets exist -> the holder died after
   storing everything but before writing ``initialised``: adopt its cluster (record ``initialised`` with
   the membership that etcd reports) and join it.
2. Something listens but the secrets are incomplete -> an etcd we cannot join and must not duplicate:
   release the lock and wait (its own agent resumes after a restart; if its launch hook abandons,
   the instance terminates and rule 3 applies).
3. Nothing listens and EC2 proves the holder's instance gone -> clean the half state: begin again
   under my own attempt (the secrets it may have left are overwritten; no node could have joined it,
   because joiners wait for ``initialised``).
4. Nothing listens but the holder's instance still runs -> wait (it may be rebooting).

My own earlier attempt (the agent restarted mid-init) -> ``kubeadm reset --force`` and begin again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from lambdas.common.version_skew import VersionSkewError, check_upgrade, parse_version, worker_skew_problem
from node_agent.addons import DRAINER_USER, kubectl_apply_argv, render_addons, write_addons
from node_agent.audit import write_policy as write_audit_policy
from node_agent.certs import CertificateTimer
from node_agent.config import AgentConfig, AgentSettings
from node_agent.election import Attempt, ClusterState, ClusterStateStore, LeaseRenewer, MemberRecord, Phase
from node_agent.errors import AgentError, LeaseLostError, SecretUnreadableError
from node_agent.etcd import EtcdAccess, EtcdTls, Member, client_url_for, listening
from node_agent.hosts import map_endpoint, unmap_endpoint
from node_agent.instance import InstanceIdentity
from node_agent.irsa import IssuerPublisher
from node_agent.kubeadm import Kubeadm, generate_bootstrap_token, init_configuration_yaml, join_configuration_yaml
from node_agent.lifecycle import LaunchHook, LaunchHookHeartbeat
from node_agent.log import Metrics, get_logger, log
from node_agent.pod_identity_webhook import webhook_addon
from node_agent.recovery import GONE, describe_instance_states, disaster_recovery_needed
from node_agent.runner import CommandRunner
from node_agent.secrets import (
    ETCD_CLIENT_KEYS,
    JOIN_KEYS,
    PKI_FILES,
    JoinSecret,
    SecretStore,
    place_pki_on_disk,
    read_pki_from_disk,
)
from node_agent.snapshots import Etcdctl, Snapshots
from node_agent.tokens import rotate_join_token
from node_agent.upgrade import ClusterUpgrade

LOG = get_logger("bootstrap")
ETCD_CLIENT_CN = "dedicated-k8s-etcd-lifecycle"


@dataclass(frozen=True)
class LaunchOutcome:
    ok: bool
    action: str  # initialised | joined | restored | already-member | adopted+joined | worker-joined | abandoned
    reason: str = ""


@dataclass
class Agent:
    config: AgentConfig
    settings: AgentSettings
    identity: InstanceIdentity
    runner: CommandRunner
    store: ClusterStateStore
    secrets: SecretStore
    hook: LaunchHook
    etcd_for: Callable[[EtcdTls], EtcdAccess]
    ec2: Any
    s3: Any = None
    metrics: Metrics | None = None
    probe: Callable[[str], bool] = listening
    sleep: Callable[[float], None] = time.sleep
    monotonic: Callable[[], float] = time.monotonic
    _deadline: float = field(default=0.0, init=False)

    # -- identity ----------------------------------------------------------------------------------
    @property
    def me(self) -> str:
        return self.identity.instance_id

    @property
    def node_name(self) -> str:
        return self.identity.node_name

    @property
    def peer_url(self) -> str:
        return f"https://{self.identity.private_ip}:{self.settings.etcd_peer_port}"

    @property
    def client_url(self) -> str:
        return f"https://{self.identity.private_ip}:{self.settings.etcd_client_port}"

    @property
    def kubeadm(self) -> Kubeadm:
        return Kubeadm(self.runner, self.settings)

    @property
    def upgrade(self) -> ClusterUpgrade:
        return ClusterUpgrade(self.config, self.settings, self.identity, self.runner, self.store)

    @property
    def lambda_client_tls(self) -> EtcdTls:
        d = self.settings.state_dir / "etcd-client"
        return EtcdTls(d / "ca.crt", d / "client.crt", d / "client.key")

    # -- entry point --------------------------------------------------------------------------------
    def run_launch(self) -> LaunchOutcome:
        """Bootstrap this node, then CONTINUE the launch hook; on any failure ABANDON with the reason.

        The launch heartbeats the hook while it works (its timeout is shorter than the launch deadline); the
        heartbeats stop before the hook is completed (:class:`~node_agent.lifecycle.LaunchHookHeartbeat`).
        """
        self._deadline = self.monotonic() + self.settings.join_deadline_seconds
        try:
            with LaunchHookHeartbeat(self.hook, self.settings.heartbeat_interval_seconds,
                                     stop_after_seconds=self.settings.join_deadline_seconds):  # fmt: skip
                action = self._launch_control_plane() if self.config.is_control_plane else self._launch_worker()
        except Exception as err:  # every failure ends the launch the same way: ABANDON, reason logged
            reason = f"{type(err).__name__}: {err}"
            log(LOG, 40, "launch failed; abandoning", instance_id=self.me, role=self.config.role, reason=reason)
            self._metric("LaunchAbandoned")
            self.hook.complete("ABANDON", reason)
            return LaunchOutcome(False, "abandoned", reason)
        log(LOG, 20, "launch complete", instance_id=self.me, role=self.config.role, action=action)
        self._metric("LaunchCompleted")
        self.hook.complete("CONTINUE", action)
        return LaunchOutcome(True, action)

    def _metric(self, name: str, value: float = 1) -> None:
        self._metric_value(name, value)

    def _metric_value(self, name: str, value: float, unit: str = "Count") -> None:
        if self.metrics is not None:
            self.metrics.put(name, value, unit, Role=self.config.role)

    def _time_left(self) -> float:
        return self._deadline - self.monotonic()

    def _wait(self, what: str, predicate: Callable[[], bool], timeout: float | None = None) -> None:
        limit = self.monotonic() + min(timeout or self.settings.health_timeout_seconds, max(self._time_left(), 0))
        while True:
            try:
                if predicate():
                    return
            except AgentError:
                raise
            except Exception as err:  # transient (etcd electing, API server starting): keep polling
                log(LOG, 10, "not yet", what=what, error=str(err))
            if self.monotonic() >= limit:
                raise AgentError(f"timed out waiting for {what}")
            self.sleep(self.settings.poll_interval_seconds)

    # -- worker ---------------------------------------------------------------------------------------
    def _launch_worker(self) -> str:
        """Workers cannot read the cluster-state table (least privilege): the join secret is the signal.

        Until the initialiser writes it, the secret holds the stack's placeholder (or no value): wait.
        Access or decryption errors end the launch at once.
        """
        join = self._wait_for_join_secret()
        if join.kubernetes_version:
            problem = worker_skew_problem(join.kubernetes_version, self.config.kubernetes_version)
            if problem is not None:
                raise VersionSkewError(problem)  # the launch abandons with this message; nothing was written
        else:
            log(LOG, 30, "the join secret names no cluster version; worker version skew check skipped")
        path = self._write("kubeadm-join.yaml", join_configuration_yaml(
            self.config, self.identity, join.token, join.ca_cert_hash, control_plane=False))  # fmt: skip
        self.kubeadm.join(path)
        self._wait("the kubelet to register the node", lambda: self.kubeadm.node_registered(self.node_name))
        return "worker-joined"

    def _wait_for_join_secret(self) -> JoinSecret:
        while True:
            try:
                return self.secrets.read_join(self.config.join_secret_name)
            except SecretUnreadableError as err:
                if not err.not_written_yet or self._time_left() <= 0:
                    raise
                log(LOG, 10, "join secret not written yet", reason=str(err))
            self.sleep(self.settings.poll_interval_seconds)

    # -- control plane ---------------------------------------------------------------------------------
    def _launch_control_plane(self) -> str:
        state = self.store.read()  # an unknown state raises here, before anything is written
        write_audit_policy(self.settings.kubernetes_dir)  # the API server this node runs reads it at start
        if state.phase == Phase.UNINITIALISED and state.holder is None and state.generation == 0:
            self.store.ensure_item()
        while True:
            state = self.store.read()
            if state.phase == Phase.INITIALISED:
                if self._already_ready_member(state):
                    return "already-member"
                self._check_version_skew(state)
                if self._dr_needed(state):
                    done = self._under_lock(state, self._restore)
                    if done:
                        return done
                else:
                    return self._join_control_plane(state)
            elif state.lease_held_by_other(self.me, time.time()):
                log(LOG, 10, "another node holds the bootstrap lock", holder=state.holder, phase=state.phase.value)
            elif state.phase in (Phase.UNINITIALISED, Phase.INITIALISING):
                done = self._under_lock(state, self._initialise)
                if done:
                    return done
            elif state.phase == Phase.RESTORING:
                done = self._under_lock(state, self._restore)
                if done:
                    return done
            if self._time_left() <= 0:
                raise AgentError(
                    f"gave up after {self.settings.join_deadline_seconds:.0f}s: cluster state {state.phase}"
                )
            self.sleep(self.settings.poll_interval_seconds)

    def _under_lock(self, seen: ClusterState, step: Callable[[ClusterState, LeaseRenewer], str | None]) -> str | None:
        """Run ``step`` while holding the renewed lock; None means "not now, read the world again"."""
        if not self.store.try_acquire(self.me, self.settings.lease_seconds):
            return None
        renewer = LeaseRenewer(self.store, self.me, self.settings.lease_seconds, self.settings.renew_interval_seconds,
                               max_hold_seconds=max(self._time_left(), self.settings.lease_seconds))  # fmt: skip
        try:
            with renewer:
                state = self.store.read()
                if state.phase != seen.phase or state.generation != seen.generation:
                    return None  # the world moved between my read and my lock: look again
                return step(state, renewer)
        finally:
            self.store.release(self.me)

    # -- takeover of a half-done init/restore ----------------------------------------------------------
    def _takeover_decision(self, attempt: Attempt) -> str:
        """``mine`` | ``adopt`` | ``wait`` | ``clean`` (see the module docstring)."""
        if attempt.holder == self.me:
            return "mine"
        if self.probe(attempt.client_url):
            stored = (
                self.secrets.holds(self.config.pki_secret_name, PKI_FILES)
                and self.secrets.holds(self.config.etcd_client_secret_name, ETCD_CLIENT_KEYS)
                and self.secrets.holds(self.config.kube_client_secret_name, ETCD_CLIENT_KEYS)  # same {ca, cert, key}
                and self.secrets.holds(self.config.join_secret_name, JOIN_KEYS)
            )  # the stack creates the secrets with placeholders: "stored" means written in the agent's shape
            if attempt.phase == Phase.INITIALISING.value and stored:
                return "adopt"
            return "wait"
        holder_state = describe_instance_states(self.ec2, [attempt.instance_id]).get(attempt.instance_id)
        return "clean" if holder_state in GONE else "wait"

    def _attempt(self, phase: Phase) -> Attempt:
        started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return Attempt(holder=self.me, instance_id=self.me, client_url=self.client_url, phase=phase.value,
                       started_at=started)  # fmt: skip

    def _begin(self, state: ClusterState, phase: Phase) -> str | None:
        """Record my attempt; returns None to proceed, or an action word if there is nothing to do now."""
        if state.attempt is not None and state.phase == phase:
            decision = self._takeover_decision(state.attempt)
            log(LOG, 30, "half-finished attempt found", previous=state.attempt.holder, decision=decision)
            if decision == "wait":
                return "wait"
            if decision == "adopt":
                return self._adopt(state)
            if decision == "mine":
                self.kubeadm.reset()
        self.store.begin(self.me, phase, self._attempt(phase), state)
        return None

    def _adopt(self, state: ClusterState) -> str:
        assert state.attempt is not None
        self._load_lambda_client_tls()
        members = self.etcd_for(self.lambda_client_tls).members([state.attempt.client_url])
        if not self.store.complete(self.me, Phase.INITIALISING, state.generation + 1, self._records(members),
                                   kubernetes_version=self.config.kubernetes_version):  # fmt: skip
            raise LeaseLostError("could not record the adopted cluster as initialised")
        log(LOG, 30, "adopted the cluster a dead initialiser left", previous=state.attempt.holder)
        return "adopted"

    # -- initialise -----------------------------------------------------------------------------------
    def _initialise(self, state: ClusterState, renewer: LeaseRenewer) -> str | None:
        if state.phase not in (Phase.UNINITIALISED, Phase.INITIALISING):
            return None
        early = self._begin(state, Phase.INITIALISING)
        if early is not None:
            return None  # "wait": look again; "adopted": the next pass sees initialised and joins
        generation = state.generation + 1
        token = generate_bootstrap_token()
        init_path = self._write(
            "kubeadm-init.yaml", init_configuration_yaml(self.config, self.identity, self.settings, token)
        )
        renewer.check()
        log(LOG, 20, "initialising the cluster", generation=generation, node=self.node_name)
        self._reach_own_api_server_by_name()  # init's upload-config and later phases use admin.conf (the endpoint)
        self.kubeadm.init(init_path)
        own_tls = EtcdTls.kubeadm_apiserver_client(self.settings.pki_dir)
        self._wait_ready(own_tls, [self.client_url])
        renewer.check()
        self.secrets.write_json(self.config.pki_secret_name, read_pki_from_disk(self.settings.pki_dir))
        self._publish_irsa_issuer()
        self._create_lambda_client_secret()
        self._create_drainer_client_secret()
        self._apply_addons()  # before the join secret: a stored join secret means everything before it is done
        self._write_join_secret(token)
        members = self.etcd_for(own_tls).members([self.client_url])
        renewer.check()
        if not self.store.complete(self.me, Phase.INITIALISING, generation, self._records(members),
                                   kubernetes_version=self.config.kubernetes_version):  # fmt: skip
            raise LeaseLostError("could not record initialised: the lock or the state changed under me")
        self._metric("ClusterInitialised")
        self._record_installed_version()
        return "initialised"

    def _create_lambda_client_secret(self) -> None:
        cert, key = self.kubeadm.create_etcd_client_cert(self.settings.state_dir / "issue", ETCD_CLIENT_CN)
        ca = (self.settings.pki_dir / "etcd" / "ca.crt").read_text()
        self.secrets.write_json(self.config.etcd_client_secret_name, {"ca": ca, "cert": cert, "key": key})

    def _create_drainer_client_secret(self) -> None:
        """The lifecycle Lambda's drain identity: a cluster-CA client certificate whose CN is the RBAC user of
        :func:`node_agent.addons.drainer_rbac`, stored as ``{ca, cert, key}`` (the etcd client secret's shape).
        Any failure (openssl, Secrets Manager) ends the init: the launch abandons and the next initialiser
        begins again, so no cluster is ever marked initialised without it."""
        cert, key = self.kubeadm.create_kube_client_cert(self.settings.state_dir / "issue", DRAINER_USER)
        ca = (self.settings.pki_dir / "ca.crt").read_text()
        self.secrets.write_json(self.config.kube_client_secret_name, {"ca": ca, "cert": cert, "key": key})

    def _publish_irsa_issuer(self) -> None:
        """IRSA (:mod:`node_agent.irsa`): this cluster's service-account public key as the issuer's JWKS, and the
        discovery document, into the issuer bucket where STS reads them. A failure ends the init like any other
        step (the launch abandons, the next initialiser begins again)."""
        if not self.config.irsa_enabled:
            return
        publisher = IssuerPublisher(self.runner, self.s3, self.config.irsa_bucket, self.config.irsa_issuer_url)
        publisher.publish(self.settings.pki_dir / "sa.pub")
        log(LOG, 20, "published the service-account issuer documents", bucket=self.config.irsa_bucket)

    def _apply_addons(self) -> None:
        """CNI, cloud controller manager, termination handler, CSR approver, drainer RBAC (:mod:`node_agent.addons`),
        from the images pre-pulled into this AMI, with admin.conf. Retried while the new API server settles; if it
        never succeeds the init (or restore) fails and the launch abandons."""
        rendered = render_addons(self.config)
        if self.config.irsa_enabled:  # IRSA's pod identity webhook, its serving certificate from the cluster CA
            issue = self.settings.state_dir / "issue"
            rendered |= webhook_addon(self.runner, self.settings.pki_dir, issue, self.config.region)
        directory = write_addons(self.settings.state_dir / "addons", rendered)
        directory.chmod(0o700)  # the webhook's serving key is in there
        argv = kubectl_apply_argv(self.kubeadm.admin_conf, directory)
        last = [""]

        def applied() -> bool:
            result = self.runner.run(argv, timeout=300)
            last[0] = (result.stderr or result.stdout).strip()[-300:]
            return result.ok

        try:
            self._wait("the cluster add-ons to apply", applied)
        except AgentError as err:
            raise AgentError(f"{err}: {last[0]}") from err
        log(LOG, 20, "applied the cluster add-ons", directory=str(directory))

    def _write_join_secret(self, token: str) -> JoinSecret:
        expires = datetime.now(UTC) + timedelta(hours=24)
        # Written by the initialiser or restorer: its version is the cluster's.
        secret = JoinSecret(token, self.kubeadm.ca_cert_hash(), expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                            self.config.control_plane_endpoint, self.config.kubernetes_version)  # fmt: skip
        self.secrets.write_join(self.config.join_secret_name, secret)
        return secret

    # -- join ----------------------------------------------------------------------------------------
    def _endpoints(self, state: ClusterState) -> list[str]:
        port = self.settings.etcd_client_port
        return [m.client_url or client_url_for(m.peer_url, port) for m in state.last_membership]

    def _load_lambda_client_tls(self) -> None:
        value = self.secrets.read_json(self.config.etcd_client_secret_name, ETCD_CLIENT_KEYS)
        tls = self.lambda_client_tls
        tls.ca.parent.mkdir(parents=True, exist_ok=True)
        for path, pem in ((tls.ca, value["ca"]), (tls.cert, value["cert"]), (tls.key, value["key"])):
            path.write_text(pem)
            path.chmod(0o600)

    def _already_ready_member(self, state: ClusterState) -> bool:
        """An agent restart after a completed join/init: my member is already a healthy voter; nothing to do."""
        tls = self.lambda_client_tls
        if not tls.cert.exists():
            return False  # this instance never reached the join step
        endpoints = [*self._endpoints(state), self.client_url]
        try:
            etcd = self.etcd_for(tls)
            if not etcd.member_ready(endpoints, self.node_name):
                return False
        except Exception:
            return False
        if not any(m.instance_id == self.me for m in state.last_membership):
            self._record_membership(state.generation, etcd, endpoints)
        self._reach_own_api_server_by_name()  # the agent may have stopped between the join and the mapping
        return True

    def _join_control_plane(self, state: ClusterState) -> str:
        # Until my join is done the endpoint name must reach the EXISTING members through the NLB (the upgrade's
        # kubeadm-config write, discovery, the etcd member list): a mapping left by an earlier try goes first.
        if unmap_endpoint(self.settings.hosts_file):
            log(LOG, 30, "removed my earlier endpoint mapping before joining", hosts_file=str(self.settings.hosts_file))
        pki = self.secrets.read_pki(self.config.pki_secret_name)
        join = self.secrets.read_join(self.config.join_secret_name)
        self._load_lambda_client_tls()
        etcd = self.etcd_for(self.lambda_client_tls)
        endpoints = self._join_endpoints(state)
        place_pki_on_disk(pki, self.settings.pki_dir)
        # A stale learner/unstarted member with my peer URL (an earlier instance with my IP died mid-join)
        # would itself count as "a change in flight": remove it first; that removal never affects quorum.
        stale = [m for m in etcd.members(endpoints) if self.peer_url in m.peer_urls and m.name != self.node_name]
        if stale and (stale[0].is_learner or not stale[0].started):
            self._remove_stale(etcd, endpoints)
        self._wait("no other etcd membership change in flight",
                   lambda: not etcd.membership_change_in_progress(endpoints))  # fmt: skip
        self._remove_stale(etcd, endpoints)
        self.upgrade.before_join(state)  # a newer node first sets kubeadm-config's kubernetesVersion (upgrade.py)
        path = self._write("kubeadm-join.yaml", join_configuration_yaml(
            self.config, self.identity, join.token, join.ca_cert_hash, control_plane=True))  # fmt: skip
        try:
            self.kubeadm.join(path)
            self._reach_own_api_server_by_name()  # from now on my clients use my API server (invariant 9)
            self._wait_ready(self.lambda_client_tls, [*endpoints, self.client_url])
        except Exception:
            self._withdraw_own_member(etcd, endpoints)
            raise
        self._record_membership(state.generation, etcd, [*endpoints, self.client_url])
        self._record_cluster_version(state)
        self._upgrade_addons_after_join(etcd, [*endpoints, self.client_url])
        return "joined"

    def _record_installed_version(self) -> None:
        """After init/restore: the add-ons kubeadm installed run my version (upgrade.py); best effort."""
        try:
            self.upgrade.after_init()
        except Exception as err:
            log(LOG, 30, "could not record the installed add-on version", error=str(err))

    def _upgrade_addons_after_join(self, etcd: EtcdAccess, endpoints: Sequence[str]) -> None:
        """Record my version; the last node of a new version upgrades the add-ons. Best effort: the node has
        joined, and the ``upgrade-addons`` timer retries."""
        try:
            outcome = self.upgrade.after_join(etcd, endpoints)
        except Exception as err:
            log(LOG, 30, "add-on upgrade step failed; the upgrade-addons timer retries", error=str(err))
            return
        log(LOG, 20, "add-on upgrade step", outcome=outcome)
        self._publish_version_to_workers(outcome)

    def _publish_version_to_workers(self, outcome: str) -> None:
        """Once every control-plane node runs my version (the add-ons moved to it), workers of my version may
        join: the join secret's ``kubernetesVersion`` follows (never lowered). Best effort, retried by the timer."""
        if outcome not in ("upgraded", "addons-current"):
            return
        mine = self.config.kubernetes_version
        try:
            join = self.secrets.read_join(self.config.join_secret_name)
            if join.kubernetes_version and parse_version(join.kubernetes_version) >= parse_version(mine):
                return
            self.secrets.write_join(self.config.join_secret_name, replace(join, kubernetes_version=mine))
        except Exception as err:
            log(LOG, 30, "could not publish the cluster version to workers", version=mine, error=str(err))
            return
        log(LOG, 20, "workers may now join at", version=mine, previous=join.kubernetes_version or "unrecorded")

    def upgrade_addons_once(self) -> str:
        """The ``upgrade-addons`` timer: upgrade the add-ons if every control-plane node runs my version."""
        state = self.store.read()
        if state.phase != Phase.INITIALISED:
            return f"skipped: cluster is {state.phase.value}"
        self._load_lambda_client_tls()
        etcd = self.etcd_for(self.lambda_client_tls)
        outcome = self.upgrade.after_join(etcd, [*self._endpoints(state), self.client_url])
        self._publish_version_to_workers(outcome)
        return outcome

    # -- version skew ----------------------------------------------------------------------------------
    def _check_version_skew(self, state: ClusterState) -> None:
        """Before joining or restoring: my version must be the cluster's minor (same or newer patch) or +1 minor.

        Raises :class:`~lambdas.common.version_skew.VersionSkewError` (the launch abandons with its message)
        before anything is written. An item without a recorded version (older agent) skips the check.
        """
        if not state.kubernetes_version:
            log(LOG, 30, "the cluster's Kubernetes version is not recorded; version skew check skipped",
                version=self.config.kubernetes_version)  # fmt: skip
            return
        check_upgrade(state.kubernetes_version, self.config.kubernetes_version)

    def _record_cluster_version(self, state: ClusterState) -> None:
        """After a successful join: a newer node raises the recorded version (never lowers it); best effort."""
        mine, recorded = self.config.kubernetes_version, state.kubernetes_version
        if recorded and parse_version(mine) <= parse_version(recorded):
            return
        try:
            raised = self.store.raise_version(mine, recorded)
        except Exception as err:  # the join succeeded; the next newer joiner records it
            log(LOG, 30, "could not record the cluster's Kubernetes version", version=mine, error=str(err))
            return
        if raised:
            log(LOG, 20, "recorded the cluster's Kubernetes version", previous=recorded or "unrecorded", version=mine)

    def _remove_stale(self, etcd: EtcdAccess, endpoints: Sequence[str]) -> None:
        removed = etcd.remove_stale_member(endpoints, self.peer_url, keep_name=self.node_name)
        if removed:
            log(LOG, 30, "removed a stale member with my peer URL", member_id=removed, peer_url=self.peer_url)

    def _join_endpoints(self, state: ClusterState) -> list[str]:
        """The recorded members' client URLs, then those of running control-plane instances (if the record lags)."""
        recorded = self._endpoints(state)
        try:
            live = self._live_control_plane_endpoints()
        except Exception as err:  # EC2 unavailable: the recorded endpoints alone
            log(LOG, 30, "could not list control-plane instances", error=str(err))
            live = []
        return recorded + [u for u in live if u not in recorded and u != self.client_url]

    def _withdraw_own_member(self, etcd: EtcdAccess, endpoints: Sequence[str]) -> None:
        """A failed join must not leave its learner behind: it would block every later join (invariant 4a).

        Best effort and quorum-checked (the membership module refuses an unsafe removal); the ASG
        terminates this instance after ABANDON, and the terminate hook/reconciler remove whatever is left.
        """
        try:
            removed = etcd.remove_stale_member(endpoints, self.peer_url, keep_name=None)
        except Exception as err:
            log(LOG, 40, "could not withdraw my etcd member after a failed join", error=str(err))
            return
        if removed:
            log(LOG, 30, "withdrew my etcd member after a failed join", member_id=removed)

    def _wait_ready(self, tls: EtcdTls, endpoints: Sequence[str]) -> None:
        etcd = self.etcd_for(tls)
        self._wait(f"etcd member {self.node_name} started, promoted and healthy",
                   lambda: etcd.member_ready(endpoints, self.node_name))  # fmt: skip
        self._wait("my API server to answer /readyz",
                   lambda: self.kubeadm.api_server_ready(self.identity.private_ip, self.config.api_port))  # fmt: skip

    def _reach_own_api_server_by_name(self) -> None:
        """The endpoint name -> my private IP in the hosts file (:mod:`node_agent.hosts`), control plane only."""
        if map_endpoint(self.settings.hosts_file, self.config.api_endpoint, self.identity.private_ip):
            log(LOG, 20, "the API endpoint name now reaches my own API server", endpoint=self.config.api_endpoint,
                address=self.identity.private_ip, hosts_file=str(self.settings.hosts_file))  # fmt: skip

    def _record_membership(self, generation: int, etcd: EtcdAccess, endpoints: Sequence[str]) -> None:
        for _ in range(10):
            state = self.store.read()  # read the revision first, then etcd, then write (see update_membership)
            if state.phase != Phase.INITIALISED or state.generation != generation:
                log(LOG, 30, "membership not recorded: the generation moved on", generation=generation)
                return
            records = self._records(etcd.members(endpoints))
            if self.store.update_membership(generation, records, state.membership_rev):
                return
        log(LOG, 30, "membership not recorded after 10 tries (concurrent writers); the reconciler will")

    def _records(self, members: list[Member]) -> list[MemberRecord]:
        return [
            MemberRecord(
                instance_id=m.name.split(".", 1)[0],
                peer_url=m.peer_urls[0] if m.peer_urls else "",
                member_id=m.id,
                name=m.name,
                client_url=m.client_urls[0] if m.client_urls else "",
            )
            for m in members
            if m.started and not m.is_learner
        ]

    # -- disaster recovery ---------------------------------------------------------------------------------
    def _live_control_plane_endpoints(self) -> list[str]:
        """Client URLs of this cluster's running control-plane instances (other than me), from EC2 tags.

        A second guard for invariant 7: a member that joined but was never recorded in last_membership
        (a lost optimistic-concurrency race) still blocks a restore if it answers.
        """
        filters = [
            {"Name": "tag:dedicated-k8s:cluster", "Values": [self.config.cluster_name]},
            {"Name": "tag:dedicated-k8s:role", "Values": ["control-plane"]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ]
        urls = []
        for page in self.ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page.get("Reservations", []):
                for inst in reservation.get("Instances", []):
                    if inst.get("InstanceId") != self.me and inst.get("PrivateIpAddress"):
                        urls.append(f"https://{inst['PrivateIpAddress']}:{self.settings.etcd_client_port}")
        return urls

    def _dr_needed(self, state: ClusterState) -> bool:
        endpoints = self._endpoints(state)
        reachable = any(self.probe(url) for url in endpoints)
        if not reachable and state.phase == Phase.INITIALISED and state.last_membership:
            reachable = any(self.probe(url) for url in self._live_control_plane_endpoints())
        states = {} if reachable else describe_instance_states(self.ec2, [m.instance_id for m in state.last_membership])
        needed = disaster_recovery_needed(state, states, reachable)
        if not reachable:
            log(LOG, 30, "no etcd member answers", instance_states=states, disaster_recovery=needed)
        return needed

    def _restore(self, state: ClusterState, renewer: LeaseRenewer) -> str | None:
        if state.phase == Phase.INITIALISED and not self._dr_needed(state):
            return None  # someone restored (or a member came back) between my read and my lock
        if state.phase not in (Phase.INITIALISED, Phase.RESTORING):
            return None
        early = self._begin(state, Phase.RESTORING)
        if early is not None:
            return None
        generation = state.generation + 1
        log(LOG, 30, "disaster recovery: restoring the latest snapshot", generation=generation)
        place_pki_on_disk(self.secrets.read_pki(self.config.pki_secret_name), self.settings.pki_dir)
        self._load_lambda_client_tls()
        etcdctl = Etcdctl(self.runner, self.lambda_client_tls, self.client_url)
        snapshots = Snapshots(self.config, self.settings, self.s3, etcdctl)
        # Only this cluster's history: a snapshot claiming a later generation than the item's is someone else's.
        path, obj, status = snapshots.download_latest_good(
            self.settings.state_dir / "restore", max_generation=state.generation
        )
        renewer.check()
        etcdctl.snapshot_restore(path, self.settings.etcd_data_dir, self.node_name, self.peer_url,
                                 cluster_token=f"{self.config.cluster_name}-g{generation}")  # fmt: skip
        token = generate_bootstrap_token()
        init_path = self._write(
            "kubeadm-init.yaml", init_configuration_yaml(self.config, self.identity, self.settings, token)
        )
        self._reach_own_api_server_by_name()
        self.kubeadm.init(init_path, ignore_preflight_errors=("DirAvailable--var-lib-etcd",))
        self._wait_ready(self.lambda_client_tls, [self.client_url])
        # The snapshot holds the add-ons already; re-applying (server-side, idempotent) pins them to the images
        # pre-pulled on this AMI. The drainer's certificate stays valid: the cluster CA is the same.
        self._apply_addons()
        self._write_join_secret(token)
        members = self.etcd_for(self.lambda_client_tls).members([self.client_url])
        renewer.check()
        if not self.store.complete(self.me, Phase.RESTORING, generation, self._records(members),
                                   kubernetes_version=self.config.kubernetes_version):  # fmt: skip
            raise LeaseLostError("could not record the restore: the lock or the state changed under me")
        log(LOG, 30, "restored", snapshot=obj.key, revision=status.revision, total_key=status.total_key)
        self._metric("DisasterRecoveryRestored")
        self._record_installed_version()
        return "restored"

    # -- timers and operator commands ------------------------------------------------------------------
    def _local_etcdctl(self) -> Etcdctl:
        return Etcdctl(self.runner, EtcdTls.kubeadm_apiserver_client(self.settings.pki_dir), self.client_url)

    def snapshot_once(self) -> str:
        """The snapshot timer: on the etcd leader only, snapshot, verify, upload, then apply retention."""
        state = self.store.read()
        if state.phase != Phase.INITIALISED:
            return f"skipped: cluster is {state.phase.value}"
        etcdctl = self._local_etcdctl()
        snapshots = Snapshots(self.config, self.settings, self.s3, etcdctl)
        obj = snapshots.take_if_leader(state.generation, self.node_name)
        self._report_snapshot_age(snapshots)
        if obj is None:
            return "skipped: not the etcd leader"
        self._metric("SnapshotUploaded")
        deleted = snapshots.enforce_retention()
        return f"uploaded {obj.key}; expired {len(deleted)}"

    def _report_snapshot_age(self, snapshots: Snapshots) -> None:
        """Every control-plane node reports the newest snapshot's age each interval (not only the leader, so
        the metric survives the leader's loss); none at all is left to the BackupAge alarm's missing data."""
        newest = snapshots.list_all()
        if newest:
            # The object's own upload time (S3 LastModified), not the date in its key: a key dated in the future must
            # not report a fresh backup and silence the BackupAge alarm.
            age = (datetime.now(UTC) - newest[-1].order_time).total_seconds()
            self._metric_value("LastSnapshotAgeSeconds", max(age, 0.0), unit="Seconds")

    def rotate_token_once(self) -> str:
        """The token timer: on the etcd leader only (one rotation per period, not one per node)."""
        if not self._local_etcdctl().is_leader():
            return "skipped: not the etcd leader"
        cluster_version = self.store.read().kubernetes_version  # the recorded one, not this node's during a rollout
        new = rotate_join_token(self.config, self.settings, self.runner, self.secrets, cluster_version=cluster_version)
        return f"rotated: token {new.token_id} until {new.expires_at}"

    def certificates_once(self) -> str:
        """The daily certificate timer (:mod:`node_agent.certs`): every control-plane node checks and renews its
        own certificates; only the etcd leader's node renews the Lambda's shared etcd client certificate."""
        timer = CertificateTimer(self.config, self.settings, self.runner, self.secrets, self.metrics)
        return timer.run_once(etcd_leader=self._local_etcdctl().is_leader()).summary()

    def restore_if_needed(self) -> str:
        """Operator command: run disaster recovery now, only if invariant 7's predicate holds."""
        self._deadline = self.monotonic() + self.settings.join_deadline_seconds
        state = self.store.read()
        if not self._dr_needed(state):
            return "refused: disaster recovery is not proven necessary (see the log for instance states)"
        done = self._under_lock(state, self._restore)
        return done or "refused: another node holds the lock or the state changed; try again"

    # -- files --------------------------------------------------------------------------------------
    def _write(self, name: str, text: str) -> Path:
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.settings.state_dir / name
        path.write_text(text)
        path.chmod(0o600)
        return path
