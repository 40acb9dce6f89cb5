"""tools/bench_overhead.py on a few steps: every row is timed, both caches skip the same calls, its section is written.

Timings are not asserted (they are the machine's, not the code's); what a run must get right is what it compares.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

from diffusers_features import needs
from tools_loader import load_tool as load_tool_named


def load_tool() -> ModuleType:
    return load_tool_named("bench_overhead")


@needs("diffusers.hooks.MagCacheConfig", feature="diffusers' MagCache (the tool compares against it)")
def test_a_short_tiny_run_times_every_method_and_writes_its_section(tmp_path: Path) -> None:
    bench = load_tool()
    out, data = tmp_path / "bench.md", tmp_path / "rounds.json"
    out.write_text("# Benchmarks\n\n## Another section\n\nkept\n")
    assert bench.main(["--sizes", "tiny", "--steps", "8", "--rounds", "5", "--sample-seconds", "0.05",
                       "--out", str(out), "--json", str(data)]) == 0
    rows = json.loads(data.read_text())
    assert [(r["method"], r["setting"]) for r in rows][:3] == [
        ("plain", "-"), ("magsdk", "K=0 (skips nothing)"), ("diffusers", "K=0 (skips nothing)")]
    assert len(rows) == 7 and all(r["median_s"] > 0 for r in rows)
    count = rows[0]["round_count"]
    assert count >= 5 and all(r["round_count"] == count for r in rows)
    assert len(rows[0]["rounds"]) == 3 * count and all(len(r["rounds"]) == count for r in rows[1:])  # plain per pair
    for setting in bench.SETTINGS:  # the same curve and settings skip the same calls in both caches
        ours, theirs = (next(r for r in rows if r["method"] == m and r["setting"] == setting)
                        for m in ("magsdk", "diffusers"))
        assert ours["computed"] == theirs["computed"]
    assert next(r for r in rows if r["setting"] == "K=0 (skips nothing)")["computed"] == 8
    for r in rows:  # every figure is a paired ratio; only magsdk rows compare with diffusers
        assert r["paired_ratio"] > 0
        if r["method"] == "magsdk":
            low, high = r["vs_diffusers_ci"]
            assert low <= r["vs_diffusers"] <= high
        else:
            assert r["vs_diffusers"] is None
    text = out.read_text()
    assert "## Another section\n\nkept" in text and bench.SECTION in text
    assert "rounds of single generations: tiny/eager" in text
    assert "**Findings (computed from the table above).**" in text
