"""``CacheStats``: what the cache did — counters for the handle's life, call records for recent generations.

A server keeps one pipeline enabled for days; a record per call for ever would grow without
bound. Counters cover every generation; per-call records are kept for the last
``keep_generations`` generations only (configurable on ``magsdk.enable``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

#: Generations whose per-call records ``CacheStats`` keeps by default.
DEFAULT_KEEP_GENERATIONS = 16


class CallRecord(BaseModel):
    """One transformer call. ``timestep`` is the scheduler's when one is attached, else the model's argument."""

    model_config = ConfigDict(frozen=True)

    generation: int
    branch: str
    step: int
    timestep: float | None
    computed: bool
    module: str = "transformer"


class _Call(NamedTuple):
    """A call as the hot path keeps it: a tuple, turned into a ``CallRecord`` only when read.

    Building a pydantic object per transformer call cost ~15 Python calls per call, more than the rest
    of the decision (docs/benchmarks.md, "Runtime work per call, counted").
    """

    generation: int
    branch: str
    step: int
    timestep: float | None
    computed: bool
    module: str


class CacheStats(BaseModel):
    """Counters plus a per-branch, per-step record of which calls were computed (recent generations)."""

    computed_calls: int = 0
    skipped_calls: int = 0
    #: Generations started over the handle's life (records are kept for the last ``keep_generations``).
    generations_seen: int = 0
    keep_generations: int = Field(DEFAULT_KEEP_GENERATIONS, ge=1)
    #: How each branch's curve was obtained in its latest generation (``"transformer:cond"`` → description).
    curves: dict[str, str] = Field(default_factory=dict)
    _records: OrderedDict[tuple[str, int], list[_Call]] = PrivateAttr(default_factory=OrderedDict)

    def note_curve(self, module: str, branch: str, how: str) -> None:
        self.curves[f"{module}:{branch}"] = how

    def record(self, call: CallRecord) -> None:
        self.note(call.generation, call.branch, call.step, call.timestep, call.computed, call.module)

    def note(self, generation: int, branch: str, step: int, timestep: float | None, computed: bool,
             module: str = "transformer") -> None:
        """Count one call and keep its record (the runtime's per-call entry point: no pydantic object built)."""
        key = (module, generation)
        # ``self._records`` goes through pydantic's __getattr__ for private attributes (~5 µs, more than the rest
        # of this method); the private dict itself is a plain slot read
        records: OrderedDict[tuple[str, int], list[_Call]] = self.__pydantic_private__["_records"]  # type: ignore[index]
        calls = records.get(key)
        if calls is None:
            calls = records[key] = []
            self.generations_seen = max(self.generations_seen, generation + 1)
            while len({g for _, g in records}) > self.keep_generations:
                records.popitem(last=False)
        calls.append(_Call(generation, branch, step, timestep, computed, module))
        # counters are plain ints in the model's __dict__: bumping them there skips pydantic's __setattr__
        # (no validation is configured for them) on every transformer call
        counter = "computed_calls" if computed else "skipped_calls"
        self.__dict__[counter] += 1

    @property
    def calls(self) -> list[CallRecord]:
        """Records of the generations kept, in call order per transformer."""
        found = sorted((c for calls in self._records.values() for c in calls), key=_order)
        return [CallRecord.model_construct(**c._asdict()) for c in found]

    @property
    def total_calls(self) -> int:
        return self.computed_calls + self.skipped_calls

    def generations(self) -> list[int]:
        return sorted({g for _, g in self._records})

    def modules(self) -> list[str]:
        """The pipeline attributes of the transformers seen (``transformer``, ``transformer_2``)."""
        seen: dict[str, None] = {}
        for module, _ in self._records:
            seen.setdefault(module, None)
        return list(seen)

    def branches(self, generation: int | None = None, module: str | None = None) -> list[str]:
        gen = self._resolve(generation)
        seen: dict[str, None] = {}
        for call in self._calls_of(gen, module):
            seen.setdefault(call.branch, None)
        return list(seen)

    def computed_steps(
        self, branch: str | None = None, generation: int | None = None, module: str | None = None
    ) -> list[int]:
        """Steps computed in one generation (default: the last) for one branch (default: the first),
        of one transformer (default: all of them)."""
        return self._steps(True, branch, generation, module)

    def skipped_steps(
        self, branch: str | None = None, generation: int | None = None, module: str | None = None
    ) -> list[int]:
        return self._steps(False, branch, generation, module)

    def per_branch(self, generation: int | None = None, module: str | None = None) -> dict[str, dict[int, bool]]:
        gen = self._resolve(generation)
        table: dict[str, dict[int, bool]] = {}
        for call in self._calls_of(gen, module):
            table.setdefault(call.branch, {})[call.step] = call.computed
        return table

    def reset(self) -> None:
        self.computed_calls = 0
        self.skipped_calls = 0
        self.generations_seen = 0
        self.curves.clear()
        self._records.clear()

    def _calls_of(self, generation: int, module: str | None = None) -> list[_Call]:
        found = [
            c for (m, g), calls in self._records.items() if g == generation and module in (None, m) for c in calls
        ]
        return sorted(found, key=_order) if module is None else found

    def _resolve(self, generation: int | None) -> int:
        if generation is not None:
            return generation
        return max((g for _, g in self._records), default=0)

    def _steps(self, computed: bool, branch: str | None, generation: int | None, module: str | None) -> list[int]:
        gen = self._resolve(generation)
        names = self.branches(gen, module)
        name = branch if branch is not None else (names[0] if names else None)
        return [c.step for c in self._calls_of(gen, module) if c.branch == name and c.computed == computed]


def _order(call: _Call) -> tuple[int, int]:
    return (call.generation, call.step)
