"""magsdk across processes: what it communicates under ``torch.distributed``, and when.

Three things, each a few collectives per generation or per calibration, none per step
(docs/multi-gpu.md lists them with their sizes):

- **Context-parallel calibration.** Ranks that shard one sequence (diffusers'
  ``enable_parallelism(ContextParallelConfig(...))``, detected from the transformer, or a group
  passed as ``parallel_group=``) see a slice of the tokens each. Their per-step sums
  (``magsdk.runtime.recorder``) are all-reduced once per generation and branch, so every rank
  gets the curve a single process measures over the whole sequence.
- **Data-parallel calibration.** Ranks that run different prompts × seeds (``data_group=``)
  exchange their per-generation records once, when the calibration is collected, and merge
  them as one process would.
- **The plan guard.** Ranks that share the transformer's collectives must skip the same steps,
  or one rank enters its blocks' collectives while another does not, and both hang. At the start
  of each generation they gather a fingerprint of their plan (settings, curves, step count,
  schedule) and, when it differs, every rank raises ``PlanMismatchError``. Plain data-parallel
  inference (independent ranks) gets no guard: its ranks may run different numbers of
  generations, and a collective there would hang the one that runs more.

Nothing here runs when ``torch.distributed`` is not initialised.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
import torch.distributed as dist

from magsdk.errors import MagSDKError, UsageError

if TYPE_CHECKING:
    from magsdk.runtime.recorder import BranchRunRecord
    from magsdk.runtime.session import CacheSession
    from magsdk.runtime.steps import CallPosition

ProcessGroup = Any  # torch.distributed.ProcessGroup; kept loose so that builds without distributed import this
GroupOption = ProcessGroup | Literal["auto"] | None
Runs = list[dict[str, "BranchRunRecord"]]
T = TypeVar("T")


class PlanMismatchError(MagSDKError):
    """Ranks that share a transformer's collectives hold different cache plans (they would hang)."""


class DistributedCalibrationError(MagSDKError):
    """Another rank's calibration failed; this one stops too instead of waiting for it."""


# -- process groups ---------------------------------------------------------------------------------
def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def is_main_process() -> bool:
    """Whether this process writes files and prints summaries (rank 0, or no process group)."""
    return rank() == 0


def group_size(group: ProcessGroup) -> int:
    return int(dist.get_world_size(group))


def group_ranks(group: ProcessGroup) -> tuple[int, ...]:
    """The global ranks of ``group`` (identifies a group across processes)."""
    return tuple(int(r) for r in dist.get_process_group_ranks(group))


def context_parallel_group(transformer: torch.nn.Module) -> ProcessGroup | None:
    """The group that shards the sequence, when diffusers' ``enable_parallelism`` set one up.

    diffusers records the config on the model (``_parallel_config``); its context-parallel part
    shards inputs over the flattened ring × ulysses mesh.
    """
    config = getattr(transformer, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is None or not initialized():
        return None
    group = mesh.get_group()
    return group if group_size(group) > 1 else None


def _check_group(value: Any, option: str) -> ProcessGroup:
    if not initialized():
        raise UsageError(
            f"{option}= was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (torchrun sets up its environment), or leave "
            f"{option} out"
        )
    try:
        dist.get_world_size(value)
    except Exception as exc:
        raise UsageError(
            f"{option}={value!r} is not a torch.distributed process group ({type(exc).__name__}: {exc}); pass a "
            f"group from torch.distributed.new_group(...) or torch.distributed.group.WORLD"
            + (", or 'auto'" if option == "parallel_group" else "")
        ) from exc
    return value


@dataclass(frozen=True)
class Parallelism:
    """What ``enable`` / ``calibrate`` were told about the processes around them."""

    #: "auto": the transformer's context-parallel group, if diffusers set one up.
    parallel_group: GroupOption = "auto"
    #: Ranks that calibrate different prompts × seeds (``calibrate`` only).
    data_group: ProcessGroup | None = None

    @classmethod
    def of(cls, parallel_group: GroupOption = "auto", data_group: ProcessGroup | None = None) -> Parallelism:
        if parallel_group is not None and not (isinstance(parallel_group, str) and parallel_group == "auto"):
            if isinstance(parallel_group, str):
                raise UsageError(
                    f"parallel_group={parallel_group!r}: pass 'auto' (the transformer's context-parallel group), "
                    "None, or a torch.distributed process group"
                )
            _check_group(parallel_group, "parallel_group")
        if data_group is not None:
            _check_group(data_group, "data_group")
            if group_size(data_group) == 1:
                data_group = None
        return cls(parallel_group, data_group)

    def group_of(self, transformer: torch.nn.Module) -> ProcessGroup | None:
        """The ranks that run ``transformer`` together (None: this process runs it alone)."""
        if isinstance(self.parallel_group, str):
            return context_parallel_group(transformer)
        if self.parallel_group is None or group_size(self.parallel_group) == 1:
            return None
        return self.parallel_group


def link(session: CacheSession, parallelism: Parallelism | None) -> None:
    """Give a new session what its process group asks of it: reducers for calibration, a guard otherwise."""
    if parallelism is None:
        return
    group = parallelism.group_of(session.transformer)
    if session.config.calibrate:
        if group is not None:
            session.sequence_reducer = SequenceSum(session, group)
        if parallelism.data_group is not None:
            session.run_gatherer = RunGatherer(parallelism.data_group, group, session.name)
    elif group is not None:
        session.plan_guard = PlanGuard(group)


def collective_device(group: ProcessGroup) -> torch.device:
    """Where a small tensor for a collective on ``group`` must live (CPU for gloo, the accelerator for NCCL)."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: XPU, HPU and other backends
    current = accelerator.current_accelerator() if accelerator is not None else None
    if accelerator is None or current is None:
        return torch.device("cpu")
    return torch.device(current.type, accelerator.current_device_index())


# -- context-parallel calibration -------------------------------------------------------------------
class SequenceSum:
    """All-reduces a generation's per-step sums over the sequence-sharding group (one collective).

    The session's image-token count (a shard's under context parallelism) rides along in one
    extra row, so the recorded schedule names the whole sequence's size, as a single process would.
    """

    def __init__(self, session: CacheSession, group: ProcessGroup) -> None:
        self.session = session
        self.group = group
        self.local_tokens: int | None = None

    def __call__(self, sums: torch.Tensor) -> torch.Tensor:
        if self.local_tokens is None:
            self.local_tokens = self.session.image_tokens or 0
        tokens = torch.zeros((1, sums.shape[1]), dtype=sums.dtype, device=sums.device)
        tokens[0, 0] = float(self.local_tokens)
        both = torch.cat([sums, tokens])
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=self.group)
        if self.local_tokens:
            self.session.image_tokens = int(both[-1, 0].item())
        return both[:-1]


# -- data-parallel calibration ----------------------------------------------------------------------
@dataclass
class _Contribution:
    """What one rank hands in when a calibration is collected."""

    rank: int
    #: The global ranks of this rank's sequence group: ranks that share one are one contribution.
    key: tuple[int, ...]
    runs: Runs = field(default_factory=list)
    error: str | None = None


class RunGatherer:
    """Gathers every rank's per-generation records before they are merged (one collective per calibration).

    Ranks of one sequence group hold the same (already reduced) records, so only one of them counts.
    """

    def __init__(self, group: ProcessGroup, sequence_group: ProcessGroup | None, name: str) -> None:
        self.group = group
        self.key = group_ranks(sequence_group) if sequence_group is not None else (rank(),)
        self.name = name

    def __call__(self, runs: Runs) -> Runs:
        contributions = _gather(_Contribution(rank(), self.key, list(runs)), self.group)
        _raise_failures(contributions)
        merged: Runs = []
        seen: set[tuple[int, ...]] = set()
        for contribution in sorted(contributions, key=lambda c: c.rank):
            if contribution.key not in seen:
                seen.add(contribution.key)
                merged.extend(contribution.runs)
        return merged


def abandon(parallelism: Parallelism | None, reason: BaseException | str) -> None:
    """This rank's calibration failed: tell the others (they are about to gather), so they stop too."""
    if parallelism is None or parallelism.data_group is None:
        return
    message = reason if isinstance(reason, str) else f"{type(reason).__name__}: {reason}"
    with contextlib.suppress(Exception):  # the original error is what this rank reports
        _gather(_Contribution(rank(), (rank(),), error=message), parallelism.data_group)


def _gather(contribution: _Contribution, group: ProcessGroup) -> list[_Contribution]:
    gathered: list[Any] = [None] * group_size(group)
    dist.all_gather_object(gathered, contribution, group=group)
    return [c for c in gathered if isinstance(c, _Contribution)]


def _raise_failures(contributions: Sequence[_Contribution]) -> None:
    failed = [c for c in contributions if c.error is not None]
    if failed:
        raise DistributedCalibrationError(
            "calibration failed on "
            + "; ".join(f"rank {c.rank}: {c.error}" for c in failed)
            + ". Every rank stops; nothing was written. Fix that rank's error and run again."
        )


def data_parallel_group(transformer: torch.nn.Module | None = None) -> ProcessGroup | None:
    """The ranks to split calibration runs across: the world, when a process group is initialised.

    Under context parallelism over the whole world every rank must run the same inputs, so there
    is nothing to split; context parallelism over part of the world is not supported here.
    """
    if not initialized() or dist.get_world_size() == 1:
        return None
    sequence = context_parallel_group(transformer) if transformer is not None else None
    if sequence is not None:
        if group_size(sequence) == dist.get_world_size():
            return None
        raise UsageError(
            f"the transformer is context-parallel over {group_size(sequence)} of {dist.get_world_size()} ranks; "
            "magsdk's calibration drivers split runs across the whole world only. Run them with context "
            "parallelism over all ranks, or drive `magsdk.calibrate(pipe, data_group=...)` yourself with a "
            "group of ranks that hold different prompts (docs/multi-gpu.md)"
        )
    return dist.group.WORLD


def shard(items: Sequence[T], group: ProcessGroup | None) -> list[T]:
    """This rank's share of ``items``: every ``size``-th item from its index in ``group``."""
    if group is None:
        return list(items)
    return list(items)[dist.get_rank(group) :: group_size(group)]


# -- the plan guard ---------------------------------------------------------------------------------
PLAN_PARTS = ("transformer", "settings", "curves", "steps", "schedule")
_EXCLUDED_SETTINGS = {"mag_ratios", "timesteps", "schedule", "probes", "calibrate"}


def _digest(text: str) -> int:
    """A 56-bit digest: fits an int64 tensor on every backend."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "big")


def _settings_text(session: CacheSession) -> str:
    values = session.config.model_dump(mode="json", exclude=_EXCLUDED_SETTINGS)
    return json.dumps(values, sort_keys=True)


def _curves_text(session: CacheSession) -> tuple[str, str]:
    source = session.curves
    if source is None:
        return "none", "no curve"
    tables = [
        {
            "num_steps": t.num_steps, "branches": t.branches, "timesteps": t.timesteps,
            "schedule": t.schedule.model_dump(mode="json") if t.schedule is not None else None,
            "probes": t.probes,
        }
        for t in source.tables
    ]
    text = json.dumps({"tables": tables, "per_branch": source.per_branch, "resample": source.resample,
                       "retention_ratio": source.retention_ratio}, sort_keys=True)
    shown = "; ".join(f"{t.num_steps} steps: {', '.join(t.branches)}" for t in source.tables)
    return text, f"{len(source.tables)} calibration(s) ({shown}), digest {_digest(text):014x}"


class PlanGuard:
    """Checks once per generation that every rank of ``group`` holds the same plan (docs/multi-gpu.md)."""

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group
        self.size = group_size(group)
        self._device: torch.device | None = None
        self._cache: dict[str, tuple[int, str]] = {}
        #: Generations checked (each one all-gather of ``len(PLAN_PARTS)`` int64 per rank).
        self.checks = 0

    def _cached(self, key: str, make: Callable[[], tuple[str, str]]) -> tuple[int, str]:
        if key not in self._cache:
            text, shown = make()
            self._cache[key] = (_digest(text), shown)
        return self._cache[key]

    def plan_parts(self, session: CacheSession, position: CallPosition) -> list[tuple[int, str]]:
        """(code, description) per entry of ``PLAN_PARTS``: what decides this generation's skips."""
        settings = _settings_text(session)
        parts = [
            (_digest(session.name), session.name),
            (_digest(settings), settings),
            self._cached(f"curves-{id(session.curves)}", lambda: _curves_text(session)),
            (position.num_steps if position.num_steps is not None else -1,
             str(position.num_steps) if position.num_steps is not None else "unknown"),
        ]
        stamps = session.tracker.run_timesteps() if session.curves is not None and session.curves.uses_schedules() \
            else None
        if stamps is None:
            parts.append((0, "not used"))
        else:
            text = json.dumps([round(float(t), 6) for t in stamps])
            parts.append((_digest(text), f"{len(stamps)} timesteps {stamps[0]:g} .. {stamps[-1]:g}"))
        return parts

    def check(self, session: CacheSession, position: CallPosition) -> None:
        parts = self.plan_parts(session, position)
        if self._device is None:
            self._device = collective_device(self.group)
        codes = torch.tensor([code for code, _ in parts], dtype=torch.int64, device=self._device)
        gathered = [torch.empty_like(codes) for _ in range(self.size)]
        dist.all_gather(gathered, codes, group=self.group)
        self.checks += 1
        rows = torch.stack(gathered).cpu().tolist()
        differing = [i for i in range(len(parts)) if len({row[i] for row in rows}) > 1]
        if not differing:
            return
        # Every rank saw the same rows, so every rank takes this path: the descriptions are one more
        # collective for all of them, then all raise.
        shown: list[Any] = [None] * self.size
        dist.all_gather_object(shown, [text for _, text in parts], group=self.group)
        ranks = group_ranks(self.group)
        session.reset(discard=True)
        lines = [_difference(PLAN_PARTS[i], [row[i] for row in shown], ranks) for i in differing]
        raise PlanMismatchError(
            f"magsdk: the {self.size} ranks that run {session.name} together (ranks {list(ranks)}) hold different "
            f"cache plans for generation {position.generation}: {'; '.join(lines)}. They would skip different "
            "steps and hang in the transformer's collectives. Enable magsdk the same way on every rank (same "
            "strategy or MagCacheConfig, same num_inference_steps and scheduler settings); nothing was skipped."
        )


def _difference(part: str, shown: Sequence[str], ranks: Sequence[int]) -> str:
    """One line of the guard's error: what differs, and each rank's value."""
    if part == "settings":  # name the settings that differ, not the whole set
        parsed = [json.loads(text) for text in shown]
        keys = sorted({k for p in parsed for k in p if len({json.dumps(q.get(k)) for q in parsed}) > 1})
        return "; ".join(
            f"{key} differs ({', '.join(f'rank {r}: {p.get(key)}' for r, p in zip(ranks, parsed, strict=True))})"
            for key in keys
        )
    values = ", ".join(f"rank {r}: {text}" for r, text in zip(ranks, shown, strict=True))
    return f"{part} differ ({values})"


# -- torchrun ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def launched_process_group(device: str | None) -> Iterator[int]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1), the default process group for the command's lifetime.

    gloo on CPU, NCCL on CUDA with each rank on ``cuda:LOCAL_RANK``. Yields the world size (1: no
    group). A group initialised by the caller is used as it is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or initialized():
        yield dist.get_world_size() if initialized() else 1
        return
    on_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if on_cuda:
        if device is not None and ":" in device:
            raise UsageError(
                f"--device {device}: under torchrun every rank uses its own GPU (cuda:LOCAL_RANK); pass --device "
                "cuda, and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {device}: no CUDA device is available here (torch.cuda.is_available() is False); leave "
                "--device out to run the ranks on the CPU (gloo)"
            )
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UsageError(
                f"torchrun started local rank {local}, but this machine has {torch.cuda.device_count()} CUDA "
                f"device(s): pass --nproc-per-node {torch.cuda.device_count()} or fewer"
            )
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if on_cuda else "gloo")
    try:
        yield world
        dist.barrier()  # no rank tears its connections down while another still works (rank 0 writes)
    finally:
        dist.destroy_process_group()
