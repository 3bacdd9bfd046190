"""Reading an etcd status sample and judging it: quorum, learners, stale members."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lambdas.common.membership import INSTANCE_ID, quorum  # the one definition of identity and quorum

__all__ = ["INSTANCE_ID", "MemberView", "Sample", "parse_status", "quorum", "sentinel_value"]


@dataclass(frozen=True)
class MemberView:
    name: str
    is_learner: bool
    healthy: bool
    started: bool

    @property
    def instance_id(self) -> str | None:
        match = INSTANCE_ID.search(self.name)
        return match.group(0) if match else None


@dataclass(frozen=True)
class Sample:
    """One poll of the cluster's etcd status, reduced to what the canary judges."""

    at: float
    members: tuple[MemberView, ...]
    error: str | None = None

    @property
    def voters(self) -> int:
        return sum(1 for m in self.members if not m.is_learner)

    @property
    def healthy_voters(self) -> int:
        return sum(1 for m in self.members if not m.is_learner and m.healthy)

    @property
    def learners(self) -> int:
        return sum(1 for m in self.members if m.is_learner)

    @property
    def has_quorum(self) -> bool:
        return self.error is None and self.voters > 0 and self.healthy_voters >= quorum(self.voters)

    def stale_members(self, live_instances: set[str]) -> list[str]:
        """Members whose name carries an instance ID that is not a live control-plane instance."""
        return [m.name for m in self.members if m.instance_id is not None and m.instance_id not in live_instances]

    def to_json(self) -> dict[str, Any]:
        return {
            "at": round(self.at, 3),
            "members": len(self.members),
            "voters": self.voters,
            "healthy_voters": self.healthy_voters,
            "learners": self.learners,
            "has_quorum": self.has_quorum,
            "error": self.error,
        }


def _flag(member: dict[str, Any], *names: str, default: bool = False) -> bool:
    for name in names:
        if name in member:
            return bool(member[name])
    return default


def parse_status(at: float, status: Any) -> Sample:
    """Accept the ops function's status document (snake_case or camelCase member fields)."""
    if not isinstance(status, dict) or not isinstance(status.get("members"), list):
        return Sample(at=at, members=(), error=f"malformed status: {str(status)[:200]}")
    if status.get("error"):
        return Sample(at=at, members=(), error=str(status["error"]))
    members = []
    for raw in status["members"]:
        name = str(raw.get("name") or "")
        members.append(
            MemberView(
                name=name,
                is_learner=_flag(raw, "is_learner", "isLearner", "learner"),
                healthy=_flag(raw, "healthy"),
                started=_flag(raw, "started", default=bool(name)),
            )
        )
    return Sample(at=at, members=tuple(members))


def sentinel_value(response: Any) -> str | None:
    """The value the ops function returned for a get (``{"value": ...}``), or None if absent."""
    if isinstance(response, dict):
        value = response.get("value")
        return None if value is None else str(value)
    return None
