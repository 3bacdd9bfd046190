"""Which AWS services a body of code creates boto3 clients for: ``boto3.client("s3")``, ``session.client("ec2")``.

Read from the source with :mod:`ast` (nothing is imported), so the node agent's bundle carries the
botocore models it needs and the tests can prove every such service has a VPC endpoint.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The code that runs inside the cluster's VPC: the node agent and the Lambdas (with their shared code).
IN_VPC_CODE = (REPO_ROOT / "node_agent", REPO_ROOT / "lambdas")


def python_files(roots: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for root in roots:
        if root.is_file():
            files.append(root)
        elif root.is_dir():
            files.extend(p for p in sorted(root.rglob("*.py")) if "__pycache__" not in p.parts)
    return files


def boto3_client_calls(roots: Iterable[Path] = IN_VPC_CODE) -> dict[str, list[str]]:
    """``{service: ["file:line", ...]}`` for every ``<x>.client("service")`` / ``<x>.resource("service")`` call."""
    found: dict[str, list[str]] = {}
    for path in python_files(roots):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in ("client", "resource"):
                continue
            service = _service_argument(node)
            if service is not None:
                location = f"{path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}:{node.lineno}"
                found.setdefault(service, []).append(location)
    return dict(sorted(found.items()))


def _service_argument(call: ast.Call) -> str | None:
    if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        return call.args[0].value
    for keyword in call.keywords:
        if keyword.arg == "service_name" and isinstance(keyword.value, ast.Constant):
            value = keyword.value.value
            return value if isinstance(value, str) else None
    return None
