"""Write one ``## `` section of a markdown file (a benchmark's), leaving the rest of the file byte for byte."""

from __future__ import annotations

import re
from pathlib import Path

from magsdk.config import atomic_write_text


def write_section(path: Path, header: str, section: str) -> None:
    """Replace the section that starts with ``header`` (up to the next ``## ``), or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    start = text.find(header)
    if start < 0:
        atomic_write_text(path, text.rstrip("\n") + "\n\n" + section)
        return
    nxt = re.search(r"^## ", text[start + len(header):], flags=re.MULTILINE)
    end = start + len(header) + nxt.start() if nxt else len(text)
    atomic_write_text(path, text[:start] + section + ("\n" + text[end:] if nxt else ""))
