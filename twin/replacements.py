"""The twin's own account of each control-plane replacement, from its timeline (independent of the canary)."""

from __future__ import annotations

from typing import Any

from twin.measure import Replacement
from twin.observe import Timeline


def replacements_from_timeline(timeline: Timeline, desired: int) -> list[Replacement]:
    """One :class:`Replacement` per control-plane termination: healthy again = the first sample after the
    termination, with the terminated member gone, ``desired`` healthy voters, no learner and ``desired`` members."""
    with timeline.lock:
        events = list(timeline.events)
        samples = list(timeline.samples)
    out: list[Replacement] = []
    for e in events:
        if e["kind"] != "termination" or e.get("role") != "control-plane":
            continue
        rep = Replacement(e["instance_id"], [e["instance_id"]], e["t"])
        for s in samples:
            gone = not any(n.startswith(e["instance_id"]) for n in s.names)
            if s.t > e["t"] and gone and s.healthy_voters == desired and s.learners == 0 and s.members == desired:
                rep.healthy_at = s.t
                rep.ok = True
                break
        rep.measure([s for s in samples if s.t >= e["t"]])
        out.append(rep)
    return out


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A plain text table: ``columns`` are (key, heading)."""
    cells = [[h for _, h in columns]] + [[str(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
