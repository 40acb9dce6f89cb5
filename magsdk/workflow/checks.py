"""Checks of cache settings given on a command line, before any model loads or file is written."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from magsdk.config import MagCacheConfig
from magsdk.errors import UsageError

#: The command-line option of each ``MagCacheConfig`` setting (errors name the flag the user typed).
FLAGS: dict[str, str] = {
    "threshold": "--threshold",
    "max_skip_steps": "--max-skip-steps/-k",
    "retention_ratio": "--retention-ratio",
    "compute_steps": "--compute-steps",
    "speedup": "--speedup",
    "reuse": "--reuse",
}


def check_steps(steps: int | None) -> None:
    """``--steps`` of export, scaffold, calibrate and demo: one check, one wording (a curve needs two steps)."""
    if steps is not None and steps < 2:
        raise UsageError(f"--steps must be at least 2 (a ratio curve needs two steps), got {steps}")


#: pydantic's error types for a number outside a bound.
_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _bounds(field: str) -> list[str]:
    """The numeric bounds ``MagCacheConfig`` puts on ``field`` (``>= 0``, ``< 1``)."""
    info = MagCacheConfig.model_fields.get(field)
    bounds: list[str] = []
    for item in info.metadata if info is not None else []:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attr, None) is not None:
                bounds.append(f"{sign} {getattr(item, attr):g}")
    return bounds


def check_cache_settings(given: Mapping[str, Any], flags: Mapping[str, str] = FLAGS) -> None:
    """threshold / K / retention as ``MagCacheConfig`` checks them; the error names the flag, the value and,
    for a value out of range, the whole accepted range (pydantic names only the bound that failed)."""
    try:
        MagCacheConfig(mag_ratios=[1.0, 1.0], **given)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        message = _as_flags(str(err["msg"]).removeprefix("Value error, "), flags)  # a validator's own message
        if not field:  # a check across fields (two budgets at once): the message names them
            raise UsageError(message) from exc
        flag = flags.get(field, field)
        bounds = _bounds(field)
        if len(bounds) > 1 and err["type"] in _RANGE_ERRORS:
            message += f" (accepted: {flag.split('/')[0]} {' and '.join(bounds)})"
        named = message.startswith(f"{flag.split('/')[0]} {given.get(field)!r}")  # the message names it already
        raise UsageError(message if named else f"{flag} {given.get(field)!r}: {message}") from exc


def _as_flags(message: str, flags: Mapping[str, str]) -> str:
    """A config validator speaks of ``speedup=0.5``; on a command line that is ``--speedup 0.5``."""
    for field, flag in flags.items():
        message = re.sub(rf"\b{field}=", f"{flag.split('/')[0]} ", message)
    return message
