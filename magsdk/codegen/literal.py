"""Python source for the ``CALIBRATIONS`` literal: one fixed layout, so regenerating is byte-stable.

The template and the libcst patcher both format entries with these functions, so a module that
was rendered with an entry and one that was rendered empty and then patched are identical.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from magsdk.config import CalibrationEntry, ScheduleInfo

#: Decimals kept for every float of a calibration (ratios, spreads, timesteps).
DECIMALS = 5
#: Widest line a packed list of numbers may produce (the project's ruff line length).
MAX_LINE = 120
#: Indentation of one entry inside the list (the list is a module-level literal).
ENTRY_INDENT = "    "

#: Key order of an entry; keys whose value is None or empty are left out.
_SCALAR_KEYS = (
    "num_steps",
    "source",
    "scheduler",
    "shape",
    "num_prompts",
    "num_seeds",
    "diffusers_version",
    "synthetic",
)


def py_str(value: str) -> str:
    """A double-quoted Python string literal (the style of the hand-written strategies)."""
    return json.dumps(value, ensure_ascii=False)


def py_value(value: Any) -> str:
    """A Python literal for the scalar types that appear in generated modules."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        return py_str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return py_float(value)
    raise TypeError(f"cannot write a {type(value).__name__} as a literal in a generated module: {value!r}")


def py_literal(value: Any) -> str:
    """A one-line literal for a JSON-like value (scalars, lists and string-keyed dicts of them)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(py_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{py_str(str(k))}: {py_literal(v)}" for k, v in value.items()) + "}"
    return py_value(value)


def _round_nested(value: Any) -> Any:
    """``value`` as it reads back from its literal (floats rounded to ``DECIMALS``)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        return float(py_float(value))
    if isinstance(value, (list, tuple)):
        return [_round_nested(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _round_nested(v) for k, v in value.items()}
    return value


def py_float(value: float | None) -> str:
    """Round to ``DECIMALS`` and print the shortest form that reads back as the same float."""
    if value is None:
        return "None"
    if not math.isfinite(value):
        raise ValueError(f"cannot write the non-finite value {value!r} into a calibration literal")
    rounded = round(float(value), DECIMALS)
    if rounded == 0.0:
        rounded = 0.0  # no "-0.0"
    return repr(rounded)


def pack_numbers(values: Sequence[float | None], indent: str) -> list[str]:
    """Numbers comma-separated, ten a line (five if ten would be too wide), so step i is easy to find."""
    tokens = [py_float(v) + "," for v in values]
    for per_line in (10, 5, 1):
        lines = [indent + " ".join(tokens[i : i + per_line]) for i in range(0, len(tokens), per_line)]
        if all(len(line) <= MAX_LINE for line in lines):
            break
    return lines


def _curve_dict(name: str, curves: dict[str, list[float]], indent: str) -> list[str]:
    inner = indent + "    "
    lines = [f"{indent}{py_str(name)}: {{"]
    for branch, values in curves.items():
        lines.append(f"{inner}{py_str(branch)}: [")
        lines.extend(pack_numbers(values, inner + "    "))
        lines.append(f"{inner}],")
    lines.append(f"{indent}}},")
    return lines


def format_entry(entry: CalibrationEntry, indent: str = ENTRY_INDENT) -> str:
    """One entry as a dict literal whose first line starts at ``indent`` (no trailing comma)."""
    inner = indent + "    "
    lines = [f"{indent}{{"]
    for key in _SCALAR_KEYS:
        value = getattr(entry, key)
        if value is None or (key == "source" and not value):
            continue
        lines.append(f"{inner}{py_str(key)}: {py_value(value)},")
    if entry.settings:
        # One setting a line, in the order they were recorded: easy to read and to diff.
        lines.append(f"{inner}{py_str('settings')}: {{")
        for name, value in entry.settings.items():
            lines.append(f"{inner}    {py_str(str(name))}: {py_literal(value)},")
        lines.append(f"{inner}}},")
    lines.extend(_curve_dict("branches", entry.branches, inner))
    if entry.spread:
        lines.extend(_curve_dict("spread", entry.spread, inner))
    if entry.probes:  # absent when empty: entries calibrated without probes are written as before
        lines.extend(_curve_dict("probes", entry.probes, inner))
    if entry.timesteps:
        lines.append(f"{inner}{py_str('timesteps')}: [")
        lines.extend(pack_numbers(entry.timesteps, inner + "    "))
        lines.append(f"{inner}],")
    if entry.schedule is not None:
        lines.extend(_schedule_lines(entry.schedule, inner))
    lines.append(f"{indent}}}")
    return "\n".join(lines)


#: Scalar and small-dict fields of a schedule, one a line; the per-step lists follow, packed.
_SCHEDULE_SCALARS = ("scheduler", "config", "set_timesteps", "image_tokens", "resolution", "note")
_SCHEDULE_LISTS = ("timesteps", "sigmas", "input_sigmas")


def _chunks(text: str, width: int) -> list[str]:
    """``text`` cut at spaces into pieces of at most ``width`` characters (concatenated back by Python)."""
    pieces: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if len(candidate) > width and current:
            pieces.append(current + " ")
            current = word
        else:
            current = candidate
    pieces.append(current)
    return pieces


def _schedule_lines(schedule: ScheduleInfo, indent: str) -> list[str]:
    inner = indent + "    "
    lines = [f"{indent}{py_str('schedule')}: {{"]
    for key in _SCHEDULE_SCALARS:
        value = getattr(schedule, key)
        if value is None or value == {}:
            continue
        line = f"{inner}{py_str(key)}: {py_literal(value)},"
        if isinstance(value, dict) and len(line) > MAX_LINE:
            lines.append(f"{inner}{py_str(key)}: {{")
            lines.extend(f"{inner}    {py_str(str(k))}: {py_literal(v)}," for k, v in value.items())
            lines.append(f"{inner}}},")
        elif isinstance(value, str) and len(line) > MAX_LINE:
            lines.append(f"{inner}{py_str(key)}: (")
            lines.extend(f"{inner}    {py_str(chunk)}" for chunk in _chunks(value, MAX_LINE - len(inner) - 8))
            lines.append(f"{inner}),")
        else:
            lines.append(line)
    for key in _SCHEDULE_LISTS:
        values = getattr(schedule, key)
        if values is None:
            continue
        lines.append(f"{inner}{py_str(key)}: [")
        lines.extend(pack_numbers(values, inner + "    "))
        lines.append(f"{inner}],")
    lines.append(f"{indent}}},")
    return lines


def format_calibrations(entries: Sequence[CalibrationEntry]) -> str:
    """The whole ``CALIBRATIONS`` value: ``[]`` or one entry per line block, sorted by step count."""
    if not entries:
        return "[]"
    ordered = sorted(entries, key=lambda e: e.num_steps)
    body = "\n".join(format_entry(e) + "," for e in ordered)
    return f"[\n{body}\n]"


def round_entry(entry: CalibrationEntry) -> CalibrationEntry:
    """The entry exactly as it reads back from the file (floats rounded to ``DECIMALS``)."""

    def r(values: Sequence[float]) -> list[float]:
        return [float(py_float(v)) for v in values]

    return entry.model_copy(
        update={
            "branches": {k: r(v) for k, v in entry.branches.items()},
            "spread": {k: r(v) for k, v in entry.spread.items()},
            "probes": {k: r(v) for k, v in entry.probes.items()},
            "timesteps": [None if t is None else float(py_float(t)) for t in entry.timesteps],
            "settings": _round_nested(entry.settings),
            "schedule": _round_schedule(entry.schedule),
        }
    )


def _round_schedule(schedule: ScheduleInfo | None) -> ScheduleInfo | None:
    if schedule is None:
        return None
    return ScheduleInfo.model_validate(_round_nested(schedule.model_dump()))
