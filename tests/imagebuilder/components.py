"""Shared helpers for the component tests: rendered documents, their steps and embedded scripts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from imagebuilder.versions import Versions, component_files, render_component

FAKE_BUNDLE_URI = "s3://cdk-hnb659fds-assets-111111111111-us-east-1/0123abcd.zip"


@dataclass(frozen=True)
class Step:
    component: str
    phase: str
    name: str
    action: str
    inputs: Any

    @property
    def where(self) -> str:
        return f"{self.component}:{self.phase}/{self.name}"


def rendered(versions: Versions) -> dict[str, str]:
    return {
        path.name: render_component(path, versions, {"AGENT_BUNDLE_S3_URI": FAKE_BUNDLE_URI})
        for path in component_files()
    }


def documents(versions: Versions) -> dict[str, dict[str, Any]]:
    return {name: yaml.safe_load(text) for name, text in rendered(versions).items()}


def steps(versions: Versions) -> list[Step]:
    found: list[Step] = []
    for name, document in documents(versions).items():
        for phase in document["phases"]:
            for step in phase["steps"]:
                found.append(Step(name, phase["name"], step["name"], step["action"], step.get("inputs")))
    return found


def bash_scripts(versions: Versions, phase: str | None = None) -> list[tuple[str, str]]:
    """(where, script) for every ExecuteBash command, optionally of one phase."""
    return [
        (step.where, command)
        for step in steps(versions)
        if step.action == "ExecuteBash" and (phase is None or step.phase == phase)
        for command in step.inputs["commands"]
    ]


def created_files(versions: Versions) -> list[tuple[str, str]]:
    """(path, content) for every CreateFile input: files that the image carries and nodes read at run time."""
    return [
        (item["path"], item["content"])
        for step in steps(versions)
        if step.action == "CreateFile"
        for item in step.inputs
    ]


def repo_path(*parts: str) -> Path:
    return Path(__file__).resolve().parents[2].joinpath(*parts)
