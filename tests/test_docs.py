"""Command output shown in the docs is what the command prints today (tools/regen_docs.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_docs_command_blocks_are_current() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "regen_docs.py"), "--check"], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_docs_point_at_the_repo_design_doc_only() -> None:
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "magsdk").rglob("*.py"),
                 *(ROOT / "tests").glob("*.py")]:
        text = path.read_text(encoding="utf-8")
        assert "shared/DESIGN.md" not in text or path.name == "test_docs.py", path
