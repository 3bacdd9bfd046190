"""The pinned versions of everything on the AMI, read from ``imagebuilder/versions.json`` (the one source).

The component documents in ``imagebuilder/components/`` carry ``@@NAME@@`` placeholders that
:func:`render` fills from :class:`Versions`; the image stack names the recipe after the Kubernetes
version and a digest of the rendered documents, so one edit of ``versions.json`` changes the recipe
name, the component contents and the image list together.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGEBUILDER_DIR = Path(__file__).resolve().parent
VERSIONS_FILE = IMAGEBUILDER_DIR / "versions.json"
COMPONENTS_DIR = IMAGEBUILDER_DIR / "components"
ARCH = "amd64"  # the instance types of the cluster (m6i, c6i, r6i) are x86_64

PLACEHOLDER = re.compile(r"@@([A-Z0-9_]+)@@")
_SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
_K8S = re.compile(r"^1\.\d{2}\.\d{1,3}$")
_ETCD_TAG = re.compile(r"^(\d+\.\d+\.\d+)-\d+$")
# registry/path:tag, the registry named explicitly (a bare "name:tag" would mean Docker Hub).
_IMAGE = re.compile(r"^[a-z0-9.-]+\.[a-z]{2,}(:\d+)?/[a-z0-9._/-]+:[A-Za-z0-9._-]+$")
KUBEADM_REGISTRY = "registry.k8s.io"
CONTROL_PLANE_COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy")


class VersionsError(ValueError):
    """versions.json is missing a key or holds a value of the wrong shape; each line names the key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("Invalid imagebuilder/versions.json:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class Versions:
    kubernetes: str
    etcd: str  # the kubeadm etcd image tag, e.g. 3.6.4-0
    containerd: str
    runc: str
    cni_plugins: str
    crictl: str
    coredns_image: str
    pause_image: str
    cni_images: tuple[str, ...]
    cloud_controller_manager_image: str
    node_termination_handler_image: str
    kubelet_csr_approver_image: str
    cluster_autoscaler_image: str
    pod_identity_webhook_image: str
    # (minor, first patch whose kubeadm the cluster can run), from versions.json "kubernetesFloors".
    kubernetes_floors: tuple[tuple[str, str], ...] = ()

    @property
    def kubernetes_minor(self) -> str:
        return ".".join(self.kubernetes.split(".")[:2])

    @property
    def etcd_version(self) -> str:
        """The etcd release (3.6.4) whose etcdctl/etcdutl the node agent runs; the image tag minus its build suffix."""
        match = _ETCD_TAG.match(self.etcd)
        assert match is not None  # validated on load
        return match.group(1)

    @property
    def kubeadm_images(self) -> tuple[str, ...]:
        """What ``kubeadm config images list --kubernetes-version v<kubernetes>`` prints (the build checks it)."""
        return (
            *(f"{KUBEADM_REGISTRY}/{name}:v{self.kubernetes}" for name in CONTROL_PLANE_COMPONENTS),
            self.coredns_image,
            self.pause_image,
            f"{KUBEADM_REGISTRY}/etcd:{self.etcd}",
        )

    @property
    def addon_images(self) -> tuple[str, ...]:
        return (
            *self.cni_images,
            self.cloud_controller_manager_image,
            self.node_termination_handler_image,
            self.kubelet_csr_approver_image,
            self.cluster_autoscaler_image,
            self.pod_identity_webhook_image,
        )

    @property
    def images(self) -> tuple[str, ...]:
        """Every image pre-pulled into containerd's k8s.io namespace, in a stable order, without duplicates."""
        return tuple(dict.fromkeys((*self.kubeadm_images, *self.addon_images)))

    def placeholders(self) -> dict[str, str]:
        """The values the component documents' ``@@NAME@@`` placeholders take."""
        return {
            "KUBERNETES_VERSION": self.kubernetes,
            "KUBERNETES_MINOR": self.kubernetes_minor,
            "ETCD_IMAGE_TAG": self.etcd,
            "ETCD_VERSION": self.etcd_version,
            "CONTAINERD_VERSION": self.containerd,
            "RUNC_VERSION": self.runc,
            "CNI_PLUGINS_VERSION": self.cni_plugins,
            "CRICTL_VERSION": self.crictl,
            "PAUSE_IMAGE": self.pause_image,
            "KUBEADM_IMAGES": " ".join(self.kubeadm_images),
            "IMAGES": " ".join(self.images),
            "ARCH": ARCH,
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.placeholders(), sort_keys=True).encode()).hexdigest()


def load_versions(path: Path = VERSIONS_FILE) -> Versions:
    """Read and validate ``versions.json``; every problem is reported at once."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise VersionsError([f"{path}: {err}"]) from err
    return parse_versions(raw)


def parse_versions(raw: Mapping[str, Any]) -> Versions:
    problems: list[str] = []

    def text(key: str, pattern: re.Pattern[str], allowed: str, source: Mapping[str, Any] = raw) -> str:
        value = source.get(key)
        if not isinstance(value, str) or not pattern.match(value):
            problems.append(f"'{key}' = {json.dumps(value)}: {allowed}")
            return ""
        return value

    kubernetes = text("kubernetes", _K8S, "must be a full Kubernetes version such as '1.34.2'")
    etcd = text("etcd", _ETCD_TAG, "must be kubeadm's etcd image tag such as '3.6.4-0'")
    semver = "must be a release version such as '2.1.4' (no leading 'v')"
    containerd = text("containerd", _SEMVER, semver)
    runc = text("runc", _SEMVER, semver)
    cni_plugins = text("cniPlugins", _SEMVER, semver)
    crictl = text("crictl", _SEMVER, semver)
    images = raw.get("images")
    if not isinstance(images, dict):
        problems.append(f"'images' = {json.dumps(images)}: must be an object of image references")
        images = {}
    image = "must be an image reference with its registry and tag, such as 'registry.k8s.io/pause:3.10.1'"
    coredns = text("coredns", _IMAGE, image, images)
    pause = text("pause", _IMAGE, image, images)
    ccm = text("cloudControllerManager", _IMAGE, image, images)
    nth = text("nodeTerminationHandler", _IMAGE, image, images)
    csr_approver = text("kubeletCsrApprover", _IMAGE, image, images)
    autoscaler = text("clusterAutoscaler", _IMAGE, image, images)
    webhook = text("podIdentityWebhook", _IMAGE, image, images)
    cni = images.get("cni")
    if not isinstance(cni, list) or not cni or not all(isinstance(i, str) and _IMAGE.match(i) for i in cni):
        problems.append(f"'images.cni' = {json.dumps(cni)}: must be a non-empty list; each entry {image}")
        cni = []
    floors = _kubernetes_floors(raw.get("kubernetesFloors"), kubernetes, problems)
    known = {"_comment", "kubernetes", "kubernetesFloors", "etcd", "containerd", "runc", "cniPlugins", "crictl",
             "images"}  # fmt: skip
    problems.extend(f"'{key}': is not a known key ({', '.join(sorted(known))})" for key in sorted(set(raw) - known))
    known_images = {"coredns", "pause", "cni", "cloudControllerManager", "nodeTerminationHandler", "kubeletCsrApprover",
                    "clusterAutoscaler", "podIdentityWebhook"}  # fmt: skip
    problems.extend(f"'images.{key}': is not a known image key" for key in sorted(set(images) - known_images))
    if problems:
        raise VersionsError(problems)
    return Versions(
        kubernetes=kubernetes,
        etcd=etcd,
        containerd=containerd,
        runc=runc,
        cni_plugins=cni_plugins,
        crictl=crictl,
        coredns_image=coredns,
        pause_image=pause,
        cni_images=tuple(cni),
        cloud_controller_manager_image=ccm,
        node_termination_handler_image=nth,
        kubelet_csr_approver_image=csr_approver,
        cluster_autoscaler_image=autoscaler,
        pod_identity_webhook_image=webhook,
        kubernetes_floors=floors,
    )


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _kubernetes_floors(value: Any, kubernetes: str, problems: list[str]) -> tuple[tuple[str, str], ...]:
    """``kubernetesFloors``: {minor: first patch of that minor the cluster can run}; the pinned version must not be
    older than its minor's floor (a minor without an entry is not checked)."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        problems.append(f"'kubernetesFloors' = {json.dumps(value)}: must be an object of minor -> first patch")
        return ()
    floors = []
    for minor, floor in sorted(value.items()):
        if minor == "_comment":
            continue
        if not re.match(r"^1\.\d{2}$", minor) or not isinstance(floor, str) or not _K8S.match(floor) \
                or not floor.startswith(minor + "."):  # fmt: skip
            problems.append(f"'kubernetesFloors.{minor}' = {json.dumps(floor)}: must be a patch of {minor} such as "
                            f"'{minor}.8'")  # fmt: skip
            continue
        floors.append((minor, floor))
    for minor, floor in floors:
        if kubernetes.startswith(minor + ".") and _numbers(kubernetes) < _numbers(floor):
            problems.append(f"'kubernetes' = \"{kubernetes}\": older than {floor}, the first {minor} patch the "
                            "cluster can run (kubernetesFloors)")  # fmt: skip
    return tuple(floors)


def component_files(directory: Path = COMPONENTS_DIR) -> list[Path]:
    """The component documents, in build order (their file names start with a two-digit order)."""
    return sorted(directory.glob("*.yaml"))


def render(text: str, values: Mapping[str, str]) -> str:
    """Fill every ``@@NAME@@``; a placeholder without a value is an error (never shipped half-rendered)."""
    missing = sorted({name for name in PLACEHOLDER.findall(text) if name not in values})
    if missing:
        raise KeyError(f"no value for placeholder(s) {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], text)


def render_component(path: Path, versions: Versions, extra: Mapping[str, str] | None = None) -> str:
    return render(path.read_text(), {**versions.placeholders(), **(extra or {})})


def component_name(path: Path) -> str:
    """``30-kubernetes.yaml`` -> ``kubernetes``."""
    return path.stem.split("-", 1)[1] if path.stem[:2].isdigit() else path.stem


def short_digest(*parts: str, length: int = 10) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:length]


def dashed(version: str) -> str:
    """Image Builder names allow no dots: ``1.34.2`` -> ``1-34-2``."""
    return version.replace(".", "-")
