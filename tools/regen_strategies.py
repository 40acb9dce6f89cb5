"""Regenerate the bundled strategies from ``templates/strategy.py.j2`` so all share one shape.

    python tools/regen_strategies.py            # rewrite strategies/flux.py and strategies/flux2_klein.py
    python tools/regen_strategies.py --check    # exit 1 if a file would change (CI)
    python tools/regen_strategies.py --inspect  # take block metadata from `magsdk inspect` of tiny models

Each module keeps its docstring (which names where its published curve comes from), its class
name, its default settings and its calibration entries (the published curves, with their
``source``); block metadata comes from the current class or, with ``--inspect``, from inspecting
the transformer class (built small), which must then agree with the current class. Every file
is validated (calibration, import, registration, ``mypy --strict``) before it is replaced.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from magsdk.codegen import render_strategy, spec_from_strategy, strategies_in, write_validated
from magsdk.codegen.validate import validate_strategy_text

MODULES = ("flux", "flux2_klein")


def regenerate(name: str, *, check: bool, use_inspect: bool) -> bool:
    """Render ``strategies/<name>.py`` again; returns True when its text changes."""
    module = importlib.import_module(f"strategies.{name}")
    path = Path(module.__file__ or "")
    (strategy,) = strategies_in(module)
    spec = spec_from_strategy(
        strategy, module_name=name, model=strategy.transformer_cls_name, docstring=module.__doc__ or ""
    )
    if use_inspect:
        from magsdk.inspect import inspect_target

        report = inspect_target(strategy.transformer_cls_name)
        inspected = report.metadata_by_class()
        paths = [group.path for group in report.block_groups]
        if inspected != strategy.block_metadata or paths != list(strategy.block_groups):
            raise SystemExit(
                f"{path}: inspection of {strategy.transformer_cls_name} disagrees with the class:\n"
                f"  inspected groups {paths}, metadata {inspected}\n"
                f"  class groups {list(strategy.block_groups)}, metadata {strategy.block_metadata}"
            )
        spec = spec.model_copy(update={"block_metadata": inspected, "block_groups": paths})
    text = render_strategy(spec)
    changed = path.read_text(encoding="utf-8") != text
    if check:
        validate_strategy_text(text, path.name, expected_transformer=strategy.transformer_cls_name)
    elif changed:
        write_validated(path, text, expected_transformer=strategy.transformer_cls_name)
    print(f"{path}: {'would change' if check and changed else 'rewritten' if changed else 'unchanged'}")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="only report files that would change")
    parser.add_argument("--inspect", action="store_true", help="take block metadata from magsdk inspect")
    parser.add_argument("modules", nargs="*", default=list(MODULES), help=f"strategy modules (default: {MODULES})")
    args = parser.parse_args(argv)
    changed = [name for name in args.modules if regenerate(name, check=args.check, use_inspect=args.inspect)]
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
