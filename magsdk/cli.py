"""The ``magsdk`` command. Each sub-command lives in ``magsdk/commands/<name>.py``.

Exit codes: 0 success, 1 the work failed, 2 usage error. A ``MagSDKError`` is printed as one
clear message; a Python traceback appears only with ``--debug``.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from magsdk.errors import MagSDKError

app = typer.Typer(
    name="magsdk",
    help="MagCache for any diffusion transformer: inspect, scaffold, calibrate, plan, list, export, demo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks and debug logs."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what magsdk does."),
) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _register_commands() -> None:
    # One import per command module; each defines `register(app)`.
    from magsdk.commands import demo, export, inspect, listing, plan, scaffold

    for module in (inspect, scaffold, plan, listing, export, demo):  # docs/cli.md's order
        module.register(app)


_register_commands()


def _command() -> Any:
    """``app`` as the click command it runs, its help written like docs/cli.md.

    typer labels each value with its Python type (``--json <bool>``, ``--out <str>``) and a required
    argument with braces (``{target}``); the commands give their metavars (``--out FILE``), and here a
    flag gets no label (it takes no value) and an argument is named as docs/cli.md names it (``TARGET``).
    """
    command = typer.main.get_command(app)
    for sub in [command, *getattr(command, "commands", {}).values()]:
        help_option = sub.get_help_option(sub.context_class(sub, info_name=sub.name))
        for param in [*sub.params, *([help_option] if help_option is not None else [])]:
            if getattr(param, "is_flag", False):
                param.metavar = ""
            elif param.param_type_name == "argument":
                param.metavar = param.metavar or str(param.name).upper()
                usage = [param.metavar if param.required else f"[{param.metavar}]"]
                setattr(param, "get_usage_pieces", lambda ctx, usage=usage: usage)  # noqa: B010
                setattr(param, "display_type_rich", lambda ctx: None)  # noqa: B010  (the name says it)
    return command


def _is(exc: BaseException, name: str) -> bool:
    """Whether ``exc`` is click's ``name`` exception: click's own, or the copy typer vendors (typer ≥ 0.20)."""
    return any(cls.__name__ == name and cls.__module__.split(".")[0] in ("click", "typer") for cls in type(exc).__mro__)


def _name_the_value(exc: BaseException) -> None:
    """Add the value to typer's conversion error, which gives only pydantic's message.

    typer ≥ 0.20 converts ``--steps abc`` with pydantic and reports "Invalid value for '--steps' / '-n':
    Input should be a valid integer, unable to parse string as an integer" without the ``'abc'`` that
    click's own converters name; pydantic's error still holds it.
    """
    from pydantic import ValidationError

    cause = exc.__cause__
    if not (_is(exc, "BadParameter") and isinstance(cause, ValidationError) and cause.errors()):
        return
    value = cause.errors()[0].get("input")
    message = str(getattr(exc, "message", ""))
    if isinstance(value, str) and repr(value) not in message:
        exc.message = f"{message}, got {value!r}"  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code instead of raising SystemExit.

    ``--debug`` adds the traceback to an error; it never changes the exit code.
    """
    from magsdk.commands import set_invocation

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    set_invocation(args)
    try:
        _command().main(args=args, prog_name="magsdk", standalone_mode=False)
    except MagSDKError as exc:
        if debug:
            traceback.print_exc()
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if _is(exc, "Exit"):
            return int(getattr(exc, "exit_code", 0))
        if _is(exc, "Abort"):
            err_console.print("aborted")
            return 1
        if _is(exc, "ClickException"):
            _name_the_value(exc)
            exc.show()  # type: ignore[attr-defined]
            return 2 if _is(exc, "UsageError") else int(getattr(exc, "exit_code", 1))
        if debug:
            traceback.print_exc()
        err_console.print(
            f"[bold red]error:[/] {type(exc).__name__}: {escape(str(exc))}\n"
            "(run `magsdk --debug <command> ...` for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
