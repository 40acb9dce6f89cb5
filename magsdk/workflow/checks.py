"""Checks of cache settings given on a command line, before any model loads or file is written."""

from __future__ import annotations

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


def check_cache_settings(given: Mapping[str, Any], flags: Mapping[str, str] = FLAGS) -> None:
    """threshold / K / retention as ``MagCacheConfig`` checks them; the error names the flag and the value."""
    try:
        MagCacheConfig(mag_ratios=[1.0, 1.0], **given)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        if not field:  # a check across fields (two budgets at once): pydantic's message names them
            raise UsageError(str(err["msg"]).removeprefix("Value error, ")) from exc
        raise UsageError(f"{flags.get(field, field)} {given.get(field)!r}: {err['msg'].lower()}") from exc
