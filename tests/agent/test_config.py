from __future__ import annotations

import json
from pathlib import Path

import pytest

from node_agent.config import AgentConfig, AgentConfigError
from tests.agent.conftest import config_values


def test_a_complete_control_plane_file_parses_into_typed_fields(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(config_values()))
    cfg = AgentConfig.load(path)
    assert cfg.is_control_plane
    assert cfg.api_port == 6443
    assert cfg.control_plane_endpoint == "dk8s-demo-api-0123456789.elb.eu-west-1.amazonaws.com:6443"
    assert cfg.snapshot_retention_days == 7
    assert cfg.kms_key_id.startswith("arn:aws:kms:")


def test_a_worker_may_omit_the_control_plane_only_keys() -> None:
    values = config_values(role="worker")
    for key in ("snapshotBucket", "kmsKeyId", "pkiSecretName", "etcdClientSecretName"):
        del values[key]
    cfg = AgentConfig.from_mapping(values)
    assert not cfg.is_control_plane
    assert cfg.pki_secret_name == ""


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("clusterStateTable", None, "'clusterStateTable': missing"),
        ("role", "master", "'role' = \"master\": must be one of control-plane, worker"),
        ("apiPort", "6443", "'apiPort' = \"6443\": must be a whole number"),
        ("apiPort", True, "'apiPort' = true: must be a whole number"),
        ("podCidr", "10.244.0.1/16", "'podCidr'"),
        ("kubernetesVersion", "v1.34", "'kubernetesVersion'"),
        ("apiEndpoint", "http://nlb", "'apiEndpoint'"),
        ("snapshotRetentionDays", 0, "'snapshotRetentionDays' = 0"),
        ("kmsKeyId", "", "'kmsKeyId' = \"\": must be a non-empty string"),
    ],
)
def test_each_bad_value_is_reported_with_its_key(key: str, value: object, expected: str) -> None:
    values = config_values()
    if value is None:
        del values[key]
    else:
        values[key] = value
    with pytest.raises(AgentConfigError) as err:
        AgentConfig.from_mapping(values)
    assert any(expected in p for p in err.value.problems), err.value.problems


def test_all_problems_are_reported_at_once() -> None:
    values = config_values(apiPort=0)
    del values["region"]
    with pytest.raises(AgentConfigError) as err:
        AgentConfig.from_mapping(values)
    assert len(err.value.problems) == 2


def test_missing_file_and_malformed_json_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError, match="cannot be read"):
        AgentConfig.load(tmp_path / "absent.json")
    bad = tmp_path / "agent.json"
    bad.write_text("{not json")
    with pytest.raises(AgentConfigError, match="not valid JSON"):
        AgentConfig.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(AgentConfigError, match="top level must be a JSON object"):
        AgentConfig.load(bad)
