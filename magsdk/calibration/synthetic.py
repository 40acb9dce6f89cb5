"""Calibration without a pipeline: a flow-matching Euler loop over synthesized inputs.

For a bare transformer class there is no text encoder, no VAE and no scheduler to run, so the
curve is measured on inputs made from the forward signature (``magsdk.inspect.inputs``), or
returned by the user's ``--inputs FILE.py:FUNC`` (the same function ``magsdk inspect`` takes), and
a plain rectified-flow sampler: ``x ← x + (σ_{i+1} − σ_i) · v(x, σ_i)`` from σ = 1 to 0. What it
measures is how this architecture's residual evolves over a schedule; with random weights that
is not what a trained model does, which is why such entries are marked ``synthetic``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import magsdk
from magsdk.config import CalibrationResult
from magsdk.errors import MagSDKError, UsageError
from magsdk.runtime import distributed
from magsdk.strategy import MagCacheStrategy

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")


def load_transformer(target: str) -> tuple[torch.nn.Module, str]:
    """The transformer to run: pretrained when a folder holds weights, else built small with random weights."""
    from magsdk.inspect import resolve_target
    from magsdk.inspect.shrink import build_small

    resolved = resolve_target(target)
    folder = Path(resolved.location)
    if resolved.source == "folder" and folder.is_dir() and any((folder / f).is_file() for f in _WEIGHT_FILES):
        from_pretrained = getattr(resolved.cls, "from_pretrained", None)
        if from_pretrained is not None:
            try:
                model: torch.nn.Module = from_pretrained(str(folder))
            except Exception as exc:
                raise MagSDKError(
                    f"could not load {resolved.cls.__name__} from {folder}: {type(exc).__name__}: {exc}"
                ) from exc
            return model.eval(), f"pretrained weights from {folder}"
    model, _ = build_small(resolved.cls, _init_config(resolved.config))
    return model.eval(), "random weights (shrunk copy)"


def _init_config(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if config is None:
        return None
    return {k: v for k, v in config.items() if not k.startswith("_")}


# -- the loop ---------------------------------------------------------------------------------------
def _hidden_name(model: torch.nn.Module, kwargs: Mapping[str, Any], command: str) -> str:
    """The latents: a known name, else the forward's first argument (a diffusion transformer's latents)."""
    from magsdk.inspect.inputs import HIDDEN_NAMES

    for name in HIDDEN_NAMES:
        if isinstance(kwargs.get(name), torch.Tensor):
            return name
    params = _parameters(model)
    if params and isinstance(kwargs.get(params[0].name), torch.Tensor):
        return params[0].name
    raise UsageError(
        "cannot tell which input holds the latents; calibrate with "
        f"`{command} ... --driver FILE.py:FUNC` (a function (transformer, steps, seed) that runs one generation)"
    )


def _timestep_name(kwargs: Mapping[str, Any], hint: str | None, command: str) -> str:
    from magsdk.conventions import TIMESTEP_ARGUMENT_NAMES as TIMESTEP_NAMES

    candidates: list[str] = [hint] if hint else []
    for name in [*candidates, *TIMESTEP_NAMES]:
        if name in kwargs:
            return name
    raise UsageError(
        "the transformer's forward takes no timestep argument magsdk knows (looked for "
        f"{', '.join(TIMESTEP_NAMES)}); calibrate with `{command} ... --driver FILE.py:FUNC`"
    )


def _parameters(model: torch.nn.Module) -> list[inspect.Parameter]:
    return list(inspect.signature(model.forward).parameters.values())


def _by_name(model: torch.nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], spec: str) -> dict[str, Any]:
    """``(args, kwargs)`` as keyword arguments only, so the loop can replace latents and timestep by name."""
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise UsageError(f"--inputs {spec}: the inputs do not fit {type(model).__name__}.forward: {exc}") from exc
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise UsageError(
                    f"--inputs {spec}: {type(model).__name__}.forward takes *{name}; return every input as a "
                    "keyword argument (args = ())"
                )
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.POSITIONAL_ONLY:
            raise UsageError(f"--inputs {spec}: {type(model).__name__}.forward has positional-only parameters")
        else:
            named[name] = value
    return named


def _prediction(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping):
        value = output.get("sample")
        if isinstance(value, torch.Tensor):
            return value
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise UsageError(
        f"cannot find the prediction in the transformer's output ({type(output).__name__}); use --driver"
    )


def _velocity(pred: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    if pred.shape == latents.shape:
        return pred
    if pred.ndim == latents.ndim and pred.shape[0] == latents.shape[0] and pred.shape[2:] == latents.shape[2:]:
        return pred[:, : latents.shape[1]]  # e.g. a learned-variance head doubles the channels
    raise UsageError(
        f"the transformer predicts shape {tuple(pred.shape)} for latents of shape {tuple(latents.shape)}; "
        "the synthetic loop cannot step it. Calibrate with --driver FILE.py:FUNC."
    )


@dataclass
class SyntheticInputs:
    """Inputs made once, before calibration starts (synthesis may call the model to pick a layout)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden: str
    timestep: str
    scale: float


def _to_model(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Inputs made on the CPU in float32, moved to where the model is (floats in its dtype)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_model(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _to_model(v, device, dtype) for k, v in value.items()}
    return value


def synthesize(
    model: torch.nn.Module,
    inputs: str | None = None,
    timestep_name: str | None = None,
    command: str = "magsdk scaffold",
) -> SyntheticInputs:
    """The loop's inputs: the user's ``--inputs FILE.py:FUNC``, else made from the forward signature."""
    from magsdk.inspect.inputs import synthesize_inputs, timestep_value

    if inputs is not None:
        from magsdk.inspect import load_inputs_function

        args, kwargs = load_inputs_function(inputs, model)
        kwargs = _by_name(model, args, kwargs, inputs)
        args = ()
    else:
        args, kwargs = synthesize_inputs(model)
    param = next(model.parameters(), None)
    if param is not None:
        args, kwargs = _to_model(args, param.device, param.dtype), _to_model(kwargs, param.device, param.dtype)
    timestep = _timestep_name(kwargs, timestep_name, command)
    if inputs is not None:
        value = kwargs[timestep]
        largest = float(value.abs().max()) if isinstance(value, torch.Tensor) else abs(float(value))
        scale = 1000.0 if largest > 1.0 else 1.0  # the user's timestep says which range the model takes
    else:
        scale = 1000.0 if timestep_value(model) > 1.0 else 1.0
    return SyntheticInputs(
        args=args, kwargs=kwargs, hidden=_hidden_name(model, kwargs, command), timestep=timestep, scale=scale
    )


def euler_generation(model: torch.nn.Module, inputs: SyntheticInputs, steps: int, seed: int) -> tuple[int, ...]:
    """One generation from seeded noise; returns the latent shape."""
    kwargs = dict(inputs.kwargs)
    template = kwargs[inputs.timestep]
    start = kwargs[inputs.hidden]
    noise = torch.randn(start.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    latents = noise.to(device=start.device, dtype=start.dtype)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            sigma = float(sigmas[i])
            kwargs[inputs.hidden] = latents
            if isinstance(template, torch.Tensor):
                kwargs[inputs.timestep] = torch.full_like(template, sigma * inputs.scale)
            else:
                kwargs[inputs.timestep] = sigma * inputs.scale
            pred = _velocity(_prediction(model(*inputs.args, **kwargs)), latents)
            latents = latents + (float(sigmas[i + 1]) - sigma) * pred
    return tuple(latents.shape)


def run_synthetic(
    model: torch.nn.Module,
    strategy: MagCacheStrategy,
    *,
    steps: int,
    seeds: int,
    progress: bool = True,
    inputs: str | None = None,
    timestep_name: str | None = None,
    command: str = "magsdk scaffold",
    probes: int = 0,
) -> tuple[CalibrationResult, str]:
    """The Euler loop once per seed inside ``magsdk.calibrate``; returns the result and the latent shape."""
    from magsdk.calibration.drivers import CalibrationRunError, progress_bar, seeds_of

    try:
        made = synthesize(model, inputs, timestep_name, command)
    except MagSDKError:
        raise
    except Exception as exc:
        raise CalibrationRunError(
            f"could not make example inputs for {type(model).__name__}: {type(exc).__name__}: {exc}. "
            f"Pass your own with `{command} ... --inputs FILE.py:FUNC`, or calibrate with --driver FILE.py:FUNC."
        ) from exc
    shape: tuple[int, ...] = ()
    group = distributed.data_parallel_group(model)
    mine = distributed.shard(seeds_of(seeds), group)
    with progress_bar(progress, f"calibrating {type(model).__name__} (synthetic)", len(mine)) as advance:
        cal = magsdk.calibrate(model, strategy=strategy, data_group=group, probes=probes)
        with cal:
            for seed in mine:
                try:
                    shape = euler_generation(model, made, steps, seed)
                except MagSDKError:
                    raise
                except Exception as exc:
                    raise CalibrationRunError(
                        f"the synthetic Euler loop failed on {type(model).__name__} (seed {seed}): "
                        f"{type(exc).__name__}: {exc}. Calibrate with --driver FILE.py:FUNC instead."
                    ) from exc
                advance(f"seed {seed}")
    assert cal.result is not None
    return cal.result, "x".join(str(d) for d in shape)
