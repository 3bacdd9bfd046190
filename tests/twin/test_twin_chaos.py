"""Chaos on the twin: the bounded run CI takes (about 20 replacements over every scenario) and the long one
(``-m chaos_long``; ``make chaos N=500`` for the full run)."""

from __future__ import annotations

import os

import pytest

from twin.chaos import Chaos
from twin.cluster import Twin


def _run(twin: Twin, count: int, seed: int, dr: bool) -> None:
    lines: list[str] = []
    chaos = Chaos(twin, seed=seed, progress=lines.append, dr=dr)
    result = chaos.run(count)
    summary = result.summary()
    print("\n".join(lines[-40:]), summary)
    assert result.violations == [], result.violations[:10]
    assert (
        summary["survived"] == summary["replacements"] and sum(len(r.terminated) for r in result.replacements) >= count
    )
    assert summary["quorum_lost_samples"] == 0 or dr
    assert result.lost_writes == 0 and result.acked_writes > 0
    assert len(twin.initialisers()) == 1


@pytest.mark.twin_options(workers=0)
def test_bounded_chaos_keeps_every_invariant_over_about_20_replacements(real_twin: Twin) -> None:
    _run(real_twin, count=int(os.environ.get("TWIN_CHAOS_COUNT", "20")), seed=20261125, dr=False)


@pytest.mark.chaos_long
@pytest.mark.twin_options(workers=0, snapshots=True, snapshot_interval_minutes=5)
def test_long_chaos_with_disaster_recovery(real_twin: Twin) -> None:
    _run(real_twin, count=int(os.environ.get("TWIN_CHAOS_COUNT", "150")), seed=7, dr=True)
