"""Print the oldest releases pyproject.toml declares for diffusers and transformers, as exact pins.

``MAGSDK_OLDEST=1 bash tools/setup.sh`` installs them (CI's second environment, .ci/run), so the floors
that pyproject.toml promises are the ones CI tests. Standard library only: it runs before any venv.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

#: The dependencies whose floor CI installs; torch stays at the CPU build tools/setup.sh installs first.
PINNED = ("diffusers", "transformers")


def floors(pyproject: str) -> dict[str, str]:
    """``name>=X.Y.Z`` in [project] dependencies → {name: "X.Y.Z"} for the pinned names."""
    block = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.DOTALL | re.MULTILINE)
    if block is None:
        raise SystemExit("tools/oldest_pins.py: no [project] dependencies list in pyproject.toml")
    found = dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9][0-9A-Za-z.]*)', block.group(1)))
    missing = [name for name in PINNED if name not in found]
    if missing:
        raise SystemExit(f"tools/oldest_pins.py: pyproject.toml declares no '>=' floor for {', '.join(missing)}")
    return {name: found[name] for name in PINNED}


def main() -> int:
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    for name, version in floors(text).items():
        sys.stdout.write(f"{name}=={version}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
