"""Research for the budget planner (issue 10): error models, the choice of K / retention, reuse modes.

    nice -n 10 python tools/research_planner.py --out /tmp/planner-research.md        # the study
    nice -n 10 python tools/research_planner.py --shift 3 --no-grid --no-threshold --no-sensitivity \
        --modes plain forecast_sigma forecast_step --models residual acc_err        # sigma vs step index

RESEARCH CODE, not run in CI and not used by the runtime. It evaluates skip schedules on the bundled
reference FluxPipeline (28 steps, true CFG, both branches on one shared schedule) *without* the
magsdk runtime: ``MaskExecutor`` below wraps the transformer with four torch hooks and, per call,
either runs the block stack and stores the stack's residual, or empties the block lists (no block
runs) and adds a reused residual. It checks itself first: nothing skipped reproduces the uncached
images exactly, and a threshold plan reproduces ``magsdk.enable``'s images exactly.

Compared per budget B (computed steps per branch; calls = 2·B), 80 images (20 prompts x 4 seeds):
(a) threshold schedules (``magsdk.plan`` on the shared mean curve, 60 thresholds, K 2..6,
    retention 0.1 / 0.2): the best one at no more calls, and evenly spaced computes as a control;
(b) ``magsdk.planner.plan_budget`` under each error model with the planner's choice of K (the
    smallest that meets the budget), with K = 6, with error terms measured on recorded residuals
    (``oracle-*``), and a grid of fixed K / retention;
(c) reuse on skipped steps: plain; scaled by the accumulated ratio; first-order forecast from the
    last two computed residuals, extrapolated in step index or in sigma;
and the image's sensitivity to skipping one step at a time. Uncached images, the calibration and
every evaluated (schedule, mode) are cached in ``--cache``, so a rerun evaluates only what is new.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import magsdk  # noqa: E402
from magsdk.planner import ERROR_MODELS, BudgetPlan, InfeasibleBudgetError, plan_budget  # noqa: E402
from magsdk.reference import generate, load_reference_pipeline  # noqa: E402
from magsdk.reference.components import DIGIT_WORDS  # noqa: E402
from magsdk.reference.digits import EXTRA_TEMPLATES, PROMPT_TEMPLATE  # noqa: E402
from magsdk.reference.metrics import psnr, ssim  # noqa: E402

ALL_MODES = ("plain", "scaled", "scaled_branch", "forecast_sigma", "forecast_step")
#: Rows of the default study: each model with the planner's choice of K (the smallest that meets the
#: budget), the same with K = 6 (why the smallest), error terms measured on recorded residuals, a weighting.
DEFAULT_MODELS = (*ERROR_MODELS, "acc_err/k6", "residual/k6", "forecast/k6", "oracle-plain/k6", "oracle-forecast/k6",
                  "residual*P")
PLANNER_MODELS = (*DEFAULT_MODELS, "forecast-nocos/k6", "oracle-plain-x/k6", "oracle-forecast-x/k6", "direction",
                  "direction/k6", "residual/kmin1", "acc_err/kmin1", "acc_err*P", "acc_err*P2", "residual*P2",
                  "residual*P/k6", "acc_err*P/k6")
BRANCHES = ("cond", "uncond")  # FluxPipeline's true-CFG call order within a step
CALIBRATION_SEED = 1000


# -- research code: a schedule executor without the runtime ------------------------------------------
class MaskExecutor:
    """Run a fixed schedule: computed steps run the blocks, skipped ones reuse a residual (research only).

    Hooks: the transformer's pre-hook counts calls (step = call // 2, branch = call % 2) and, on a
    skipped step, swaps both block lists for empty ones; ``x_embedder``'s output is the stack's
    input; ``norm_out``'s pre-hook sees the stack's output, so it stores ``x_out - x_in`` on a
    computed call and returns ``x_in + reuse`` on a skipped one. Residual memory: two per branch.
    """

    def __init__(self, transformer: Any, computed: set[int], mode: str, curves: dict[str, list[float]]) -> None:
        self.t, self.computed, self.mode, self.curves = transformer, computed, mode, curves
        self.call, self.x_in, self.skip = 0, None, False
        self.hist: dict[int, list[tuple[int, float, torch.Tensor]]] = {0: [], 1: []}  # (step, sigma, r), last two
        self.blocks = (transformer.transformer_blocks, transformer.single_transformer_blocks)
        self.handles = [
            transformer.register_forward_pre_hook(self._pre, with_kwargs=True),
            transformer.register_forward_hook(self._post),
            transformer.x_embedder.register_forward_hook(lambda m, a, out: setattr(self, "x_in", out)),
            transformer.norm_out.register_forward_pre_hook(self._stack_out),
        ]

    def _pre(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        self.step, self.branch = divmod(self.call, 2)
        self.sigma = float(kwargs["timestep"].flatten()[0])
        self.skip = self.step not in self.computed
        if self.skip:
            module.transformer_blocks, module.single_transformer_blocks = torch.nn.ModuleList(), torch.nn.ModuleList()

    def _post(self, module: Any, args: Any, out: Any) -> None:
        module.transformer_blocks, module.single_transformer_blocks = self.blocks
        self.call += 1

    def _stack_out(self, module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        hist = self.hist[self.branch]
        if not self.skip:
            hist[:] = [*hist[-1:], (self.step, self.sigma, args[0] - self.x_in)]
            return None
        return (self.x_in + self.reuse(hist), *args[1:])

    def reuse(self, hist: list[tuple[int, float, torch.Tensor]]) -> torch.Tensor:
        step_c, sigma_c, r_c = hist[-1]
        if self.mode in ("scaled", "scaled_branch"):
            curve = self.curves["shared" if self.mode == "scaled" else BRANCHES[self.branch]]
            return r_c * math.prod(curve[step_c + 1 : self.step + 1])
        if self.mode.startswith("forecast") and len(hist) == 2:
            step_p, sigma_p, r_p = hist[0]
            if self.mode == "forecast_sigma":
                slope = (sigma_c - self.sigma) / (sigma_p - sigma_c)
            else:
                slope = (self.step - step_c) / (step_c - step_p)
            return r_c + (r_c - r_p) * slope
        return r_c

    def remove(self) -> None:
        self.t.transformer_blocks, self.t.single_transformer_blocks = self.blocks
        for h in self.handles:
            h.remove()


# -- evaluation --------------------------------------------------------------------------------------
class Lab:
    def __init__(self, args: argparse.Namespace) -> None:
        self.steps, self.cache = args.steps, Path(args.cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.pipe = load_reference_pipeline()
        if args.shift != 1.0:
            from diffusers import FlowMatchEulerDiscreteScheduler

            config = dict(self.pipe.scheduler.config)
            self.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config, shift=args.shift)
        templates = (PROMPT_TEMPLATE, *EXTRA_TEMPLATES)[: args.templates]
        self.prompts = [t.format(word=w) for t in templates for w in DIGIT_WORDS]
        self.seeds = list(range(args.seeds))
        tag = f"s{self.steps}-t{args.templates}-n{args.seeds}-shift{args.shift:g}"
        ref_file = self.cache / f"uncached-{tag}.pt"
        cal_file = self.cache / f"calibration-{self.steps}-shift{args.shift:g}.json"
        if ref_file.is_file():
            self.reference = torch.load(ref_file)
        else:
            self.reference = generate(self.pipe, self.prompts, self.seeds, num_inference_steps=self.steps)
            torch.save(self.reference, ref_file)
        if cal_file.is_file():
            self.calibration = magsdk.CalibrationResult.load(cal_file)
        else:
            with magsdk.calibrate(self.pipe) as cal:  # default prompts, a seed kept out of the evaluation
                generate(self.pipe, None, [CALIBRATION_SEED], num_inference_steps=self.steps)
            assert cal.result is not None
            self.calibration = cal.result
            self.calibration.save(cal_file)
        b = self.calibration.branches
        self.curves = {name: list(b[name].norm_ratios) for name in BRANCHES}
        self.curves["shared"] = [float(np.mean(v)) for v in zip(*(self.curves[n] for n in BRANCHES), strict=True)]
        self.norm_stds = [float(np.mean(v)) for v in zip(*(b[n].norm_stds for n in BRANCHES), strict=True)]
        self.cos_dists = [float(np.mean(v)) for v in zip(*(b[n].cos_dists for n in BRANCHES), strict=True)]
        self.sigmas = [float(t) for t in b[BRANCHES[0]].timesteps]  # type: ignore[arg-type]
        self.memo_file = self.cache / f"memo-{tag}.json"
        self.memo: dict[str, dict[str, list[float]]] = (
            json.loads(self.memo_file.read_text()) if self.memo_file.is_file() else {}
        )
        self.evaluated = 0
        self._oracle: dict[str, np.ndarray] = {}
        self._trajectory: tuple[torch.Tensor, torch.Tensor] | None = None

    def evaluate(self, computed: list[int], mode: str = "plain") -> dict[str, list[float]]:
        key = f"{mode}|{schedule_string(computed, self.steps)}"
        if key not in self.memo:
            executor = MaskExecutor(self.pipe.transformer, set(computed), mode, self.curves)
            try:
                images = generate(self.pipe, self.prompts, self.seeds, num_inference_steps=self.steps)
            finally:
                executor.remove()
            assert executor.call == 2 * self.steps, executor.call
            self.memo[key] = {"psnr": psnr(images, self.reference).tolist(),
                              "ssim": ssim(images, self.reference).tolist()}
            self.memo_file.write_text(json.dumps(self.memo))
            self.evaluated += 1
        return self.memo[key]

    def plan(self, budget: int, model: str, k: int | None = None, r: float | None = None) -> BudgetPlan:
        """Plan with a named model; the name may carry variants (research only).

        Without a suffix K is the planner's choice (the smallest K that meets the budget).
        ``NAME-nocos``: the model from the ratio curve alone (what a strategy's curve gives);
        ``oracle-*``: terms measured on recorded residuals (``oracle_terms``); ``direction``: the
        planar model's direction-only error (what is left once the magnitude is forecast);
        ``NAME*P`` / ``*P2``: terms weighted by ‖r_j‖/‖r_0‖ from the curve (or its square);
        ``NAME/k6``: K = 6, the loosest the planner allows; ``/kmin1``: one more than the smallest.
        """
        model, _, rule = model.partition("/")
        model, _, weighting = model.partition("*")
        weights = None
        if weighting:
            norm = np.cumprod(np.asarray(self.curves["shared"]))
            weights = (norm if weighting == "P" else norm**2).tolist()
        if k is None:
            k_min = magsdk.planner.smallest_max_skip_steps(self.steps, budget, r or 0.0)
            k = 6 if rule == "k6" else k_min + 1 if rule == "kmin1" else k_min
        if model.startswith("oracle") or model == "direction":
            kk = k
            rr = 0.0 if r is None else r
            least = magsdk.planner.budget_bounds(self.steps, kk, rr)[0]
            if budget < least:
                raise InfeasibleBudgetError(f"budget {budget} < {least}")
            span = max(1, min(self.steps - 1, kk))
            terms = self.oracle_terms(model) if model != "direction" else self.direction_terms(span)
            if weights is not None:
                j = np.minimum(np.arange(self.steps)[:, None, None] + np.arange(1, terms.shape[2] + 1), self.steps - 1)
                terms = terms * np.asarray(weights)[j]
            fixed = magsdk.planner.retention_steps(rr, self.steps)
            computed, cost = magsdk.planner._solve(terms[:, :, :span], self.steps, budget, kk, fixed)
            return BudgetPlan(num_steps=self.steps, budget=budget, computed_steps=computed,
                              skipped_steps=sorted(set(range(self.steps)) - set(computed)), max_skip_steps=kk,
                              retention_ratio=rr, error_model=model, cost=cost)
        name, _, variant = model.partition("-")
        return plan_budget(self.curves["shared"], budget, max_skip_steps=k, retention_ratio=r,
                           error_model=name,  # type: ignore[arg-type]
                           norm_stds=self.norm_stds, cos_dists=None if variant == "nocos" else self.cos_dists,
                           sigmas=self.sigmas, step_weights=weights)

    def direction_terms(self, span: int) -> np.ndarray:
        n = self.steps
        angle = np.cumsum(np.arccos(1.0 - np.asarray(self.cos_dists)))
        log_norm = np.cumsum(np.log(np.asarray(self.curves["shared"])))
        terms = np.full((n, 1, span), np.inf)
        for c in range(n):
            for length in range(1, min(span, n - 1 - c) + 1):
                j = c + length
                terms[c, 0, length - 1] = math.exp(log_norm[j] - log_norm[c]) * 2 * math.sin((angle[j] - angle[c]) / 2)
        return terms

    def oracle_terms(self, model: str) -> np.ndarray:
        """Error terms measured on recorded residuals of the calibration run (research: what a model could know).

        ``oracle-plain`` / ``oracle-forecast``: mean over images and branches of ‖r_j − reuse‖ / ‖r_c‖;
        ``-x`` variants divide by ‖x_out_j‖ (what ``norm_out`` sees) instead of ‖r_c‖.
        """
        if model in self._oracle:
            return self._oracle[model]
        if self._trajectory is None:
            self._trajectory = self.record_residuals()
        r, x_out = self._trajectory  # (steps, branches, images, tokens, dim), x_out alike
        n, span = self.steps, 6
        forecast = "forecast" in model
        terms = np.full((n, span + 2 if forecast else 1, span), np.inf)
        norm = (lambda d, c, j: d.flatten(2).norm(dim=-1) / x_out[j].flatten(2).norm(dim=-1)) if model.endswith("-x") \
            else (lambda d, c, j: d.flatten(2).norm(dim=-1) / r[c].flatten(2).norm(dim=-1))
        for c in range(n):
            for g in range(terms.shape[1]):
                if c - g < 0:
                    continue
                for length in range(1, span + 1):
                    j = c + length
                    if j > n - 1:
                        break
                    pred = r[c] if g == 0 else r[c] + (r[c] - r[c - g]) * (length / g)
                    terms[c, g, length - 1] = float(norm(r[j] - pred, c, j).mean())
        self._oracle[model] = terms
        return terms

    def record_residuals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Residuals and stack outputs of every call of an uncached run of the calibration prompts and seed."""
        t = self.pipe.transformer
        rs: list[torch.Tensor] = []
        xs: list[torch.Tensor] = []
        state: dict[str, torch.Tensor] = {}
        hooks = [t.x_embedder.register_forward_hook(lambda m, a, out: state.__setitem__("x_in", out)),
                 t.norm_out.register_forward_pre_hook(
                     lambda m, a: (rs.append(a[0] - state["x_in"]), xs.append(a[0].clone()), None)[-1])]
        try:
            generate(self.pipe, None, [CALIBRATION_SEED], num_inference_steps=self.steps)
        finally:
            for h in hooks:
                h.remove()
        shape = (self.steps, 2, *rs[0].shape)
        return torch.stack(rs).reshape(shape).double(), torch.stack(xs).reshape(shape).double()

    def threshold_schedules(self, thresholds: list[float]) -> dict[str, tuple[list[int], str]]:
        """Every distinct shared schedule the threshold rule makes: schedule string -> (computed, first setting)."""
        out: dict[str, tuple[list[int], str]] = {}
        curve = self.curves["shared"]
        for k in range(2, 7):
            for r in (0.1, 0.2):
                for th in thresholds:
                    config = magsdk.MagCacheConfig(mag_ratios=curve, threshold=th, max_skip_steps=k, retention_ratio=r)
                    p = magsdk.plan(curve, config, self.steps)
                    out.setdefault(p.schedule_string(), (p.computed_steps, f"{th:.3g}/{k}/{r:g}"))
        return out


    def check_executor(self) -> list[str]:
        """The executor must reproduce the uncached run when nothing skips, and the runtime for a threshold plan."""
        full = summary(self.evaluate(list(range(self.steps))))["psnr"]
        curve = self.curves["shared"]
        config = magsdk.MagCacheConfig(mag_ratios=curve, threshold=0.24, max_skip_steps=5, retention_ratio=0.1)
        p = magsdk.plan(curve, config, self.steps)
        executor = MaskExecutor(self.pipe.transformer, set(p.computed_steps), "plain", self.curves)
        try:
            ours = generate(self.pipe, self.prompts[:10], self.seeds[:1], num_inference_steps=self.steps)
        finally:
            executor.remove()
        with magsdk.enable(self.pipe, config) as handle:
            runtime = generate(self.pipe, self.prompts[:10], self.seeds[:1], num_inference_steps=self.steps)
        same_steps = handle.stats.computed_calls == 2 * len(p.computed_steps)
        diff = float((ours - runtime).abs().max())
        line = (f"Executor check: all steps computed -> {full:.2f} dB against the uncached images (100 = identical); "
                f"0.24/5/0.1 ({p.schedule_string()}) against magsdk.enable: same calls {same_steps}, "
                f"max abs pixel difference {diff:.2e}.")
        print(line, flush=True)
        return [line, ""]


def longest_run(computed: list[int], n: int) -> int:
    edges = [*computed, n]
    return max(b - a - 1 for a, b in itertools.pairwise(edges))


def schedule_string(computed: list[int], n: int) -> str:
    chosen = set(computed)
    return "".join("C" if i in chosen else "." for i in range(n))


def summary(scores: dict[str, list[float]], base: dict[str, list[float]] | None = None) -> dict[str, float]:
    p = scores["psnr"]
    out = {"psnr": statistics.fmean(p), "psnr_sd": statistics.stdev(p), "ssim": statistics.fmean(scores["ssim"])}
    if base is not None:
        diff = [a - b for a, b in zip(p, base["psnr"], strict=True)]
        out["delta"] = statistics.fmean(diff)
        out["delta_se"] = statistics.stdev(diff) / math.sqrt(len(diff)) if len(set(diff)) > 1 else 0.0
    return out


def fmt(s: dict[str, float]) -> str:
    return f"{s['psnr']:.2f} ± {s['psnr_sd']:.2f} \\| {s['ssim']:.5f}"


def fmt_delta(s: dict[str, float]) -> str:
    return f"{s['delta']:+.2f} ± {s['delta_se']:.2f}" if "delta" in s else "-"


# -- the study ---------------------------------------------------------------------------------------
def study(
    lab: Lab, budgets: list[int], thresholds: list[float], grid: bool, modes: tuple[str, ...],
    models: tuple[str, ...] = PLANNER_MODELS,
) -> tuple[list[str], dict[str, Any]]:
    n = lab.steps
    lines: list[str] = lab.check_executor()
    record: dict[str, Any] = {"budgets": {}}
    th_schedules = lab.threshold_schedules(thresholds) if thresholds else {}
    print(f"{len(th_schedules)} distinct threshold schedules", flush=True)
    th_scores = {}
    for s, (computed, setting) in th_schedules.items():
        if len(computed) <= max(budgets):
            th_scores[s] = (computed, setting, summary(lab.evaluate(computed)))
    for budget in budgets:
        rec: dict[str, Any] = {}
        lines += [f"### Budget {budget} of {n} steps ({2 * budget} calls)", ""]
        eligible = [v for v in th_scores.values() if len(v[0]) <= budget]
        best_th = max(eligible, key=lambda v: v[2]["psnr"]) if eligible else None
        rows: list[tuple[str, list[int], str]] = []
        if best_th is not None:
            rows.append((f"threshold best ({best_th[1]})", best_th[0], "-"))
        uniform = sorted({round(i * n / budget) for i in range(budget)})
        rows.append(("evenly spaced (control)", uniform, "-"))
        for model in models:
            p = lab.plan(budget, model)
            rows.append((f"DP {model}", p.computed_steps, f"longest run {longest_run(p.computed_steps, n)}"))
        lines += ["| schedule | constraints | calls | string | " + " | ".join(f"{m} PSNR ± sd \\| SSIM" for m in modes)
                  + " | " + " | ".join(f"{m} Δ vs plain" for m in modes[1:]) + " |",
                  "|---|---|---:|---|" + "---|" * (2 * len(modes) - 1)]
        for label, computed, constraint in rows:
            base = lab.evaluate(computed, "plain")
            stats = {m: summary(lab.evaluate(computed, m), base if m != "plain" else None) for m in modes}
            rec[label] = {"computed": computed, **stats}
            lines.append(f"| {label} | {constraint} | {2 * len(computed)} | `{schedule_string(computed, n)}` | "
                         + " | ".join(fmt(stats[m]) for m in modes) + " | "
                         + " | ".join(fmt_delta(stats[m]) for m in modes[1:]) + " |")
            print(f"  B={budget} {label:<34} {schedule_string(computed, n)} " + " ".join(
                f"{m}={stats[m]['psnr']:.2f}" for m in modes), flush=True)
        lines.append("")
        if grid:
            lines += _grid(lab, budget, rec)
        record["budgets"][budget] = rec
    return lines, record


GRID = (("acc_err", "plain"), ("residual", "forecast_step"))


def _grid(lab: Lab, budget: int, rec: dict[str, Any]) -> list[str]:
    """Fixed K / retention for two planner models: does the planner's choice (K ≤ 6, retention 0) land near the best?"""
    lines = [f"Fixed constraints at budget {budget} (PSNR dB; '-' = infeasible):", "",
             "| model, reuse | retention | " + " | ".join(f"K={k}" for k in range(2, 7)) + " |",
             "|---|---|" + "---:|" * 5]
    grid: dict[str, float] = {}
    for model, mode in GRID:
        for r in (0.0, 0.1, 0.2, 0.3):
            cells = []
            for k in range(2, 7):
                try:
                    p = lab.plan(budget, model, k, r)
                except InfeasibleBudgetError:
                    cells.append("-")
                    continue
                value = summary(lab.evaluate(p.computed_steps, mode))["psnr"]
                grid[f"{model}/{mode}/{k}/{r:g}"] = value
                cells.append(f"{value:.2f}")
            lines.append(f"| {model}, {mode} | {r:g} | " + " | ".join(cells) + " |")
    rec["grid"] = grid
    return [*lines, ""]


def sensitivity(lab: Lab) -> list[str]:
    """Skip one step at a time (plain reuse of the step before): which steps does the image feel, and does the model?"""
    curve = lab.curves["shared"]
    lines = ["Single-step sensitivity: only step j skipped (plain reuse of step j-1), against the model's term for it:",
             "", "| step j | ratio | acc_err term | residual term | PSNR dB | MSE x 1e6 |",
             "|---:|---:|---:|---:|---:|---:|"]
    for j in range(1, lab.steps):
        computed = [i for i in range(lab.steps) if i != j]
        scores = lab.evaluate(computed)
        mse = statistics.fmean(10 ** (-p / 10) for p in scores["psnr"])
        residual = math.sqrt((1 - curve[j]) ** 2 + 2 * curve[j] * lab.cos_dists[j])
        lines.append(f"| {j} | {curve[j]:.3f} | {abs(1 - curve[j]):.4f} | {residual:.4f} | "
                     f"{summary(scores)['psnr']:.2f} | {mse * 1e6:.2f} |")
        print(lines[-1], flush=True)
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--budgets", type=int, nargs="+", default=[18, 14, 10, 8])
    parser.add_argument("--templates", type=int, default=2, help="prompt phrasings (10 digit prompts each), 1-4")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--no-grid", action="store_true", help="skip the fixed K / retention grid")
    parser.add_argument("--no-threshold", action="store_true", help="skip the threshold sweep")
    parser.add_argument("--no-sensitivity", action="store_true", help="skip the one-step-at-a-time table")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=PLANNER_MODELS,
                        help="planner error models to compare")
    parser.add_argument("--cache", default="/tmp/magsdk-research-planner")
    parser.add_argument("--out", type=Path, help="write the markdown tables here")
    parser.add_argument("--json", type=Path, help="write every summary here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shift", type=float, default=1.0, help="run on FlowMatchEulerDiscreteScheduler(shift=...)")
    parser.add_argument("--modes", nargs="+", default=["plain", "scaled", "forecast_step", "forecast_sigma"],
                        choices=ALL_MODES, help="reuse modes to compare (the first is the baseline of the deltas)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lab = Lab(args)
    thresholds = [float(x) for x in np.geomspace(0.005, 5.0, 60)]
    lines, record = study(lab, args.budgets, [] if args.no_threshold else thresholds, not args.no_grid,
                          tuple(args.modes), tuple(args.models))
    if not args.no_sensitivity:
        lines += sensitivity(lab)
    n_img = len(lab.prompts) * len(lab.seeds)
    head = [f"Command: `python tools/research_planner.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
            f"({time.perf_counter() - start:.0f} s, {lab.evaluated} new evaluations).", "",
            f"{n_img} images ({len(lab.prompts)} prompts x {len(lab.seeds)} seeds), {lab.steps} steps, true CFG, "
            "one shared schedule for both branches; PSNR mean ± sd over images, SSIM mean, both against the "
            "uncached images; Δ vs plain: paired mean PSNR difference ± its standard error.", ""]
    text = "\n".join(head + lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
