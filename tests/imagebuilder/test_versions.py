"""versions.json is the one source: the cluster config, the components and the image list all follow it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from imagebuilder.versions import VERSIONS_FILE, Versions, VersionsError, load_versions, parse_versions
from stages.config import ClusterConfig
from tests.imagebuilder.components import rendered


def _raw() -> dict[str, Any]:
    return dict(json.loads(VERSIONS_FILE.read_text()))


def test_versions_file_loads_and_names_every_image() -> None:
    versions = load_versions()
    assert versions.kubernetes == _raw()["kubernetes"]
    assert f"registry.k8s.io/kube-apiserver:v{versions.kubernetes}" in versions.images
    assert f"registry.k8s.io/etcd:{versions.etcd}" in versions.images
    for image in (versions.coredns_image, versions.pause_image, *versions.cni_images):
        assert image in versions.images
    assert versions.cloud_controller_manager_image in versions.images
    assert versions.node_termination_handler_image in versions.images
    assert len(versions.images) == len(set(versions.images))


def test_cluster_config_default_kubernetes_version_is_read_from_versions_file() -> None:
    config = ClusterConfig.from_mapping({})
    assert config.kubernetes_version == load_versions().kubernetes


def test_cluster_config_follows_an_edited_versions_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import stages.config as config_module

    edited = _raw() | {"kubernetes": "1.35.0"}
    path = tmp_path / "versions.json"
    path.write_text(json.dumps(edited))
    monkeypatch.setattr(config_module, "VERSIONS_FILE", path)
    config = ClusterConfig.from_mapping({})
    assert config.kubernetes_version == "1.35.0"
    assert config.ami == "/dedicated-k8s/ami/kubernetes-1-35"


def test_etcd_client_version_comes_from_the_kubeadm_etcd_tag() -> None:
    assert replace(load_versions(), etcd="3.6.5-0").etcd_version == "3.6.5"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("kubernetes", "v1.34.2", "'kubernetes' = \"v1.34.2\""),
        ("etcd", "3.6.4", "'etcd' = \"3.6.4\""),
        ("containerd", "v2.1.4", "'containerd' = \"v2.1.4\""),
        ("crictl", None, "'crictl' = null"),
        ("extra", "1", "'extra': is not a known key"),
    ],
)
def test_invalid_versions_name_the_key(key: str, value: object, message: str) -> None:
    raw = _raw()
    if value is None:
        raw.pop(key)
    else:
        raw[key] = value
    with pytest.raises(VersionsError) as caught:
        parse_versions(raw)
    assert message in str(caught.value)


def test_an_image_without_a_registry_is_refused() -> None:
    raw = _raw()
    raw["images"] = {**raw["images"], "cni": ["calico/node:v3.30.3"]}
    with pytest.raises(VersionsError, match=r"'images.cni'"):
        parse_versions(raw)


def _next_patch(version: str) -> str:
    major, minor, patch = version.split(".")
    return f"{major}.{minor}.{int(patch) + 1}"


def _bumped() -> Versions:
    raw = _raw()
    raw["kubernetes"] = _next_patch(raw["kubernetes"])
    raw["containerd"] = "2.1.5"
    return parse_versions(raw)


def test_one_edit_changes_component_contents_and_the_image_list() -> None:
    before, after = load_versions(), _bumped()
    newer = _next_patch(before.kubernetes)
    assert f"registry.k8s.io/kube-apiserver:v{newer}" in after.images
    assert f"registry.k8s.io/kube-apiserver:v{newer}" not in before.images
    old, new = rendered(before), rendered(after)
    changed = {name for name in old if old[name] != new[name]}
    # Kubernetes binaries, containerd and the image list move; kernel, SSM and hardening do not.
    assert changed == {"20-container-runtime.yaml", "30-kubernetes.yaml", "40-images.yaml"}
    assert f"https://dl.k8s.io/release/v{newer}/bin/linux/amd64" in new["30-kubernetes.yaml"]
    assert "containerd-2.1.5-linux-amd64.tar.gz" in new["20-container-runtime.yaml"]
    assert before.digest() != after.digest()


# The first patch of each minor whose kubeadm init makes its API calls through the node's own localAPIEndpoint
# instead of controlPlaneEndpoint (our NLB, which has no target until the node is InService): kubeadm 1.34.2
# regressed (kubernetes/kubeadm#3294, from kubernetes/kubernetes#134265 via #134270); kubernetes/kubernetes#138449
# fixed it (CHANGELOG-1.37.md v1.37.0-alpha.1: "Kubeadm: during 'kubeadm init', if the default 'admin.conf' and
# 'super-admin.conf' paths are used, ... construct in memory kubeconfigs that point to the
# InitConfiguration.localAPIEndpoint instead of the ClusterConfiguration.controlPlaneEndpoint"). Cherry-picks:
# release-1.34 #138685 (not in CHANGELOG-1.34.md's v1.34.7 section: first in v1.34.8), release-1.35 #138683 (v1.35.5).
FIRST_FIXED = {"1.34": (1, 34, 8), "1.35": (1, 35, 5)}
FIXED_FROM_MINOR = (1, 37)  # master carries it from v1.37.0-alpha.1


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_the_pinned_kubernetes_has_kubeadms_local_api_endpoint_fix_for_init() -> None:
    versions = load_versions()
    pinned = _version(versions.kubernetes)
    minor = versions.kubernetes_minor
    assert minor in FIRST_FIXED or pinned[:2] >= FIXED_FROM_MINOR, f"no known first fixed patch for {minor}"
    if minor in FIRST_FIXED:
        assert pinned >= FIRST_FIXED[minor]
    # The loader's own guard holds the same floors, so a later edit to an older patch fails at load time.
    assert {m: _version(v) for m, v in versions.kubernetes_floors} == FIRST_FIXED


@pytest.mark.parametrize("older", ["1.34.2", "1.34.7", "1.35.4"])
def test_a_patch_older_than_its_minors_floor_is_refused_naming_the_key(older: str) -> None:
    with pytest.raises(VersionsError) as caught:
        parse_versions(_raw() | {"kubernetes": older})
    assert f"'kubernetes' = \"{older}\": older than" in str(caught.value)
    assert "kubernetesFloors" in str(caught.value)


@pytest.mark.parametrize("floor", ["1.35.5", "v1.34.8", 1348, "1.34"])
def test_a_malformed_floor_is_refused_naming_it(floor: object) -> None:
    raw = _raw()
    raw["kubernetesFloors"] = {**raw["kubernetesFloors"], "1.34": floor}
    with pytest.raises(VersionsError, match=r"'kubernetesFloors\.1\.34'"):
        parse_versions(raw)
