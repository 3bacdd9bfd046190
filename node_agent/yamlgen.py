"""A tiny YAML emitter for kubeadm configuration (the node agent is stdlib-only).

Strings are always double-quoted in JSON style, which is valid YAML, so no value can change type.
"""

from __future__ import annotations

import json
from typing import Any


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"unsupported YAML scalar {value!r}")


def _emit(value: Any, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict) and item:
                lines.append(f"{pad}{key}:")
                _emit(item, indent + 1, lines)
            elif isinstance(item, list) and item:
                lines.append(f"{pad}{key}:")
                _emit(item, indent, lines)
            elif isinstance(item, dict | list):
                lines.append(f"{pad}{key}: {'{}' if isinstance(item, dict) else '[]'}")
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item:
                sub: list[str] = []
                _emit(item, indent + 1, sub)
                first = sub[0].lstrip()
                lines.append(f"{pad}- {first}")
                lines.extend(sub[1:])
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    else:
        lines.append(f"{pad}{_scalar(value)}")


def dump_documents(docs: list[dict[str, Any]]) -> str:
    out: list[str] = []
    for doc in docs:
        lines: list[str] = []
        _emit(doc, 0, lines)
        out.append("\n".join(lines))
    return "---\n" + "\n---\n".join(out) + "\n"
