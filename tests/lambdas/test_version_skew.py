"""The version skew rule, one row per case: same minor (patch up), exactly +1 minor; never older, never +2.

The same rule guards synth (ClusterConfig with deployedKubernetesVersion); tests/agent/test_version_skew.py
covers the node-boot guard.
"""

from __future__ import annotations

import re

import pytest

from lambdas.common.version_skew import VersionSkewError, check_upgrade, parse_version, skew_problem
from stages.config import ClusterConfig, ConfigError

ALLOWED = [
    pytest.param("1.34.2", "1.34.2", id="same version (a plain replacement)"),
    pytest.param("1.34.2", "1.34.5", id="patch upgrade"),
    pytest.param("1.34.2", "1.35.0", id="one minor ahead, lower patch number"),
    pytest.param("1.34.2", "1.35.7", id="one minor ahead, higher patch number"),
    pytest.param("v1.34.2", "1.35.1", id="kubeadm's v prefix is accepted"),
    pytest.param("1.9.3", "1.10.0", id="minor compared as a number, not as text"),
]

REFUSED = [
    pytest.param("1.34.2", "1.34.1", "older", id="patch downgrade"),
    pytest.param("1.34.2", "1.33.9", "older", id="minor downgrade"),
    pytest.param("1.34.0", "1.32.0", "older", id="two minors older"),
    pytest.param("1.34.2", "1.36.0", "2 minor versions ahead", id="two minors ahead"),
    pytest.param("1.34.2", "1.37.3", "3 minor versions ahead", id="three minors ahead"),
    pytest.param("1.10.0", "1.9.99", "older", id="numeric minor: 1.9 is older than 1.10"),
    pytest.param("1.34.2", "2.0.0", "major version", id="major change"),
]


@pytest.mark.parametrize(("running", "new"), ALLOWED)
def test_allowed_versions_pass(running: str, new: str) -> None:
    assert skew_problem(running, new) is None
    check_upgrade(running, new)


@pytest.mark.parametrize(("running", "new", "why"), REFUSED)
def test_refused_versions_name_both_versions_and_the_rule(running: str, new: str, why: str) -> None:
    with pytest.raises(VersionSkewError) as err:
        check_upgrade(running, new)
    message = str(err.value)
    assert why in message
    assert str(parse_version(running)) in message and str(parse_version(new)) in message
    assert "exactly one minor version ahead" in message


def test_two_minors_ahead_names_the_next_step() -> None:
    with pytest.raises(VersionSkewError, match=r"first to 1\.35\.x"):
        check_upgrade("1.34.2", "1.36.0")


@pytest.mark.parametrize("bad", ["1.34", "latest", "", "1.34.2-rc.1", "v1.x.0"])
def test_malformed_versions_are_refused_not_guessed(bad: str) -> None:
    with pytest.raises(VersionSkewError, match="is not a Kubernetes version"):
        check_upgrade("1.34.2", bad)
    with pytest.raises(VersionSkewError, match="is not a Kubernetes version"):
        check_upgrade(bad, "1.34.2")


# -- at synth: ClusterConfig refuses a kubernetesVersion the deployed cluster may not move to ----------------


def _config(**values: str) -> ClusterConfig:
    return ClusterConfig.from_mapping(values)


@pytest.mark.parametrize(
    ("deployed", "new", "why"),
    [
        pytest.param("1.34.2", "1.36.0", "2 minor versions ahead", id="two minors ahead"),
        pytest.param("1.34.2", "1.33.9", "older", id="older minor"),
        pytest.param("1.34.2", "1.34.1", "older", id="older patch"),
    ],
)
def test_synth_refuses_a_forbidden_skew_naming_both_versions(deployed: str, new: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(kubernetesVersion=new, deployedKubernetesVersion=deployed)
    (problem,) = err.value.problems
    assert problem.startswith(f"'kubernetesVersion' = \"{new}\": refused by the version skew guard")
    assert f"Kubernetes {new} cannot join a cluster running {deployed}" in problem and why in problem


@pytest.mark.parametrize(("deployed", "new"), [("1.34.2", "1.34.2"), ("1.34.2", "1.34.3"), ("1.34.2", "1.35.0")])
def test_synth_accepts_a_same_minor_or_next_minor_version(deployed: str, new: str) -> None:
    config = _config(kubernetesVersion=new, deployedKubernetesVersion=deployed)
    assert (config.kubernetes_version, config.deployed_kubernetes_version) == (new, deployed)


def test_without_a_deployed_version_synth_skips_the_check() -> None:
    assert _config(kubernetesVersion="1.36.0").deployed_kubernetes_version is None


def test_a_malformed_deployed_version_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=re.escape("'deployedKubernetesVersion' = \"1.34\": must be the running")):
        _config(deployedKubernetesVersion="1.34")
