"""Every control-plane instance lost at once (quorum destroyed by design): the replacements prove all previous
members terminated, one restores the latest snapshot from S3, and every write acknowledged before that
snapshot is readable afterwards."""

from __future__ import annotations

import pytest

from twin.chaos import Chaos
from twin.cluster import Twin


@pytest.mark.twin_options(workers=0, snapshots=True, snapshot_interval_minutes=5)
def test_all_control_planes_lost_restores_the_latest_snapshot_with_every_write_before_it(real_twin: Twin) -> None:
    chaos = Chaos(real_twin, seed=3, progress=lambda line: None, dr=True)
    chaos.weights = {"all-lost-dr": 1}
    real_twin.wait_bootstrapped(90)
    obs = real_twin.observer()
    assert obs is not None
    obs.put(real_twin.etcd_endpoints(), "before/first", "1")
    # The snapshot timer runs every snapshotIntervalMinutes (scaled): two periods and a margin.
    real_twin.wait_for("a snapshot in S3", lambda: bool(chaos._snapshots()), 2 * real_twin.timers["snapshot"] + 10)
    result = chaos.run(3)
    assert result.violations == []
    assert result.replacements[0].ok and result.replacements[0].min_healthy_voters == 0, "quorum was really lost"
    assert len(real_twin.restorers()) == 1 and len(real_twin.initialisers()) == 1
    assert result.acked_writes > 0 and result.lost_writes == 0
    required = [w for w in chaos.writer.acked if chaos._required(w)]  # type: ignore[union-attr]
    assert required, "some acknowledged writes predate the restored snapshot"
    assert obs.get_prefix(real_twin.etcd_endpoints(), "before/") == {"before/first": "1"}
