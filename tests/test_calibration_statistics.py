"""Calibration statistics checked against an independent computation, not only counted.

docs/design.md section 1 and docs/user-guide.md "Calibration": per branch and step, the mean and std over
tokens of ``‖r_t‖ / (‖r_{t-1}‖ + 1e-8)`` (norms over the hidden dimension), the mean cosine distance
``1 - cos(r_t, r_{t-1})`` and the timestep, where ``r = x_out - x_in`` is the block stack's residual;
step 0 records 1, 0, 0. Several generations: the mean of their curves, and ``norm_ratio_spread`` their
std across generations (population std, ``correction=0``: ``magsdk/runtime/recorder.py::merge_runs``).

The residuals here are taken with plain torch hooks on the model's own modules, outside the block
stack: the hidden state leaving ``x_embedder`` (the first block's input) and the one entering
``norm_out`` (the last block's output).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tiny_models import denoise, fresh_copy, tiny_flux

import magsdk

STEPS = 6


class StackResiduals:
    """Per transformer call: the block stack's residual and the timestep argument, seen by plain hooks."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.residuals: list[torch.Tensor] = []
        self.timesteps: list[float] = []
        self._entering: torch.Tensor | None = None
        self._handles = [
            transformer.register_forward_pre_hook(self._on_call, with_kwargs=True),
            transformer.x_embedder.register_forward_hook(self._on_embedded),
            transformer.norm_out.register_forward_pre_hook(self._on_stack_output),
        ]

    def _on_call(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self.timesteps.append(float(kwargs["timestep"].reshape(-1)[0]))

    def _on_embedded(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        self._entering = output.detach().clone()

    def _on_stack_output(self, module: torch.nn.Module, args: Any) -> None:
        assert self._entering is not None
        self.residuals.append(args[0].detach() - self._entering)
        self._entering = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def own_statistics(residuals: list[torch.Tensor]) -> tuple[list[float], list[float], list[float]]:
    """Norm-ratio mean, norm-ratio std (over tokens) and mean cosine distance per step, in float64."""
    ratios, stds, cos = [1.0], [0.0], [0.0]
    for previous, current in itertools.pairwise(residuals):
        width = current.shape[-1]
        cur, prev = current.double().reshape(-1, width), previous.double().reshape(-1, width)
        cur_norm, prev_norm = cur.norm(dim=-1), prev.norm(dim=-1)
        per_token = cur_norm / (prev_norm + 1e-8)
        ratios.append(per_token.mean().item())
        stds.append(per_token.std(correction=0).item())
        cos.append((1.0 - (cur * prev).sum(-1) / (cur_norm * prev_norm)).mean().item())
    return ratios, stds, cos


def calibrated(model: torch.nn.Module, *runs: Callable[[], Any]) -> magsdk.CalibrationResult:
    with magsdk.calibrate(model) as cal:
        for run in runs:
            run()
    return cal.result


def mean(values: list[list[float]]) -> list[float]:
    return [sum(column) / len(column) for column in zip(*values, strict=True)]


def population_std(values: list[list[float]]) -> list[float]:
    means = mean(values)
    return [(sum((v - m) ** 2 for v in column) / len(column)) ** 0.5
            for column, m in zip(zip(*values, strict=True), means, strict=True)]


@pytest.fixture(scope="module")
def flux() -> torch.nn.Module:
    return tiny_flux()


def test_each_statistic_is_what_the_residuals_say(flux):
    """Two CFG passes per step: each branch's curve from its own calls' residuals, value by value."""
    model = fresh_copy(flux)
    seen = StackResiduals(model)
    result = calibrated(model, lambda: denoise(model, STEPS, cfg=True, seed=0))
    seen.remove()
    assert sorted(result.branches) == ["pass0", "pass1"] and len(seen.residuals) == 2 * STEPS
    for position, name in enumerate(("pass0", "pass1")):  # calls alternate cond (pass0), uncond (pass1)
        branch = result.branches[name]
        residuals = seen.residuals[position::2]
        ratios, stds, cos = own_statistics(residuals)
        assert branch.norm_ratios == pytest.approx(ratios, rel=1e-5, abs=1e-7), name
        assert branch.norm_stds == pytest.approx(stds, rel=1e-5, abs=1e-7), name
        assert branch.cos_dists == pytest.approx(cos, rel=1e-5, abs=1e-7), name
        assert branch.timesteps == pytest.approx(seen.timesteps[position::2], abs=1e-6), name
        assert branch.num_runs == 1 and branch.norm_ratio_spread == [0.0] * STEPS
        # the values are not degenerate: the check above could tell a wrong statistic from a right one
        assert all(s > 1e-4 for s in stds[1:]) and all(c > 1e-4 for c in cos[1:])
        assert len({round(r, 4) for r in ratios}) == STEPS
    # the two branches were told apart (a mixed-up branch would compare cond with uncond residuals)
    assert result.branches["pass0"].norm_ratios != result.branches["pass1"].norm_ratios


def test_generations_are_averaged_and_their_spread_is_the_population_std(flux):
    """Both seeds in one block: the mean of each seed calibrated alone; the spread, their population std."""
    model = fresh_copy(flux)
    alone = [calibrated(model, lambda seed=seed: denoise(model, STEPS, cfg=True, seed=seed)) for seed in (0, 1)]
    seen = StackResiduals(model)
    both = calibrated(model, lambda: denoise(model, STEPS, cfg=True, seed=0),
                      lambda: denoise(model, STEPS, cfg=True, seed=1))
    seen.remove()
    assert sorted(both.branches) == ["pass0", "pass1"]
    for position, name in enumerate(("pass0", "pass1")):
        combined, singles = both.branches[name], [result.branches[name] for result in alone]
        curves = [single.norm_ratios for single in singles]
        assert combined.num_runs == 2
        assert combined.norm_ratios == pytest.approx(mean(curves), rel=1e-12, abs=1e-12)
        assert combined.norm_ratio_spread == pytest.approx(population_std(curves), rel=1e-9, abs=1e-12)
        assert combined.norm_stds == pytest.approx(mean([s.norm_stds for s in singles]), rel=1e-12, abs=1e-12)
        assert combined.cos_dists == pytest.approx(mean([s.cos_dists for s in singles]), rel=1e-12, abs=1e-12)
        assert combined.timesteps == singles[0].timesteps
        # two different seeds: a real spread, and a population std that a sample std (÷ n-1) would not equal
        assert max(combined.norm_ratio_spread) > 1e-4
        sample = [s * 2**0.5 for s in combined.norm_ratio_spread]
        assert combined.norm_ratio_spread != pytest.approx(sample, rel=1e-3)
        # and the mean of the two generations is what their residuals say, generation by generation
        per_generation = [own_statistics(seen.residuals[g * 2 * STEPS + position:(g + 1) * 2 * STEPS:2])
                          for g in range(2)]
        assert combined.norm_ratios == pytest.approx(mean([p[0] for p in per_generation]), rel=1e-5, abs=1e-7)
        assert combined.norm_stds == pytest.approx(mean([p[1] for p in per_generation]), rel=1e-5, abs=1e-7)
        assert combined.cos_dists == pytest.approx(mean([p[2] for p in per_generation]), rel=1e-5, abs=1e-7)
        assert combined.norm_ratio_spread == pytest.approx(population_std([p[0] for p in per_generation]),
                                                           rel=1e-3, abs=1e-6)


def test_a_pipeline_calibration_is_what_its_transformer_residuals_say():
    """A FluxPipeline (one named branch, ``cond``) over two seeds: each statistic from the residuals, averaged."""
    from magsdk.reference.components import build_pipeline

    pipe = build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    seen = StackResiduals(pipe.transformer)
    with magsdk.calibrate(pipe) as cal, torch.no_grad():
        for seed in (0, 1):
            pipe("a handwritten digit seven", height=32, width=32, num_inference_steps=STEPS, guidance_scale=1.0,
                 max_sequence_length=16, output_type="latent", generator=torch.Generator().manual_seed(seed))
    seen.remove()
    assert list(cal.result.branches) == ["cond"] and len(seen.residuals) == 2 * STEPS
    branch = cal.result.branches["cond"]
    per_generation = [own_statistics(seen.residuals[g * STEPS:(g + 1) * STEPS]) for g in range(2)]
    assert branch.num_runs == 2
    assert branch.norm_ratios == pytest.approx(mean([p[0] for p in per_generation]), rel=1e-5, abs=1e-7)
    assert branch.norm_stds == pytest.approx(mean([p[1] for p in per_generation]), rel=1e-5, abs=1e-7)
    assert branch.cos_dists == pytest.approx(mean([p[2] for p in per_generation]), rel=1e-5, abs=1e-7)
    assert branch.norm_ratio_spread == pytest.approx(population_std([p[0] for p in per_generation]),
                                                     rel=1e-3, abs=1e-6)
    assert branch.timesteps == pytest.approx(seen.timesteps[:STEPS], abs=1e-6)
    assert max(branch.norm_ratio_spread) > 1e-4 and min(branch.cos_dists[1:]) > 1e-4
