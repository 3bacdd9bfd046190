"""The node agent bundle: what the node-agent component downloads (as a CDK asset) and unpacks under /opt/dedicated-k8s.

Layout::

    lib/node_agent/...        the agent (python -m node_agent)
    lib/node_agent/versions.json  a copy of imagebuilder/versions.json: the add-on images the agent applies
                              are exactly the ones the images component pre-pulled into this AMI
    lib/lambdas/common/...    the shared domain code, installed beside the agent
    lib/boto3, lib/botocore, ...  boto3 and its pure-Python dependencies, vendored from the synthesizing
                              interpreter (the versions pinned in requirements.txt); botocore keeps only
                              the service models the agent's clients use
    bin/dedicated-k8s-agent, bin/dedicated-k8s-enable-timers
    systemd/*.service, systemd/*.timer
    MANIFEST.json             awsServices, vendored package versions, the Kubernetes version

Built offline from files already on disk, so ``cdk synth`` needs no network and the build instance needs no PyPI.
"""

from __future__ import annotations

import atexit
import functools
import importlib.metadata
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from imagebuilder.aws_clients import REPO_ROOT, boto3_client_calls
from imagebuilder.versions import IMAGEBUILDER_DIR, VERSIONS_FILE, load_versions

SYSTEMD_DIR = IMAGEBUILDER_DIR / "systemd"
# What the node runs: the agent and the shared domain code (not the Lambda handlers).
AGENT_SOURCES = ("node_agent", "lambdas/__init__.py", "lambdas/common")
# import name -> distribution name
VENDORED = {
    "boto3": "boto3",
    "botocore": "botocore",
    "s3transfer": "s3transfer",
    "jmespath": "jmespath",
    "dateutil": "python-dateutil",
    "urllib3": "urllib3",
    "six": "six",
}
ALWAYS_NEEDED_SERVICES = ("sts",)
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")
_NATIVE_SUFFIXES = (".so", ".pyd", ".dylib")


class BundleError(RuntimeError):
    pass


def agent_services() -> list[str]:
    """The AWS services whose botocore models the bundle carries (the node agent's and Lambdas' clients)."""
    return sorted({*boto3_client_calls([REPO_ROOT / source for source in AGENT_SOURCES]), *ALWAYS_NEEDED_SERVICES})


def build_agent_bundle(out: Path) -> Path:
    """Write the bundle into ``out`` (created; must not exist or be empty) and return it."""
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise BundleError(f"{out} is not empty")
    lib = out / "lib"
    lib.mkdir()
    for source in AGENT_SOURCES:
        origin, target = REPO_ROOT / source, lib / source
        target.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_dir():
            shutil.copytree(origin, target, ignore=_IGNORE)
        else:
            shutil.copy2(origin, target)
    shutil.copy2(VERSIONS_FILE, lib / "node_agent" / "versions.json")  # node_agent.addons reads it at run time
    services = agent_services()
    versions: dict[str, str] = {}
    for module, distribution in VENDORED.items():
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise BundleError(f"{module} is not installed in the synthesizing interpreter (requirements.txt)")
        origin = Path(spec.origin)
        if origin.name == "__init__.py":
            shutil.copytree(origin.parent, lib / module, ignore=_IGNORE)
        else:
            shutil.copy2(origin, lib / origin.name)
        versions[distribution] = importlib.metadata.version(distribution)
    _prune_botocore_models(lib / "botocore" / "data", services)
    native = [str(p.relative_to(out)) for p in out.rglob("*") if p.suffix in _NATIVE_SUFFIXES]
    if native:
        raise BundleError(f"the bundle must be pure Python (it runs on AL2023's python3.11): {native}")

    (out / "bin").mkdir()
    (out / "systemd").mkdir()
    for path in sorted(SYSTEMD_DIR.iterdir()):
        target = out / ("systemd" if path.suffix in (".service", ".timer") else "bin") / path.name
        shutil.copy2(path, target)
    manifest = {
        "awsServices": services,
        "vendored": versions,
        "kubernetes": load_versions().kubernetes,
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def _prune_botocore_models(data: Path, services: list[str]) -> None:
    """Keep botocore's shared data files and only the named services' models (the rest is ~25 MB)."""
    missing = [s for s in services if not (data / s).is_dir()]
    if missing:
        raise BundleError(f"botocore has no model for {missing}")
    for entry in data.iterdir():
        if entry.is_dir() and entry.name not in services:
            shutil.rmtree(entry)


@functools.cache
def agent_bundle_dir() -> Path:
    """The bundle, built once per process in a temporary directory (never inside the repository)."""
    scratch = Path(tempfile.mkdtemp(prefix="dk8s-agent-bundle-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # synth has copied it into cdk.out by then
    return build_agent_bundle(scratch / "bundle")
