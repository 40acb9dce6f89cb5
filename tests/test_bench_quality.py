"""tools/bench_quality.py --quick: every method gets a row with finite numbers; only its own doc section changes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import sklearn  # noqa: F401  (a core dependency: the digit classifier needs it; missing, the tests fail, not skip)
from diffusers_features import needs
from tools_loader import load_tool as load_tool_named

METHODS = (
    "magsdk (K=3, r=0.2)", "diffusers MagCache (K=3, r=0.2)", "diffusers FirstBlockCache", "diffusers TaylorSeer",
)


def load_tool() -> ModuleType:
    return load_tool_named("bench_quality")


def test_write_section_keeps_the_rest_of_the_file(tmp_path: Path) -> None:
    bench = load_tool()
    doc = tmp_path / "benchmarks.md"
    head = "# Benchmarks\n\n## Lead's section\n\nkeep me\n"
    tail = "## Another section\n\nkeep me too\n"
    doc.write_text(head + "\n" + bench.SECTION_QUALITY + "\n\nold numbers\n\n" + tail)
    bench.write_section(doc, bench.SECTION_QUALITY, bench.SECTION_QUALITY + "\n\nnew numbers\n")
    text = doc.read_text()
    assert text.startswith(head) and text.endswith(tail)
    assert "new numbers" in text and "old numbers" not in text
    bench.write_section(doc, bench.SECTION_TRANSFER, bench.SECTION_TRANSFER + "\n\ntransfer\n")  # appended
    text = doc.read_text()
    assert "new numbers" in text and text.rstrip().endswith("transfer")
    fresh = tmp_path / "fresh.md"
    bench.write_section(fresh, bench.SECTION_QUALITY, bench.SECTION_QUALITY + "\n\nfirst\n")
    assert bench.SECTION_QUALITY in fresh.read_text()


@pytest.mark.slow
@needs("diffusers.MagCacheConfig", "diffusers.TaylorSeerCacheConfig",
       feature="the caches the sweep compares with (TaylorSeer: 0.36.0, MagCache: 0.37.0)")
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
    text = out.read_text()
    assert bench.SECTION_QUALITY in text and "**Findings (computed from the table above).**" in text
    for method in expected:
        assert f"| {method} |" in text
    # the same section again from the kept points, without measuring: same rows, and it names both commands
    again = tmp_path / "again.md"
    assert bench.main(["--from-json", str(data), "--out", str(again), "--plot", str(tmp_path / "p.png")]) == 0
    rendered = again.read_text()
    assert f"rendered from its points by `python tools/bench_quality.py --from-json {data}`" in rendered
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows == [line for line in rendered.splitlines() if line.startswith("| ")]
    # a speedup above the call ratio never wins the Pareto check: it counts at the call ratio
    for point in map(lambda p: bench.Point(**p), payload["points"]):
        assert point.credible_speedup <= point.call_speedup


@pytest.mark.slow
def test_quick_transfer_run_compares_mapped_index_and_native(tmp_path: Path) -> None:
    bench = load_tool()
    out, data = tmp_path / "bench.md", tmp_path / "bench.json"
    assert bench.main(["--transfer", "--quick", "--prompts", "1", "--steps", "12", "--out", str(out),
                       "--json", str(data)]) == 0
    rows = json.loads(data.read_text())["transfer"]
    assert [r["target"] for r in rows] == ["14 steps", "28 steps, shift 3"]
    for row in rows:
        for name in ("mapped", "probed", "index", "native"):
            assert math.isfinite(row[name]["psnr_db"]) and row[name]["total_calls"] == 2 * row["steps"]
        assert isinstance(row["meets_goal"], bool) and isinstance(row["probed_meets_goal"], bool)
    grid = json.loads(data.read_text())["transfer_grid"]
    assert [r["target"] for r in grid] == ["14 steps", "28 steps, shift 3"]
    for row in grid:
        assert [c["setting"] for c in row["settings"]] == ["0.06/3/0.2", "0.12/4/0.2"]
        for cell in row["settings"]:
            assert len(cell["native"]) == len(cell["mapped"]) == len(cell["probed"]) == len(cell["index"]) == 2
            assert all(1 <= n <= row["steps"] for n in cell["native"])
            assert all(-n < d <= row["steps"] - n for d, n in zip(cell["mapped"], cell["native"], strict=True))
    seeds = json.loads(data.read_text())["transfer_seeds"]
    assert [(r["target"], r["setting"]) for r in seeds] == [("14 steps", "0.06/3/0.2"),
                                                           ("28 steps, shift 3", "0.06/3/0.2")]
    for row in seeds:
        assert row["seeds"] == [1000, 1001] and len(row["native"]) == len(row["mapped"]) == len(row["probed"]) == 2
        assert all(1 <= n <= 28 for n in row["native"] + row["mapped"] + row["probed"])
    # the seed-1000 counts are the PSNR table's (the same calibrations, by plan): the plan matches the runs
    for row, measured in zip(seeds, rows, strict=True):
        assert 2 * row["native"][0] == measured["native"]["computed_calls"]
        assert 2 * row["mapped"][0] == measured["mapped"]["computed_calls"]
        assert 2 * row["probed"][0] == measured["probed"]["computed_calls"]
    # the probed calibration's cost is counted: 2 branches x (12 steps + 16 probes between each step and the next)
    assert "counted transformer calls): plain 24, probed 376 (15.7x)" in out.read_text()
    text = out.read_text()
    assert bench.SECTION_TRANSFER in text and "### More schedules, by plan" in text
    assert "### The same points with other calibration seeds, by plan" in text
    assert text.count("| 14 steps |") == 1 + 1 + 1  # a row each in the PSNR table (one setting), the grid, the seeds


@pytest.mark.slow
def test_quick_budget_run_compares_the_planner_with_the_best_threshold(tmp_path: Path) -> None:
    bench = load_tool()
    out, data = tmp_path / "bench.md", tmp_path / "bench.json"
    assert bench.main(["--budget", "--quick", "--prompts", "1", "--steps", "12", "--out", str(out),
                       "--json", str(data)]) == 0
    (row,) = json.loads(data.read_text())["budget"]
    assert row["budget"] == 6
    for mode in ("residual", "scaled", "forecast"):
        assert row[f"planner {mode}"]["computed_calls"] == 2 * 6  # exactly the budget, both CFG branches
    assert row["planner forecast full"]["computed_calls"] == 2 * 6  # the reach changes what a skip adds, not when
    for mode in ("residual", "forecast"):
        assert row[f"threshold {mode}"]["computed_calls"] <= 2 * 6
    assert bench.SECTION_BUDGET in out.read_text()


def test_equal_calls_runs_compare_the_two_curves_at_the_same_cost() -> None:
    """Where mapped and native differ in calls, each is rerun at the other's count, and the cell says the gap."""
    bench_tool = load_tool()
    from magsdk.reference import DEFAULT_PROMPTS, load_reference_pipeline

    pipe = load_reference_pipeline(None)
    bench = bench_tool.Bench(pipe, DEFAULT_PROMPTS[:1], [0], 1)
    source = bench_tool.calibration_on(bench, 12, None)
    native = bench_tool.calibration_on(bench, 8, None)
    assert native.schedule is not None
    timesteps = native.schedule.timesteps
    setting = (0.12, 4, 0.2)

    def calls(calibration: object, threshold: float) -> int:
        config = bench_tool.magsdk.MagCacheConfig(threshold=threshold, max_skip_steps=4, retention_ratio=0.2)
        return sum(len(bench_tool.magsdk.plan(calibration, config, 8, b, timesteps=timesteps).computed_steps)
                   for b in native.branches)

    # a count the native curve reaches at some threshold: the search finds one that gives it, the nearest first
    wanted = calls(native, 0.3)
    found = bench_tool.threshold_for_calls(native, setting, 8, wanted, timesteps)
    assert found is not None and calls(native, found) == wanted
    assert bench_tool.threshold_for_calls(native, setting, 8, 0, timesteps) is None  # never: retention computes

    # a row whose two runs differ in calls (native at a looser threshold): both curves rerun at the other's count
    mapped = bench.point("mapped", "threshold", 0.12, 8, bench_tool.attach_magsdk(pipe, source, 0.12, 4, 0.2), 1)
    loose = bench.point("native", "threshold", 0.3, 8, bench_tool.attach_magsdk(pipe, native, 0.3, 4, 0.2), 1)
    if mapped.computed_calls == loose.computed_calls:
        pytest.skip("the two runs happen to compute the same calls on this model")  # pragma: no cover
    row = {"target": "8 steps", "steps": 8, "setting": "0.12/4/0.2", "mapped": mapped, "native": loose}
    runs = bench_tool.equal_calls_runs(bench, row, source, native, setting)
    assert [run["curve"] for run in runs] == ["native", "mapped"]
    assert [run["calls"] for run in runs] == [mapped.computed_calls, loose.computed_calls]
    for run in runs:
        if run["point"] is not None:
            assert run["point"].computed_calls == run["calls"]  # the plan is what the runtime computes
    row["equal_calls"] = runs
    cell = bench_tool.equal_calls_cell(row)
    assert [part.split(":")[0] for part in cell.split("; ")] == [f"at {run['calls']}" for run in runs]
    assert bench_tool.equal_calls_findings([row])[0].startswith("*At equal calls.*")
    assert bench_tool.equal_calls_cell({**row, "equal_calls": []}) == "same calls"
