"""Upgrades by replacement, the node's part: a control-plane node of a newer AMI upgrades the cluster it joins.

A new AMI (Kubernetes ``N`` -> ``N+1``, patch or one minor) rolls through the cluster by replacement
(``pipeline/rollout.py``). Nothing runs ``kubeadm upgrade apply``: like Cluster API's KubeadmControlPlane,

1. **before its join**, the first control-plane node of the new version sets
   ``kube-system/kubeadm-config``'s ``ClusterConfiguration.kubernetesVersion`` to its own version
   (:meth:`ClusterUpgrade.before_join`). ``kubeadm join --control-plane`` reads that ConfigMap and renders
   the static pods of that version, whose images the AMI pre-pulled. Then it records the version in the
   cluster-state item (``kubeadm_config_version``) with a conditional write, so exactly one node records
   it; every later node of that version sees it done and only joins. Same-version joins do nothing here.
2. **after its join**, every control-plane node records its version under its instance ID
   (``control_plane_versions``). Once every started etcd voter (the control plane) runs the same newest
   version, one node (a conditional claim on ``addons_holder``, then ``addons_version``) upgrades the
   add-ons (:meth:`ClusterUpgrade.upgrade_addons_if_ready`): kubeadm's own (CoreDNS, kube-proxy) with
   ``kubeadm upgrade node phase addon all`` (kubeadm 1.32+; it renders them from the ClusterConfiguration
   in the cluster, now the new version), then the cluster's other add-ons through
   :func:`node_agent.addons` (when that module exists). The last new control-plane node usually does it
   at the end of its join; when the old nodes leave after it (launch before terminate), the
   ``upgrade-addons`` timer command (``python -m node_agent upgrade-addons``) catches up.

**Credentials of a joiner.** A joining node has no ``admin.conf`` yet, but it holds the cluster CA (the
shared PKI from Secrets Manager is on disk before ``kubeadm join``, which needs it). ``kubeadm kubeconfig
user --client-name dedicated-k8s-upgrade:<node> --org kubeadm:cluster-admins --validity-period 1h`` signs a
short-lived client certificate with that CA, in the group kubeadm binds to ``cluster-admin`` (the same
identity as ``admin.conf``, kubeadm 1.29+), not ``system:masters``; it talks to ``controlPlaneEndpoint``
(the API load balancer, served by the old control plane), and the file is deleted after use. The write is a
``kubectl replace`` of the ConfigMap read just before (its ``resourceVersion`` included): a concurrent
writer makes it fail instead of being overwritten, and the node re-reads.

The agent is stdlib-only (no YAML parser): the ClusterConfiguration is edited on its one top-level
``kubernetesVersion:`` line, which kubeadm always writes.
"""

from __future__ import annotations

import importlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lambdas.common.version_skew import parse_version
from node_agent.config import AgentConfig, AgentSettings
from node_agent.election import PK, ClusterState, ClusterStateStore, Phase
from node_agent.errors import AgentError
from node_agent.etcd import EtcdAccess
from node_agent.instance import InstanceIdentity
from node_agent.kubeadm import cluster_configuration
from node_agent.log import get_logger, log
from node_agent.runner import CommandRunner
from node_agent.yamlgen import dump_documents

LOG = get_logger("upgrade")
CLUSTER_ADMINS_ORG = "kubeadm:cluster-admins"
UPGRADE_CLIENT = "dedicated-k8s-upgrade"
KUBEADM_ADDON_PHASE = ("kubeadm", "upgrade", "node", "phase", "addon", "all")
ADDONS_MODULE = "node_agent.addons"  # the cluster's other add-ons (another change); called when it exists
_VERSION_LINE = re.compile(r"^kubernetesVersion:[ \t]*\"?(v?[0-9][^\"\s]*)\"?[ \t]*$", re.MULTILINE)

_NAMES = {
    "#cv": "kubeadm_config_version",
    "#cpv": "control_plane_versions",
    "#av": "addons_version",
    "#ah": "addons_holder",
    "#ae": "addons_lease_expires_at",
}


def _newer(a: str, b: str) -> bool:
    """``a`` is a newer Kubernetes version than ``b`` ("" = unrecorded, older than anything)."""
    return bool(a) and (not b or parse_version(a) > parse_version(b))


@dataclass(frozen=True)
class UpgradeRecord:
    """The upgrade attributes of the cluster-state item (absent on items from older agents)."""

    kubeadm_config_version: str = ""
    control_plane_versions: dict[str, str] = field(default_factory=dict)
    addons_version: str = ""
    addons_holder: str = ""
    addons_lease_expires_at: float = 0.0


class UpgradeStore:
    """Conditional writes of the upgrade attributes on the one cluster-state item (same table, same key)."""

    def __init__(self, store: ClusterStateStore) -> None:
        self.store = store

    def read(self) -> UpgradeRecord:
        item = self.store.client.get_item(TableName=self.store.table, Key={"pk": {"S": PK}}, ConsistentRead=True)
        raw = item.get("Item") or {}
        versions = {k: str(v.get("S", "")) for k, v in raw.get("control_plane_versions", {}).get("M", {}).items()}
        return UpgradeRecord(
            kubeadm_config_version=raw.get("kubeadm_config_version", {}).get("S", ""),
            control_plane_versions=versions,
            addons_version=raw.get("addons_version", {}).get("S", ""),
            addons_holder=raw.get("addons_holder", {}).get("S", ""),
            addons_lease_expires_at=float(raw.get("addons_lease_expires_at", {}).get("N", "0")),
        )

    def _update(self, update: str, condition: str, values: dict[str, Any]) -> bool:
        values = {":d": {"S": Phase.INITIALISED.value}, **values}
        return self.store._update(update, f"#s = :d AND ({condition})", values, _NAMES)

    def record_config_version(self, version: str, seen: str) -> bool:
        """``kubeadm_config_version = version``, only if it still holds what the writer read (exactly one wins)."""
        cond = "attribute_not_exists(#cv)" if not seen else "#cv = :seen"
        return self._update("SET #cv = :v", cond, {":v": {"S": version}, ":seen": {"S": seen}})

    def record_node_version(self, instance_id: str, version: str) -> None:
        """``control_plane_versions[instance_id] = version`` (creates the map on first use)."""
        self._update("SET #cpv = if_not_exists(#cpv, :empty)", "attribute_exists(#s)", {":empty": {"M": {}}})
        ok = self.store._update(
            "SET #cpv.#id = :v", "#s = :d", {":d": {"S": Phase.INITIALISED.value}, ":v": {"S": version}},
            {**_NAMES, "#id": instance_id},
        )  # fmt: skip
        if not ok:
            raise AgentError("could not record this node's Kubernetes version: the cluster is not initialised")

    def record_installed(self, instance_id: str, version: str) -> None:
        """After ``kubeadm init`` (first init or restore): its add-ons and this node run ``version``."""
        self._update("SET #av = :v", "attribute_exists(#s)", {":v": {"S": version}})
        self.record_node_version(instance_id, version)

    def claim_addons(self, holder: str, seen_version: str, lease_seconds: float) -> bool:
        """Take the add-on upgrade: only if nobody upgraded past what I read and no live claim exists."""
        now = self.store.clock()
        seen = "attribute_not_exists(#av)" if not seen_version else "#av = :seen"
        return self._update(
            "SET #ah = :me, #ae = :exp",
            f"{seen} AND (attribute_not_exists(#ah) OR #ae < :now OR #ah = :me)",
            {":me": {"S": holder}, ":exp": {"N": repr(now + lease_seconds)}, ":now": {"N": repr(now)},
             ":seen": {"S": seen_version}},
        )  # fmt: skip

    def finish_addons(self, holder: str, version: str) -> bool:
        return self._update("SET #av = :v REMOVE #ah, #ae", "#ah = :me", {":me": {"S": holder}, ":v": {"S": version}})

    def release_addons(self, holder: str) -> None:
        self._update("REMOVE #ah, #ae", "#ah = :me", {":me": {"S": holder}})


@dataclass
class ClusterUpgrade:
    """The two upgrade steps of a control-plane node (module docstring); every command through ``runner``."""

    config: AgentConfig
    settings: AgentSettings
    identity: InstanceIdentity
    runner: CommandRunner
    store: ClusterStateStore
    addon_lease_seconds: float = 900.0
    apply_addons: Callable[[str], Any] | None = None  # tests; default: node_agent.addons if it exists
    _records: UpgradeStore = field(init=False)

    def __post_init__(self) -> None:
        self._records = UpgradeStore(self.store)

    @property
    def version(self) -> str:
        return self.config.kubernetes_version

    def read(self) -> UpgradeRecord:
        return self._records.read()

    # -- 1. before the join: the cluster's kubeadm configuration ------------------------------------------
    def before_join(self, state: ClusterState) -> str:
        """``same-version`` | ``unrecorded`` | ``already-updated`` | ``updated`` | ``updated-by-another``."""
        mine, recorded = self.version, state.kubernetes_version
        if not recorded:  # an item from an older agent: nothing to compare with (the skew check was skipped too)
            return "unrecorded"
        if not _newer(mine, recorded):
            return "same-version"
        seen = self._records.read().kubeadm_config_version
        if seen and not _newer(mine, seen):
            log(LOG, 20, "the cluster's kubeadm configuration is already at my version", version=seen)
            return "already-updated"
        kubeconfig = self._joiner_kubeconfig()
        try:
            written = self._set_kubernetes_version(kubeconfig, mine)
        finally:
            kubeconfig.unlink(missing_ok=True)
        if self._records.record_config_version(mine, seen):
            log(LOG, 20, "upgraded the cluster's kubeadm configuration", previous=recorded, version=mine,
                configmap_written=written)  # fmt: skip
            return "updated"
        log(LOG, 20, "another node recorded the kubeadm configuration upgrade first", version=mine)
        return "updated-by-another"

    def _joiner_kubeconfig(self) -> Path:
        """A 1-hour cluster-admins kubeconfig signed with the shared CA (module docstring: credentials)."""
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.settings.state_dir / "upgrade-cluster-config.yaml"
        cfg_path.write_text(dump_documents([cluster_configuration(self.config, self.identity, self.settings)]))
        out = self.runner.run(
            ["kubeadm", "kubeconfig", "user", "--config", str(cfg_path),
             "--client-name", f"{UPGRADE_CLIENT}:{self.identity.node_name}", "--org", CLUSTER_ADMINS_ORG,
             "--validity-period", "1h0m0s"],
            timeout=60,
        ).check()  # fmt: skip
        path = self.settings.state_dir / "upgrade-admin.conf"
        path.write_text(out.stdout)
        path.chmod(0o600)
        return path

    def _set_kubernetes_version(self, kubeconfig: Path, version: str, attempts: int = 5) -> bool:
        """Read-modify-replace kube-system/kubeadm-config; False if it already says ``version`` (or newer)."""
        base = ["kubectl", "--kubeconfig", str(kubeconfig), "--namespace", "kube-system"]
        for attempt in range(attempts):
            cm = json.loads(self._get_kubeadm_config(base))
            text = str(cm.get("data", {}).get("ClusterConfiguration", ""))
            match = _VERSION_LINE.search(text)
            if match is None:
                raise AgentError("kubeadm-config has no top-level kubernetesVersion in its ClusterConfiguration")
            current = match.group(1).lstrip("v")
            if not _newer(version, current):
                return False
            cm["data"]["ClusterConfiguration"] = _VERSION_LINE.sub(f"kubernetesVersion: v{version}", text, count=1)
            path = self.settings.state_dir / "kubeadm-config.json"
            path.write_text(json.dumps(cm))  # metadata.resourceVersion kept: a concurrent write makes this fail
            result = self.runner.run([*base, "replace", "--filename", str(path)], timeout=60)
            if result.ok:
                return True
            log(LOG, 30, "kubeadm-config changed under me; reading it again", attempt=attempt + 1,
                error=(result.stderr or result.stdout).strip()[-200:])  # fmt: skip
            time.sleep(0.2)
        raise AgentError(f"could not update kubeadm-config to v{version} after {attempts} attempts")

    def _get_kubeadm_config(self, base: list[str]) -> str:
        """The ConfigMap as JSON, asked through controlPlaneEndpoint (the load balancer: this node joins later).
        Retried until ``health_timeout_seconds``: right after the initialiser's launch completes, the NLB has
        registered it but not yet seen it pass ``healthy_threshold`` checks, and has no target to send us to."""
        argv = [*base, "get", "configmap", "kubeadm-config", "--output", "json"]
        deadline = time.monotonic() + self.settings.health_timeout_seconds
        while True:
            got = self.runner.run(argv, timeout=60)
            if got.ok or time.monotonic() >= deadline:
                return got.check().stdout
            log(LOG, 10, "kubeadm-config not readable through the API endpoint yet",
                error=(got.stderr or got.stdout).strip()[-200:])  # fmt: skip
            time.sleep(self.settings.poll_interval_seconds)

    def after_init(self) -> None:
        """``kubeadm init`` installed the add-ons of my version: record that, and my own version."""
        self._records.record_installed(self.identity.instance_id, self.version)

    # -- 2. after the join: the add-ons once every control-plane node runs the new version -------------------
    def after_join(self, etcd: EtcdAccess, endpoints: Sequence[str]) -> str:
        """Record my version, then upgrade the add-ons if I complete the control plane's upgrade."""
        self._records.record_node_version(self.identity.instance_id, self.version)
        return self.upgrade_addons_if_ready(etcd, endpoints)

    def addons_blockers(self, record: UpgradeRecord, etcd: EtcdAccess, endpoints: Sequence[str]) -> list[str]:
        """Why the add-ons may not be upgraded to my version now (empty: they may)."""
        members = etcd.members(endpoints)
        pending = [m.name or m.id for m in members if m.is_learner or not m.started]
        if pending:
            return [f"membership change in flight ({', '.join(pending)})"]
        blockers = []
        for m in members:
            instance_id = m.name.split(".", 1)[0]
            theirs = record.control_plane_versions.get(instance_id, "")
            if theirs != self.version:
                blockers.append(f"{instance_id} runs {theirs or 'an unrecorded version'}")
        return blockers

    def upgrade_addons_if_ready(self, etcd: EtcdAccess, endpoints: Sequence[str]) -> str:
        """``addons-current`` | ``waiting: ...`` | ``claimed-by-another`` | ``upgraded``."""
        record = self._records.read()
        if record.addons_version and not _newer(self.version, record.addons_version):
            return "addons-current"
        blockers = self.addons_blockers(record, etcd, endpoints)
        if blockers:
            log(LOG, 20, "add-on upgrade waits for the control plane", version=self.version, blockers=blockers)
            return "waiting: " + "; ".join(blockers)
        me = self.identity.instance_id
        if not self._records.claim_addons(me, record.addons_version, self.addon_lease_seconds):
            return "claimed-by-another"
        try:
            admin = str(self.settings.kubernetes_dir / "admin.conf")
            self.runner.run([*KUBEADM_ADDON_PHASE, "--kubeconfig", admin], timeout=600).check()
            self._cluster_addons(admin)
        except Exception:
            self._records.release_addons(me)
            raise
        self._records.finish_addons(me, self.version)
        log(LOG, 20, "upgraded the add-ons", previous=record.addons_version or "unrecorded", version=self.version)
        return "upgraded"

    def _cluster_addons(self, kubeconfig: str) -> None:
        """CALL POINT for the cluster's other add-ons (:mod:`node_agent.addons`, written in another change):
        re-render them for this AMI (its pre-pulled images) and server-side apply them with ``kubeconfig``.
        Imported by name so this module works before that one lands; without it only kubeadm's add-ons move."""
        if self.apply_addons is not None:
            self.apply_addons(kubeconfig)
            return
        try:
            addons = importlib.import_module(ADDONS_MODULE)
        except ModuleNotFoundError:
            log(LOG, 30, "no node_agent.addons module: only kubeadm's add-ons were upgraded")
            return
        directory = addons.write_addons(self.settings.state_dir / "addons", addons.render_addons(self.config))
        self.runner.run(addons.kubectl_apply_argv(kubeconfig, directory), timeout=300).check()
