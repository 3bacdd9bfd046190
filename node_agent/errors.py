"""Errors that end a launch. Each carries a reason that goes into the log line and the ABANDON decision."""

from __future__ import annotations


class AgentError(RuntimeError):
    """A launch step failed; the node abandons its launch hook with this reason."""


class UnknownClusterStateError(AgentError):
    """The cluster-state item holds a value this agent does not understand; it changes nothing."""


class SecretUnreadableError(AgentError):
    """A secret the node needs is missing, not readable or not in the expected JSON shape."""


class LeaseLostError(AgentError):
    """The bootstrap lease was lost (another node holds it now); stop before any further risky step."""
