"""The Image Builder component documents: schema, shellcheck, and test phases that fail when something is missing."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from imagebuilder.versions import PLACEHOLDER, Versions, component_files, load_versions, render
from tests.imagebuilder.components import bash_scripts, created_files, documents, rendered, repo_path, steps

# The AWSTOE component document schema (docs: "Document schema and definitions", "Action modules"),
# restricted to the actions these components use.
_STEP_NAME = {"type": "string", "pattern": "^[A-Za-z0-9]+$", "maxLength": 128}
_COMMON = {
    "name": _STEP_NAME,
    "onFailure": {"enum": ["Abort", "Continue", "Ignore"]},
    "timeoutSeconds": {"type": "integer", "minimum": -1, "maximum": 86400},
    "maxAttempts": {"type": "integer", "minimum": 1, "maximum": 10},
}
STEP_SCHEMA: dict[str, Any] = {
    "oneOf": [
        {
            "type": "object",
            "properties": {
                **_COMMON,
                "action": {"const": "ExecuteBash"},
                "inputs": {
                    "type": "object",
                    "properties": {"commands": {"type": "array", "minItems": 1, "items": {"type": "string"}}},
                    "required": ["commands"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "action", "inputs"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                **_COMMON,
                "action": {"const": "S3Download"},
                "inputs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "source": {"type": "string", "pattern": "^s3://[a-z0-9.-]+/.+"},
                            "destination": {"type": "string", "pattern": "^/"},
                            "overwrite": {"type": "boolean"},
                            "expectedBucketOwner": {"type": "string"},
                        },
                        "required": ["source", "destination"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["name", "action", "inputs"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                **_COMMON,
                "action": {"const": "CreateFile"},
                "inputs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "path": {"type": "string", "pattern": "^/"},
                            "content": {"type": "string", "minLength": 1},
                            "overwrite": {"type": "boolean"},
                        },
                        "required": ["path", "content"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["name", "action", "inputs"],
            "additionalProperties": False,
        },
    ]
}
DOCUMENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9-]+$"},
        "description": {"type": "string", "minLength": 1, "maxLength": 1024},
        "schemaVersion": {"enum": [1.0, "1.0"]},
        "phases": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"enum": ["build", "validate", "test"]},
                    "steps": {"type": "array", "minItems": 1, "items": STEP_SCHEMA},
                },
                "required": ["name", "steps"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "description", "schemaVersion", "phases"],
    "additionalProperties": False,
}
EXPECTED_COMPONENTS = {
    "10-kernel.yaml",
    "20-container-runtime.yaml",
    "30-kubernetes.yaml",
    "40-images.yaml",
    "50-node-agent.yaml",
    "60-ssm-agent.yaml",
    "65-cloudwatch-agent.yaml",
    "70-hardening.yaml",
}


@pytest.fixture(scope="module")
def versions() -> Versions:
    return load_versions()


def test_the_components_the_issue_asks_for_exist() -> None:
    assert {path.name for path in component_files()} == EXPECTED_COMPONENTS


@pytest.mark.parametrize("name", sorted(EXPECTED_COMPONENTS))
def test_component_validates_against_the_document_schema(versions: Versions, name: str) -> None:
    document = documents(versions)[name]
    jsonschema.validate(document, DOCUMENT_SCHEMA)
    phase_names = [phase["name"] for phase in document["phases"]]
    assert len(phase_names) == len(set(phase_names)), "phase names must be unique"
    for phase in document["phases"]:
        names = [step["name"] for step in phase["steps"]]
        assert len(names) == len(set(names)), f"step names must be unique within {phase['name']}"


def test_the_schema_rejects_a_malformed_step(versions: Versions) -> None:
    document = documents(versions)["10-kernel.yaml"]
    document["phases"][0]["steps"][0]["action"] = "ExecuteBahs"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, DOCUMENT_SCHEMA)


@pytest.mark.parametrize("name", sorted(EXPECTED_COMPONENTS))
def test_every_component_has_build_validate_and_test_phases(versions: Versions, name: str) -> None:
    phases = [phase["name"] for phase in documents(versions)[name]["phases"]]
    assert phases == ["build", "validate", "test"]


@pytest.mark.parametrize("name", sorted(EXPECTED_COMPONENTS))
def test_every_check_phase_fails_loudly(versions: Versions, name: str) -> None:
    # validate and test phases run under `set -e` and say what is missing before they exit non-zero.
    for phase in ("validate", "test"):
        scripts = [s for where, s in bash_scripts(versions, phase) if where.startswith(name + ":")]
        assert scripts, f"{name} has no {phase} script"
        for script in scripts:
            assert script.startswith("set -euo pipefail"), script[:60]
            assert re.search(r"exit (1|\"\$missing\")", script), f"{name} {phase} never fails"


def test_every_placeholder_is_filled(versions: Versions) -> None:
    for name, text in rendered(versions).items():
        assert not PLACEHOLDER.search(text), name


def test_an_unknown_placeholder_is_an_error() -> None:
    with pytest.raises(KeyError, match="NOT_A_VERSION"):
        render("echo @@NOT_A_VERSION@@", {"KUBERNETES_VERSION": "1.34.2"})


def test_every_embedded_script_passes_shellcheck(versions: Versions, tmp_path: Path) -> None:
    scripts = bash_scripts(versions)
    assert len(scripts) >= 20
    files = []
    for index, (where, script) in enumerate(scripts):
        path = tmp_path / f"{index:02d}-{re.sub(r'[^A-Za-z0-9]+', '-', where)}.sh"
        path.write_text("#!/bin/bash\n" + script)
        files.append(path)
    result = subprocess.run(["shellcheck", "-s", "bash", *map(str, files)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_the_node_scripts_pass_shellcheck() -> None:
    scripts = [p for p in repo_path("imagebuilder", "systemd").iterdir() if p.suffix not in (".service", ".timer")]
    assert {p.name for p in scripts} == {"dedicated-k8s-agent", "dedicated-k8s-enable-timers"}
    result = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_downloads_are_https_and_checksum_verified(versions: Versions) -> None:
    for where, script in bash_scripts(versions, "build"):
        if "fetch " not in script:
            continue
        assert "--proto '=https'" in script, where
        assert "sha256sum --check --strict" in script, where
        assert "http://" not in script, where


def test_containerd_pins_the_pre_pulled_pause_image_and_systemd_cgroups(versions: Versions) -> None:
    (script,) = [s for where, s in bash_scripts(versions, "build") if where.endswith("ConfigureContainerd")]
    assert f"= '{versions.pause_image}'" in script
    assert "SystemdCgroup = true" in script
    assert versions.pause_image in versions.images


def test_images_component_pulls_and_checks_exactly_the_image_list(versions: Versions) -> None:
    scripts = dict(bash_scripts(versions))
    pull = scripts["40-images.yaml:build/PullImages"]
    assert f"for image in {' '.join(versions.images)}; do" in pull
    kubeadm = scripts["40-images.yaml:build/KubeadmAgreesWithVersionsFile"]
    assert " ".join(versions.kubeadm_images) in kubeadm
    assert f'--kubernetes-version "v{versions.kubernetes}"' in kubeadm
    for phase in ("validate/EveryImagePresent", "test/EveryImagePresentAfterBoot"):
        assert f"for image in {' '.join(versions.images)}; do" in scripts[f"40-images.yaml:{phase}"]


def _stub(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def no_systemd(tmp_path: Path) -> dict[str, str]:
    """A PATH whose systemctl/auditctl/passwd say "nothing here": the checks run read-only on this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("systemctl", "auditctl", "passwd", "sysctl", "swapon"):
        _stub(bin_dir, name, "exit 3")
    return {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}


@pytest.mark.parametrize("name", sorted(EXPECTED_COMPONENTS))
def test_test_phase_fails_on_a_machine_without_the_component(
    versions: Versions, name: str, no_systemd: dict[str, str]
) -> None:
    # This machine has none of the AMI's binaries, units or images: every test phase must refuse it.
    for where, script in bash_scripts(versions, "test"):
        if not where.startswith(name + ":"):
            continue
        result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=no_systemd, check=False)
        assert result.returncode != 0, f"{where} passed on a machine without the component"
        assert result.stderr.strip(), f"{where} failed without saying why"


def test_images_test_phase_names_the_one_missing_image(versions: Versions, tmp_path: Path) -> None:
    missing = versions.cni_images[-1]
    crictl = _stub(tmp_path, "crictl", f'[ "$1" = inspecti ] && [ "$2" != "{missing}" ]')
    script = dict(bash_scripts(versions, "test"))["40-images.yaml:test/EveryImagePresentAfterBoot"]
    env = {**os.environ, "DK8S_CRICTL": str(crictl)}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"image missing: {missing}"
    all_present = _stub(tmp_path, "crictl-all", "exit 0")
    env["DK8S_CRICTL"] = str(all_present)
    assert subprocess.run(["bash", "-c", script], env=env, check=False).returncode == 0


def test_runtime_files_written_by_components_are_what_nodes_need(versions: Versions) -> None:
    paths = {path for path, _ in created_files(versions)}
    assert {
        "/etc/systemd/system/containerd.service",
        "/etc/systemd/system/kubelet.service",
        "/etc/systemd/system/kubelet.service.d/10-kubeadm.conf",
        "/etc/crictl.yaml",
        "/etc/cloud/cloud.cfg.d/99-dedicated-k8s.cfg",
        "/etc/ssh/sshd_config.d/00-dedicated-k8s.conf",
        "/etc/audit/rules.d/50-dedicated-k8s.rules",
    } <= paths


def test_hardening_forbids_passwords_and_keys(versions: Versions) -> None:
    files = dict(created_files(versions))
    sshd = files["/etc/ssh/sshd_config.d/00-dedicated-k8s.conf"]
    for line in ("PasswordAuthentication no", "PermitRootLogin no", "AuthorizedKeysFile none"):
        assert line in sshd.splitlines()
    cloud = files["/etc/cloud/cloud.cfg.d/99-dedicated-k8s.cfg"]
    assert "allow_public_ssh_keys: false" in cloud
    assert "ssh_pwauth: false" in cloud


def test_the_agent_unit_is_never_enabled_by_the_image() -> None:
    unit = repo_path("imagebuilder", "systemd", "dedicated-k8s-agent.service").read_text()
    assert "[Install]" not in unit.splitlines()  # user data starts it, after writing agent.json
    assert "ConditionPathExists=/etc/dedicated-k8s/agent.json" in unit
    assert "ExecStart=/usr/local/bin/dedicated-k8s-agent run" in unit


def test_systemd_units_pass_systemd_analyze_if_available(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    units = [p for p in repo_path("imagebuilder", "systemd").iterdir() if p.suffix in (".service", ".timer")]
    result = subprocess.run(
        [analyze, "verify", "--man=no", *map(str, units)], capture_output=True, text=True, check=False
    )
    # Missing executables (/usr/local/bin/dedicated-k8s-agent) are expected off the AMI; syntax errors are not.
    syntax = [line for line in result.stderr.splitlines() if "Unknown" in line or "Invalid" in line]
    assert syntax == []


def test_step_inventory_is_stable(versions: Versions) -> None:
    # Every component downloads nothing outside its build phase.
    for step in steps(versions):
        if step.phase != "build":
            assert step.action == "ExecuteBash", step.where
            assert "fetch " not in "\n".join(step.inputs["commands"]), step.where


CONTAINERD_21_DEFAULT = """version = 3
root = '/var/lib/containerd'

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'

    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = 'registry.k8s.io/pause:3.10'

  [plugins.'io.containerd.cri.v1.runtime']
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'

      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes]
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
          runtime_type = 'io.containerd.runc.v2'

          [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
            BinaryName = ''
            NoNewKeyring = false
            ShimCgroup = ''
"""
CONTAINERD_22_DEFAULT = CONTAINERD_21_DEFAULT.replace(
    "            ShimCgroup = ''\n", "            ShimCgroup = ''\n            SystemdCgroup = false\n"
)


@pytest.mark.parametrize("default", [CONTAINERD_21_DEFAULT, CONTAINERD_22_DEFAULT], ids=["2.1-no-key", "2.2-false"])
def test_containerd_config_gets_systemd_cgroups_and_the_pinned_pause_image(
    versions: Versions, tmp_path: Path, default: str
) -> None:
    import tomllib

    sample = tmp_path / "default.toml"
    sample.write_text(default)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    containerd = _stub(bin_dir, "containerd", f'[ "$1 $2" = "config default" ] && cat {sample}')
    _stub(bin_dir, "systemctl", "exit 0")
    config = tmp_path / "etc" / "containerd" / "config.toml"
    script = dict(bash_scripts(versions, "build"))["20-container-runtime.yaml:build/ConfigureContainerd"]
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "DK8S_CONTAINERD": str(containerd),
        "DK8S_CONTAINERD_CONFIG": str(config),
    }
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    parsed = tomllib.loads(config.read_text())
    runtime = parsed["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["runc"]["options"]
    assert runtime["SystemdCgroup"] is True
    assert parsed["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"] == versions.pause_image
