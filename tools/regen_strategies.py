"""Regenerate the bundled strategies and docs/strategies.md from the published curves.

    python tools/regen_strategies.py            # rewrite strategies/<module>.py and docs/strategies.md
    python tools/regen_strategies.py --check    # exit 1 if a file would change (CI, tests)
    python tools/regen_strategies.py --no-mypy  # rewrite without the mypy step of validation

``tools/data/published_curves.json`` holds every published MagCache curve with its source
(repository, commit, file, line), padding, cond/uncond interleaving, model, step count, schedule
and settings, and the variants (models) that use them. For each strategy listed there this tool
inspects the real diffusers transformer class (``magsdk inspect``, built small) for its block
metadata, turns each variant's curves into calibration entries (the source's padding applied,
interleaved curves split into ``cond`` / ``uncond``, the second transformer's branches prefixed
``transformer_2:``), and renders the module through scaffold's own template. Every module is
validated (calibration, import, registration, ``mypy --strict``) before it replaces a file.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from magsdk.codegen import render_strategy, spec_from_report, write_validated
from magsdk.codegen.literal import round_entry
from magsdk.config import CalibrationEntry, InspectionReport, ScheduleInfo, StrategyVariant, atomic_write_text
from magsdk.ratios import plan
from magsdk.strategy import MagCacheStrategy

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tools" / "data" / "published_curves.json"
STRATEGIES = ROOT / "strategies"
DOCS = ROOT / "docs" / "strategies.md"
COMMAND = "python tools/regen_strategies.py"


# -- the data file ----------------------------------------------------------------------------------
class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo: str
    commit: str | None
    file: str
    line: int | None
    symbol: str | None = None
    pull_request: int | None = None
    read_at: str | None = None

    def short(self) -> str:
        """One line for a calibration entry's ``source`` (kept short: it sits deep in a literal)."""
        if self.line is not None and self.commit:
            return f"{self.repo}@{self.commit[:7]} {self.file}:{self.line}"
        return f"{self.repo} PR #{self.pull_request} {Path(self.file).name} {self.symbol}"

    def url(self) -> str:
        if self.line is not None and self.commit:
            return f"https://github.com/{self.repo}/blob/{self.commit}/{self.file}#L{self.line}"
        return f"https://github.com/{self.repo}/pull/{self.pull_request}"

    def label(self) -> str:
        if self.line is not None:
            return f"{self.repo} {self.file} line {self.line}"
        return f"{self.repo} PR #{self.pull_request} {self.file} ({self.symbol})"


class Padding(BaseModel):
    model_config = ConfigDict(extra="forbid")

    in_source: str
    applied: str


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float
    max_skip_steps: int
    retention_ratio: float
    where: str


class TwoTransformers(BaseModel):
    model_config = ConfigDict(extra="forbid")

    first: str
    second: str
    boundary_ratio: float
    boundary_timestep: int
    first_steps: int
    how: str
    retention: str


class EntryFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scheduler: str | None
    shape: str | None


class ScheduleRebuild(BaseModel):
    """How to compute the schedule a curve was measured on, when its source states it but did not record it."""

    model_config = ConfigDict(extra="forbid")

    scheduler: str
    config: dict[str, Any]
    config_source: str
    #: "flux_linspace": the pipeline passes sigmas = linspace(1, 1/N, N) and mu from the image token count.
    #: "wan_flow_unipc": the Wan repos' own FlowUniPCMultistepScheduler (magsdk.schedules.flow_unipc_schedule).
    sigmas: str
    #: The image token count the schedule was set up for (None: the schedule does not depend on it).
    image_tokens: int | None
    resolution: str
    #: The transformer's timestep argument is the scheduler's timestep times this (FluxPipeline: t / 1000).
    timestep_argument_scale: float
    note: str

    def schedule(self, num_steps: int) -> tuple[ScheduleInfo, list[float]]:
        """The ``ScheduleInfo`` and the transformer's timestep argument per step."""
        import diffusers
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        from magsdk.runtime.session import schedule_info
        from magsdk.schedules import flow_unipc_schedule

        note = f"{self.note}; {self.config_source}"
        if self.sigmas == "wan_flow_unipc":
            timesteps, sigmas = flow_unipc_schedule(
                num_steps, float(self.config["shift"]), int(self.config.get("num_train_timesteps", 1000))
            )
            info = ScheduleInfo(timesteps=timesteps, sigmas=sigmas, scheduler=self.scheduler, config=dict(self.config),
                                image_tokens=self.image_tokens, resolution=self.resolution, note=note)
            return info, [t * self.timestep_argument_scale for t in timesteps]
        scheduler = getattr(diffusers, self.scheduler).from_config(self.config)
        if self.sigmas != "flux_linspace":
            raise ValueError(f"unknown sigma rule {self.sigmas!r}")
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
        cfg = scheduler.config
        mu = calculate_shift(self.image_tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                             cfg.max_shift)
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        timesteps = [float(t) for t in scheduler.timesteps.tolist()]
        info = schedule_info(timesteps, scheduler, {"mu": mu, "sigmas": sigmas}, self.image_tokens)
        info = info.model_copy(update={"resolution": self.resolution, "note": note})
        return info, [t * self.timestep_argument_scale for t in timesteps]


class Curve(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    model: str
    num_steps: int
    source: Source
    values: list[float]
    padding: Padding
    pad: int = Field(ge=0)
    interleaved_cfg: bool
    branches: list[str]
    branch_order: str | None = None
    two_transformers: TwoTransformers | None = None
    schedule: dict[str, Any]
    settings: Settings
    notes: list[str]
    entry: EntryFields
    rebuild: ScheduleRebuild | None = None

    def curves(self) -> dict[str, list[float]]:
        """Branch → curve: the source's padding applied, interleaved cond/uncond split (cond first)."""
        lead = [1.0] * self.pad
        if self.interleaved_cfg:
            cond, uncond = self.branches
            found = {cond: lead + self.values[0::2], uncond: lead + self.values[1::2]}
        else:
            (name,) = self.branches
            found = {name: lead + list(self.values)}
        if self.two_transformers is not None:
            # One curve spans both experts (the source counts calls across them); each transformer
            # reads the steps it runs. Branch names follow CalibrationHandle.collect: "<attribute>:<branch>".
            second = self.two_transformers.second
            found.update({f"{second}:{name}": list(curve) for name, curve in list(found.items())})
        return found

    def calibration(self) -> CalibrationEntry:
        schedule, stamps = self.rebuild.schedule(self.num_steps) if self.rebuild is not None else (None, [])
        two = self.two_transformers
        if schedule is not None and two is not None:  # the source's own account of its expert switch checks the rebuild
            high = sum(t >= two.boundary_timestep for t in schedule.timesteps)
            if high != two.first_steps:
                raise ValueError(f"{self.id}: the rebuilt schedule has {high} steps at timesteps >= "
                                 f"{two.boundary_timestep}, the source says {two.first_steps}")
        entry = CalibrationEntry(
            num_steps=self.num_steps,
            branches=self.curves(),
            source=self.source.short(),
            scheduler=self.entry.scheduler,
            shape=self.entry.shape,
            synthetic=False,
            timesteps=stamps,
            schedule=schedule,
        )
        return round_entry(entry)  # as the module's literal reads back


class Recognise(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pipelines: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    pipeline_config: dict[str, Any] = Field(default_factory=dict)
    name_or_path: list[str] = Field(default_factory=list)


class VariantRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    strategy: str
    default: bool = False
    curves: list[str]
    recognise: Recognise
    notes: str = ""


class StrategyRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    module: str
    class_name: str
    transformer: str
    family: str


class NotShipped(BaseModel):
    model_config = ConfigDict(extra="forbid")

    curves: list[dict[str, Any]]
    model: str
    reason: str


class Library(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    about: str = Field(alias="_about")
    strategies: list[StrategyRecord]
    variants: list[VariantRecord]
    curves: list[Curve]
    not_shipped: list[NotShipped]

    def curve(self, curve_id: str) -> Curve:
        for curve in self.curves:
            if curve.id == curve_id:
                return curve
        raise SystemExit(f"{DATA}: variant refers to unknown curve {curve_id!r}")

    def variants_of(self, module: str) -> list[VariantRecord]:
        return [v for v in self.variants if v.strategy == module]


def load_library(path: Path = DATA) -> Library:
    return Library.model_validate(json.loads(path.read_text(encoding="utf-8")))


# -- from records to strategy data ------------------------------------------------------------------
def build_variant(record: VariantRecord, library: Library) -> StrategyVariant:
    curves = [library.curve(c) for c in record.curves]
    first = curves[0]
    settings = first.settings
    return StrategyVariant(
        name=record.name,
        model=first.model,
        default=record.default,
        pipelines=record.recognise.pipelines,
        config=record.recognise.config,
        pipeline_config=record.recognise.pipeline_config,
        name_or_path=record.recognise.name_or_path,
        threshold=settings.threshold,
        max_skip_steps=settings.max_skip_steps,
        retention_ratio=settings.retention_ratio,
        settings_source=f"{first.source.repo}: {settings.where}",
        notes=record.notes,
        calibrations=[c.calibration() for c in curves],
    )


def docstring(record: StrategyRecord, variants: list[StrategyVariant], library: Library) -> str:
    lines = [
        f"MagCache strategy for ``{record.transformer}`` ({record.family}).",
        "",
        f"Generated by ``{COMMAND}`` from tools/data/published_curves.json.",
        "",
        "Every curve below is a published one, with its source named in each variant's calibration entry",
        "and in docs/strategies.md (which also gives the schedule each was made on). ``magsdk.enable(pipe)``",
        "recognises the variant from the pipeline; ``magsdk.enable(pipe, strategy=NAME)`` forces one:",
        "",
    ]
    for record_variant, variant in zip(library.variants_of(record.module), variants, strict=True):
        steps = "/".join(str(e.num_steps) for e in variant.calibrations)
        curve = library.curve(record_variant.curves[0])
        item = f"- ``{variant.name}``: {variant.model}, {steps} steps ({curve.source.label()})"
        lines += textwrap.wrap(item, 100, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)
    lines += [
        "",
        "Block conventions were inferred by ``magsdk inspect`` on the real class, built small. Interleaved",
        "cond/uncond curves are split into the branches ``cond`` and ``uncond``; a second transformer's",
        "branches are prefixed with its pipeline attribute (``transformer_2:cond``). Edit",
        "tools/data/published_curves.json and rerun the tool rather than this file.",
    ]
    return "\n".join(lines)


def inspect_class(transformer: str) -> InspectionReport:
    from magsdk.inspect import inspect_target

    return inspect_target(transformer)


def render_module(record: StrategyRecord, library: Library, report: InspectionReport) -> str:
    variants = [build_variant(v, library) for v in library.variants_of(record.module)]
    spec = spec_from_report(report, model=record.transformer, module_name=record.module,
                            docstring=docstring(record, variants, library))
    if spec.class_name != record.class_name:
        raise SystemExit(f"{DATA}: module {record.module!r} renders class {spec.class_name}, "
                         f"the data says {record.class_name}; rename one of them")
    if spec.unsupported_layouts:
        raise SystemExit(f"{record.transformer}: magsdk inspect found a layout the runtime cannot cache "
                         f"({spec.unsupported_layouts}); it must not ship as a published strategy")
    return render_strategy(spec.model_copy(update={"variants": variants}))


# -- docs/strategies.md ----------------------------------------------------------------------------
def _speedup(variant: StrategyVariant, steps: int) -> str:
    # The config enable() builds for this variant (same code path), planned at the calibrated step count.
    config = MagCacheStrategy.default_config(steps, variant=variant)
    skip_plan = plan(None, config, steps)
    return f"{skip_plan.ideal_speedup:.2f}x ({len(skip_plan.computed_steps)}/{steps})"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_docs(library: Library) -> str:
    out = [
        "# Strategies: the published curves magsdk ships",
        "",
        f"Generated by `{COMMAND}` from `tools/data/published_curves.json`; do not edit by hand",
        f"(`{COMMAND} --check` fails when this page or a module in `strategies/` is stale).",
        "",
        "Each module of `strategies/` serves one diffusers transformer class. Several published models share",
        "a class, so a strategy carries named **variants**, each with its calibrated curves, the settings its",
        "source uses, and rules that recognise it. `magsdk.enable(pipe)` picks the variant from the pipeline",
        "(its class, the transformer's and the pipeline's config, the folder or hub id it was loaded from;",
        "see `magsdk/variants.py` for how the rules are weighed) and raises an error listing the candidates",
        "when they tie; `magsdk.enable(pipe, strategy=\"wan2.1-t2v-14b\")` forces one, and `magsdk list` shows",
        "them all. Curves you calibrate yourself are used instead of the variants unless a variant is asked",
        "for by name: copy the bundled module into your project's `./strategies/` (in a checkout it is",
        "`strategies/<module>.py`; installed, `python -c \"import strategies.flux as m; print(m.__file__)\"`",
        "prints where it is) and run `magsdk calibrate strategies/<module>.py --model ...`; your copy then",
        "shadows the bundled one for its transformer class (`magsdk list` marks it), and the bundled variant",
        "names keep working.",
        "",
        "Ideal speedup: the steps divided by the steps computed in `magsdk.plan` at the calibrated step",
        "count with the variant's default settings, for the run's default branch (what",
        "`magsdk plan --strategy <variant> --steps <steps>` prints).",
        "",
        "| model | transformer class | variant | steps | branches | defaults (thr/K/ret) | ideal speedup | source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    built = {v.name: build_variant(v, library) for v in library.variants}
    by_module = {s.module: s for s in library.strategies}
    for record in library.variants:
        variant = built[record.name]
        strategy = by_module[record.strategy]
        for curve_id, entry in zip(record.curves, variant.calibrations, strict=True):
            curve = library.curve(curve_id)
            settings = f"{variant.threshold} / {variant.max_skip_steps} / {variant.retention_ratio}"
            out.append(
                f"| {_cell(variant.model)} | `{strategy.transformer}` | `{variant.name}`"
                f"{' (default)' if variant.default else ''} | {entry.num_steps} | "
                f"{', '.join(f'`{b}`' for b in entry.branches)} | {settings} | "
                f"{_speedup(variant, entry.num_steps)} | [{_cell(curve.source.label())}]({curve.source.url()}) |"
            )
    mapped = [name for name, v in built.items() if any(entry.schedule is not None for entry in v.calibrations)]
    out += [
        "",
        "## The schedule each curve was made on",
        "",
        "As far as each source says. Where a source states its schedule fully, the variant carries it (the",
        "scheduler's timesteps computed from its config, with a note; the Wan repos' own FlowUniPCMultistepScheduler,",
        "which diffusers lacks, by its formula in `magsdk.schedules.flow_unipc_schedule`) and its curve is mapped",
        "through them onto",
        "each run's step count, shift and resolution (`resample=\"auto\"`; see the user guide's *Schedules*):",
        (", ".join(f"`{name}`" for name in mapped) or "none yet") + ". The others are resampled to other step counts",
        "by nearest index, as their sources do; a run far from the schedule below (other shift, resolution,",
        "sampler) may need its own calibration (`magsdk calibrate`).",
        "",
        "| variant | scheduler | shift | resolution | frames | guidance | padding in the source "
        "| interleaved cond/uncond |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for record in library.variants:
        for curve_id in record.curves:
            curve = library.curve(curve_id)
            sched = curve.schedule
            interleaved = f"yes: {_cell(curve.branch_order or '')}" if curve.interleaved_cfg else "no"
            out.append(
                f"| `{record.name}` | {_cell(str(sched.get('scheduler', '-')))} | {sched.get('shift', '-')} | "
                f"{_cell(str(sched.get('resolution', '-')))} | {sched.get('frames', '-')} | "
                f"{_cell(str(sched.get('guidance', '-')))} | `{_cell(curve.padding.in_source)}`; applied: "
                f"{_cell(curve.padding.applied)} | {interleaved} |"
            )
    out += [
        "",
        "## Settings, recognition and notes per variant",
        "",
    ]
    for record in library.variants:
        variant = built[record.name]
        curve = library.curve(record.curves[0])
        out.append(f"### `{variant.name}` — {variant.model}")
        out.append("")
        out.append(f"- settings {variant.threshold} / {variant.max_skip_steps} / {variant.retention_ratio} "
                   f"(threshold / max_skip_steps / retention_ratio): {variant.settings_source}")
        out.append("- recognised by: " + "; ".join(variant.recognition()))
        if curve.two_transformers is not None:
            two = curve.two_transformers
            out.append(f"- two transformers: `{two.first}` (high noise) and `{two.second}` (low noise), switched at "
                       f"timestep {two.boundary_timestep} (boundary_ratio {two.boundary_ratio}). {two.how}. "
                       f"Retention in the source: {two.retention}.")
        for note in [*curve.notes, *([variant.notes] if variant.notes else [])]:
            out.append(f"- {note}")
        out.append("")
    out += [
        "## Published curves without a shipped strategy",
        "",
        "| model | curves | why not shipped |",
        "|---|---|---|",
    ]
    for item in library.not_shipped:
        where = "; ".join(f"{c['file']} lines {', '.join(str(n) for n in c['lines'])}" for c in item.curves)
        out.append(f"| {_cell(item.model)} | Zehong-Ma/MagCache {where} | {_cell(item.reason)} |")
    return "\n".join(out) + "\n"


# -- main -------------------------------------------------------------------------------------------
def outputs(library: Library) -> dict[Path, tuple[str, str | None]]:
    """Every generated file → (text, transformer class it must register, or None for docs)."""
    found: dict[Path, tuple[str, str | None]] = {}
    for record in library.strategies:
        text = render_module(record, library, inspect_class(record.transformer))
        found[STRATEGIES / f"{record.module}.py"] = (text, record.transformer)
    found[DOCS] = (render_docs(library), None)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="only report files that would change (exit 1)")
    parser.add_argument("--no-mypy", action="store_true", help="skip mypy when validating rewritten modules")
    args = parser.parse_args(argv)
    library = load_library()
    stale = []
    for path, (text, transformer) in outputs(library).items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        changed = current != text
        if changed and not args.check:
            if transformer is None:
                atomic_write_text(path, text)
            else:
                write_validated(path, text, expected_transformer=transformer, mypy=not args.no_mypy)
        if changed:
            stale.append(path)
        state = ("would change" if args.check else "rewritten") if changed else "unchanged"
        print(f"{path.relative_to(ROOT)}: {state}")
    if args.check and stale:
        print(f"run `{COMMAND}` to regenerate {len(stale)} file(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
