"""torch.compile with magsdk: graph breaks and recompilations, counted with dynamo's own counters.

A tiny real FluxPipeline (``magsdk.reference.components.build_pipeline``), 28 steps, magsdk enabled
with the FLUX.1-dev curve at 0.24/5/0.1. For whole-model ``torch.compile(pipe.transformer)`` and for
diffusers' ``compile_repeated_blocks()``: graphs compiled and recompilations in a first and a second
generation, where the graph breaks are, whether the computed steps equal eager magsdk's, and the
largest difference of the latents against eager magsdk.

    python tools/bench_compile.py                 # prints a markdown table (CPU: a few minutes)
    python tools/bench_compile.py --out docs/benchmarks.md   # and writes it as its section there
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from docsection import write_section  # noqa: E402

import magsdk  # noqa: E402
from strategies.flux import VARIANTS  # noqa: E402

FLUX_RATIOS = VARIANTS[0]["calibrations"][0]["branches"]["default"]  # flux.1-dev
CONFIG = magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, threshold=0.24, max_skip_steps=5, retention_ratio=0.1)
SECTION = "## torch.compile with magsdk"
#: magsdk's own decision calls, where a whole-model graph is meant to break.
DECISION_CALLS = ("CacheSession.before_call", "CacheSession.after_call")


def make_pipe() -> Any:
    from magsdk.reference.components import build_pipeline

    pipe = build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any, steps: int = 28) -> torch.Tensor:
    with torch.no_grad():
        out = pipe("a cat", num_inference_steps=steps, height=32, width=32, max_sequence_length=16,
                   output_type="latent", generator=torch.Generator().manual_seed(0))
    return out.images  # type: ignore[no-any-return]


class _Recompiles(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.functions: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Recompiling function"):
            self.functions.append(message.splitlines()[0])


@contextmanager
def dynamo_counts() -> Iterator[dict[str, Any]]:
    """Graphs compiled, graph breaks (reason → count) and recompilations while inside."""
    torch._logging.set_logs(recompiles=True)
    logger = logging.getLogger("torch._dynamo.guards.__recompiles")
    handler = _Recompiles()
    logger.addHandler(handler)
    counters.clear()
    found: dict[str, Any] = {}
    try:
        yield found
    finally:
        found["graph_breaks"] = dict(counters["graph_break"])
        found["graphs"] = counters["stats"]["unique_graphs"]
        found["recompiles"] = list(handler.functions)
        logger.removeHandler(handler)
        torch._logging.set_logs()


def where(reason: str) -> str:
    """A graph break's place, short: magsdk's decision call or the function dynamo names."""
    for name in DECISION_CALLS:
        if name in reason:
            return f"magsdk {name.split('.')[-1]}"
    found = re.search(r"function (\S+)", reason)
    return found.group(1) if found else reason.splitlines()[0][:60]


def measure(mode: str, eager_out: torch.Tensor, eager_steps: list[int]) -> dict[str, Any]:
    torch._dynamo.reset()
    pipe = make_pipe()
    handle = magsdk.enable(pipe, CONFIG)
    if mode == "torch.compile(pipe.transformer)":
        pipe.transformer = torch.compile(pipe.transformer)
    else:
        pipe.transformer.compile_repeated_blocks()
    start = time.perf_counter()
    with dynamo_counts() as first:
        out = generate(pipe)
    seconds = time.perf_counter() - start
    steps = handle.stats.computed_steps()
    with dynamo_counts() as second:
        again = generate(pipe)
    handle.disable()
    breaks: dict[str, int] = {}
    for reason, count in first["graph_breaks"].items():
        breaks[where(reason)] = breaks.get(where(reason), 0) + count
    return {
        "mode": mode, "first": first, "second": second, "seconds": seconds, "breaks": breaks,
        "same_steps": steps == eager_steps, "max_diff": float((out - eager_out).abs().max()),
        "repeatable": bool(torch.equal(again, out)),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| compile | generation 1: graphs / recompilations | graph breaks (where: count) | generation 2: graphs "
             "/ recompilations | computed steps = eager | max \\|latents − eager\\| |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        breaks = ", ".join(f"{k}: {v}" for k, v in row["breaks"].items()) or "none"
        lines.append(f"| `{row['mode']}` | {row['first']['graphs']} / {len(row['first']['recompiles'])} | {breaks} "
                     f"| {row['second']['graphs']} / {len(row['second']['recompiles'])} | "
                     f"{'yes' if row['same_steps'] else '**no**'} | {row['max_diff']:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write the section into this markdown file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    pipe = make_pipe()
    with magsdk.enable(pipe, CONFIG) as handle:
        eager_out = generate(pipe)
        eager_steps = handle.stats.computed_steps()
    rows = [measure(mode, eager_out, eager_steps)
            for mode in ("pipe.transformer.compile_repeated_blocks()", "torch.compile(pipe.transformer)")]
    body = table(rows)
    command = "python tools/bench_compile.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = (
        f"{SECTION}\n\nCommand: `{command.strip()}` ({time.perf_counter() - started:.0f} s on CPU, torch "
        f"{torch.__version__}, {time.strftime('%Y-%m-%d')}).\n\nA tiny real FluxPipeline, 28 steps, magsdk at "
        f"0.24/5/0.1 ({len(eager_steps)} of 28 steps computed). Counted with dynamo's counters and its recompilation "
        "log. Breaks at magsdk's decision calls are on purpose (`torch.compiler.disable`); none is inside a block. "
        "The latents differ from eager by what inductor's reordered arithmetic gives on this model without magsdk "
        "too.\n\n" + body + "\n"
    )
    print(section)
    if args.out is not None:
        write_section(args.out, SECTION, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
