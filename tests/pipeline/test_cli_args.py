"""Every numeric flag of pipeline.rollout, pipeline.canary and twin.chaos is refused at parse time when it makes no
sense, and a bad ``--outputs`` file is a clear error, before any AWS call is made.

argparse behaviour relied on (Python documentation, argparse "type"): an ``ArgumentTypeError`` raised by a
``type=`` callable becomes ``error: argument --flag: <message>`` on stderr and ``SystemExit(2)``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.canary.__main__ import main as canary_main
from pipeline.cli_args import bounded_float, bounded_int, positive_seconds, stack_outputs_file
from pipeline.rollout import main as rollout_main
from twin import chaos


class NoAws:
    """Any AWS call fails the test: a refused command line starts nothing."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"AWS called ({name}) although the command line was refused")


def _rollout(argv: list[str]) -> int:
    return rollout_main(argv, autoscaling=NoAws(), lambda_client=NoAws())


def _chaos(argv: list[str]) -> int:
    return chaos.main(argv)


@pytest.fixture(autouse=True)
def _no_chaos_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the chaos run started although the command line was refused")

    monkeypatch.setattr(chaos, "run_chaos", refuse)
    monkeypatch.setenv("CONTROL_PLANE_GROUP_NAMES", "g0,g1,g2")
    monkeypatch.setenv("CLUSTER_OPS_FUNCTION_NAME", "ops")


BAD_FLAGS = [
    # rollout: the quorum guard cannot be switched off, nor a sleep go negative
    (_rollout, ["--min-margin", "-1"], "argument --min-margin: -1 is out of range: must be from 0 to 3"),
    (_rollout, ["--start-margin", "-1"], "argument --start-margin: -1 is out of range: must be from 1 to 3"),
    (_rollout, ["--start-margin", "0"], "argument --start-margin: 0 is out of range"),
    (_rollout, ["--poll-interval", "-1"], "argument --poll-interval: -1 is out of range: must be more than 0"),
    (_rollout, ["--poll-interval", "0"], "argument --poll-interval: 0 is out of range"),
    (_rollout, ["--poll-interval", "nan"], "argument --poll-interval: 'nan' is not a finite number"),
    (
        _rollout,
        ["--poll-interval", "11"],
        "argument --poll-interval: 11 is out of range: must be more than 0 and at most 10",
    ),
    (_rollout, ["--status-grace", "-5"], "argument --status-grace: -5 is out of range"),
    (_rollout, ["--group-timeout", "-1"], "argument --group-timeout: -1 is out of range"),
    (_rollout, ["--group-timeout", "inf"], "argument --group-timeout: 'inf' is not a finite number"),
    (_rollout, ["--control-plane-warmup", "-1"], "argument --control-plane-warmup: -1 is out of range"),
    (_rollout, ["--worker-warmup", "x"], "argument --worker-warmup: 'x' is not an integer"),
    (
        _rollout,
        ["--worker-min-healthy", "101"],
        "argument --worker-min-healthy: 101 is out of range: must be from 0 to 100",
    ),
    (_rollout, ["--worker-max-healthy", "99"], "argument --worker-max-healthy: 99 is out of range"),
    (_rollout, ["--min-margin", "2", "--start-margin", "1"], "--min-margin 2 is above --start-margin 1"),
    # canary
    (canary_main, ["--replacement-timeout", "-1"], "argument --replacement-timeout: -1 is out of range"),
    (canary_main, ["--poll-interval", "-0.5"], "argument --poll-interval: -0.5 is out of range"),
    (canary_main, ["--expected-voters", "-3"], "argument --expected-voters: -3 is out of range: must be from 3 to 7"),
    (canary_main, ["--expected-voters", "4"], "--expected-voters: 4 is even"),
    # chaos
    (_chaos, ["--count", "-3"], "argument --count: -3 is out of range: must be from 1 to 1000"),
    (_chaos, ["--count", "0"], "argument --count: 0 is out of range"),
    (_chaos, ["--seed", "-1"], "argument --seed: -1 is out of range: must be at least 0"),
]


@pytest.mark.parametrize(
    ("main", "argv", "message"), BAD_FLAGS, ids=[f"{m.__name__}{' '.join(a)}" for m, a, _ in BAD_FLAGS]
)
def test_a_flag_that_makes_no_sense_is_refused_at_parse_time(
    main: Callable[[list[str]], int], argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("main", [_rollout, canary_main], ids=["rollout", "canary"])
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ('{"dk8s-demo-cluster": {"ControlPlaneGroupNames": "g0,g1', "is not JSON"),
        ('["ControlPlaneGroupNames"]', "holds a JSON list, not an object of outputs"),
    ],
    ids=["missing", "truncated", "not an object"],
)
def test_a_missing_or_broken_outputs_file_is_a_clear_error_naming_it(
    main: Callable[[list[str]], int], content: str | None, message: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    path = tmp_path / "outputs.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["--outputs", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"argument --outputs: {message}" in err.replace(f"{path} ", "") and str(path) in err


def test_the_outputs_of_cdk_deploy_are_read_from_under_the_stack_name(tmp_path: Path) -> None:
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps({"Other": {"X": "1"}, "dk8s-demo-cluster": {"ControlPlaneGroupNames": "a,b", "N": 3}}))
    assert stack_outputs_file(str(path)) == {"ControlPlaneGroupNames": "a,b", "N": "3"}


def test_the_range_types_accept_their_bounds_and_refuse_beyond() -> None:
    count = bounded_int(1, 5)
    assert (count("1"), count("5")) == (1, 5)
    for bad in ("0", "6", "1.5", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            count(bad)
    seconds = positive_seconds(10)
    assert (seconds("0.001"), seconds("10")) == (0.001, 10.0)
    with pytest.raises(argparse.ArgumentTypeError, match="more than 0"):
        seconds("0")
    assert bounded_float(0)("0") == 0.0, "a closed lower bound includes it"
