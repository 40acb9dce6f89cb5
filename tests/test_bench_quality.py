"""tools/bench_quality.py --quick: every method gets a row with finite numbers; only its own doc section changes."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("sklearn")

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_quality.py"
METHODS = (
    "magsdk (K=3, r=0.2)", "diffusers MagCache (K=3, r=0.2)", "diffusers FirstBlockCache", "diffusers TaylorSeer",
)


def load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_quality", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module
    spec.loader.exec_module(module)
    return module


def test_write_section_keeps_the_rest_of_the_file(tmp_path: Path) -> None:
    bench = load_tool()
    doc = tmp_path / "benchmarks.md"
    head = "# Benchmarks\n\n## Lead's section\n\nkeep me\n"
    tail = "## Another section\n\nkeep me too\n"
    doc.write_text(head + "\n" + bench.SECTION + "\n\nold numbers\n\n" + tail)
    bench.write_section(doc, bench.SECTION + "\n\nnew numbers\n")
    text = doc.read_text()
    assert text.startswith(head) and text.endswith(tail)
    assert "new numbers" in text and "old numbers" not in text
    # hand-written findings survive a regeneration
    def notes(body: str) -> str:
        return f"{bench.SECTION}\n\n{bench.NOTES_START}\n{body}\n{bench.NOTES_END}\n"

    bench.write_section(doc, notes("my analysis"))
    bench.write_section(doc, notes("placeholder") + "v2\n")
    text = doc.read_text()
    assert "my analysis" in text and "placeholder" not in text and "v2" in text and text.endswith(tail)
    fresh = tmp_path / "fresh.md"
    bench.write_section(fresh, bench.SECTION + "\n\nfirst\n")
    assert bench.SECTION in fresh.read_text()


@pytest.mark.slow
def test_quick_run_has_a_row_per_method(tmp_path: Path) -> None:
    bench = load_tool()
    out, data = tmp_path / "bench.md", tmp_path / "bench.json"
    assert bench.main(["--quick", "--prompts", "2", "--steps", "12", "--out", str(out), "--json", str(data)]) == 0
    payload = json.loads(data.read_text())
    methods = {p["method"] for p in payload["points"]}
    expected = set(METHODS)
    if payload["cache_dit"] is None:
        expected.add("cache-dit DBCache F1B0")
    assert expected <= methods, f"missing rows: {expected - methods}"
    for p in payload["points"]:
        for key in ("speedup", "psnr_db", "ssim", "accuracy", "seconds"):
            assert math.isfinite(p[key]), (p["method"], key, p[key])
        assert 0 < p["computed_calls"] <= p["total_calls"] == 2 * 12
    assert payload["transfer"] and all(math.isfinite(r["psnr_gap_db"]) for r in payload["transfer"])
    text = out.read_text()
    assert bench.SECTION in text
    for method in expected:
        assert f"| {method} |" in text
