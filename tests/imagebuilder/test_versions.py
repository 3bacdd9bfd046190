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


def _bumped() -> Versions:
    raw = _raw()
    raw["kubernetes"] = "1.34.3"
    raw["containerd"] = "2.1.5"
    return parse_versions(raw)


def test_one_edit_changes_component_contents_and_the_image_list() -> None:
    before, after = load_versions(), _bumped()
    assert "registry.k8s.io/kube-apiserver:v1.34.3" in after.images
    assert "registry.k8s.io/kube-apiserver:v1.34.3" not in before.images
    old, new = rendered(before), rendered(after)
    changed = {name for name in old if old[name] != new[name]}
    # Kubernetes binaries, containerd and the image list move; kernel, SSM and hardening do not.
    assert changed == {"20-container-runtime.yaml", "30-kubernetes.yaml", "40-images.yaml"}
    assert "https://dl.k8s.io/release/v1.34.3/bin/linux/amd64" in new["30-kubernetes.yaml"]
    assert "containerd-2.1.5-linux-amd64.tar.gz" in new["20-container-runtime.yaml"]
    assert before.digest() != after.digest()
