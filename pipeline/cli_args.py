"""argparse types shared by the pipeline's and the twin's command lines: a number in a range, a JSON outputs file.

A flag that makes no sense (a negative margin switches the rollout's quorum guard off, a negative poll interval
crashes ``time.sleep`` mid-refresh, a negative count "succeeds" with nothing done) is refused when the command
line is parsed, before anything is started. argparse turns an :class:`argparse.ArgumentTypeError` raised by a
``type=`` callable into ``error: argument --flag: <message>`` and exit status 2 (Python's argparse
documentation, "type").
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path


def _range_text(low: float | None, high: float | None, *, low_open: bool) -> str:
    if high is None:
        return f"{'greater than' if low_open else 'at least'} {low}"
    if low is None:
        return f"at most {high}"
    return f"{'more than ' + str(low) + ' and at most' if low_open else 'from ' + str(low) + ' to'} {high}"


def bounded_int(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An integer in ``low..high`` (both inclusive; ``None``: unbounded on that side)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{value} is out of range: must be {_range_text(low, high, low_open=False)}"
            )
        return value

    parse.__name__ = "integer"  # argparse names the type in its "invalid <name> value" fallback
    return parse


def bounded_float(
    low: float | None = None, high: float | None = None, *, low_open: bool = False
) -> Callable[[str], float]:
    """A finite number in ``low..high`` (``low_open``: ``low`` itself excluded, e.g. a positive duration)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{value:g} is out of range: must be {_range_text(low, high, low_open=low_open)}"
            )
        return value

    parse.__name__ = "number"
    return parse


def positive_seconds(high: float | None = None) -> Callable[[str], float]:
    """A duration in seconds: more than 0 (a zero or negative wait is a busy loop or a crash), at most ``high``."""
    return bounded_float(0, high, low_open=True)


def stack_outputs_file(text: str) -> dict[str, str]:
    """``cdk deploy --outputs-file`` JSON: ``{stack: {OutputKey: value}}`` (or the outputs object itself).

    Returns the stack's outputs (the object holding ``ControlPlaneGroupNames``, else the top level). A missing,
    unreadable, truncated or non-object file is an argparse error naming the file and what is wrong with it.
    """
    path = Path(text)
    try:
        document = json.loads(path.read_text())
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise argparse.ArgumentTypeError(f"{path} is not JSON ({err})") from None
    if not isinstance(document, dict):
        raise argparse.ArgumentTypeError(f"{path} holds a JSON {type(document).__name__}, not an object of outputs")
    for value in document.values():  # `cdk deploy --outputs-file` nests outputs under the stack name
        if isinstance(value, dict) and "ControlPlaneGroupNames" in value:
            return {k: str(v) for k, v in value.items()}
    return {k: str(v) for k, v in document.items() if not isinstance(v, dict | list)}
