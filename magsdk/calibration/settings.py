"""Which generations calibration runs: settings taken from the model, unless the user says otherwise.

A curve is only as good as the generations it was measured on, so calibration samples a model
the way it is meant to be sampled: the step count, guidance and resolution come from the
pipeline's own ``__call__`` defaults (the resolution from ``default_sample_size ×
vae_scale_factor`` where the signature leaves it open); a model folder may record the call
settings it was made for (``magsdk.json``, or ``reference.json`` as the bundled digits model
has), and those win over the pipeline's defaults; options the user gives win over both. The
prompts are a built-in, varied, general set unless ``--prompts`` names a file.

Every setting remembers where it came from, so the commands can say what they used, and the
settings are recorded in the calibration entry they produced.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from magsdk.errors import UsageError

#: Prompts used when none are given: varied subjects, styles and compositions, so the mean curve
#: is not the curve of one kind of image.
GENERAL_PROMPTS: tuple[str, ...] = (
    "a photograph of a red fox sitting in fresh snow, soft morning light",
    "a watercolor painting of a small harbor town at sunset",
    "a close-up studio portrait of an elderly man with a grey beard",
    "an isometric 3d render of a cozy reading room full of bookshelves",
    "a bowl of ramen with a soft-boiled egg, top-down food photography",
    "a futuristic city skyline at night with neon signs and rain on the streets",
    "a pencil sketch of a hummingbird drinking from a flower",
    "a minimalist poster with the words OPEN LATE in bold letters",
    "an aerial view of a river winding through an autumn forest",
    "a vintage red bicycle leaning against a brick wall",
)

#: Files in a model folder that record how the model is meant to be called (first found wins).
CALL_SETTINGS_FILES: tuple[str, ...] = ("magsdk.json", "reference.json")
#: Steps when neither the user, the folder nor the pipeline says (a bare transformer class).
FALLBACK_STEPS = 28
#: Keys of a recorded entry's ``settings`` that are not keyword arguments of the pipeline call.
NOT_CALL_KEYS: tuple[str, ...] = ("device", "dtype", "driver", "inputs", "sampler", "probes")

DTYPES: dict[str, str] = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}

Kind = Literal["pipeline", "driver", "synthetic"]


class CalibrationRequest(BaseModel):
    """What the user asked for on the command line; ``None`` means "take it from the model"."""

    model_config = ConfigDict(extra="forbid")

    steps: int | None = None
    prompts: list[str] | None = None
    prompts_source: str | None = None
    seeds: int | None = None
    height: int | None = None
    width: int | None = None
    call_kwargs: dict[str, Any] = Field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    driver: str | None = None
    inputs: str | None = None
    #: Between-step probes per step (``--probes``; 0: none).
    probes: int = 0


class CalibrationSettings(BaseModel):
    """What calibration runs, each value with where it came from."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind
    steps: int
    seeds: int
    prompts: list[str] = Field(default_factory=list)
    prompts_source: str = ""
    #: Keyword arguments of every pipeline call besides prompt, generator and output_type.
    call_kwargs: dict[str, Any] = Field(default_factory=dict)
    origins: dict[str, str] = Field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"
    driver: str | None = None
    inputs: str | None = None
    #: Between-step probes per step (``magsdk.calibrate(..., probes=P)``; 0: none).
    probes: int = 0

    def record(self) -> dict[str, Any]:
        """The ``settings`` of the calibration entry: enough to replay one generation."""
        record: dict[str, Any] = dict(self.call_kwargs)
        if self.kind != "pipeline":
            record["num_inference_steps"] = self.steps
        if self.kind == "driver":
            record["driver"] = self.driver
        if self.kind == "synthetic":
            record["sampler"] = "flow-matching Euler (magsdk synthetic loop)"
            record["inputs"] = self.inputs or "synthesized"
        if self.probes:  # only when probed, so the settings of entries without probes stay as they were
            record["probes"] = self.probes
        record["device"] = self.device
        record["dtype"] = self.dtype
        return record

    def describe(self) -> str:
        """One line per source, e.g. ``28 steps, height=256 (pipeline defaults); ...``."""
        by_source: dict[str, list[str]] = {}
        for key, value in self.call_kwargs.items():
            if key == "num_inference_steps":
                continue
            by_source.setdefault(self.origins.get(key, "?"), []).append(f"{key}={value!r}")
        parts = [f"{self.steps} steps ({self.origins.get('num_inference_steps', '?')})"]
        parts += [f"{', '.join(items)} ({source})" for source, items in by_source.items()]
        if self.kind == "pipeline":
            prompts = _count(len(self.prompts), "prompt")
            parts.append(f"{prompts} ({self.prompts_source}) x {_count(self.seeds, 'seed')}")
        elif self.kind == "driver":
            parts.append(f"--driver {self.driver}, {_count(self.seeds, 'seed')}")
        else:
            parts.append(f"synthetic Euler loop on {self.inputs or 'synthesized'} inputs, {_count(self.seeds, 'seed')}")
        if self.probes:  # the cost is what the user should see before the generations start
            parts.append(f"{_count(self.probes, 'probe')} per step (about {1 + self.probes}x the transformer calls)")
        parts.append(f"{self.device} {self.dtype}")
        return "; ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


# -- device and dtype -------------------------------------------------------------------------------
def parse_dtype(value: str | None, option: str = "--dtype") -> str | None:
    """A canonical torch dtype name (``float32``, ``float16``, ``bfloat16``), or None for the model's own."""
    if value is None:
        return None
    canonical = DTYPES.get(value.strip().lower().removeprefix("torch."))
    if canonical is None:
        raise UsageError(f"{option} {value!r}: expected one of float32, float16, bfloat16 (or fp32, fp16, bf16)")
    return canonical


def parse_device(value: str | None, option: str = "--device") -> str | None:
    """A device torch accepts and this machine has; None picks CUDA when there is one, else the CPU."""
    if value is None:
        return None
    import torch

    try:
        device = torch.device(value.strip())
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"{option} {value!r} is not a device torch knows (e.g. cpu, cuda, cuda:1, mps)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"{option} {value}: no CUDA device is available here (torch.cuda.is_available() is False); "
                "leave --device out to run on the CPU"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{option} {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{option} {value}: MPS is not available here; leave --device out to run on the CPU")
    return str(device)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# -- what the model says ----------------------------------------------------------------------------
def call_parameters(pipe: Any) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(pipe.__call__).parameters


def accepts_any_keyword(pipe: Any) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in call_parameters(pipe).values())


def pipeline_defaults(pipe: Any) -> dict[str, Any]:
    """Resolution, step count and guidance the pipeline uses when the caller gives none."""
    params = call_parameters(pipe)
    found: dict[str, Any] = {}
    sample = getattr(pipe, "default_sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    for side in ("height", "width"):
        if side not in params:
            continue
        default = params[side].default
        if isinstance(default, int) and not isinstance(default, bool):
            found[side] = default
        elif isinstance(sample, int) and isinstance(scale, int):
            found[side] = sample * scale
    for name in ("num_inference_steps", "guidance_scale"):
        default = params[name].default if name in params else None
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            found[name] = default
    return found


def recorded_call_settings(folder: Path | None) -> tuple[dict[str, Any], str | None]:
    """The call settings a model folder records (``magsdk.json`` / ``reference.json``) and the file's name."""
    if folder is None or not folder.is_dir():
        return {}, None
    for name in CALL_SETTINGS_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"{path} is not valid JSON ({exc}); fix it or remove it") from exc
        if not isinstance(data, dict):
            raise UsageError(f"{path} must hold a JSON object of pipeline call settings")
        return data, name
    return {}, None


def resolve_pipeline_settings(
    request: CalibrationRequest, pipe: Any, folder: Path | None, *, device: str, dtype: str
) -> CalibrationSettings:
    """The pipeline call of every calibration generation: user options > --call-arg > folder > pipeline."""
    params = call_parameters(pipe)
    recorded, recorded_file = recorded_call_settings(folder)
    call: dict[str, Any] = {}
    origins: dict[str, str] = {}

    def put(key: str, value: Any, origin: str) -> None:
        call[key] = value
        origins[key] = origin

    for key, value in pipeline_defaults(pipe).items():
        put(key, value, "pipeline default")
    for key, value in recorded.items():
        if key in params and key not in ("prompt", "generator", "output_type"):
            put(key, value, f"{recorded_file} in the model folder")
    unknown = [k for k in request.call_kwargs if k not in params]
    if unknown and not accepts_any_keyword(pipe):
        raise UsageError(
            f"--call-arg {unknown[0]}: {type(pipe).__name__}.__call__ has no parameter {unknown[0]!r}; "
            f"it takes: {', '.join(p for p in params if p not in ('self', 'kwargs'))}"
        )
    for key, value in request.call_kwargs.items():
        put(key, value, "--call-arg")
    if request.steps is not None:
        put("num_inference_steps", request.steps, "--steps")
    for side in ("height", "width"):
        value = getattr(request, side)
        if value is not None:
            if side not in params:
                raise UsageError(f"--{side}: {type(pipe).__name__}.__call__ takes no {side!r}; leave --{side} out")
            put(side, value, f"--{side}")
    if "num_inference_steps" not in call:
        put("num_inference_steps", FALLBACK_STEPS, "magsdk default")
    steps = call["num_inference_steps"]
    if not isinstance(steps, int) or steps < 2:
        raise UsageError(
            f"num_inference_steps={steps!r} ({origins['num_inference_steps']}): calibration needs at least 2 steps; "
            "pass --steps N"
        )
    prompts = [p.strip() for p in request.prompts if p.strip()] if request.prompts is not None else []
    return CalibrationSettings(
        kind="pipeline",
        steps=steps,
        seeds=request.seeds or 1,
        prompts=prompts or list(GENERAL_PROMPTS),
        prompts_source=request.prompts_source or ("given" if prompts else "built-in general set"),
        call_kwargs=call,
        origins=origins,
        device=device,
        dtype=dtype,
        probes=request.probes,
    )


def resolve_loop_settings(request: CalibrationRequest, *, device: str, dtype: str) -> CalibrationSettings:
    """Calibration without a pipeline: the user's --driver or the synthetic Euler loop."""
    steps = request.steps if request.steps is not None else FALLBACK_STEPS
    origin = "--steps" if request.steps is not None else "magsdk default"
    return CalibrationSettings(
        kind="driver" if request.driver is not None else "synthetic",
        steps=steps,
        seeds=request.seeds or 2,  # the seeds are the only thing that varies: two give a spread
        origins={"num_inference_steps": origin},
        device=device,
        dtype=dtype,
        driver=request.driver,
        inputs=request.inputs,
        probes=request.probes,
    )


def replay_kwargs(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The pipeline keyword arguments recorded in an entry's ``settings`` (device and dtype left out)."""
    return {k: v for k, v in settings.items() if k not in NOT_CALL_KEYS}
