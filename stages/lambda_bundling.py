"""Local, Docker-free bundling of the Lambda asset.

The Lambda code is pure Python with no third-party dependencies (boto3 comes with the runtime; the etcd
client is stdlib over etcd's JSON gateway), so bundling is a copy of ``lambdas/`` into the asset folder:
sorted, with ``__pycache__`` left out, so the same sources always give the same asset hash.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import jsii

LAMBDAS_DIR = Path(__file__).resolve().parent.parent / "lambdas"
ASSET_EXCLUDES = ["**/__pycache__", "**/*.pyc", "**/tests"]


def lambda_source_files(root: Path = LAMBDAS_DIR) -> list[Path]:
    return sorted(path for path in root.rglob("*.py") if "__pycache__" not in path.parts)


@jsii.implements(cdk.ILocalBundling)
class CopyLambdaPackage:
    """Copies ``lambdas/**/*.py`` to ``<output>/lambdas/`` so handlers import as ``lambdas.<fn>.handler``."""

    def __init__(self, root: Path = LAMBDAS_DIR) -> None:
        self.root = root

    def try_bundle(self, output_dir: str, *, image: Any = None, **_: Any) -> bool:
        target_root = Path(output_dir) / "lambdas"
        for source in lambda_source_files(self.root):
            target = target_root / source.relative_to(self.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        return True


def lambda_code() -> cdk.aws_lambda.Code:
    return cdk.aws_lambda.Code.from_asset(
        str(LAMBDAS_DIR),
        exclude=ASSET_EXCLUDES,
        asset_hash_type=cdk.AssetHashType.SOURCE,
        bundling=cdk.BundlingOptions(
            # Never pulled: local bundling always succeeds. CDK requires an image to be named.
            image=cdk.DockerImage.from_registry("public.ecr.aws/sam/build-python3.14"),
            local=CopyLambdaPackage(),
        ),
    )
