"""tools/bench_overhead.py on a few steps: every row is timed, both caches skip the same calls, its section is written.

Timings are not asserted (they are the machine's, not the code's); what a run must get right is what it compares.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType

import diffusers
import pytest
from diffusers_features import lacks, needs
from tools_loader import load_tool as load_tool_named


def load_tool() -> ModuleType:
    return load_tool_named("bench_overhead")


@needs("diffusers.hooks.MagCacheConfig", feature="diffusers' MagCache (the tool compares against it)")
def test_a_short_tiny_run_times_every_method_and_writes_its_section(tmp_path: Path) -> None:
    bench = load_tool()
    out, data = tmp_path / "bench.md", tmp_path / "rounds.json"
    out.write_text("# Benchmarks\n\n## Another section\n\nkept\n")
    assert bench.main(["--sizes", "tiny", "--steps", "8", "--rounds", "5", "--sample-seconds", "0.05",
                       "--sync-cost", "--out", str(out), "--json", str(data)]) == 0
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
    # the GPU check's measure of what reading each call's timestep costs, here on the CPU (no sync to pay)
    assert re.search(r"magsdk without `scheduler=` \(it reads each call's timestep\) / with it, 0\.06/3/0\.2: "
                     r"\d\.\d{3} \(\d\.\d{3}-\d\.\d{3}\), [+-]\d+\.\d{3} ms per call", text)
    assert rows[0]["note"] and all(r["note"] is None for r in rows[1:])


@pytest.mark.slow
@needs("diffusers.hooks.MagCacheConfig", feature="diffusers' MagCache (the tool compares against it)")
@pytest.mark.skipif(not hasattr(diffusers.ModelMixin, "compile_repeated_blocks"),
                    reason=lacks("ModelMixin.compile_repeated_blocks (the compiled mode uses it)"))
def test_a_compiled_run_holds_one_copy_per_method_and_times_compiled_code_only(tmp_path: Path) -> None:
    """The GPU check's compiled mode on the tiny model: three copies (not one per method and setting: FLUX.1-dev
    would not fit), every setting measured, no graph compiled inside the timed rounds, and the section says
    compiled / eager for magsdk and is written after each mode."""
    bench = load_tool()
    out, data = tmp_path / "bench.md", tmp_path / "rounds.json"
    copies: list[int] = []
    real_deepcopy = bench.copy.deepcopy

    def counting_deepcopy(obj: object, *args: object) -> object:
        if isinstance(obj, diffusers.FluxTransformer2DModel):  # not the submodules copied on the way
            copies.append(1)
        return real_deepcopy(obj, *args)

    bench.copy.deepcopy = counting_deepcopy
    try:
        assert bench.main(["--sizes", "tiny", "--modes", "eager,compiled", "--steps", "6", "--rounds", "5",
                           "--sample-seconds", "0.01", "--out", str(out), "--json", str(data)]) == 0
    finally:
        bench.copy.deepcopy = real_deepcopy
    assert len(copies) == 2  # magsdk's and diffusers' compiled copies; plain runs on the model itself
    rows = json.loads(data.read_text())
    compiled = [r for r in rows if r["mode"] == "compiled"]
    assert len(compiled) == 7
    for setting in bench.SETTINGS:
        ours, theirs = (next(r for r in compiled if r["method"] == m and r["setting"] == setting)
                        for m in ("magsdk", "diffusers"))
        assert ours["computed"] == theirs["computed"]
        assert ours["compiled_in_rounds"] == theirs["compiled_in_rounds"] == 0
    assert all(r["compiled_in_rounds"] is None for r in rows if r["mode"] == "eager")
    text = out.read_text()
    assert "rounds of single generations: tiny/eager 5, tiny/compiled" in text and "Incomplete" not in text
    assert "graphs compiled during the timed rounds: 0 (the rounds timed compiled code only)" in text
    assert "magsdk compiled / magsdk eager median time" in text
