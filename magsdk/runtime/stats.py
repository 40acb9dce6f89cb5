"""``CacheStats``: what the cache did, call by call."""

from __future__ import annotations

from pydantic import BaseModel, Field


class CallRecord(BaseModel):
    generation: int
    branch: str
    step: int
    timestep: float | None
    computed: bool
    module: str = "transformer"


class CacheStats(BaseModel):
    """Counters plus a per-branch, per-step record of which calls were computed."""

    computed_calls: int = 0
    skipped_calls: int = 0
    calls: list[CallRecord] = Field(default_factory=list)

    def record(self, call: CallRecord) -> None:
        self.calls.append(call)
        if call.computed:
            self.computed_calls += 1
        else:
            self.skipped_calls += 1

    @property
    def total_calls(self) -> int:
        return self.computed_calls + self.skipped_calls

    def generations(self) -> list[int]:
        return sorted({c.generation for c in self.calls})

    def branches(self, generation: int | None = None) -> list[str]:
        gen = self._resolve(generation)
        seen: dict[str, None] = {}
        for call in self.calls:
            if call.generation == gen:
                seen.setdefault(call.branch, None)
        return list(seen)

    def computed_steps(self, branch: str | None = None, generation: int | None = None) -> list[int]:
        """Steps computed in one generation (default: the last) for one branch (default: the first)."""
        return self._steps(True, branch, generation)

    def skipped_steps(self, branch: str | None = None, generation: int | None = None) -> list[int]:
        return self._steps(False, branch, generation)

    def per_branch(self, generation: int | None = None) -> dict[str, dict[int, bool]]:
        gen = self._resolve(generation)
        table: dict[str, dict[int, bool]] = {}
        for call in self.calls:
            if call.generation == gen:
                table.setdefault(call.branch, {})[call.step] = call.computed
        return table

    def reset(self) -> None:
        self.computed_calls = 0
        self.skipped_calls = 0
        self.calls = []

    def _resolve(self, generation: int | None) -> int:
        if generation is not None:
            return generation
        return self.calls[-1].generation if self.calls else 0

    def _steps(self, computed: bool, branch: str | None, generation: int | None) -> list[int]:
        gen = self._resolve(generation)
        names = self.branches(gen)
        name = branch if branch is not None else (names[0] if names else None)
        return [c.step for c in self.calls if c.generation == gen and c.branch == name and c.computed == computed]
