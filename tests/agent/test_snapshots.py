"""Snapshot keys, retention keeping the newest N, and DR choosing only a known-good snapshot of this cluster.

The restore tests use real etcd 3.5.30 snapshots (``etcdctl snapshot save`` of a live etcd) that they damage, on
moto S3. What they model of etcd: ``etcdctl snapshot save`` appends a SHA-256 of the database to the file and
``etcdutl snapshot restore`` refuses a file whose hash does not match or is missing unless ``--skip-hash-check``
(etcd op-guide "Disaster recovery": "The integrity hash is checked when restoring"; etcd
``server/storage/backend``/``etcdutl/snapshot/v3_snapshot.go`` ``saveDB``), while ``etcdutl snapshot status``
reads a small damaged database without complaint (issue 15, measured).
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from node_agent.config import AgentConfig
from node_agent.etcd import EtcdTls
from node_agent.runner import CommandResult, SubprocessRunner
from node_agent.snapshots import Etcdctl, SnapshotError, SnapshotObject, Snapshots, snapshot_key
from tests.agent.conftest import config_values
from tests.agent.harness import fast_settings

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
TLS = EtcdTls(Path("/pki/etcd/ca.crt"), Path("/pki/c.crt"), Path("/pki/c.key"))


class ScriptedEtcdctl:
    """Plays etcdctl: save writes a file, status answers with a hash; the calls are recorded."""

    def __init__(self, leader: bool = True, bad_files: tuple[str, ...] = ()) -> None:
        self.leader = leader
        self.bad = bad_files
        self.calls: list[list[str]] = []

    def run(self, argv: Any, *, env: Any = None, timeout: Any = None) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        assert env == {"ETCDCTL_API": "3"}
        if "endpoint" in argv:
            leader = 7 if self.leader else 8
            out = f'[{{"Endpoint":"e","Status":{{"header":{{"member_id":7}},"leader":{leader}}}}}]'
            return CommandResult(tuple(argv), 0, out)
        if argv[-3:-1] == ["snapshot", "save"]:
            Path(argv[-1]).write_bytes(b"etcd-db")
            return CommandResult(tuple(argv), 0)
        if "status" in argv:
            path = argv[3]
            if any(b in path for b in self.bad):
                return CommandResult(tuple(argv), 1, "", "snapshot file integrity check failed")
            return CommandResult(tuple(argv), 0, '{"hash":1234,"revision":99,"totalKey":12,"totalSize":4096}')
        raise AssertionError(argv)


def _snapshots(aws: dict[str, Any], tmp_path: Path, runner: ScriptedEtcdctl, **cfg: Any) -> Snapshots:
    config = AgentConfig.from_mapping(config_values(kmsKeyId=aws["kms_key_id"], **cfg))
    etcdctl = Etcdctl(runner, TLS, "https://10.0.0.1:2379")
    return Snapshots(config, fast_settings(tmp_path), aws["s3"], etcdctl, now=lambda: NOW)


def test_keys_sort_by_time_across_generations() -> None:
    keys = [
        snapshot_key("demo", 9, NOW - timedelta(days=2), 5),
        snapshot_key("demo", 10, NOW - timedelta(days=1), 3),
        snapshot_key("demo", 10, NOW, 40),
    ]
    assert keys == sorted(keys)
    assert keys[2] == "snapshots/demo/000010/20261125T120000Z-40.db"
    parsed = SnapshotObject.parse(keys[2])
    assert parsed is not None and (parsed.generation, parsed.revision, parsed.taken_at) == (10, 40, NOW)


def test_the_leader_saves_verifies_and_uploads_with_sse_kms(aws: dict[str, Any], tmp_path: Path) -> None:
    runner = ScriptedEtcdctl()
    snaps = _snapshots(aws, tmp_path, runner)
    obj = snaps.take_if_leader(generation=1, member_name="i-0abc.eu-west-1.compute.internal")
    assert obj is not None and obj.key == "snapshots/demo/000001/20261125T120000Z-99.db"
    head = aws["s3"].head_object(Bucket=snaps.cfg.snapshot_bucket, Key=obj.key)
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"] == aws["kms_key_id"]
    assert head["Metadata"] == {
        "cluster": "demo", "generation": "1", "revision": "99", "hash": "1234", "total-key": "12",
        "member": "i-0abc.eu-west-1.compute.internal",
        "sha256": hashlib.sha256(b"etcd-db").hexdigest(), "taken-at": "20261125T120000Z",
    }  # fmt: skip
    tls = ["--cacert", "/pki/etcd/ca.crt", "--cert", "/pki/c.crt", "--key", "/pki/c.key"]
    save = next(c for c in runner.calls if "save" in c)
    assert save[:-1] == ["etcdctl", "--endpoints", "https://10.0.0.1:2379", *tls, "snapshot", "save"]
    status = next(c for c in runner.calls if "status" in c and "snapshot" in c)
    assert status[:3] == ["etcdutl", "snapshot", "status"] and status[-2:] == ["-w", "json"]
    assert not list((tmp_path / "state" / "snapshots").iterdir()), "the local file is removed after upload"


def test_a_follower_takes_no_snapshot(aws: dict[str, Any], tmp_path: Path) -> None:
    runner = ScriptedEtcdctl(leader=False)
    assert _snapshots(aws, tmp_path, runner).take_if_leader(1, "n") is None
    assert not any("save" in c for c in runner.calls)


def test_retention_deletes_old_snapshots_but_always_keeps_the_newest_three(aws: dict[str, Any], tmp_path: Path) -> None:
    snaps = _snapshots(aws, tmp_path, ScriptedEtcdctl(), snapshotRetentionDays=7)
    ages = [30, 20, 10, 8, 6, 1, 0]  # days
    keys = [snapshot_key("demo", 1, NOW - timedelta(days=d), 100 - d) for d in ages]
    other = "snapshots/other-cluster/000001/20200101T000000Z-1.db"
    for key in [*keys, other]:
        aws["s3"].put_object(Bucket=snaps.cfg.snapshot_bucket, Key=key, Body=b"x")
    deleted = snaps.enforce_retention()
    assert sorted(deleted) == sorted(keys[:4])
    assert [o.key for o in snaps.list_all()] == keys[4:]
    # All old: still the newest three stay.
    for key in keys[:4]:
        aws["s3"].put_object(Bucket=snaps.cfg.snapshot_bucket, Key=key, Body=b"x")
    old_snaps = _snapshots(aws, tmp_path, ScriptedEtcdctl(), snapshotRetentionDays=1)
    old_snaps.now = lambda: NOW + timedelta(days=365)
    old_snaps.enforce_retention()
    assert [o.key for o in old_snaps.list_all()] == keys[-3:]
    assert aws["s3"].head_object(Bucket=snaps.cfg.snapshot_bucket, Key=other), "another cluster's objects untouched"


class RealEtcdutl:
    """Real etcdutl (status, restore) through the agent's SubprocessRunner; ``snapshot save`` hands over the real
    snapshot the fixture took, as etcdctl would write it."""

    def __init__(self, snapshot: bytes) -> None:
        self.snapshot = snapshot
        self.real = SubprocessRunner()
        self.restores: list[list[str]] = []

    def run(self, argv: Any, *, env: Any = None, timeout: Any = None) -> CommandResult:
        argv = list(argv)
        if argv[0] == "etcdctl" and argv[-2] == "save":
            Path(argv[-1]).write_bytes(self.snapshot)
            return CommandResult(tuple(argv), 0)
        assert argv[0] == "etcdutl", argv
        if "restore" in argv:
            self.restores.append(argv)
        return self.real.run(argv, env=env, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def real_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bytes]:
    """A snapshot of a live single-member etcd holding 50 keys."""
    if shutil.which("etcd") is None or shutil.which("etcdutl") is None:
        pytest.skip("etcd 3.5 not installed (make setup)")
    work = tmp_path_factory.mktemp("etcd")
    client, peer = f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        ["etcd", "--data-dir", str(work / "data"), "--listen-client-urls", client, "--advertise-client-urls", client,
         "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", f"default={peer}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        ctl = ["etcdctl", "--endpoints", client]
        deadline = time.monotonic() + 30
        while subprocess.run([*ctl, "endpoint", "health"], check=False, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "etcd did not start"
            time.sleep(0.2)
        for i in range(50):
            subprocess.run([*ctl, "put", f"/registry/k{i:03d}", f"value-{i}"], check=True, capture_output=True)
        subprocess.run([*ctl, "snapshot", "save", str(work / "snap.db")], check=True, capture_output=True)
        yield (work / "snap.db").read_bytes()
    finally:
        proc.kill()
        proc.wait()


def _uploader(aws: dict[str, Any], tmp_path: Path, snapshot: bytes, at: datetime, **cfg: Any) -> Snapshots:
    snaps = _snapshots(aws, tmp_path, RealEtcdutl(snapshot), **cfg)  # type: ignore[arg-type]
    snaps.now = lambda: at
    return snaps


def _flip_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _overwrite_body(aws: dict[str, Any], bucket: str, key: str, body: bytes) -> None:
    """Damage at rest: the same metadata (so the same recorded checksum) over different bytes."""
    head = aws["s3"].head_object(Bucket=bucket, Key=key)
    aws["s3"].put_object(Bucket=bucket, Key=key, Body=body, Metadata=head["Metadata"])


def test_the_upload_records_an_end_to_end_sha256(aws: dict[str, Any], tmp_path: Path, real_snapshot: bytes) -> None:
    """The whole file's SHA-256, independent of how the upload was split into parts (S3 user guide "Checking
    object integrity in Amazon S3": a multipart object's checksum is a checksum of its parts' checksums)."""
    snaps = _uploader(aws, tmp_path, real_snapshot, NOW)
    obj = snaps.take(generation=1, member_name="m")
    head = aws["s3"].head_object(Bucket=snaps.cfg.snapshot_bucket, Key=obj.key, ChecksumMode="ENABLED")
    digest = hashlib.sha256(real_snapshot).digest()
    assert head["Metadata"]["sha256"] == digest.hex()
    assert head["Metadata"]["taken-at"] == "20261125T120000Z"
    assert head["ChecksumSHA256"] == base64.b64encode(digest).decode(), "S3's own SHA-256, asked for at upload"


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) - 40], id="truncated"),
        pytest.param(lambda b: _flip_byte(b, len(b) // 2), id="byte flipped"),
    ],
)
def test_a_snapshot_damaged_at_rest_is_refused_and_the_next_newest_good_one_restored(
    aws: dict[str, Any], tmp_path: Path, real_snapshot: bytes, damage: Callable[[bytes], bytes]
) -> None:
    good = _uploader(aws, tmp_path, real_snapshot, NOW - timedelta(hours=1)).take(1, "m")
    time.sleep(1.1)  # LastModified has one-second resolution
    newest = _uploader(aws, tmp_path, real_snapshot, NOW).take(1, "m")
    bucket = _snapshots(aws, tmp_path, ScriptedEtcdctl()).cfg.snapshot_bucket
    _overwrite_body(aws, bucket, newest.key, damage(real_snapshot))
    restorer = _uploader(aws, tmp_path, real_snapshot, NOW)
    path, obj, status = restorer.download_latest_good(tmp_path / "restore", max_generation=1)
    assert obj.key == good.key and path.read_bytes() == real_snapshot and status.total_key >= 50


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) - 40], id="truncated"),
        pytest.param(lambda b: _flip_byte(b, len(b) // 2), id="byte flipped"),
    ],
)
def test_a_snapshot_damaged_before_upload_fails_the_trial_restore_and_falls_back(
    aws: dict[str, Any], tmp_path: Path, real_snapshot: bytes, damage: Callable[[bytes], bytes]
) -> None:
    """The checksum matches what was uploaded, so only the trial restore (etcd's own hash) can tell."""
    good = _uploader(aws, tmp_path, real_snapshot, NOW - timedelta(hours=1)).take(1, "m")
    time.sleep(1.1)
    damaged = damage(real_snapshot)
    restorer = _uploader(aws, tmp_path, real_snapshot, NOW)
    # Uploaded with take()'s metadata, checksum of the damaged bytes (take() itself may refuse it: ``snapshot
    # status`` panics on some byte flips, in bbolt's page check, and passes on others).
    bad_key = snapshot_key("demo", 1, NOW, 99)
    meta = {"cluster": "demo", "generation": "1", "sha256": hashlib.sha256(damaged).hexdigest()}
    restorer.s3.put_object(Bucket=restorer.cfg.snapshot_bucket, Key=bad_key, Body=damaged, Metadata=meta)
    path, obj, _ = restorer.download_latest_good(tmp_path / "restore")
    assert obj.key == good.key != bad_key and path.read_bytes() == real_snapshot
    runner = restorer.etcdctl.runner
    assert isinstance(runner, RealEtcdutl) and Path(good.key).name in runner.restores[-1][3], "chosen after a trial"
    assert not list((tmp_path / "restore").glob("trial-restore-*")), "scratch directories are removed"


def test_only_damaged_snapshots_means_no_restore_naming_each_refusal(
    aws: dict[str, Any], tmp_path: Path, real_snapshot: bytes
) -> None:
    snaps = _uploader(aws, tmp_path, real_snapshot[:-40], NOW)
    bad = snaps.take(1, "m")
    with pytest.raises(SnapshotError, match="no good snapshot") as err:
        snaps.download_latest_good(tmp_path / "restore")
    assert bad.key in str(err.value) and "etcdutl" in str(err.value)


def test_another_clusters_snapshot_under_this_prefix_is_refused(
    aws: dict[str, Any], tmp_path: Path, real_snapshot: bytes
) -> None:
    good = _uploader(aws, tmp_path, real_snapshot, NOW - timedelta(hours=1)).take(1, "m")
    time.sleep(1.1)
    foreign = _uploader(aws, tmp_path, real_snapshot, NOW, clusterName="other").take(1, "m")
    bucket = _snapshots(aws, tmp_path, ScriptedEtcdctl()).cfg.snapshot_bucket
    # Copied under this cluster's prefix, metadata (cluster "other") and checksum intact.
    planted = snapshot_key("demo", 1, NOW, foreign.revision)
    aws["s3"].copy_object(Bucket=bucket, Key=planted, CopySource={"Bucket": bucket, "Key": foreign.key})
    _, obj, _ = _uploader(aws, tmp_path, real_snapshot, NOW).download_latest_good(tmp_path / "restore")
    assert obj.key == good.key


def test_a_snapshot_of_a_later_generation_than_the_cluster_is_refused(
    aws: dict[str, Any], tmp_path: Path, real_snapshot: bytes
) -> None:
    good = _uploader(aws, tmp_path, real_snapshot, NOW - timedelta(hours=1)).take(2, "m")
    time.sleep(1.1)
    _uploader(aws, tmp_path, real_snapshot, NOW).take(3, "m")
    restorer = _uploader(aws, tmp_path, real_snapshot, NOW)
    assert restorer.download_latest_good(tmp_path / "r1", max_generation=2)[1].key == good.key
    assert restorer.download_latest_good(tmp_path / "r2", max_generation=3)[1].key != good.key


def test_a_snapshot_without_a_recorded_checksum_is_refused(
    aws: dict[str, Any], tmp_path: Path, real_snapshot: bytes
) -> None:
    snaps = _uploader(aws, tmp_path, real_snapshot, NOW)
    key = snapshot_key("demo", 1, NOW, 99)
    meta = {"cluster": "demo", "generation": "1"}
    aws["s3"].put_object(Bucket=snaps.cfg.snapshot_bucket, Key=key, Body=real_snapshot, Metadata=meta)
    with pytest.raises(SnapshotError, match="no SHA-256 recorded"):
        snaps.download_latest_good(tmp_path / "restore")


def test_newest_is_the_objects_own_time_not_a_future_date_in_its_key(
    aws: dict[str, Any], tmp_path: Path, real_snapshot: bytes
) -> None:
    future = _uploader(aws, tmp_path, real_snapshot, NOW + timedelta(days=3650)).take(1, "m")
    time.sleep(1.1)
    newer = _uploader(aws, tmp_path, real_snapshot, NOW).take(1, "m")
    restorer = _uploader(aws, tmp_path, real_snapshot, NOW)
    assert [o.key for o in restorer.list_all()] == [future.key, newer.key]
    assert restorer.download_latest_good(tmp_path / "restore")[1].key == newer.key


def test_the_backup_age_metric_ages_the_newest_snapshot_from_its_upload_not_its_key() -> None:
    """A key dated in the future (a clock-skewed writer, or a forged object) must not report a fresh backup: the
    BackupAge alarm reads LastSnapshotAgeSeconds, so the age comes from S3's LastModified (the object's own time)."""
    from types import SimpleNamespace

    from node_agent.bootstrap import Agent

    uploaded = datetime.now(UTC) - timedelta(hours=3)
    future_key = SnapshotObject("snapshots/c/000001/29990101T000000Z-5.db", 1, datetime(2999, 1, 1, tzinfo=UTC), 5,
                                stored_at=uploaded)  # fmt: skip
    emitted: list[tuple[str, float]] = []
    agent = SimpleNamespace(_metric_value=lambda name, value, unit="Count": emitted.append((name, value)))
    Agent._report_snapshot_age(agent, SimpleNamespace(list_all=lambda: [future_key]))  # type: ignore[arg-type]
    ((name, age),) = emitted
    assert name == "LastSnapshotAgeSeconds" and 3 * 3600 - 60 < age < 3 * 3600 + 60, age
