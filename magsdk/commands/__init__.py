"""CLI sub-commands, one module each; every module defines ``register(app)``."""

from __future__ import annotations

import contextvars
import shlex
import sys

from rich.console import Console

#: Width of output that goes to a file, a pipe or a CI log: wide enough that no table truncates a
#: name or wraps a row (a terminal keeps its own width).
FILE_WIDTH = 10_000

_INVOCATION: contextvars.ContextVar[str | None] = contextvars.ContextVar("magsdk_invocation", default=None)


def make_console(stderr: bool = False) -> Console:
    """A console that does not truncate tables when output goes to a file or a pipe."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else FILE_WIDTH
    return Console(stderr=stderr, width=width, soft_wrap=width is not None)


def set_invocation(args: list[str]) -> None:
    """Remember the command line (``magsdk.cli.main`` calls this) for hints that add an option to it."""
    _INVOCATION.set(shlex.join(["magsdk", *args]))


def invocation() -> str | None:
    """The command as the user typed it (None outside the CLI)."""
    return _INVOCATION.get()


def quiet_library_progress() -> None:
    """The commands print their own progress; diffusers' and transformers' loading bars would drown it."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
