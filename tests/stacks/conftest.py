"""Synthesized templates shared by the stack tests: each app is synthesized once per session."""

from __future__ import annotations

import json
import os

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Template

from app import build_app

ROOT = Path(__file__).resolve().parents[2]


def default_context() -> dict[str, Any]:
    return dict(json.loads((ROOT / "cdk.json").read_text())["context"])


def synth_app(overrides: dict[str, Any] | None = None) -> dict[str, Template]:
    context = {**default_context(), **(overrides or {})}
    app = cdk.App(context=context)
    build_app(app)
    assembly = app.synth()
    return {stack.hierarchical_id: Template.from_json(stack.template) for stack in assembly.stacks}


@pytest.fixture(scope="session")
def templates() -> dict[str, Template]:
    return synth_app()


@pytest.fixture(scope="session")
def cluster_template(templates: dict[str, Template]) -> Template:
    return templates["K8sClusterStack"]


@pytest.fixture(scope="session")
def iam_template(templates: dict[str, Template]) -> Template:
    return templates["IamStack"]


@pytest.fixture(scope="session")
def synth() -> Callable[[dict[str, Any]], dict[str, Template]]:
    return synth_app
