"""Snapshot keys sort by time, retention keeps the newest N whatever their age, restore skips bad files."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from node_agent.config import AgentConfig
from node_agent.etcd import EtcdTls
from node_agent.runner import CommandResult
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


def test_restore_takes_the_newest_snapshot_that_verifies(aws: dict[str, Any], tmp_path: Path) -> None:
    runner = ScriptedEtcdctl(bad_files=("T120000Z",))
    snaps = _snapshots(aws, tmp_path, runner)
    good = snapshot_key("demo", 1, NOW - timedelta(hours=1), 90)
    bad = snapshot_key("demo", 1, NOW, 99)
    for key in (good, bad):
        aws["s3"].put_object(Bucket=snaps.cfg.snapshot_bucket, Key=key, Body=b"db", Metadata={"hash": "1234"})
    path, obj, status = snaps.download_latest_good(tmp_path / "restore")
    assert obj.key == good and path.read_bytes() == b"db" and status.revision == 99


def test_restore_rejects_a_hash_mismatch_and_fails_when_nothing_verifies(aws: dict[str, Any], tmp_path: Path) -> None:
    snaps = _snapshots(aws, tmp_path, ScriptedEtcdctl())
    key = snapshot_key("demo", 1, NOW, 99)
    aws["s3"].put_object(Bucket=snaps.cfg.snapshot_bucket, Key=key, Body=b"db", Metadata={"hash": "999"})
    with pytest.raises(SnapshotError, match="no good snapshot"):
        snaps.download_latest_good(tmp_path / "restore")
