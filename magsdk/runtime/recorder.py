"""Calibration measurements: per step and branch, statistics of the residual's per-token norm ratio.

Each step keeps *sums and counts* (Σ ratio, Σ ratio², Σ (1 − cos), number of tokens), not means,
and keeps them on the device until the generation ends. Two reasons:

- one device→host read per generation instead of several per step (calibrating costs what an
  uncached generation costs);
- sums reduce correctly across processes. Under context parallelism each rank sees a slice of
  the tokens; reducing the sums over the sequence-sharding group gives every rank the curve a
  single process would measure (docs/multi-gpu.md). Per-rank means would not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from magsdk.config import BranchCalibration

logger = logging.getLogger("magsdk")

#: Reduces a float64 tensor of sums across the processes that share a sequence (None: one process).
Reducer = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class BranchRunRecord:
    """One branch over one generation, after the device→host read: per-step values."""

    norm_ratios: list[float]
    norm_stds: list[float]
    cos_dists: list[float]
    timesteps: list[float | None]
    #: The run's step at which this branch was first measured (Wan 2.2's second expert joins mid-run).
    first_step: int = 0
    #: Between-step probes (``BranchCalibration.probes``), flattened; empty unless probed.
    probes: list[float] = field(default_factory=list)


#: Gathers the per-generation records of every rank that calibrated other inputs (None: one process).
Gatherer = Callable[[list[dict[str, BranchRunRecord]]], list[dict[str, BranchRunRecord]]]


@dataclass
class BranchRecorder:
    """Per-step sums of one branch during one generation (tensors until ``finish``)."""

    sums: list[torch.Tensor | None] = field(default_factory=list)
    timesteps: list[torch.Tensor | float | None] = field(default_factory=list)
    first_step: int | None = None
    #: Per probed step: (P, 2) sums of per-token norm ratios and token counts, one row per probe timestep.
    probe_sums: list[torch.Tensor] = field(default_factory=list)

    def add_probes(self, residuals: list[torch.Tensor], base: torch.Tensor) -> None:
        """Sums for one step's probes: each probe residual against the step's own residual, token by token."""
        with torch.no_grad():
            prev = torch.linalg.norm(base.float(), dim=-1) + 1e-8
            rows = []
            for residual in residuals:
                per_token = (torch.linalg.norm(residual.float(), dim=-1) / prev).double()
                count = torch.tensor(float(per_token.numel()), dtype=torch.float64, device=per_token.device)
                rows.append(torch.stack([per_token.sum(), count]))
            self.probe_sums.append(torch.stack(rows))

    def add(
        self, residual: torch.Tensor, previous: torch.Tensor | None, timestep: torch.Tensor | float | None, step: int
    ) -> None:
        if self.first_step is None:
            self.first_step = step
        self.timesteps.append(timestep)
        if previous is None or previous.shape != residual.shape:
            self.sums.append(None)  # the first step has nothing to compare with: ratio 1 by definition
            return
        with torch.no_grad():
            # norms in float32 as diffusers computes them; the sums in float64
            cur, prev = residual.float(), previous.float()
            per_token = (torch.linalg.norm(cur, dim=-1) / (torch.linalg.norm(prev, dim=-1) + 1e-8)).double()
            cos = torch.nn.functional.cosine_similarity(cur, prev, dim=-1).double()
            count = torch.tensor(float(per_token.numel()), dtype=torch.float64, device=per_token.device)
            self.sums.append(torch.stack([per_token.sum(), (per_token * per_token).sum(), (1.0 - cos).sum(), count]))

    def finish(self, reduce: Reducer | None = None) -> BranchRunRecord:
        """Means and stds per step: one stack, one optional collective, one read."""
        present = [s for s in self.sums if s is not None]
        values: list[list[float]] = []
        if present:
            stacked = torch.stack(present)
            if reduce is not None:
                stacked = reduce(stacked)
            values = stacked.cpu().tolist()
        ratios, stds, cos = [], [], []
        it = iter(values)
        for entry in self.sums:
            if entry is None:
                ratios.append(1.0)
                stds.append(0.0)
                cos.append(0.0)
                continue
            total, squares, cos_total, count = next(it)
            mean = total / count
            ratios.append(mean)
            stds.append(max(squares / count - mean * mean, 0.0) ** 0.5)
            cos.append(cos_total / count)
        stamps = _floats(self.timesteps)
        return BranchRunRecord(ratios, stds, cos, stamps, self.first_step or 0, self._probes(reduce))

    def _probes(self, reduce: Reducer | None) -> list[float]:
        """Log growth per probe, flattened; only when every step but the last was probed alike."""
        if not self.probe_sums or len(self.probe_sums) != len(self.sums) - 1:
            return []
        if len({tuple(s.shape) for s in self.probe_sums}) != 1:
            return []
        stacked = torch.stack(self.probe_sums)
        if reduce is not None:  # a (rows, columns) table, as the step sums are
            stacked = reduce(stacked.reshape(-1, stacked.shape[-1])).reshape(stacked.shape)
        values = stacked.cpu().double()
        means = values[..., 0] / values[..., 1].clamp_min(1.0)
        if not bool((means > 0).all()):
            return []
        return [float(v) for v in torch.log(means).reshape(-1).tolist()]


def _floats(values: list[torch.Tensor | float | None]) -> list[float | None]:
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    read = iter(torch.stack([t.detach().double().reshape(()) for t in tensors]).cpu().tolist()) if tensors else iter(())
    return [next(read) if isinstance(v, torch.Tensor) else (float(v) if v is not None else None) for v in values]


def merge_runs(runs: list[dict[str, BranchRunRecord]]) -> dict[str, BranchCalibration]:
    """Mean curve per branch over the generations recorded, with the spread across them."""
    names: list[str] = []
    for run in runs:
        names.extend(n for n in run if n not in names)
    branches = {}
    for name in names:
        recs = [run[name] for run in runs if name in run]
        # A generation that stopped early (an exception the user caught) or ran fewer steps would cut every
        # run's curve to its length: only the longest runs are averaged, and the others are named.
        length = max(len(r.norm_ratios) for r in recs)
        short = sorted(len(r.norm_ratios) for r in recs if len(r.norm_ratios) < length)
        if short:
            logger.warning(
                "magsdk: calibration: %d generation(s) of branch %r recorded fewer steps (%s) than the longest "
                "(%d); the curve is the mean of the %d with %d steps. Calibrate one step count per "
                "magsdk.calibrate block, and let each generation reach its last step.",
                len(short), name, ", ".join(map(str, short)), length, len(recs) - len(short), length,
            )
            recs = [r for r in recs if len(r.norm_ratios) == length]
        ratios = torch.tensor([r.norm_ratios[:length] for r in recs], dtype=torch.float64)
        stds = torch.tensor([r.norm_stds[:length] for r in recs], dtype=torch.float64)
        cos = torch.tensor([r.cos_dists[:length] for r in recs], dtype=torch.float64)
        probed = [r.probes for r in recs]
        same = len({len(p) for p in probed}) == 1 and probed[0]
        branches[name] = BranchCalibration(
            probes=torch.tensor(probed, dtype=torch.float64).mean(0).tolist() if same else [],
            norm_ratios=ratios.mean(0).tolist(),
            norm_stds=stds.mean(0).tolist(),
            cos_dists=cos.mean(0).tolist(),
            timesteps=list(recs[0].timesteps[:length]),
            norm_ratio_spread=ratios.std(0, correction=0).tolist(),
            num_runs=len(recs),
        )
    return branches


def first_steps(runs: list[dict[str, BranchRunRecord]]) -> dict[str, int]:
    """The step at which each branch was first measured, over a calibration's generations."""
    found: dict[str, int] = {}
    for run in runs:
        for name, record in run.items():
            found[name] = min(found.get(name, record.first_step), record.first_step)
    return found


#: One transformer's part of a calibration: its pipeline attribute, its branches, each branch's first step.
ModulePart = tuple[str, dict[str, BranchCalibration], dict[str, int]]


def join_modules(parts: list[ModulePart], num_steps: int | None) -> dict[str, BranchCalibration]:
    """The branches of transformers that share one schedule, each as a curve over the whole run.

    The runtime indexes every transformer's curve by the run's step (docs/design.md §5, "Two transformers").
    Wan 2.2 A14B's experts each run part of the steps (high noise, then low noise), so each measured part
    of the run: each one's curve is its own measurements at the steps it ran and the other's at the rest
    — one curve over the run, as MagCache's published Wan 2.2 curves are — so a run on another schedule,
    whose boundary falls at another step, still finds a ratio at every step (mapped through timesteps).
    The second transformer's branches are named ``transformer_2:cond``; the first's keep their names.
    """
    total = num_steps or max(firsts.get(n, 0) + len(b.norm_ratios) for _, bs, firsts in parts for n, b in bs.items())
    joined: dict[str, BranchCalibration] = {}
    for index, (module, branches, firsts) in enumerate(parts):
        prefix = "" if index == 0 else f"{module}:"
        for position, (name, branch) in enumerate(branches.items()):
            donors = [(o_firsts.get(o_name, 0), o_branch) for o_index, (_, o_branches, o_firsts) in enumerate(parts)
                      if o_index != index
                      for o_position, (o_name, o_branch) in enumerate(o_branches.items())
                      if o_name == name or (name not in o_branches and o_position == position)]
            joined[prefix + name] = _over_the_run(branch, firsts.get(name, 0), donors, total)
    return joined


def _probes_over_the_run(parts: list[tuple[int, BranchCalibration]], total: int) -> list[float]:
    """Each part's probes at the intervals it measured (between two steps it ran, the later part winning), and
    none (zeros: the growth spread evenly, as without probes) at the interval where one expert hands over to
    the other, which neither measured. Empty unless every part was probed alike."""
    counts = {len(b.probes) // (len(b.norm_ratios) - 1) for _, b in parts if len(b.norm_ratios) > 1 and b.probes}
    if len(counts) != 1 or any(not b.probes for _, b in parts if len(b.norm_ratios) > 1):
        return []
    per = counts.pop()
    rows = [[0.0] * per for _ in range(total - 1)]
    for start, source in parts:
        for offset in range(len(source.norm_ratios) - 1):
            if 0 <= start + offset < total - 1:
                rows[start + offset] = source.probes[offset * per : (offset + 1) * per]
    return [v for row in rows for v in row]


def _over_the_run(
    branch: BranchCalibration, first: int, donors: list[tuple[int, BranchCalibration]], total: int
) -> BranchCalibration:
    if first == 0 and len(branch.norm_ratios) == total:
        return branch
    columns = ("norm_ratios", "norm_stds", "cos_dists", "norm_ratio_spread", "timesteps")
    neutral: dict[str, float | None] = {"norm_ratios": 1.0, "norm_stds": 0.0, "cos_dists": 0.0,
                                        "norm_ratio_spread": 0.0, "timesteps": None}
    filled: dict[str, list[float | None]] = {c: [neutral[c]] * total for c in columns}
    for start, source in [*donors, (first, branch)]:  # its own measurements last: they win
        for column in columns:
            for offset, value in enumerate(getattr(source, column)):
                if 0 <= start + offset < total:
                    filled[column][start + offset] = value
    return BranchCalibration(
        probes=_probes_over_the_run([*donors, (first, branch)], total),
        norm_ratios=[float(v) for v in filled["norm_ratios"] if v is not None],
        norm_stds=[float(v) for v in filled["norm_stds"] if v is not None] if branch.norm_stds else [],
        cos_dists=[float(v) for v in filled["cos_dists"] if v is not None] if branch.cos_dists else [],
        norm_ratio_spread=([float(v) for v in filled["norm_ratio_spread"] if v is not None]
                           if branch.norm_ratio_spread else []),
        timesteps=filled["timesteps"] if branch.timesteps else [],
        num_runs=branch.num_runs,
    )
