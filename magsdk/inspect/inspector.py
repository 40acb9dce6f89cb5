"""``inspect_target`` (TARGET string → report) and ``inspect_module`` (built module + inputs → report).

``inspect_target`` resolves the target (``targets.py``), builds it small (``shrink.py``), makes
example inputs (``inputs.py``, or the user's ``--inputs`` function), then does what
``inspect_module`` does: one traced forward (``trace.py``) and the inference (``infer.py``).
"""

from __future__ import annotations

import inspect
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from magsdk.config import InspectionReport, NoteCode
from magsdk.conventions import TIMESTEP_ARGUMENT_NAMES
from magsdk.errors import BlockLayoutError, MagSDKError, UsageError
from magsdk.inspect.infer import infer_metadata
from magsdk.inspect.targets import ResolvedTarget, load_file_module, resolve_target
from magsdk.inspect.trace import (
    describe,
    find_block_containers,
    forward_signature,
    no_blocks_message,
    trace_forward,
)


class ForwardFailedError(MagSDKError):
    """The transformer's forward raised with the inputs inspect used (exit code 1)."""


class NotADenoiserError(UsageError):
    """The model is not a denoising transformer (a VAE, a UNet …): there are no denoising steps to skip."""


#: Notes that say the cached blocks are not one chain carrying the hidden state.
_BROKEN_CHAIN: frozenset[NoteCode] = frozenset({"separate-stack", "interleaved-group"})


def check_denoiser(report: InspectionReport) -> None:
    """Refuse a model that is plainly not a denoising transformer instead of reporting a few "cached" blocks.

    A diffusion transformer takes a timestep (the runtime's step tracking reads it) and runs one
    chain of blocks that hands the hidden state from block to block, first to last. A model that
    lacks the timestep and whose blocks form no such chain (AutoencoderKL: separate encoder and
    decoder stacks, attention interleaved), or whose blocks neither form one chain nor keep the
    hidden state's shape from the first block to the last (a UNet), has no step to skip. Either fact
    alone is not enough: toy and custom transformers often take no timestep (the runtime then counts
    calls), and real ones can have a stack that needs a hand-written residual.
    """
    codes = report.codes()
    broken = sorted(codes & _BROKEN_CHAIN)
    reshaped = "residual-undefined" in codes
    no_timestep = report.timestep_argument_name is None
    if not ((no_timestep and (broken or reshaped)) or (broken and reshaped)):
        return
    reasons = []
    if no_timestep:
        reasons.append(f"its forward takes no timestep argument (none of {', '.join(TIMESTEP_ARGUMENT_NAMES)})")
    found = []
    separate = sum(1 for n in report.notes if n.code == "separate-stack")
    if separate:
        found.append(f"its blocks form {separate + 1} stacks joined only by work outside any block")
    between = [n.group or "?" for n in report.notes if n.code == "interleaved-group"]
    if between:
        found.append(f"{', '.join(between)} run{'s' if len(between) == 1 else ''} between the blocks of another list")
    if reshaped:
        found.append("the last block does not return the hidden state in the shape the first block received")
    reasons.append("no single chain of blocks carries the hidden state from block to block (" + "; ".join(found) + ")")
    raise NotADenoiserError(not_a_denoiser_message(report.transformer, reasons))


def not_a_denoiser_message(name: str, reasons: list[str]) -> str:
    return (
        f"{name} is not a denoising transformer: " + ", and ".join(reasons) + ". magsdk caches the block stack of "
        "the transformer a diffusion pipeline calls once per denoising step; inspect that model instead (a "
        "transformer class such as FluxTransformer2DModel, or a pipeline folder, whose transformer inspect picks)."
    )


def inputs_example(model: torch.nn.Module) -> str:
    """A ready-to-edit ``--inputs`` function for this model's forward signature."""
    signature = forward_signature(model)
    names = [p for p in (list(signature.parameters)[1:] if signature else []) if p not in ("args", "kwargs")]
    required = []
    if signature is not None:
        for name in names:
            param = signature.parameters[name]
            if param.default is inspect.Parameter.empty and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                required.append(name)
    tensors = [
        n for n in names
        if signature is not None and "Tensor" in str(signature.parameters[n].annotation) and n not in required
    ]
    shown = (required + tensors)[:10] or names[:3]
    body = "\n".join(f'        "{n}": ...,  # what {type(model).__name__}.forward takes as {n}' for n in shown)
    return (
        "# my_inputs.py — run as: magsdk inspect TARGET --inputs my_inputs.py:make_inputs\n"
        "import torch\n\n"
        "def make_inputs(model):  # receives the small model inspect built; use model.config for sizes\n"
        "    args = ()\n"
        "    kwargs = {\n"
        f"{body}\n"
        "    }\n"
        "    return args, kwargs\n"
    )


def with_metadata_sources(report: InspectionReport) -> InspectionReport:
    """Say, per group, where ``magsdk.enable`` would take the conventions from and whether they agree.

    The runtime prefers a strategy registered for the transformer class, then the block class's entry
    in ``TransformerBlockRegistry``, then inference from the first call (docs/design.md, "Finding a
    transformer's blocks"); a known entry that disagrees with what the trace shows is worth a look.
    """
    from magsdk.registry import StrategyRegistry, TransformerBlockRegistry

    strategy = StrategyRegistry.get(report.transformer)
    groups = []
    for group in report.block_groups:
        known = strategy.block_metadata.get(group.block_class) if strategy is not None else None
        source = "strategy" if known is not None else "inferred"
        if known is None:
            known = TransformerBlockRegistry.get(group.block_class)
            source = "registry" if known is not None else "inferred"
        agrees = None if known is None else known == group.metadata
        groups.append(group.model_copy(update={"source": source, "agrees_with_inferred": agrees}))
    return report.model_copy(update={"block_groups": groups})


def inspect_module(
    model: torch.nn.Module,
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    inputs: str = "user",
) -> InspectionReport:
    """Trace one forward of an already-built module with the given inputs and infer its conventions.

    ``inputs`` only labels the report (``"user"`` or ``"synthesized"``) and the error message.
    Raises ``UsageError`` when the model has no list of repeated blocks, ``ForwardFailedError``
    when the forward raises, ``BlockLayoutError`` when no block group carries a hidden state, and
    ``NotADenoiserError`` (a ``UsageError``) for a model that is plainly no denoising transformer
    (see :func:`check_denoiser`).
    """
    start = time.perf_counter()
    call_args, call_kwargs = tuple(args), dict(kwargs or {})
    try:
        trace, _ = trace_forward(model, call_args, call_kwargs)
    except MagSDKError:
        raise
    except Exception as exc:
        shown = ", ".join([describe(a) for a in call_args] + [f"{k}={describe(v)}" for k, v in call_kwargs.items()])
        raise ForwardFailedError(
            f"{type(model).__name__}.forward raised {type(exc).__name__}: {exc}\n"
            f"with the {inputs} inputs ({shown}).\n"
            "Give inspect inputs that work: write a function that returns (args, kwargs) for forward and pass "
            "it with --inputs FILE.py:FUNC, for example:\n\n" + inputs_example(model)
        ) from exc
    try:
        report = infer_metadata(trace)
    except BlockLayoutError as exc:
        if trace.timestep_name is None:
            raise NotADenoiserError(
                not_a_denoiser_message(type(model).__name__, [
                    f"its forward takes no timestep argument (none of {', '.join(TIMESTEP_ARGUMENT_NAMES)})",
                    f"no chain of blocks carries the hidden state ({exc})",
                ])
            ) from exc
        raise
    check_denoiser(report)
    report = with_metadata_sources(report)
    return report.model_copy(update={"inputs": inputs, "seconds": round(time.perf_counter() - start, 3)})


def load_inputs_function(spec: str, model: torch.nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Call the ``--inputs FILE.py:FUNC`` (or ``pkg.module:FUNC``: ``pkg/module.py`` in the working directory,
    else an importable module) function and check what it returns.

    The function is called as ``FUNC(model)`` when it takes a parameter (the small model inspect
    built, so that sizes can come from ``model.config``), else as ``FUNC()``. It returns
    ``(args, kwargs)`` — a tuple/list and a dict — or just a dict of keyword arguments.
    """
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise UsageError(f"--inputs {spec!r}: expected FILE.py:FUNC (a function returning (args, kwargs))")
    module = load_file_module(Path(where), f"--inputs {spec}") if where.endswith(".py") else _inputs_module(where, spec)
    func = getattr(module, name, None)
    if not callable(func):
        raise UsageError(f"--inputs {spec!r}: {where} has no function {name!r}")
    try:
        takes_model = any(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
            for p in inspect.signature(func).parameters.values()
        )
    except (TypeError, ValueError):
        takes_model = False
    try:
        result = func(model) if takes_model else func()
    except Exception as exc:
        raise UsageError(f"--inputs {spec!r}: {name}() raised {type(exc).__name__}: {exc}") from exc
    if isinstance(result, Mapping):
        return (), dict(result)
    if (
        isinstance(result, (tuple, list))
        and len(result) == 2
        and isinstance(result[0], (tuple, list))
        and isinstance(result[1], Mapping)
    ):
        return tuple(result[0]), dict(result[1])
    raise UsageError(
        f"--inputs {spec!r}: {name}() returned {describe(result)}; it must return (args, kwargs) — a tuple of "
        "positional arguments and a dict of keyword arguments for the transformer's forward"
    )


def _inputs_module(where: str, spec: str) -> ModuleType:
    """The module of ``--inputs pkg.module:FUNC``: ``pkg/module.py`` in the working directory, else an import.

    As for ``--strategy pkg.module``: the ``magsdk`` console script does not put the working directory
    on ``sys.path``, so a module next to the user would not import by name.
    """
    import importlib

    parts = where.split(".")
    if all(part.isidentifier() for part in parts):
        candidate = Path.cwd().joinpath(*parts).with_suffix(".py")
        if candidate.is_file():
            return load_file_module(candidate, f"--inputs {spec}")
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (where == exc.name or where.startswith(f"{exc.name}.")):
            raise UsageError(  # the module was found; something it imports was not
                f"--inputs {spec!r}: importing {where!r} raised ModuleNotFoundError: {exc}; install {exc.name!r} "
                "or remove that import from the module"
            ) from exc
        func = spec.rpartition(":")[2]
        raise UsageError(
            f"--inputs {spec!r}: no module {where!r}: neither {'/'.join(parts)}.py in the working directory "
            f"({Path.cwd()}) nor an importable module. Give the file's path instead, e.g. "
            f"--inputs path/to/{parts[-1]}.py:{func}"
        ) from exc
    except Exception as exc:
        raise UsageError(
            f"--inputs {spec!r}: importing {where!r} raised {type(exc).__name__}: {exc}; fix the module and run "
            "the command again"
        ) from exc


def inspect_target(
    target: str | type[torch.nn.Module],
    *,
    config: Mapping[str, Any] | None = None,
    inputs: str | None = None,
    config_from_model: bool = False,
) -> InspectionReport:
    """Inspect a transformer named by TARGET without its weights: build it small, trace one forward, infer.

    ``config`` overrides (or, for a bare class, replaces) the constructor arguments found with
    the target (a key its ``__init__`` does not take is a ``UsageError``); ``inputs`` is
    ``FILE.py:FUNC`` (see :func:`load_inputs_function`); without it
    inputs are synthesized from the forward signature and the config. ``config_from_model``: the
    config is a model's own (a cached curve's record), which, like a folder's config.json, may carry
    keys of another diffusers release; those are dropped instead of refused.
    """
    start = time.perf_counter()
    if isinstance(target, str):
        resolved = resolve_target(target)
    elif isinstance(target, type) and issubclass(target, torch.nn.Module):
        resolved = ResolvedTarget(target, None, "class", target.__name__)
    else:
        raise UsageError(f"inspect_target needs a TARGET string or an nn.Module class, got {describe(target)}")
    from magsdk.inspect.shrink import build_small, check_config_keys

    if not config_from_model:
        check_config_keys(resolved.cls, config)  # a folder's own config may carry stale keys; the caller's may not
    merged = dict(resolved.config or {})
    merged.update(config or {})
    model, shrunk = build_small(resolved.cls, merged or None)
    if not find_block_containers(model):  # say so before inputs are made for a forward that cannot help
        raise UsageError(no_blocks_message(model))
    if inputs is not None:
        args, kwargs = load_inputs_function(inputs, model)
        label = "user"
    else:
        from magsdk.inspect.inputs import InputSynthesisError, synthesize_inputs

        try:
            args, kwargs = synthesize_inputs(model)
        except InputSynthesisError as exc:
            if not isinstance(target, str) or exc.command is not None:
                raise
            # the hint repeats TARGET as it was given (a file.py:Class target is not a diffusers class name)
            raise exc.for_command(shlex.join(["magsdk", "inspect", target])) from None
        label = "synthesized"
    report = inspect_module(model, args, kwargs, inputs=label)
    return report.model_copy(
        update={"shrunk": dict(shrunk), "seconds": round(time.perf_counter() - start, 3)}
    )
