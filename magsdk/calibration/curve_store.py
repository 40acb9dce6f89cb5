"""A user cache of calibrated curves, keyed by what the curve depends on.

``magsdk.enable(pipe, auto_calibrate=True)`` measures a model's curve during its first
generation(s); this module keeps that curve so that later processes find it again, and
``magsdk scaffold --from-cache`` turns it into a strategy module.

A curve belongs to one transformer (class and config), one schedule (scheduler class, its shift
and dynamic-shifting settings), one resolution (the number of image tokens the blocks see) and one
step count; a run that differs in any of these gets no curve from here (``docs/design.md``: curves
measured on another schedule or resolution mislead). The key says all of it, and a curve is
stored under a file name made from the key, one JSON file each, in ``$MAGSDK_CACHE_DIR/curves``
or the platform's user cache folder (``~/.cache/magsdk/curves`` on Linux). Writes are atomic.

The runtime imports this module, so it imports only the standard library, pydantic and
``magsdk.config`` (no torch).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from magsdk.config import CalibrationResult, atomic_write_text

logger = logging.getLogger("magsdk")

CACHE_DIR_ENV = "MAGSDK_CACHE_DIR"
CURVES_FOLDER = "curves"
#: Scheduler config entries that change the sigmas a step count produces.
SHIFT_KEYS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "shift_terminal", "time_shift_type")


def _canonical(value: Any) -> str:
    """Sorted-key JSON, with anything JSON cannot hold written as its string (tuples as lists)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: Mapping[str, Any] | None) -> str:
    """A short digest of a model config; diffusers' private ``_``-keys (paths, versions) are left out."""
    public = {str(k): v for k, v in (config or {}).items() if not str(k).startswith("_")}
    return hashlib.sha256(_canonical(public).encode()).hexdigest()[:16]


class CurveKey(BaseModel):
    """Everything a calibrated curve depends on; two runs with equal keys may share a curve."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    transformer: str
    config_hash: str
    scheduler: str | None = None
    #: The scheduler's shift settings (``SHIFT_KEYS`` present in its config), e.g. ``{"shift": 3.0}``.
    shift: dict[str, float | bool | str | None] = Field(default_factory=dict)
    #: Resolution bucket: the number of image tokens the transformer's blocks see.
    image_tokens: int = Field(ge=1)
    num_steps: int = Field(ge=2)

    @classmethod
    def create(
        cls,
        *,
        transformer: str,
        transformer_config: Mapping[str, Any] | None,
        scheduler: str | None,
        scheduler_config: Mapping[str, Any] | None,
        image_tokens: int,
        num_steps: int,
    ) -> CurveKey:
        """The key from class names and configs (``dict(model.config)``, ``dict(scheduler.config)``)."""
        shift: dict[str, float | bool | str | None] = {}
        for name in SHIFT_KEYS:
            value = (scheduler_config or {}).get(name)
            if value is None or isinstance(value, (bool, str)):
                shift[name] = value
            elif isinstance(value, (int, float)):
                shift[name] = float(value)
            else:
                shift[name] = str(value)
        return cls(
            transformer=transformer,
            config_hash=config_hash(transformer_config),
            scheduler=scheduler,
            shift={k: v for k, v in shift.items() if v is not None},
            image_tokens=image_tokens,
            num_steps=num_steps,
        )

    @classmethod
    def for_objects(cls, transformer: Any, scheduler: Any, *, image_tokens: int, num_steps: int) -> CurveKey:
        """The key of a live transformer and scheduler (read through ``type(...)`` and ``.config``)."""
        return cls.create(
            transformer=type(transformer).__name__,
            transformer_config=_config_of(transformer),
            scheduler=type(scheduler).__name__ if scheduler is not None else None,
            scheduler_config=_config_of(scheduler),
            image_tokens=image_tokens,
            num_steps=num_steps,
        )

    def digest(self) -> str:
        return hashlib.sha256(_canonical(self.model_dump()).encode()).hexdigest()[:16]

    def id(self) -> str:
        """A readable, unique file stem: ``FluxTransformer2DModel-28steps-4096tok-<digest>``."""
        stem = re.sub(r"[^A-Za-z0-9_.]+", "_", self.transformer)
        return f"{stem}-{self.num_steps}steps-{self.image_tokens}tok-{self.digest()}"


def _config_of(obj: Any) -> dict[str, Any]:
    config = getattr(obj, "config", None)
    if config is None:
        return {}
    try:
        return dict(config)
    except (TypeError, ValueError):
        return {}


class CachedCurve(BaseModel):
    """One cache file: the key, the measured result, and what ``scaffold --from-cache`` needs."""

    model_config = ConfigDict(extra="forbid")

    key: CurveKey
    result: CalibrationResult
    created: str = ""
    source: str = ""
    #: Where the transformer class lives (``diffusers.models...``), to inspect it again.
    transformer_module: str | None = None
    #: The transformer's config, to build it again for inspection (JSON-safe values only).
    transformer_config: dict[str, Any] = Field(default_factory=dict)


# -- location -----------------------------------------------------------------------------------------
def user_cache_dir() -> Path:
    """The platform's per-user cache folder for magsdk."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "magsdk" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "magsdk"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "magsdk"


def cache_dir() -> Path:
    """``$MAGSDK_CACHE_DIR`` when set, else the user cache folder."""
    override = os.environ.get(CACHE_DIR_ENV)
    return Path(override).expanduser() if override else user_cache_dir()


def curves_dir() -> Path:
    return cache_dir() / CURVES_FOLDER


def path_for(key: CurveKey) -> Path:
    return curves_dir() / f"{key.id()}.json"


# -- save / find --------------------------------------------------------------------------------------
def save(
    key: CurveKey,
    result: CalibrationResult,
    *,
    source: str = "",
    transformer_module: str | None = None,
    transformer_config: Mapping[str, Any] | None = None,
) -> Path:
    """Store ``result`` under ``key`` (replacing an older curve with the same key); returns the file."""
    record = CachedCurve(
        key=key,
        result=result,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
        source=source,
        transformer_module=transformer_module,
        transformer_config=json.loads(_canonical(dict(transformer_config or {}))),
    )
    path = path_for(key)
    atomic_write_text(path, record.model_dump_json(indent=2) + "\n")
    return path


def find_record(key: CurveKey) -> CachedCurve | None:
    """The cached record for exactly this key, or None (an unreadable file is logged and ignored)."""
    path = path_for(key)
    if not path.is_file():
        return None
    try:
        record = load_record(path)
    except ValueError as exc:
        logger.warning("magsdk: ignoring the unreadable cached curve %s: %s", path, exc)
        return None
    return record if record.key == key else None


def find(key: CurveKey) -> CalibrationResult | None:
    """The curve cached for exactly this key, or None."""
    record = find_record(key)
    return record.result if record is not None else None


def load_record(path: Path) -> CachedCurve:
    """Read one cache file; ``ValueError`` says what is wrong with it."""
    try:
        return CachedCurve.model_validate_json(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{path} is not a magsdk cached curve ({where}: {first['msg']})") from exc


def records() -> list[tuple[Path, CachedCurve]]:
    """Every readable cached curve, newest first."""
    folder = curves_dir()
    found: list[tuple[Path, CachedCurve]] = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            found.append((path, load_record(path)))
        except ValueError as exc:
            logger.warning("magsdk: ignoring %s", exc)
    found.sort(key=lambda item: (item[1].created, item[0].name), reverse=True)
    return found


def describe(path: Path, record: CachedCurve) -> str:
    key = record.key
    shift = ", ".join(f"{k}={v}" for k, v in key.shift.items()) or "no shift settings"
    return (
        f"{path.stem}  ({key.transformer}, {key.num_steps} steps, {key.image_tokens} image tokens, "
        f"{key.scheduler or 'no scheduler'} {shift}, branches {', '.join(record.result.branches)}; "
        f"cached {record.created[:19]})"
    )
