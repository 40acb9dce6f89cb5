"""Python source for a strategy's ``VARIANTS`` literal, in one fixed layout so regenerating is byte-stable.

Each variant's calibrations are written with the same entry layout as ``CALIBRATIONS``
(``magsdk.codegen.literal``), so a curve reads the same wherever it sits.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

from magsdk.codegen.literal import MAX_LINE, format_entry, py_str, py_value
from magsdk.config import StrategyVariant

#: Key order of a variant; empty lists, dicts and strings and ``default: False`` are left out.
_KEYS = (
    "name",
    "model",
    "default",
    "pipelines",
    "config",
    "pipeline_config",
    "name_or_path",
    "threshold",
    "max_skip_steps",
    "retention_ratio",
    "settings_source",
    "notes",
)


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{py_str(str(k))}: {_value(v)}" for k, v in value.items()) + "}"
    return py_value(value)


def _item(key: str, value: Any, indent: str) -> list[str]:
    """``"key": value,`` on one line, or a long string split into implicitly joined pieces."""
    line = f"{indent}{py_str(key)}: {_value(value)},"
    if len(line) <= MAX_LINE or not isinstance(value, str):
        return [line]
    inner = indent + "    "
    width = MAX_LINE - len(inner) - 2
    pieces = textwrap.wrap(value, width, drop_whitespace=False, break_long_words=False, break_on_hyphens=False)
    return [f"{indent}{py_str(key)}: (", *(inner + py_str(p) for p in pieces), f"{indent}),"]


def format_variant(variant: StrategyVariant, indent: str = "    ") -> str:
    inner = indent + "    "
    lines = [f"{indent}{{"]
    for key in _KEYS:
        value = getattr(variant, key)
        if value in ("", [], {}) or (key == "default" and value is False):
            continue
        lines.extend(_item(key, value, inner))
    lines.append(f"{inner}{py_str('calibrations')}: [")
    for entry in sorted(variant.calibrations, key=lambda e: e.num_steps):
        lines.append(format_entry(entry, inner + "    ") + ",")
    lines.append(f"{inner}],")
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def format_variants(variants: Sequence[StrategyVariant]) -> str:
    """The whole ``VARIANTS`` value, in the given order (the first is listed first by ``magsdk list``)."""
    if not variants:
        return "[]"
    return "[\n" + "\n".join(format_variant(v) + "," for v in variants) + "\n]"
