"""The one narrow seam to the host: every kubeadm/kubectl/etcdctl/systemctl/openssl call goes through it.

kubeadm, the kubelet and the API server cannot run on a build machine, so tests put a runner here that
records argv lists (and, in ``tests/agent/kubeadm_emulator.py``, reproduces kubeadm's etcd effects on
real etcd). Production uses :class:`SubprocessRunner`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from node_agent.errors import AgentError


class CommandFailedError(AgentError):
    def __init__(self, result: CommandResult) -> None:
        self.result = result
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        super().__init__(f"{' '.join(result.argv[:3])} ... exited {result.returncode}: {' | '.join(tail)}")


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check(self) -> CommandResult:
        if not self.ok:
            raise CommandFailedError(self)
        return self


class CommandRunner(Protocol):
    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float | None = None
    ) -> CommandResult: ...


class SubprocessRunner:
    """Runs argv directly (never a shell); ``env`` is added to the agent's environment."""

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float | None = None
    ) -> CommandResult:
        full_env = {**os.environ, **(env or {})}
        try:
            proc = subprocess.run(
                list(argv), capture_output=True, text=True, env=full_env, timeout=timeout, check=False
            )
        except FileNotFoundError as err:
            return CommandResult(tuple(argv), 127, "", str(err))
        except subprocess.TimeoutExpired as err:
            return CommandResult(tuple(argv), 124, str(err.stdout or ""), f"timed out after {timeout}s")
        return CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
