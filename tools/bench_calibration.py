"""What calibration costs: K generations inside ``magsdk.calibrate`` against the same K generations uncached.

Calibration records ‖r_t‖ ratios at every transformer call; the target is that calibrating K
generations takes at most 1.05 x the time of K plain generations. Both methods run the exact
calls ``magsdk scaffold`` makes (the model's own call settings, see ``magsdk.calibration.settings``),
after one warm-up generation of each, in interleaved rounds (alternating order); the medians and
their ratio are printed as a row for docs/benchmarks.md.

    python tools/bench_calibration.py --model PIPELINE_FOLDER [--steps N] [--generations K] [--rounds R]
                                      [--device cuda] [--dtype bfloat16]

Run it on a quiet machine; timings are never asserted in tests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docsection import write_section

import magsdk
from magsdk.calibration.drivers import load_model, pipeline_call_kwargs, resolve_settings
from magsdk.calibration.settings import CalibrationRequest, CalibrationSettings


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _generations(pipe: Any, settings: CalibrationSettings, runs: list[tuple[str, int]]) -> float:
    _sync()
    begin = time.perf_counter()
    with torch.no_grad():
        for prompt, seed in runs:
            pipe(**pipeline_call_kwargs(pipe, prompt, seed, settings.call_kwargs))
    _sync()
    return time.perf_counter() - begin


def _calibrated(pipe: Any, settings: CalibrationSettings, runs: list[tuple[str, int]]) -> float:
    _sync()
    begin = time.perf_counter()
    with magsdk.calibrate(pipe) as cal:
        _generations(pipe, settings, runs)
    _sync()
    seconds = time.perf_counter() - begin
    assert cal.result is not None and cal.result.num_steps == settings.steps
    return seconds


def calibration_cost(
    model: str,
    *,
    steps: int | None = None,
    generations: int = 4,
    rounds: int = 5,
    device: str | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Medians of ``rounds`` interleaved rounds of K uncached and K calibrated generations, and their ratio."""
    loaded = load_model(model, device=device, dtype=dtype)
    if loaded.pipeline is None:
        raise SystemExit(f"{model}: give a diffusers pipeline folder (model_index.json)")
    settings = resolve_settings(CalibrationRequest(steps=steps), loaded)
    prompts = settings.prompts
    runs = [(prompts[i % len(prompts)], i // len(prompts)) for i in range(generations)]
    pipe = loaded.pipeline
    _generations(pipe, settings, runs[:1])  # warm-up of both paths
    _calibrated(pipe, settings, runs[:1])
    plain: list[float] = []
    calibrated: list[float] = []
    for index in range(rounds):
        order = (False, True) if index % 2 == 0 else (True, False)
        for with_calibration in order:
            if with_calibration:
                calibrated.append(_calibrated(pipe, settings, runs))
            else:
                plain.append(_generations(pipe, settings, runs))
    plain_median, calibrated_median = statistics.median(plain), statistics.median(calibrated)
    return {
        "model": model,
        "settings": settings.describe(),
        "generations": generations,
        "rounds": rounds,
        "uncached_seconds": plain,
        "calibrated_seconds": calibrated,
        "uncached_median": plain_median,
        "calibrated_median": calibrated_median,
        "ratio": calibrated_median / plain_median,
    }


SECTION = "## What calibration costs"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a diffusers pipeline folder")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--generations", type=int, default=4, help="K generations per timed run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the row as its section of a markdown file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cost = calibration_cost(args.model, steps=args.steps, generations=args.generations, rounds=args.rounds,
                            device=args.device, dtype=args.dtype)
    rows = [
        "| model | K generations | uncached (s, median) | calibrated (s, median) | calibrated / uncached |",
        "|---|---|---|---|---|",
        f"| {cost['model']} | {cost['generations']} | {cost['uncached_median']:.3f} | "
        f"{cost['calibrated_median']:.3f} | {cost['ratio']:.3f}x |",
    ]
    print(f"settings: {cost['settings']}")
    print("\n".join(rows))
    if args.out is not None:
        command = "python tools/bench_calibration.py " + " ".join(argv if argv is not None else sys.argv[1:])
        goal = "met" if cost["ratio"] <= 1.05 else "**not met**"
        section = (
            f"{SECTION}\n\nCommand: `{command.strip()}` ({time.perf_counter() - started:.0f} s, "
            f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {torch.get_num_threads()} threads).\n\n"
            f"K generations inside `magsdk.calibrate` against the same K generations uncached, with the calls "
            f"`magsdk scaffold` makes ({cost['settings']}); medians of {cost['rounds']} interleaved rounds after a "
            f"warm-up. Goal: calibrated / uncached <= 1.05 ({goal}).\n\n" + "\n".join(rows) + "\n"
        )
        write_section(args.out, SECTION, section)


if __name__ == "__main__":
    main()
