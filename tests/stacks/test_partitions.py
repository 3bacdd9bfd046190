"""Every stack synthesizes for a region of each partition (commercial, GovCloud, China) with no hard-coded
partition: ARNs use the stack's partition, regional service names its URL suffix, so ``aws-us-gov`` and
``aws-cn`` deployments get ``arn:aws-us-gov:``/``arn:aws-cn:`` and ``amazonaws.com.cn`` where they must."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.stacks.conftest import ROOT

PARTITION_REGIONS = {
    "aws": ("us-east-1", ["us-east-1a", "us-east-1b", "us-east-1c"]),
    "aws-us-gov": ("us-gov-west-1", ["us-gov-west-1a", "us-gov-west-1b", "us-gov-west-1c"]),
    "aws-cn": ("cn-north-1", ["cn-north-1a", "cn-north-1b", "cn-north-1d"]),
}
# A regional service endpoint or principal spelt out (for example "logs.cn-north-1.amazonaws.com"): wrong in
# China, where it ends in amazonaws.com.cn; regional names must use the stack's URL suffix instead.
REGIONAL_LITERAL = re.compile(r"[a-z0-9-]+\.[a-z]{2}(-gov)?-[a-z]+-\d\.amazonaws\.com")
SOURCE_DIRS = ("stages", "pipeline", "lambdas", "node_agent", "imagebuilder", "scripts", "twin")


@pytest.mark.parametrize("partition", sorted(PARTITION_REGIONS))
def test_every_stack_synthesizes_without_a_hard_coded_partition(synth: Any, partition: str) -> None:
    region, zones = PARTITION_REGIONS[partition]
    templates = synth({"region": region, "availabilityZones": zones})
    assert {"IamStack", "K8sClusterStack", "ImageStack", "PipelineStack"} <= set(templates)
    for name, template in templates.items():
        text = json.dumps(template.to_json())
        assert "arn:aws:" not in text, f"{name}: a hard-coded commercial ARN"
        assert not REGIONAL_LITERAL.search(text), f"{name}: {REGIONAL_LITERAL.search(text)}"
        if '"arn:' in text or "arn:${" in text:
            assert "AWS::Partition" in text, f"{name} builds ARNs without the partition"
    cluster = json.dumps(templates["K8sClusterStack"].to_json())
    assert "AWS::Partition" in cluster and "AWS::URLSuffix" in cluster


def test_no_source_file_spells_out_the_commercial_partition() -> None:
    offenders = []
    for directory in SOURCE_DIRS:
        for path in sorted((ROOT / directory).rglob("*")):
            if path.suffix not in (".py", ".sh", ".yaml", ".json") and path.name != "build-k8s-ami-imagebuilder.sh":
                continue
            if not path.is_file() or "node_modules" in path.parts:
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                # "arn:aws[a-z-]*:" in a pattern accepts every partition; "arn:aws:" names one.
                if "arn:aws:" in line:
                    offenders.append(f"{Path(path).relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert offenders == []
