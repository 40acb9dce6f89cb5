"""Render strategy modules (and their tests) from the Jinja templates in ``magsdk.templates``.

Rendering is strict: an undefined template variable is an error, never an empty string, and
nothing is written here — callers validate the text before one atomic write. Set
``MAGSDK_TEMPLATE_DIR`` to a folder holding your own ``strategy.py.j2`` / ``test_strategy.py.j2``
to override the bundled templates.
"""

from __future__ import annotations

import ast
import keyword
import os
import re
import shlex
import textwrap
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import jinja2
from pydantic import BaseModel, ConfigDict, Field

from magsdk.codegen.literal import format_calibrations, py_value
from magsdk.codegen.variant_literal import format_variants
from magsdk.config import BlockMetadata, CalibrationEntry, InspectionReport, NoteCode, StrategyVariant
from magsdk.errors import MagSDKError, UsageError
from magsdk.strategy import MagCacheStrategy

STRATEGY_TEMPLATE = "strategy.py.j2"
TEST_TEMPLATE = "test_strategy.py.j2"
TEMPLATE_DIR_ENV = "MAGSDK_TEMPLATE_DIR"

#: Fields written for every block class even at their default value: the facts diffusers'
#: registry also records, plus the output container kind.
CORE_FIELDS = (
    "hidden_states_argument_name",
    "encoder_hidden_states_argument_name",
    "return_hidden_states_index",
    "return_encoder_hidden_states_index",
    "output_kind",
)

#: Inspection note codes that mean the runtime cannot take this model's residual: the strategy gets a
#: ``compute_residual`` stub to write by hand. Decided by code, never by the wording of a message.
UNSUPPORTED_CODES: frozenset[NoteCode] = frozenset({"residual-undefined", "fused-image-in-middle"})


class TemplateRenderError(MagSDKError):
    """A template failed to render or rendered something that is not Python."""


class StrategySpec(BaseModel):
    """Everything the strategy template needs; built from an ``InspectionReport``."""

    model_config = ConfigDict(extra="forbid")

    module_name: str
    class_name: str
    transformer_cls_name: str
    model: str
    docstring: str
    block_groups: list[str]
    block_metadata: dict[str, BlockMetadata]
    threshold: float = MagCacheStrategy.threshold
    max_skip_steps: int = MagCacheStrategy.max_skip_steps
    retention_ratio: float = MagCacheStrategy.retention_ratio
    calibrations: list[CalibrationEntry] = Field(default_factory=list)
    #: Inspection warnings about layouts the runtime cannot handle (renders a compute_residual stub).
    unsupported_layouts: list[str] = Field(default_factory=list)
    #: Published models the strategy serves (the bundled library; scaffold renders none).
    variants: list[StrategyVariant] = Field(default_factory=list)


# -- names ------------------------------------------------------------------------------------------
_SUFFIXES = ("Transformer3DModel", "Transformer2DModel", "Transformer1DModel", "TransformerModel",
             "Transformer", "Model")


def default_module_name(transformer_cls_name: str) -> str:
    """``FluxTransformer2DModel`` → ``flux``; ``QwenImageTransformer2DModel`` → ``qwen_image``."""
    stem = transformer_cls_name
    for suffix in _SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", stem).lower()
    snake = re.sub(r"[^0-9a-z_]+", "_", snake).strip("_") or "model"
    if snake[0].isdigit():
        snake = f"model_{snake}"
    return snake


def class_name_for(module_name: str) -> str:
    """``flux2_klein`` → ``Flux2KleinStrategy``."""
    return "".join(part[:1].upper() + part[1:] for part in module_name.split("_") if part) + "Strategy"


def check_module_name(name: str) -> str:
    if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
        raise UsageError(
            f"--name {name!r} is not usable as a Python module name; use lower-case letters, digits and "
            "underscores, starting with a letter (e.g. 'my_model')"
        )
    return name


# -- spec from an inspection ------------------------------------------------------------------------
def unsupported_layouts(report: InspectionReport) -> list[str]:
    """The messages of the report's notes that say the runtime cannot take this model's residual."""
    return [note.message for note in report.notes if note.code in UNSUPPORTED_CODES]


def check_decided(report: InspectionReport, target: str | None = None) -> None:
    """Refuse to render guessed conventions: an ambiguous inspection would become a wrong strategy.

    ``target``: the model as the user gave it (``ambm.py:M``), so the suggested command runs as written.
    """
    if report.ambiguous:
        groups = ", ".join(a.group for a in report.ambiguities)
        raise MagSDKError(
            f"the inspection of {report.transformer} does not decide the output slots of {groups} (see its "
            "'ambiguous-output-slot' note), so no strategy is written. Run `magsdk inspect "
            f"{shlex.quote(target or report.transformer)} --inputs FILE.py:FUNC` with inputs whose hidden and "
            "encoder states differ in token count to see the conventions, and write the strategy's "
            "block_metadata from that (docs/adapting-a-new-model.md)."
        )


def metadata_in_order(report: InspectionReport) -> dict[str, BlockMetadata]:
    """Block class → metadata in execution order; one class with two conventions cannot be keyed by class."""
    found: dict[str, BlockMetadata] = {}
    where: dict[str, str] = {}
    for group in report.block_groups:
        previous = found.get(group.block_class)
        if previous is not None and previous != group.metadata:
            raise MagSDKError(
                f"block class {group.block_class} is used in {where[group.block_class]!r} and {group.path!r} "
                "with different conventions, but strategies key block metadata by class. Write this "
                "strategy by hand (see docs/adapting-a-new-model.md)."
            )
        found.setdefault(group.block_class, group.metadata)
        where.setdefault(group.block_class, group.path)
    return found


def default_docstring(report: InspectionReport, model: str) -> str:
    shrunk = " (traced on a small copy built from its config)" if report.shrunk else ""
    lines = [
        f"MagCache strategy for ``{report.transformer}``, generated by ``magsdk scaffold``.",
        "",
        *textwrap.wrap(f"Model: {model}.", 100, break_long_words=False, break_on_hyphens=False),
        "",
        *textwrap.wrap(
            f"Block conventions were inferred by ``magsdk inspect``{shrunk}. Each entry of CALIBRATIONS "
            "was measured with ``magsdk.calibrate`` and names its source, scheduler, shape and the "
            "number of prompts and seeds averaged; an entry marked ``synthetic`` describes random "
            "weights on synthesized inputs only. ``magsdk calibrate`` adds or refreshes entries.",
            100,
        ),
    ]
    return "\n".join(lines)


def spec_from_report(
    report: InspectionReport,
    *,
    model: str,
    module_name: str | None = None,
    docstring: str | None = None,
    calibrations: Sequence[CalibrationEntry] = (),
    threshold: float | None = None,
    max_skip_steps: int | None = None,
    retention_ratio: float | None = None,
) -> StrategySpec:
    name = check_module_name(module_name or default_module_name(report.transformer))
    check_decided(report, model)
    if not report.block_groups:
        raise MagSDKError(f"the inspection of {report.transformer} found no block groups; nothing to cache")
    base = MagCacheStrategy
    return StrategySpec(
        module_name=name,
        class_name=class_name_for(name),
        transformer_cls_name=report.transformer,
        model=model,
        docstring=docstring if docstring is not None else default_docstring(report, model),
        block_groups=[g.path for g in report.block_groups],
        block_metadata=metadata_in_order(report),
        threshold=base.threshold if threshold is None else threshold,
        max_skip_steps=base.max_skip_steps if max_skip_steps is None else max_skip_steps,
        retention_ratio=base.retention_ratio if retention_ratio is None else retention_ratio,
        calibrations=list(calibrations),
        unsupported_layouts=unsupported_layouts(report),
    )


# -- rendering --------------------------------------------------------------------------------------
def _py(value: Any) -> str:
    return py_value(value)


def _py_tuple(values: Iterable[Any]) -> str:
    items = [py_value(v) for v in values]
    if len(items) == 1:
        return f"({items[0]},)"
    return "(" + ", ".join(items) + ")"


def _environment() -> jinja2.Environment:
    loaders: list[jinja2.BaseLoader] = []
    override = os.environ.get(TEMPLATE_DIR_ENV)
    if override:
        loaders.append(jinja2.FileSystemLoader(override))
    bundled = resources.files("magsdk.templates")
    loaders.append(jinja2.FunctionLoader(lambda name: _bundled_source(bundled, name)))
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # the output is Python source, not HTML
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["py"] = _py
    env.filters["py_tuple"] = _py_tuple
    return env


def _bundled_source(root: Any, name: str) -> str | None:
    resource = root.joinpath(name)
    if not resource.is_file():
        return None
    text: str = resource.read_text(encoding="utf-8")
    return text


def render_template(name: str, context: dict[str, Any]) -> str:
    """Render one template; every failure is a ``TemplateRenderError`` naming the template and line."""
    try:
        template = _environment().get_template(name)
        text = template.render(**context)
    except jinja2.TemplateNotFound as exc:
        where = os.environ.get(TEMPLATE_DIR_ENV) or "magsdk.templates"
        raise TemplateRenderError(
            f"template {name} not found (looked in {where}); reinstall magsdk or fix ${TEMPLATE_DIR_ENV}"
        ) from exc
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateRenderError(
            f"template {exc.filename or name} has a syntax error at line {exc.lineno}: {exc.message}. "
            "Fix the template; nothing was written."
        ) from exc
    except jinja2.TemplateError as exc:
        raise TemplateRenderError(
            f"template {name} failed to render: {exc}. Fix the template (or the values given to it); "
            "nothing was written."
        ) from exc
    try:
        ast.parse(text, filename=name)
    except SyntaxError as exc:
        raise TemplateRenderError(
            f"template {name} rendered invalid Python (line {exc.lineno}: {exc.msg}); fix the template, "
            "nothing was written"
        ) from exc
    return text


def _docstring_literal_body(text: str) -> str:
    # The closing quotes sit on their own line, so only backslashes and triple quotes need escaping.
    return text.strip("\n").replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


def _metadata_fields(metadata: BlockMetadata) -> list[tuple[str, Any]]:
    defaults = BlockMetadata()
    fields: list[tuple[str, Any]] = []
    for name in BlockMetadata.model_fields:
        value = getattr(metadata, name)
        if name in CORE_FIELDS or value != getattr(defaults, name):
            fields.append((name, value))
    return fields


def _stub_lines(warnings: Sequence[str]) -> list[str]:
    lines: list[str] = []
    for warning in warnings:
        wrapped = textwrap.wrap(" ".join(warning.split()), 88, break_long_words=False, break_on_hyphens=False)
        lines.extend(("- " if i == 0 else "  ") + line for i, line in enumerate(wrapped))
    return lines


def _stub_message(spec: StrategySpec) -> list[str]:
    message = (
        f"{spec.class_name}.compute_residual is a stub: `magsdk inspect` found a block layout the runtime "
        f"cannot take the residual of ({'; '.join(' '.join(w.split()) for w in spec.unsupported_layouts)}). "
        f"Implement it in {spec.module_name}.py, then run `magsdk calibrate`."
    )
    chunks = textwrap.wrap(message, 80, drop_whitespace=False, break_long_words=False, break_on_hyphens=False)
    return chunks or [message]


def render_strategy(spec: StrategySpec) -> str:
    context = {
        "docstring": _docstring_literal_body(spec.docstring),
        "class_name": spec.class_name,
        "transformer_cls_name": spec.transformer_cls_name,
        "block_groups": spec.block_groups,
        "blocks": [{"name": name, "fields": _metadata_fields(m)} for name, m in spec.block_metadata.items()],
        "threshold": float(spec.threshold),
        "max_skip_steps": int(spec.max_skip_steps),
        "retention_ratio": float(spec.retention_ratio),
        "calibrations_literal": format_calibrations(spec.calibrations),
        "residual_stub": _stub_lines(spec.unsupported_layouts),
        "stub_message": _stub_message(spec) if spec.unsupported_layouts else [],
        "variants_literal": format_variants(spec.variants) if spec.variants else "",
    }
    return render_template(STRATEGY_TEMPLATE, context)


def render_test(
    spec: StrategySpec,
    *,
    module_relpath: str,
    model_relpath: tuple[str, str] | None = None,
    inputs: str | None = None,
    inputs_relpath: tuple[str, str] | None = None,
) -> str:
    """The test module for a generated strategy; the relative paths are from the test's folder.

    ``model_relpath`` is (path, suffix) for a local model: ``("../../pipe", "")`` or
    ``("../models.py", ":MyTransformer")``. ``inputs`` is the ``--inputs FILE.py:FUNC`` the model was
    inspected with (the test inspects it again with the same function); ``inputs_relpath`` is that
    file as (path, ``":FUNC"``) from the test's folder, so it is found from any working directory.
    """
    context = {
        "model_relpath": model_relpath,
        "inputs": inputs,
        "inputs_relpath": inputs_relpath if inputs else None,
        "module_name": spec.module_name,
        "module_relpath": module_relpath,
        "class_name": spec.class_name,
        "transformer_cls_name": spec.transformer_cls_name,
        "model": spec.model,
    }
    return render_template(TEST_TEMPLATE, context)


def spec_from_strategy(
    strategy: type[MagCacheStrategy], *, module_name: str, model: str, docstring: str
) -> StrategySpec:
    """The spec that renders an existing strategy class again (same data, the template's shape)."""
    return StrategySpec(
        module_name=check_module_name(module_name),
        class_name=strategy.__name__,
        transformer_cls_name=strategy.transformer_cls_name,
        model=model,
        docstring=docstring,
        block_groups=list(strategy.block_groups),
        block_metadata=dict(strategy.block_metadata),
        threshold=strategy.threshold,
        max_skip_steps=strategy.max_skip_steps,
        retention_ratio=strategy.retention_ratio,
        calibrations=list(strategy.calibrations),
        variants=list(strategy.variants),
    )
