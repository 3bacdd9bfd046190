"""etcd snapshots: taken on the leader only, verified, uploaded with SSE-KMS, kept by a retention rule.

Key layout (sorts by time within a cluster): ``snapshots/<cluster>/<generation:06d>/<yyyymmddThhmmssZ>-<revision>.db``.
The generation is zero-padded so that lexical order is time order across restores too.

etcdctl saves (a client call); status and restore are offline file operations, which etcd 3.5+ moved
to ``etcdutl`` (the AMI ships etcd 3.6, which has no ``etcdctl snapshot restore`` at all). The tests run the
real ``etcdutl`` 3.5.30 (scripts/install-etcd.sh), whose restore flags are the same as 3.6's.

A restore bumps the revision and marks it compacted (:data:`RESTORE_REVISION_BUMP`): a watcher that outlived
the old cluster (a kubelet, a controller, an informer) then gets "required revision has been compacted" and
re-lists, instead of being served reused revisions that hold different data (etcd's op-guide "Disaster
recovery", and Kubernetes' "Operating etcd clusters for Kubernetes: restoring an etcd cluster", which gives
``--bump-revision 1000000000 --mark-compacted`` for clusters restored under a running Kubernetes).

Only what is known good, of this cluster, is restored (:meth:`Snapshots.download_latest_good`):

* an end-to-end checksum: the SHA-256 of the file as saved is recorded in the object's metadata (``sha256``) and
  the upload asks S3 for its own SHA-256 (``ChecksumAlgorithm``, S3 "Checking object integrity"); the download
  asks S3 to validate it (``ChecksumMode=ENABLED``) and the agent recomputes the file's SHA-256 against the
  recorded one itself, because S3's checksum of a multipart upload is a checksum of part checksums and moto
  (the tests' S3) does not validate what it is sent. No recorded checksum: refused.
* the object's metadata names this cluster and a generation no newer than the cluster-state item's.
* a trial ``etcdutl snapshot restore`` into a scratch directory: ``snapshot status`` reads a truncated or
  bit-flipped small database without complaint, the restore checks the SHA-256 ``etcdctl snapshot save``
  appends to the file (etcd's ``snapshot.Restore``, ``--skip-hash-check`` never given).
* "newest" is the object's own time (S3's ``LastModified``), never the time its key spells: a key dated in
  the future would otherwise outrank every later snapshot for ever.

Anything refused is logged and the next-newest snapshot is tried.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

from node_agent.config import AgentConfig, AgentSettings
from node_agent.errors import AgentError
from node_agent.etcd import EtcdTls
from node_agent.log import get_logger, log
from node_agent.runner import CommandRunner

LOG = get_logger("snapshots")
_KEY = re.compile(r"^snapshots/(?P<cluster>[^/]+)/(?P<gen>\d+)/(?P<ts>\d{8}T\d{6}Z)-(?P<rev>\d+)\.db$")
TS_FORMAT = "%Y%m%dT%H%M%SZ"


# Kubernetes' documented value: larger than the writes any cluster makes between its last snapshot and a restore.
RESTORE_REVISION_BUMP = 1_000_000_000


class SnapshotError(AgentError):
    pass


@dataclass(frozen=True)
class SnapshotStatus:
    hash: int
    revision: int
    total_key: int
    total_size: int


@dataclass(frozen=True)
class SnapshotObject:
    key: str
    generation: int
    taken_at: datetime  # as the key spells it: written by whoever wrote the key, so never trusted for order
    revision: int
    # S3's LastModified (the listing's): the object's own time, which orders snapshots and ages them out.
    stored_at: datetime | None = None

    @property
    def order_time(self) -> datetime:
        return self.stored_at if self.stored_at is not None else self.taken_at

    @property
    def age_time(self) -> datetime:
        """For retention: the earlier of the two, so a key dated in the future still ages from its upload."""
        return min(self.taken_at, self.order_time)

    @classmethod
    def parse(cls, key: str) -> SnapshotObject | None:
        m = _KEY.match(key)
        if not m:
            return None
        taken = datetime.strptime(m["ts"], TS_FORMAT).replace(tzinfo=UTC)
        return cls(key=key, generation=int(m["gen"]), taken_at=taken, revision=int(m["rev"]))


def snapshot_key(cluster: str, generation: int, taken_at: datetime, revision: int) -> str:
    return f"snapshots/{cluster}/{generation:06d}/{taken_at.astimezone(UTC).strftime(TS_FORMAT)}-{revision}.db"


class Etcdctl:
    """etcdctl/etcdutl argv lists through the runner (``ETCDCTL_API=3``, TLS flags)."""

    ENV: ClassVar[dict[str, str]] = {"ETCDCTL_API": "3"}

    def __init__(self, runner: CommandRunner, tls: EtcdTls, endpoint: str, etcdutl: str = "etcdutl") -> None:
        self.runner = runner
        self.tls = tls
        self.endpoint = endpoint
        self.etcdutl = etcdutl

    def _client(self, *args: str) -> list[str]:
        return [
            "etcdctl", "--endpoints", self.endpoint,
            "--cacert", str(self.tls.ca), "--cert", str(self.tls.cert), "--key", str(self.tls.key),
            *args,
        ]  # fmt: skip

    def endpoint_status(self) -> dict[str, Any]:
        result = self.runner.run(self._client("endpoint", "status", "-w", "json"), env=self.ENV, timeout=30).check()
        try:
            return dict(json.loads(result.stdout)[0]["Status"])
        except (ValueError, KeyError, IndexError) as err:
            raise SnapshotError(f"etcdctl endpoint status gave unexpected output: {result.stdout[:200]}") from err

    def is_leader(self) -> bool:
        status = self.endpoint_status()
        return int(status["header"]["member_id"]) == int(status["leader"])

    def snapshot_save(self, path: Path) -> None:
        self.runner.run(self._client("snapshot", "save", str(path)), env=self.ENV, timeout=600).check()

    def snapshot_status(self, path: Path) -> SnapshotStatus:
        argv = [self.etcdutl, "snapshot", "status", str(path), "-w", "json"]
        result = self.runner.run(argv, env=self.ENV, timeout=120).check()
        try:
            doc = json.loads(result.stdout)
            return SnapshotStatus(int(doc["hash"]), int(doc["revision"]), int(doc["totalKey"]), int(doc["totalSize"]))
        except (ValueError, KeyError, TypeError) as err:
            raise SnapshotError(f"snapshot status of {path} unreadable: {result.stdout[:200]}") from err

    def snapshot_restore(self, path: Path, data_dir: Path, name: str, peer_url: str, cluster_token: str) -> None:
        argv = [
            self.etcdutl, "snapshot", "restore", str(path),
            "--data-dir", str(data_dir),
            "--name", name,
            "--initial-cluster", f"{name}={peer_url}",
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster-token", cluster_token,
            "--bump-revision", str(RESTORE_REVISION_BUMP),
            "--mark-compacted",
        ]  # fmt: skip
        self.runner.run(argv, env=self.ENV, timeout=600).check()

    def trial_restore(self, path: Path, scratch_parent: Path) -> None:
        """Restore into a throw-away data directory: the restore verifies the hash ``snapshot save`` appended."""
        scratch = Path(tempfile.mkdtemp(prefix="trial-restore-", dir=scratch_parent))
        trial_token = "trial-restore"  # noqa: S105 -- an etcd cluster token of a throw-away directory, no secret
        try:
            self.snapshot_restore(path, scratch / "member", "trial", "https://127.0.0.1:2380", trial_token)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Snapshots:
    def __init__(
        self,
        cfg: AgentConfig,
        settings: AgentSettings,
        s3: Any,
        etcdctl: Etcdctl,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.cfg = cfg
        self.settings = settings
        self.s3 = s3
        self.etcdctl = etcdctl
        self.now = now
        self.work_dir = settings.state_dir / "snapshots"

    @property
    def prefix(self) -> str:
        return f"snapshots/{self.cfg.cluster_name}/"

    # -- taking --------------------------------------------------------------------------------------
    def take_if_leader(self, generation: int, member_name: str) -> SnapshotObject | None:
        """One node at a time: only the current etcd leader snapshots. Returns what it uploaded."""
        if not self.etcdctl.is_leader():
            log(LOG, 20, "not the etcd leader; no snapshot from this node")
            return None
        return self.take(generation, member_name)

    def take(self, generation: int, member_name: str) -> SnapshotObject:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        taken_at = self.now()
        path = self.work_dir / f"etcd-{taken_at.strftime(TS_FORMAT)}.db"
        try:
            self.etcdctl.snapshot_save(path)
            status = self.etcdctl.snapshot_status(path)
            if status.total_key <= 0 or status.revision <= 0:
                raise SnapshotError(f"snapshot looks empty: {status}")
            key = snapshot_key(self.cfg.cluster_name, generation, taken_at, status.revision)
            self.s3.upload_file(
                str(path),
                self.cfg.snapshot_bucket,
                key,
                ExtraArgs={
                    "ServerSideEncryption": "aws:kms",
                    "SSEKMSKeyId": self.cfg.kms_key_id,
                    "ChecksumAlgorithm": "SHA256",  # S3's own checksum too, validated at download (ChecksumMode)
                    "Metadata": {
                        "sha256": file_sha256(path),
                        "taken-at": taken_at.astimezone(UTC).strftime(TS_FORMAT),
                        "cluster": self.cfg.cluster_name,
                        "generation": str(generation),
                        "revision": str(status.revision),
                        "hash": str(status.hash),
                        "total-key": str(status.total_key),
                        "member": member_name,
                    },
                },
            )
        finally:
            path.unlink(missing_ok=True)
        log(LOG, 20, "snapshot uploaded", key=key, revision=status.revision, total_key=status.total_key)
        obj = SnapshotObject.parse(key)
        assert obj is not None
        return obj

    # -- listing and retention ------------------------------------------------------------------------
    def list_all(self) -> list[SnapshotObject]:
        """All snapshots of this cluster, oldest first by the object's own time (LastModified), not its name."""
        found: list[SnapshotObject] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.cfg.snapshot_bucket, Prefix=self.prefix
        ):
            for item in page.get("Contents", []):
                obj = SnapshotObject.parse(item["Key"])
                if obj is not None:
                    found.append(replace(obj, stored_at=item["LastModified"].astimezone(UTC)))
        return sorted(found, key=lambda o: (o.order_time, o.generation, o.revision, o.key))

    def enforce_retention(self) -> list[str]:
        """Delete snapshots older than the retention period, but always keep the newest N."""
        snapshots = self.list_all()
        keep = set(o.key for o in snapshots[-self.settings.snapshot_keep_newest :])
        cutoff = self.now() - timedelta(days=self.cfg.snapshot_retention_days)
        doomed = [o.key for o in snapshots if o.key not in keep and o.age_time < cutoff]
        for key in doomed:
            self.s3.delete_object(Bucket=self.cfg.snapshot_bucket, Key=key)
        if doomed:
            log(LOG, 20, "snapshots expired", deleted=doomed)
        return doomed

    # -- restoring -----------------------------------------------------------------------------------
    def download_latest_good(
        self, dest_dir: Path, max_generation: int | None = None
    ) -> tuple[Path, SnapshotObject, SnapshotStatus]:
        """The newest snapshot (by LastModified) that is known good, of this cluster; older ones as fallback.

        ``max_generation``: the cluster-state item's generation; a snapshot claiming a later one is not this
        cluster's history. Raises :class:`SnapshotError` listing every refusal when none verifies.
        """
        dest_dir.mkdir(parents=True, exist_ok=True)
        refused: list[str] = []
        for obj in reversed(self.list_all()):
            path = dest_dir / Path(obj.key).name
            try:
                status = self._fetch_verified(obj, path, dest_dir, max_generation)
            except Exception as err:
                log(LOG, 30, "snapshot refused, trying an older one", key=obj.key, error=str(err))
                refused.append(f"{obj.key}: {err}")
                path.unlink(missing_ok=True)
                continue
            return path, obj, status
        detail = "; ".join(refused) if refused else "none found"
        raise SnapshotError(f"no good snapshot under s3://{self.cfg.snapshot_bucket}/{self.prefix} ({detail})")

    def _fetch_verified(
        self, obj: SnapshotObject, path: Path, scratch: Path, max_generation: int | None
    ) -> SnapshotStatus:
        bucket = self.cfg.snapshot_bucket
        meta = self.s3.head_object(Bucket=bucket, Key=obj.key).get("Metadata", {})
        cluster = meta.get("cluster")
        if cluster != self.cfg.cluster_name:
            raise SnapshotError(f"metadata names cluster {cluster!r}, not {self.cfg.cluster_name!r}")
        generation = meta.get("generation", "")
        if not generation.isdigit() or int(generation) != obj.generation:
            raise SnapshotError(f"metadata generation {generation!r} is not the key's {obj.generation}")
        if max_generation is not None and obj.generation > max_generation:
            raise SnapshotError(f"generation {obj.generation} is newer than the cluster's {max_generation}")
        recorded_sha = meta.get("sha256")
        if not recorded_sha:
            raise SnapshotError("no SHA-256 recorded at upload: its integrity cannot be verified")
        self.s3.download_file(bucket, obj.key, str(path), ExtraArgs={"ChecksumMode": "ENABLED"})
        actual_sha = file_sha256(path)
        if actual_sha != recorded_sha:
            raise SnapshotError(f"SHA-256 {actual_sha} differs from the {recorded_sha} recorded at upload")
        status = self.etcdctl.snapshot_status(path)
        recorded_hash = meta.get("hash")
        if recorded_hash is not None and recorded_hash != str(status.hash):
            raise SnapshotError(f"hash {status.hash} differs from the recorded {recorded_hash}")
        self.etcdctl.trial_restore(path, scratch)
        return status
