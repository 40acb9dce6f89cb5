"""Example inputs for a transformer's ``forward``, made from its signature and its config.

Inspection traces one forward pass, so it needs inputs of the right shapes, not meaningful ones.
Most of them follow from names: ``encoder_hidden_states`` is ``(batch, tokens, text width)``
with the width read from the config (``joint_attention_dim``, ``text_dim``, ``caption_channels``
…), ``pooled_projections`` is ``(batch, pooled_projection_dim)``, masks are all ones, position ids
follow the latent grid. The latent layout (packed ``(B, L, C)`` tokens, a ``(B, C, H, W)`` image
or a ``(B, C, F, H, W)`` video) is read from the module that first consumes it: its input width
and kernel size give the channels and the patch size. Families whose forward wants more than
names can tell (lists of latents, rope positions, image shapes, fused token layouts) have a
recipe in ``magsdk.inspect.recipes``, registered with ``@input_recipe(class names)``.

Everything is kept tiny: a 2×2 grid of latent tokens, two latent frames, six text tokens.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from magsdk.conventions import LATENT_ARGUMENT_NAMES, TIMESTEP_ARGUMENT_NAMES
from magsdk.errors import UsageError
from magsdk.inspect.recipes.registry import OMIT, Recipe, recipe_for

GRID = 2
"""Latent tokens per spatial axis (after patching)."""
FRAMES = 2
"""Latent tokens along time (after patching), for video models."""
TEXT = 6
"""Text tokens (not a multiple of the image token count, so that shapes tell text from image)."""

#: Parameter names that get latents / a timestep (``magsdk.conventions``; also read by synthetic calibration).
HIDDEN_NAMES = LATENT_ARGUMENT_NAMES
TIMESTEP_NAMES = TIMESTEP_ARGUMENT_NAMES
_TEXT_WIDTH_KEYS = (
    "joint_attention_dim", "text_dim", "text_embed_dim", "caption_channels", "cap_feat_dim", "context_in_dim",
    "in_text_dim", "text_in_dim", "text_hidden_dim", "cross_attention_dim", "text_encoder_dim", "encoder_hidden_size",
    "condition_dim", "llm_features_dim", "text_emb_dim",
)
_POOLED_WIDTH_KEYS = ("pooled_projection_dim", "in_text_dim2", "text_emb_dim", "pooled_embed_dim")
_TEXT_LAYER_NAMES = ("context_embedder", "txt_in", "text_embedder", "caption_projection", "text_proj", "y_embedder",
                     "cap_embedder", "text_embedding", "encoder_proj", "cond_proj")
_CHANNEL_KEYS = ("in_channels", "in_visual_dim", "in_dim", "input_channels", "latent_channels")


class InputSynthesisError(UsageError):
    """No example value could be made for a forward parameter; the user must pass ``--inputs``.

    ``command`` is the command line to repeat with ``--inputs`` added (``magsdk inspect TARGET`` as the
    user typed TARGET); :meth:`for_command` sets it where the command is known.
    """

    def __init__(
        self, parameter: str, model: str, reason: str, required: tuple[str, ...] = (), command: str | None = None
    ) -> None:
        self.parameter = parameter
        self.model = model
        self.reason = reason
        self.required = required
        self.command = command
        names = list(dict.fromkeys([*required, parameter]))
        body = "".join(f"            {name!r}: ...,  # a tensor for {model}.forward({name}=...)\n" for name in names)
        again = command or f"magsdk inspect {model}"
        super().__init__(
            f"cannot synthesize the {parameter!r} argument of {model}.forward: {reason}. "
            "Write a function that returns example inputs and pass it with --inputs FILE.py:FUNC, e.g.\n\n"
            "    # my_inputs.py\n"
            "    import torch\n\n"
            "    def make_inputs(model):  # optional argument: the small model inspect built (sizes in model.config)\n"
            "        args = ()\n"
            "        kwargs = {\n"
            f"{body}"
            "        }\n"
            "        return args, kwargs\n\n"
            "then run the command again with the option added:\n\n"
            f"    {again} --inputs my_inputs.py:make_inputs"
        )

    def for_command(self, command: str) -> InputSynthesisError:
        """The same error, its hint repeating ``command`` (the command line as the user typed it)."""
        return InputSynthesisError(self.parameter, self.model, self.reason, self.required, command)


# -- context ----------------------------------------------------------------------------------------
@dataclass
class Ctx:
    """What the builders know: the model, its config, batch size and a seeded generator."""

    model: torch.nn.Module
    batch: int
    config: dict[str, Any]
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    @property
    def name(self) -> str:
        return type(self.model).__name__

    def get(self, *keys: str, default: Any = None) -> Any:
        for key in keys:
            value = self.config.get(key)
            if value is not None:
                return value
        return default

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator)

    # widths ---------------------------------------------------------------------------------------
    def text_width(self) -> int:
        value = self.get(*_TEXT_WIDTH_KEYS)
        if isinstance(value, (list, tuple)):
            value = value[-1]
        if isinstance(value, int):
            return value
        for name in _TEXT_LAYER_NAMES:  # no config entry: the layer that embeds the text says it
            module = getattr(self.model, name, None)
            if isinstance(module, torch.nn.Module):
                for sub in module.modules():
                    if isinstance(sub, torch.nn.Linear):
                        return int(sub.in_features)
        raise InputSynthesisError(
            "encoder_hidden_states", self.name, "neither the config nor a text-embedding layer gives the text width"
        )

    def pooled_width(self) -> int:
        value = self.get(*_POOLED_WIDTH_KEYS)
        if not isinstance(value, int):
            raise InputSynthesisError("pooled_projections", self.name, "the config names no pooled projection width")
        return value

    def channels(self) -> int:
        value = self.get(*_CHANNEL_KEYS)
        if not isinstance(value, int):
            layer = first_input_layer(self.model)
            if layer is None:
                raise InputSynthesisError("hidden_states", self.name, "the config names no input channels")
            return _layer_in_channels(layer)
        return value

    def patch(self) -> tuple[int, int, int]:
        """(time, height, width) patch size."""
        value = self.get("patch_size", default=1)
        if isinstance(value, (list, tuple)):
            sizes = [int(v) for v in value]
            if len(sizes) == 3:
                return sizes[0], sizes[1], sizes[2]
            if len(sizes) == 2:
                return int(self.get("patch_size_t", default=1)), sizes[0], sizes[1]
            return 1, sizes[0], sizes[0]
        return int(self.get("patch_size_t", default=1) or 1), int(value), int(value)

    # latents --------------------------------------------------------------------------------------
    def image(self, channels: int | None = None, grid: int = GRID) -> torch.Tensor:
        _, ph, pw = self.patch()
        return self.randn(self.batch, channels or self.channels(), ph * grid, pw * grid)

    def video(self, channels: int | None = None, frames: int = FRAMES, grid: int = GRID) -> torch.Tensor:
        pt, ph, pw = self.patch()
        return self.randn(self.batch, channels or self.channels(), pt * frames, ph * grid, pw * grid)

    def packed(self, tokens: int = GRID * GRID, channels: int | None = None) -> torch.Tensor:
        return self.randn(self.batch, tokens, channels or self.channels())

    def text(self, width: int | None = None, tokens: int = TEXT) -> torch.Tensor:
        return self.randn(self.batch, tokens, width or self.text_width())

    def timestep(self, value: float | None = None) -> torch.Tensor:
        return torch.full((self.batch,), value if value is not None else timestep_value(self.model))

    def mask(self, tokens: int = TEXT, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        return torch.ones(self.batch, tokens, dtype=dtype)


def _config_dict(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    try:
        return dict(config)
    except (TypeError, ValueError):
        return {k: v for k, v in vars(config).items() if not k.startswith("_")}


def timestep_value(model: torch.nn.Module) -> float:
    """A mid-schedule timestep in the scale the model expects.

    Models that multiply the timestep by 1000 themselves (Flux: ``timestep * 1000``; Z-Image:
    ``t * t_scale``) take a sigma in [0, 1]; the others take a value in [0, 1000].
    """
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return 500.0
    if re.search(r"\*\s*1000|t_scale|time_factor|timestep_scale", source):
        return 0.5
    return 500.0


# -- layout detection -------------------------------------------------------------------------------
_IN_LAYER_NAMES = ("x_embedder", "img_in", "patch_embed", "patch_embedding", "pos_embed", "proj_in", "input_proj",
                   "visual_embeddings", "image_projector", "patch_embedder", "x_embed")


def first_input_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The Linear / Conv that first reads the latents (by conventional name, else the first one)."""
    for name in _IN_LAYER_NAMES:
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            for sub in module.modules():
                if isinstance(sub, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                    return sub
    for sub in model.modules():
        if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            return sub
    return None


def _layer_in_channels(layer: torch.nn.Module) -> int:
    if isinstance(layer, torch.nn.Linear):
        return int(layer.in_features)
    return int(getattr(layer, "in_channels", 0))


def generic_latents(ctx: Ctx) -> torch.Tensor:
    """Latents shaped for the first layer that reads them."""
    layer = first_input_layer(ctx.model)
    if isinstance(layer, torch.nn.Conv3d):
        kt, kh, kw = (int(k) for k in layer.kernel_size)
        return ctx.randn(ctx.batch, layer.in_channels, kt * FRAMES, kh * GRID, kw * GRID)
    if isinstance(layer, torch.nn.Conv2d):
        kh, kw = (int(k) for k in layer.kernel_size)
        if "3D" in ctx.name:
            return ctx.randn(ctx.batch, layer.in_channels, FRAMES, kh * GRID, kw * GRID)
        return ctx.randn(ctx.batch, layer.in_channels, kh * GRID, kw * GRID)
    if isinstance(layer, torch.nn.Linear):
        width = int(layer.in_features)
        channels = ctx.get(*_CHANNEL_KEYS)
        if isinstance(channels, int) and width != channels and width % channels == 0:
            # a Linear patch embedding over unpacked latents: (B, C, H, W) with patch p*p = width/C
            _, ph, pw = ctx.patch()
            if ph * pw * channels == width:
                if "3D" in ctx.name:
                    return ctx.video(channels)
                return ctx.image(channels)
        return ctx.packed(channels=width)
    raise InputSynthesisError("hidden_states", ctx.name, "no Linear or Conv layer reads the latents")


# -- ids --------------------------------------------------------------------------------------------
def flux_ids(ctx: Ctx, axes: int = 3, batched: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(img_ids, txt_ids) for Flux-style rope: image tokens carry (0, row, col)."""
    img = torch.zeros(GRID * GRID, axes)
    img[:, 1] = torch.arange(GRID * GRID) // GRID
    img[:, 2] = torch.arange(GRID * GRID) % GRID
    txt = torch.zeros(TEXT, axes)
    if batched:
        return img.expand(ctx.batch, -1, -1).clone(), txt.expand(ctx.batch, -1, -1).clone()
    return img, txt


def rope_axes_count(ctx: Ctx, default: int = 3) -> int:
    for key in ("axes_dims_rope", "axes_dims", "axes_dim", "rope_axes_dim"):
        value = ctx.config.get(key)
        if isinstance(value, (list, tuple)):
            return len(value)
    return default


# -- generic synthesis by parameter name -------------------------------------------------------------
Maker = Callable[[Ctx], Any]

_ALWAYS_FILL = {
    "encoder_hidden_states", "pooled_projections", "timestep", "timesteps", "img_ids", "txt_ids",
    "encoder_attention_mask", "encoder_hidden_states_mask", "img_shapes", "pooled_embeds", "cap_feats",
    "return_dict", "t",
}


def _generic_value(ctx: Ctx, param: inspect.Parameter, first: bool = False) -> Any:
    name = param.name
    if name in HIDDEN_NAMES:
        return generic_latents(ctx)
    if name in TIMESTEP_NAMES:
        return ctx.timestep()
    if name == "return_dict":
        return False
    if name == "encoder_hidden_states":
        return ctx.text()
    if name in ("pooled_projections", "pooled_embeds", "pooled_text_embeds"):
        return ctx.randn(ctx.batch, ctx.pooled_width())
    if name in ("img_ids", "txt_ids"):
        img, txt = flux_ids(ctx, rope_axes_count(ctx))
        return img if name == "img_ids" else txt
    if name == "guidance":
        return torch.full((ctx.batch,), 3.5) if ctx.config.get("guidance_embeds") else None
    if name in ("encoder_attention_mask", "encoder_hidden_states_mask", "text_attention_mask"):
        return ctx.mask()
    if name == "img_shapes":
        return [(1, GRID, GRID)] * ctx.batch
    if "mask" in name or name.endswith("_kwargs") or "cache" in name or "controlnet" in name:
        return None
    if first and param.default is inspect.Parameter.empty:
        return generic_latents(ctx)  # a diffusion transformer's first argument is its latents, whatever its name
    return _MISSING


_MISSING = object()


def _forward_parameters(model: torch.nn.Module) -> list[inspect.Parameter]:
    params = list(inspect.signature(type(model).forward).parameters.values())[1:]
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def synthesize_inputs(model: torch.nn.Module, batch: int = 1) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` for one forward call of ``model`` (tiny shapes, seeded random values).

    Raises ``InputSynthesisError`` naming the parameter when a required argument cannot be made.
    """
    ctx = Ctx(model=model, batch=batch, config=_config_dict(model))
    recipe = _recipe_for(model)
    special: dict[str, Any] = recipe(ctx) if recipe is not None else {}
    kwargs: dict[str, Any] = {}
    for index, param in enumerate(_forward_parameters(model)):
        if param.name in special:
            value = special[param.name]
            if value is not OMIT:
                kwargs[param.name] = value
            continue
        required = param.default is inspect.Parameter.empty
        if not required and param.name not in _ALWAYS_FILL and param.name != "guidance":
            continue
        try:
            value = _generic_value(ctx, param, first=index == 0)
        except InputSynthesisError as exc:
            if required:
                raise InputSynthesisError(exc.parameter, ctx.name, exc.reason, _required_names(model)) from None
            continue  # an optional input that cannot be made stays at its default
        if value is _MISSING:
            if required:
                raise InputSynthesisError(
                    param.name, ctx.name, "its name does not say what it holds", _required_names(model)
                )
            continue
        if value is None and not required:
            continue
        kwargs[param.name] = value
    if recipe is None:
        _pick_working_layout(ctx, kwargs)
    return (), kwargs


def _required_names(model: torch.nn.Module) -> tuple[str, ...]:
    return tuple(p.name for p in _forward_parameters(model) if p.default is inspect.Parameter.empty)


def _pick_working_layout(ctx: Ctx, kwargs: dict[str, Any]) -> None:
    """For a model without a recipe, keep the first latent layout its forward accepts.

    The layout read from the first input layer is tried first; packed tokens, an image and a video
    follow. When none works the first is kept, so that inspect reports the forward's own error.
    """
    params = _forward_parameters(ctx.model)
    names = [*HIDDEN_NAMES, params[0].name] if params else list(HIDDEN_NAMES)
    name = next((n for n in names if isinstance(kwargs.get(n), torch.Tensor)), None)
    if name is None:
        return
    first = kwargs[name]
    candidates = [first]
    channels = ctx.get(*_CHANNEL_KEYS)
    width = int(channels) if isinstance(channels, int) else int(first.shape[-1] if first.ndim == 3 else first.shape[1])
    for candidate in (ctx.packed(channels=width), ctx.image(width), ctx.video(width)):
        if all(candidate.shape != c.shape for c in candidates):
            candidates.append(candidate)
    for candidate in candidates:
        kwargs[name] = candidate
        try:
            with torch.no_grad():
                ctx.model(**kwargs)
        except Exception:  # a layout the forward rejects: try the next one
            continue
        return
    kwargs[name] = first


def _recipe_for(model: torch.nn.Module) -> Recipe | None:
    return recipe_for(type(model))
