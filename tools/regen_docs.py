"""Re-run the command shown in each docs example block and write its real output under it.

Docs show command output in fenced blocks that start with ``$ magsdk ...``. For the commands whose
output depends only on the repository (``plan``, ``list``, ``export``), this tool runs the command
and replaces the block's body with what it printed, so no figure in those blocks is ever typed by
hand. Blocks of slow or machine-dependent commands (``inspect``, ``scaffold``, ``calibrate``,
``demo``) are left alone; the documents that show them say which command made them.

    python tools/regen_docs.py            # rewrite the blocks in README.md and docs/*.md
    python tools/regen_docs.py --check    # exit 1 if any block is out of date (a test runs this)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Sub-commands whose output is a pure function of the repository (no model is loaded, no timing shown).
REGENERATED = ("plan", "list", "export")
BLOCK = re.compile(r"^```[a-z]*\n(\$ magsdk (\S+)[^\n]*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)


def run(command: str) -> str:
    """The command's output, run in this process (one import of magsdk for all blocks)."""
    from magsdk.cli import main

    args = shlex.split(command)[2:]  # drop "$ magsdk"
    saved = {key: os.environ.get(key) for key in ("COLUMNS", "NO_COLOR", "TERM")}
    os.environ.update(COLUMNS="200", NO_COLOR="1", TERM="dumb")
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(args)
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    output = out.getvalue() + err.getvalue()
    if code != 0:
        raise SystemExit(f"`{command[2:]}` failed with exit code {code}:\n{output}")
    return output if output.endswith("\n") else output + "\n"


def regenerate(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        command, sub = match.group(1), match.group(2)
        if sub not in REGENERATED:
            return match.group(0)
        opening = match.group(0).split("\n", 1)[0]
        return f"{opening}\n{command}\n{run(command)}```\n"

    return BLOCK.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report out-of-date blocks instead of rewriting them")
    args = parser.parse_args(argv)
    stale = []
    for path in DOCS:
        text = path.read_text()
        new = regenerate(text)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print("out of date (run `python tools/regen_docs.py`): " + ", ".join(map(str, stale)))
        return 1
    print(("rewrote: " + ", ".join(map(str, stale))) if stale else "all command outputs are current")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
