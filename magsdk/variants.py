"""Pick a strategy's variant from what a pipeline shows: its class, its configs, where it was loaded from.

Several published models share one transformer class, so ``enable(pipe)`` must tell them apart
before it can pick a curve. Every rule of a variant is evidence, weighed the same way each time:

- the folder or hub id the pipeline or transformer was loaded from contains one of the variant's
  substrings: +4 (the strongest sign; only the longest matching substring counts, so
  ``Qwen-Image-Edit`` is not also taken for ``Qwen-Image``). A non-matching path says nothing:
  folders are named freely;
- the pipeline class is one of the variant's: +2, another pipeline class: -2;
- each transformer or pipeline config value the variant names: +1 when equal, -1 when different
  (tiny test configs and fine-tunes keep some values and not others).

The best score wins. A tie goes to the strategy's default variant when it is among the best, and
is otherwise an error that lists the candidates with how each is recognised: picking a curve
silently from a tie would be a guess. The functions here are pure: nothing is attached or changed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from magsdk.config import StrategyVariant
from magsdk.errors import StrategyNotFoundError, UsageError
from magsdk.registry import StrategyRegistry

if TYPE_CHECKING:
    from magsdk.strategy import MagCacheStrategy

logger = logging.getLogger("magsdk")

NAME_POINTS = 4
PIPELINE_POINTS = 2
CONFIG_POINTS = 1


class VariantSelectionError(UsageError):
    """The pipeline matches several variants equally (or a requested name is unknown)."""


class Observation(BaseModel):
    """What a pipeline or transformer shows about which model it is."""

    model_config = ConfigDict(extra="forbid")

    pipeline: str | None = None
    #: None when the target is a bare transformer (no pipeline config to compare).
    pipeline_config: dict[str, Any] | None = None
    transformer: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    #: ``_name_or_path`` of the pipeline and of the transformer (folders or hub ids).
    names: list[str] = Field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.pipeline:
            parts.append(f"pipeline {self.pipeline}")
        if self.transformer:
            parts.append(f"transformer {self.transformer}")
        if self.names:
            parts.append("loaded from " + ", ".join(repr(n) for n in self.names))
        return "; ".join(parts) or "nothing (no pipeline, no transformer)"


class Candidate(BaseModel):
    """One variant with its score and the evidence behind it."""

    model_config = ConfigDict(frozen=True)

    variant: StrategyVariant
    score: int
    evidence: list[str]


def observe(target: Any) -> Observation:
    """Read a pipeline (anything with ``.transformer``) or a transformer; ``None`` observes nothing."""
    if target is None:
        return Observation()
    transformer = getattr(target, "transformer", None)
    is_pipeline = transformer is not None  # as enable(): anything with a `.transformer` is a pipeline
    if not is_pipeline:
        transformer = target
    config = _plain_config(getattr(transformer, "config", None))
    pipeline_config = _plain_config(getattr(target, "config", None)) if is_pipeline else None
    names = []
    for source in (pipeline_config or {}, config):
        name = source.get("_name_or_path")
        if isinstance(name, str) and name and name not in names:
            names.append(name)
    return Observation(
        pipeline=type(target).__name__ if is_pipeline else None,
        pipeline_config=pipeline_config,
        transformer=type(transformer).__name__,
        config=config,
        names=names,
    )


def _plain_config(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return {str(k): v for k, v in config.items()}
    return {k: v for k, v in vars(config).items() if not k.startswith("__")}


def _same(expected: Any, actual: Any) -> bool:
    def norm(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [norm(v) for v in value]
        return value

    return bool(norm(expected) == norm(actual))


def score(variant: StrategyVariant, seen: Observation, name_match: str | None) -> Candidate:
    """The evidence for ``variant`` in ``seen``; ``name_match`` is its path substring if that counts."""
    points, evidence = 0, []
    if name_match is not None:
        points += NAME_POINTS
        evidence.append(f"path contains {name_match!r} (+{NAME_POINTS})")
    if seen.pipeline and variant.pipelines:
        if seen.pipeline in variant.pipelines:
            points += PIPELINE_POINTS
            evidence.append(f"pipeline {seen.pipeline} (+{PIPELINE_POINTS})")
        else:
            points -= PIPELINE_POINTS
            evidence.append(f"pipeline {seen.pipeline} is not {' | '.join(variant.pipelines)} (-{PIPELINE_POINTS})")
    for label, rules, values in (("", variant.config, seen.config), ("pipeline.", variant.pipeline_config,
                                                                      seen.pipeline_config)):
        if values is None:
            continue
        for key, expected in rules.items():
            if key not in values:
                continue  # nothing observed, or a diffusers version without this key: no evidence either way
            actual = values.get(key)
            if _same(expected, actual):
                points += CONFIG_POINTS
                evidence.append(f"{label}{key}={actual!r} (+{CONFIG_POINTS})")
            else:
                points -= CONFIG_POINTS
                evidence.append(f"{label}{key}={actual!r}, not {expected!r} (-{CONFIG_POINTS})")
    return Candidate(variant=variant, score=points, evidence=evidence)


def rank(variants: list[StrategyVariant], seen: Observation) -> list[Candidate]:
    """Every variant scored, best first (ties keep the strategy's order)."""
    lowered = [n.lower() for n in seen.names]
    matches: dict[str, str] = {}
    for variant in variants:
        found = [s for s in variant.name_or_path if any(s.lower() in name for name in lowered)]
        if found:
            matches[variant.name] = max(found, key=len)
    longest = max((len(s) for s in matches.values()), default=0)
    candidates = [
        score(v, seen, matches[v.name] if len(matches.get(v.name, "")) == longest and longest else None)
        for v in variants
    ]
    return sorted(candidates, key=lambda c: -c.score)


def select_variant(
    strategy: type[MagCacheStrategy], target: Any, requested: str | None = None
) -> StrategyVariant:
    """The variant of ``strategy`` that ``target`` (a pipeline or transformer, or None) is.

    ``requested`` forces a variant by name. A strategy with one variant always uses it. Otherwise
    the best-scoring variant wins; a tie goes to the default variant when it is among the best, and
    raises ``VariantSelectionError`` (listing the candidates) when it is not.
    """
    variants = list(strategy.variants)
    if not variants:
        raise VariantSelectionError(f"{strategy.__name__} has no variants to choose from")
    if requested is not None:
        return strategy.variant_named(requested)
    seen = observe(target)
    if len(variants) == 1:
        _log_choice(strategy, variants[0], seen, "its only variant")
        return variants[0]
    ranked = rank(variants, seen)
    best = [c for c in ranked if c.score == ranked[0].score]
    if len(best) == 1:
        chosen = best[0]
        _log_choice(strategy, chosen.variant, seen, "; ".join(chosen.evidence) or "no evidence against it")
        return chosen.variant
    defaults = [c for c in best if c.variant.default]
    if defaults:
        _log_choice(strategy, defaults[0].variant, seen, "the default among " + ", ".join(c.variant.name for c in best))
        return defaults[0].variant
    raise VariantSelectionError(ambiguity_message(strategy, seen, best, ranked))


def ambiguity_message(
    strategy: type[MagCacheStrategy], seen: Observation, best: list[Candidate], ranked: list[Candidate]
) -> str:
    lines = [
        f"cannot tell which {strategy.__name__} variant this is ({seen.describe()}): "
        f"{', '.join(c.variant.name for c in best)} match equally (score {best[0].score}). "
        f"Name one: magsdk.enable(pipe, strategy={best[0].variant.name!r}) (on the command line "
        f"--strategy {best[0].variant.name}), or give your own config=MagCacheConfig(mag_ratios=...). "
        "The variants and how each is recognised:"
    ]
    for candidate in ranked:
        variant = candidate.variant
        steps = "/".join(str(e.num_steps) for e in variant.calibrations)
        lines.append(
            f"  {variant.name} ({variant.model}, {steps} steps; score {candidate.score}): "
            + "; ".join(variant.recognition())
        )
    return "\n".join(lines)


def _log_choice(strategy: type[MagCacheStrategy], variant: StrategyVariant, seen: Observation, why: str) -> None:
    logger.info("magsdk: %s variant %s for %s (%s)", strategy.__name__, variant.name, seen.describe(), why)


# -- names ------------------------------------------------------------------------------------------
def all_variants() -> dict[str, tuple[type[MagCacheStrategy], StrategyVariant]]:
    """Variant name → (strategy, variant) over every strategy found; names must be unique among the strategies
    ``enable`` would use. A strategy shadowed for its transformer class by a more specific one (your own FLUX
    strategy over the bundled one) keeps the variant names the winner does not use: ``flux.1-kontext`` still
    names the bundled FLUX.1 Kontext curve."""
    found: dict[str, tuple[type[MagCacheStrategy], StrategyVariant]] = {}
    winners = list(StrategyRegistry.all().values())
    for cls in winners:
        for variant in cls.variants:
            if variant.name in found and found[variant.name][0] is not cls:
                other = found[variant.name][0]
                raise UsageError(
                    f"variant name {variant.name!r} is used by both {other.__module__}.{other.__name__} and "
                    f"{cls.__module__}.{cls.__name__}; rename one of them"
                )
            found[variant.name] = (cls, variant)
    for cls in StrategyRegistry.known():
        if cls not in winners:
            for variant in cls.variants:
                found.setdefault(variant.name, (cls, variant))
    return found


def resolve_name(name: str) -> tuple[type[MagCacheStrategy], StrategyVariant | None]:
    """A strategy name → (strategy, variant or None).

    Accepts a variant name (``wan2.1-t2v-14b``), and everything ``StrategyRegistry.resolve`` takes:
    a transformer class name, a strategy class name, a module (``flux`` / ``strategies.flux``), a
    file path, and modules found in ``./strategies/`` and ``$MAGSDK_STRATEGY_PATH``.
    """
    variants = all_variants()
    if name in variants:
        return variants[name]
    try:
        return StrategyRegistry.resolve(name), None
    except StrategyNotFoundError as exc:
        names = ", ".join(sorted(variants)) or "(none)"
        text = str(exc)
        raise StrategyNotFoundError(f"{text}{'' if text.endswith('.') else '.'} Variant names: {names}.") from exc
