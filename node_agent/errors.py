"""Errors that end a launch. Each carries a reason that goes into the log line and the ABANDON decision."""

from __future__ import annotations


class AgentError(RuntimeError):
    """A launch step failed; the node abandons its launch hook with this reason."""


class UnknownClusterStateError(AgentError):
    """The cluster-state item holds a value this agent does not understand; it changes nothing."""


class SecretUnreadableError(AgentError):
    """A secret the node needs is missing, not readable or not in the expected JSON shape.

    ``not_written_yet``: the secret has no value or still holds the placeholder the stack created it with
    (not JSON / not the shape), so a worker may wait for the initialiser; access or decryption errors are not.
    """

    def __init__(self, message: str, *, not_written_yet: bool = False) -> None:
        super().__init__(message)
        self.not_written_yet = not_written_yet


class LeaseLostError(AgentError):
    """The bootstrap lease was lost (another node holds it now); stop before any further risky step."""
