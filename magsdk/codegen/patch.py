"""Rewrite one entry of a strategy module's ``CALIBRATIONS`` literal and nothing else.

libcst parses the module and locates the literal and its entries (with byte spans); the new
entry's text replaces the entry with the same ``num_steps`` or is inserted in step order. Every
byte outside that entry — comments, formatting, the user's edits to the class — is kept as it was.
"""

from __future__ import annotations

import ast
import re
import warnings
from dataclasses import dataclass
from typing import Any

import libcst as cst
from libcst.metadata import ByteSpanPositionProvider, CodeSpan, MetadataWrapper

from magsdk.codegen.literal import ENTRY_INDENT, format_calibrations, format_entry
from magsdk.config import CalibrationEntry
from magsdk.errors import MagSDKError, UsageError

CALIBRATIONS_NAME = "CALIBRATIONS"


class StrategyFileError(UsageError):
    """A strategy file cannot be patched as it stands (syntax error, no CALIBRATIONS literal...)."""


@dataclass(frozen=True)
class _Literal:
    source: bytes
    value: cst.BaseExpression
    value_span: CodeSpan
    elements: list[tuple[cst.Element, CodeSpan, CodeSpan | None]]  # element, value span, comma span


def parse_strategy_source(source: str, filename: str = "<strategy>") -> cst.Module:
    """Parse with libcst; a syntax error says where and that the file was left as it is."""
    try:
        return cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        raise StrategyFileError(
            f"{_syntax_error(source, filename, exc)}. Fix the syntax error and run the command again; "
            "the file was not changed."
        ) from exc


def _syntax_error(source: str, filename: str, exc: cst.ParserSyntaxError) -> str:
    """What the syntax error is and where, as Python's own parser reports it (1-based line and column).

    libcst's native parser puts its error one token late (often on the next line) and reports
    column 0 beside an "error at LINE:COL" of its own; Python's parser points at the offending
    character, which is what an editor shows.
    """
    try:
        with warnings.catch_warnings():  # a SyntaxWarning (an invalid escape) is not the error
            warnings.simplefilter("ignore")
            ast.parse(source, filename=filename)
    except SyntaxError as err:
        if err.lineno is not None:
            where = f"line {err.lineno}" + (f", column {err.offset}, both counted from 1" if err.offset else "")
            text = (err.text or "").strip()
            return f"{filename} is not valid Python ({where}): {err.msg}" + (f" in `{text}`" if text else "")
        return f"{filename} is not valid Python: {err.msg}"
    except ValueError as err:  # null bytes, on Pythons that do not call that a SyntaxError
        return f"{filename} is not valid Python: {err}"
    # Python accepts it, libcst (which magsdk edits strategy files with) does not: its line, which may be
    # one token late, and its message without its second "error at LINE:COL" position
    message = re.sub(r"^parser error: error at \d+:\d+: ", "", exc.message)
    return (f"{filename} cannot be parsed by libcst, which magsdk edits strategy files with "
            f"(near line {exc.raw_line}): {message}")


#: What a strategy module needs so that magsdk can store calibrations in it (the error's hint).
CALIBRATIONS_IMPORTS = ("from typing import Any", "from magsdk import load_calibrations")
CALIBRATIONS_LINE = f"{CALIBRATIONS_NAME}: list[dict[str, Any]] = []"
CALIBRATIONS_CLASS_LINE = f"calibrations = load_calibrations({CALIBRATIONS_NAME})"


def missing_calibrations_message(filename: str) -> str:
    """Lines that, added as they are, make the module patchable and keep it ``mypy --strict`` clean."""
    return (
        f"{filename} has no module-level `{CALIBRATIONS_NAME} = [...]` assignment, so magsdk has nowhere to write "
        "the calibration; the file was not changed. Add these lines at module level, after its imports:\n\n"
        + "".join(f"    {line}\n" for line in CALIBRATIONS_IMPORTS)
        + f"    {CALIBRATIONS_LINE}\n\n"
        "and this line in the body of the strategy class (indented like its other attributes):\n\n"
        f"    {CALIBRATIONS_CLASS_LINE}\n\n"
        "then run the command again."
    )


def _is_calibrations_target(node: cst.BaseExpression) -> bool:
    return isinstance(node, cst.Name) and node.value == CALIBRATIONS_NAME


def _find_literal(source: str, filename: str) -> _Literal:
    module = parse_strategy_source(source, filename)
    wrapper = MetadataWrapper(module, unsafe_skip_copy=True)
    spans = wrapper.resolve(ByteSpanPositionProvider)
    values: list[cst.BaseExpression] = []
    for statement in module.body:
        if not isinstance(statement, cst.SimpleStatementLine):
            continue
        for small in statement.body:
            if isinstance(small, cst.AnnAssign) and _is_calibrations_target(small.target) and small.value:
                values.append(small.value)
            elif isinstance(small, cst.Assign) and any(_is_calibrations_target(t.target) for t in small.targets):
                values.append(small.value)
    if len(values) > 1:
        raise StrategyFileError(
            f"{filename} has {len(values)} module-level `{CALIBRATIONS_NAME} = [...]` assignments; magsdk rewrites "
            "exactly one. Merge them into one list and run the command again; the file was not changed."
        )
    if not values:
        raise StrategyFileError(missing_calibrations_message(filename))
    value = values[0]
    if not isinstance(value, cst.List):
        raise StrategyFileError(
            f"{filename}: {CALIBRATIONS_NAME} must be a list literal for magsdk to rewrite it, found "
            f"{type(value).__name__}"
        )
    elements = []
    for element in value.elements:
        if not isinstance(element, cst.Element):
            raise StrategyFileError(f"{filename}: {CALIBRATIONS_NAME} contains a starred element; write entries out")
        comma = element.comma
        elements.append((element, spans[element.value], spans[comma] if isinstance(comma, cst.Comma) else None))
    return _Literal(source.encode("utf-8"), value, spans[value], elements)


def read_calibrations(source: str, filename: str = "<strategy>") -> list[dict[str, Any]]:
    """The literal's entries as plain data, without executing the module."""
    literal = _find_literal(source, filename)
    raw = literal.source[literal.value_span.start : literal.value_span.start + literal.value_span.length]
    try:
        data = ast.literal_eval(raw.decode("utf-8"))
    except (ValueError, SyntaxError) as exc:
        raise StrategyFileError(
            f"{filename}: {CALIBRATIONS_NAME} is not a plain literal (only numbers, strings, True/False/None, "
            f"lists and dicts may appear in it): {exc}"
        ) from exc
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise StrategyFileError(f"{filename}: {CALIBRATIONS_NAME} must be a list of dicts")
    return data


def _entry_steps(literal: _Literal, span: CodeSpan, filename: str, index: int) -> int:
    raw = literal.source[span.start : span.start + span.length].decode("utf-8")
    try:
        data = ast.literal_eval(raw)
    except (ValueError, SyntaxError) as exc:
        raise StrategyFileError(f"{filename}: {CALIBRATIONS_NAME}[{index}] is not a plain literal: {exc}") from exc
    steps = data.get("num_steps") if isinstance(data, dict) else None
    if not isinstance(steps, int):
        raise StrategyFileError(f"{filename}: {CALIBRATIONS_NAME}[{index}] has no integer 'num_steps'")
    return steps


def _line_start(source: bytes, offset: int) -> int:
    return source.rfind(b"\n", 0, offset) + 1


def _own_line_indent(source: bytes, offset: int) -> str | None:
    """The indentation before ``offset`` when only whitespace precedes it on its line."""
    prefix = source[_line_start(source, offset) : offset]
    return prefix.decode("utf-8") if prefix.strip() == b"" else None


def upsert_calibration(source: str, entry: CalibrationEntry, filename: str = "<strategy>") -> str:
    """Return ``source`` with the entry for ``entry.num_steps`` replaced, or inserted in step order."""
    literal = _find_literal(source, filename)
    data = literal.source
    steps = [_entry_steps(literal, span, filename, i) for i, (_, span, _) in enumerate(literal.elements)]
    start, end, text = _edit(literal, steps, entry)
    patched = (data[:start] + text.encode("utf-8") + data[end:]).decode("utf-8")
    _check_only_literal_changed(source, patched, literal, filename)
    return patched


def _edit(literal: _Literal, steps: list[int], entry: CalibrationEntry) -> tuple[int, int, str]:
    """(start, end, replacement) in bytes of the source."""
    data = literal.source
    elements = literal.elements
    if not elements:
        span = literal.value_span
        return span.start, span.start + span.length, format_calibrations([entry])
    if entry.num_steps in steps:
        _, span, _ = elements[steps.index(entry.num_steps)]
        indent = _own_line_indent(data, span.start)
        text = format_entry(entry, indent if indent is not None else ENTRY_INDENT)
        return span.start, span.start + span.length, text[len(indent) :] if indent is not None else text.lstrip()
    later = [i for i, s in enumerate(steps) if s > entry.num_steps]
    if later:
        _, span, _ = elements[later[0]]
        indent = _own_line_indent(data, span.start)
        if indent is not None:
            at = _line_start(data, span.start)
            return at, at, format_entry(entry, indent) + ",\n"
        return span.start, span.start, format_entry(entry, "").lstrip() + ", "
    _, span, comma = elements[-1]
    indent = _own_line_indent(data, span.start)
    new = format_entry(entry, indent if indent is not None else ENTRY_INDENT)
    if comma is not None:
        at = comma.start + comma.length
        return at, at, "\n" + new + ","
    at = span.start + span.length
    return at, at, ",\n" + new + ","


def _check_only_literal_changed(before: str, after: str, literal: _Literal, filename: str) -> None:
    """Belt and braces: the patched file parses and differs from the original only inside the literal."""
    module = parse_strategy_source(after, filename)
    start = literal.value_span.start
    tail = len(literal.source) - (start + literal.value_span.length)
    new = after.encode("utf-8")
    if new[:start] != literal.source[:start] or (tail and new[-tail:] != literal.source[-tail:]):
        raise MagSDKError(f"internal error: patching {filename} would change bytes outside {CALIBRATIONS_NAME}")
    if module.code != after:
        raise MagSDKError(f"internal error: libcst does not round-trip the patched {filename}")


def strip_calibrations(source: str, filename: str = "<strategy>") -> str:
    """``source`` with the literal emptied: two modules that differ only in calibrations compare equal."""
    literal = _find_literal(source, filename)
    span = literal.value_span
    return (literal.source[: span.start] + b"[]" + literal.source[span.start + span.length :]).decode("utf-8")
