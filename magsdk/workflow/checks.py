"""Checks of cache settings given on a command line, before any model loads or file is written."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path
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


# -- --model values ---------------------------------------------------------------------------------
#: ``org/name``, as ``magsdk.inspect.targets`` takes a Hub id (a value starting with "." or "/" is a path).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: Options that come before the command (``magsdk --debug scaffold ...``).
_GLOBAL_FLAGS = ("--debug", "--verbose", "-v")


def looks_like_hub_id(value: str) -> bool:
    """``org/name`` with no such local path: what ``from_pretrained`` would look up on the Hub."""
    return bool(_HUB_ID.match(value)) and not Path(value).exists()


def command_name(invocation: str | None) -> str | None:
    """The sub-command of a command line (``scaffold`` in ``magsdk --debug scaffold --model x``)."""
    words = shlex.split(invocation) if invocation else []
    rest = [w for w in words[1:] if w not in _GLOBAL_FLAGS]
    return rest[0] if rest else None


def with_model(invocation: str | None, model: str, fallback: str) -> str:
    """The command line with its ``--model`` value replaced by ``model`` (``fallback --model MODEL`` when
    there is no command line to repeat, as from Python)."""
    words = shlex.split(invocation) if invocation else []
    for i, word in enumerate(words):
        if word in ("--model", "-m") and i + 1 < len(words):
            return shlex.join([*words[: i + 1], model, *words[i + 2:]])
        if word.startswith("--model="):
            return shlex.join([*words[:i], f"--model={model}", *words[i + 1:]])
    return f"{fallback} --model {shlex.quote(model)}"


def local_folder_name(repo_id: str) -> str:
    """The folder a Hub download goes to in the hints (``black-forest-labs/FLUX.1-dev`` → ``FLUX.1-dev``)."""
    return repo_id.rsplit("/", 1)[-1]


def download_command(repo_id: str, *files: str) -> str:
    """``hf download`` of a Hub repository (or some of its files) into a local folder named after it."""
    return shlex.join(["hf", "download", repo_id, *files, "--local-dir", local_folder_name(repo_id)])


def download_note(repo_id: str) -> str:
    """The download, said once for both CLIs of huggingface_hub."""
    return (
        f"on a machine with network run `{download_command(repo_id)}` (huggingface_hub < 0.34: "
        f"`huggingface-cli download` with the same arguments; log in first with `hf auth login` for a gated model)"
    )


def missing_path_error(model: str, flag: str = "--model") -> UsageError:
    head = model.rpartition(":")[0] if ".py:" in model else model
    return UsageError(
        f"{flag} {model!r}: no such file or folder ({Path(head).expanduser().resolve()} does not exist); give a "
        "diffusers pipeline folder (model_index.json), a transformer folder (config.json), a class name or "
        "file.py:Class"
    )


def check_demo_model(model: str | None, invocation: str | None = None) -> None:
    """``magsdk demo --model``: a local diffusers pipeline folder (it never downloads), before anything loads."""
    if model is None:
        return
    path = Path(model)
    if (path / "model_index.json").is_file():
        return
    needs = "`magsdk demo` generates images with a whole diffusers pipeline, so it needs a pipeline folder " \
            "(with model_index.json)"
    if path.is_dir() and (path / "config.json").is_file():
        raise UsageError(
            f"--model {model!r} is a transformer folder (config.json, no model_index.json); {needs}. To calibrate "
            f"this transformer alone, use `{shlex.join(['magsdk', 'scaffold', '--model', model])}`"
        )
    if path.exists():
        raise UsageError(
            f"--model {model!r} is not a diffusers pipeline folder ({path.resolve()} has no model_index.json); "
            f"{needs}, or leave --model out for the bundled digits pipeline"
        )
    if looks_like_hub_id(model):
        local = local_folder_name(model)
        raise UsageError(
            f"--model {model!r} looks like a Hugging Face Hub id, but `magsdk demo` runs on a local pipeline folder "
            f"only (it does not download, and there is no folder {path.resolve()}): {download_note(model)}, bring "
            f"the folder here and run `{with_model(invocation, local, 'magsdk demo')}`"
        )
    raise UsageError(
        f"--model {model!r}: no such folder ({path.expanduser().resolve()} does not exist); {needs}, or leave "
        "--model out for the bundled digits pipeline"
    )
