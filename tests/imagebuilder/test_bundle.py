"""The node agent bundle runs on a bare Python 3.11: no site-packages, no PyPI, only what the bundle carries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imagebuilder.aws_clients import REPO_ROOT, boto3_client_calls
from imagebuilder.bundle import BundleError, agent_services, build_agent_bundle
from imagebuilder.versions import VERSIONS_FILE, load_versions

PYTHON311 = shutil.which("python3.11") or sys.executable


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_agent_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


def bare_python(bundle: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python3.11 -S``: no site module, so nothing but the standard library and the bundle's lib/ is importable."""
    # Bytecode goes beside the bundle (not into it), so the second run imports fast.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(bundle / "lib"), "PYTHONPYCACHEPREFIX": str(bundle.parent)}
    return subprocess.run(
        [PYTHON311, "-S", *args], capture_output=True, text=True, env=env, cwd=bundle, timeout=60, check=False
    )


def test_bundle_layout(bundle: Path) -> None:
    assert (bundle / "lib" / "node_agent" / "__main__.py").is_file()
    assert (bundle / "lib" / "lambdas" / "common" / "__init__.py").is_file()
    assert not (bundle / "lib" / "lambdas" / "etcd_lifecycle").exists()  # handlers run in Lambda, not on nodes
    assert {p.name for p in (bundle / "bin").iterdir()} == {"dedicated-k8s-agent", "dedicated-k8s-enable-timers"}
    assert "dedicated-k8s-agent.service" in {p.name for p in (bundle / "systemd").iterdir()}
    assert not list(bundle.rglob("__pycache__"))


def test_manifest_names_services_vendored_versions_and_kubernetes(bundle: Path) -> None:
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    agent_calls = boto3_client_calls([REPO_ROOT / "node_agent"])
    assert set(agent_calls) <= set(manifest["awsServices"])
    assert manifest["awsServices"] == agent_services()
    assert manifest["kubernetes"] == load_versions().kubernetes
    assert set(manifest["vendored"]) >= {"boto3", "botocore", "urllib3"}


def test_botocore_carries_only_the_models_the_agent_needs(bundle: Path) -> None:
    data = bundle / "lib" / "botocore" / "data"
    assert sorted(p.name for p in data.iterdir() if p.is_dir()) == agent_services()
    assert (data / "endpoints.json").is_file()


def test_agent_and_its_boto3_clients_work_from_the_bundle_alone(bundle: Path) -> None:
    probe = (
        "import sys, json, boto3, node_agent.__main__, lambdas.common\n"
        "assert not any('site-packages' in p for p in sys.path), sys.path\n"
        "services = json.load(open('MANIFEST.json'))['awsServices']\n"
        "[boto3.session.Session(region_name='us-east-1').client(s) for s in services]\n"
        "print(boto3.__file__)\n"
    )
    result = bare_python(bundle, "-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(bundle / "lib" / "boto3"))


def test_the_agent_renders_the_addons_with_the_images_this_ami_pre_pulls(bundle: Path) -> None:
    # node_agent.addons reads the bundle's copy of versions.json (the images component pulled exactly these).
    assert (bundle / "lib" / "node_agent" / "versions.json").read_bytes() == VERSIONS_FILE.read_bytes()
    probe = (
        "from node_agent import addons\n"
        "print(addons.versions_file())\n"
        "print(' '.join(addons.load_addon_images().all()))\n"
    )
    result = bare_python(bundle, "-c", probe)
    assert result.returncode == 0, result.stderr
    where, images = result.stdout.splitlines()
    assert where == str(bundle / "lib" / "node_agent" / "versions.json")
    assert set(images.split()) <= set(load_versions().images)


def test_wrapper_entry_point_answers_help(bundle: Path) -> None:
    result = bare_python(bundle, "-m", "node_agent", "--help")
    assert result.returncode == 0, result.stderr
    assert "{run,snapshot,rotate-token,upgrade-addons,certificates,restore}" in result.stdout


def test_bundle_is_pure_python(bundle: Path) -> None:
    assert [p for p in bundle.rglob("*") if p.suffix in (".so", ".pyd", ".dylib")] == []


def test_bundle_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "leftover").write_text("x")
    with pytest.raises(BundleError, match="not empty"):
        build_agent_bundle(tmp_path)


def test_wrapper_runs_python311_with_the_bundle_path() -> None:
    wrapper = (REPO_ROOT / "imagebuilder" / "systemd" / "dedicated-k8s-agent").read_text()
    assert "export PYTHONPATH=/opt/dedicated-k8s/lib" in wrapper
    assert 'exec /usr/bin/python3.11 -m node_agent "$@"' in wrapper
    assert os.access(REPO_ROOT / "imagebuilder" / "systemd" / "dedicated-k8s-agent", os.X_OK)


def test_bundle_is_reproducible_so_names_only_change_with_content(bundle: Path, tmp_path: Path) -> None:
    # The asset hash goes into the node-agent component's name: a rebuilt bundle must hash the same.
    import aws_cdk as cdk

    again = build_agent_bundle(tmp_path / "again")
    assert cdk.FileSystem.fingerprint(str(again)) == cdk.FileSystem.fingerprint(str(bundle))
