"""Example inputs for a transformer's ``forward``, made from its signature and its config.

Inspection traces one forward pass, so it needs inputs of the right shapes, not meaningful ones.
Most of them follow from names: ``encoder_hidden_states`` is ``(batch, tokens, text width)``
with the width read from the config (``joint_attention_dim``, ``text_dim``, ``caption_channels``
…), ``pooled_projections`` is ``(batch, pooled_projection_dim)``, masks are all ones, position ids
follow the latent grid. The latent layout (packed ``(B, L, C)`` tokens, a ``(B, C, H, W)`` image
or a ``(B, C, F, H, W)`` video) is read from the module that first consumes it: its input width
and kernel size give the channels and the patch size. Families whose forward wants more than
names can tell (lists of latents, rope positions, image shapes, fused token layouts) have a
recipe here.

Everything is kept tiny: a 2×2 grid of latent tokens, two latent frames, six text tokens.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from magsdk.errors import UsageError

GRID = 2
"""Latent tokens per spatial axis (after patching)."""
FRAMES = 2
"""Latent tokens along time (after patching), for video models."""
TEXT = 6
"""Text tokens (not a multiple of the image token count, so that shapes tell text from image)."""

HIDDEN_NAMES = ("hidden_states", "x", "sample", "latents", "latent_model_input", "img", "hidden_state", "latent",
                "tokens", "z", "x_t", "noisy_latents", "hidden")
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "time_step", "noise_level", "time")
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
    """No example value could be made for a forward parameter; the user must pass ``--inputs``."""

    def __init__(self, parameter: str, model: str, reason: str, required: tuple[str, ...] = ()) -> None:
        self.parameter = parameter
        self.model = model
        self.reason = reason
        names = list(dict.fromkeys([*required, parameter]))
        body = "".join(f"            {name!r}: ...,  # a tensor for {model}.forward({name}=...)\n" for name in names)
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
            f"    magsdk inspect {model} --inputs my_inputs.py:make_inputs"
        )


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
    scale = getattr(model, "_magsdk_timestep_scale", None)
    if isinstance(scale, (int, float)):
        return 0.5 * float(scale)
    name = type(model).__name__
    if name in _UNIT_TIMESTEP:
        return 0.5
    if name in _THOUSAND_TIMESTEP:
        return 500.0
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
            if value is not _OMIT:
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


_OMIT = object()
"""A recipe value meaning: leave this parameter at its default."""

Recipe = Callable[[Ctx], dict[str, Any]]
_RECIPES: dict[str, Recipe] = {}


def register_recipe(class_name: str, recipe: Recipe) -> None:
    """Inputs for a family whose forward wants more than its parameter names say."""
    _RECIPES[class_name] = recipe


def _recipe_for(model: torch.nn.Module) -> Recipe | None:
    for cls in type(model).__mro__:
        recipe = _RECIPES.get(cls.__name__)
        if recipe is not None:
            return recipe
    return None


#: Classes known to take a sigma-like timestep in [0, 1] / a timestep in [0, 1000] (overrides detection).
_UNIT_TIMESTEP: set[str] = set()
_THOUSAND_TIMESTEP: set[str] = set()


# -- family recipes ---------------------------------------------------------------------------------
# Each recipe returns the arguments that names alone get wrong; every other parameter still goes
# through the generic rules. ``_OMIT`` leaves an optional parameter at its default.
def _video_fchw(ctx: Ctx, channels: int | None = None) -> torch.Tensor:
    """(B, F, C, H, W): CogVideoX / ConsisID / AnyFlow order."""
    pt, ph, pw = ctx.patch()
    return ctx.randn(ctx.batch, pt * FRAMES, channels or ctx.channels(), ph * GRID, pw * GRID)


def _flux_like(ctx: Ctx) -> dict[str, Any]:
    axes = rope_axes_count(ctx)
    img, txt = flux_ids(ctx, axes)
    return {"hidden_states": ctx.packed(), "img_ids": img, "txt_ids": txt}


def _cogvideox(ctx: Ctx) -> dict[str, Any]:
    # the sincos position table covers exactly max_text_seq_length text tokens
    tokens = int(ctx.get("max_text_seq_length", default=TEXT))
    return {"hidden_states": _video_fchw(ctx), "encoder_hidden_states": ctx.text(tokens=tokens)}


def _size_conditions(ctx: Ctx) -> dict[str, Any]:
    """SDXL-style micro-conditions of CogView: (B, 2) sizes and crop coordinates in pixels."""
    side = float(8 * GRID * ctx.patch()[1])
    size = torch.tensor([[side, side]] * ctx.batch)
    return {"original_size": size, "target_size": size.clone(), "crop_coords": torch.zeros(ctx.batch, 2)}


def _cogview4(ctx: Ctx) -> dict[str, Any]:
    return {"hidden_states": ctx.image(), **_size_conditions(ctx)}


def _glm_image(ctx: Ctx) -> dict[str, Any]:
    tokens = GRID * GRID
    codebook = int(ctx.get("prior_vq_quantizer_codebook_size", default=16))
    values = _size_conditions(ctx)
    values.pop("original_size")
    return {
        "hidden_states": ctx.image(),
        "prior_token_id": torch.randint(0, codebook, (ctx.batch, tokens), generator=ctx.generator),
        "prior_token_drop": torch.zeros(ctx.batch, tokens, dtype=torch.bool),
        **values,
    }


def _ace_step(ctx: Ctx) -> dict[str, Any]:
    length = 2 * int(ctx.get("patch_size", default=1))
    acoustic = int(ctx.get("audio_acoustic_hidden_dim", default=64))
    context = int(ctx.get("in_channels")) - acoustic
    width = int(ctx.get("encoder_hidden_size", "hidden_size"))
    t = ctx.timestep()
    return {
        "hidden_states": ctx.randn(ctx.batch, length, acoustic),
        "context_latents": ctx.randn(ctx.batch, length, context),
        "encoder_hidden_states": ctx.text(width),
        "timestep": t,
        "timestep_r": t.clone(),
    }


def _anyflow(ctx: Ctx) -> dict[str, Any]:
    t = torch.full((ctx.batch, FRAMES), timestep_value(ctx.model))
    return {"hidden_states": _video_fchw(ctx), "timestep": t, "r_timestep": t.clone()}


def _anyflow_far(ctx: Ctx) -> dict[str, Any]:
    # the spatial grid must also divide by the compressed patch size used for far-away chunks
    compressed = ctx.get("compressed_patch_size", default=(1, 4, 4))
    _, ph, pw = ctx.patch()
    grid = max(GRID, int(compressed[1]) // ph)
    t = torch.full((ctx.batch, FRAMES), timestep_value(ctx.model))
    return {
        "hidden_states": ctx.randn(ctx.batch, FRAMES, ctx.channels(), ph * grid, pw * grid),
        "timestep": t,
        "r_timestep": t.clone(),
        "chunk_partition": [1] * FRAMES,
    }


def _bria(ctx: Ctx) -> dict[str, Any]:
    values = _flux_like(ctx)
    if ctx.get("pooled_projection_dim") is None:
        values["pooled_projections"] = _OMIT
    return values


def _bria_fibo(ctx: Ctx) -> dict[str, Any]:
    values = _bria(ctx)
    # one text-encoder hidden state per block, each as wide as the text encoder
    layers = int(ctx.get("num_layers", default=1)) + int(ctx.get("num_single_layers", default=0))
    width = int(ctx.get("text_encoder_dim", default=ctx.text_width()))
    values["text_encoder_layers"] = [ctx.text(width) for _ in range(layers)]
    return values


def _bria_fibo2(ctx: Ctx) -> dict[str, Any]:
    bundles = 1 + len(ctx.get("injection_layer_ids", default=()))
    return {
        "hidden_states": ctx.image(),
        "encoder_hidden_states": ctx.randn(ctx.batch, bundles, TEXT, ctx.text_width()),
        "encoder_attention_mask": ctx.mask(),
    }


def _cosmos(ctx: Ctx) -> dict[str, Any]:
    video = ctx.video(int(ctx.get("in_channels")))
    values: dict[str, Any] = {"hidden_states": video}
    if ctx.get("concat_padding_mask"):
        values["padding_mask"] = torch.zeros(ctx.batch, 1, video.shape[-2], video.shape[-1])
    return values


def _dit(ctx: Ctx) -> dict[str, Any]:
    return {"hidden_states": ctx.image(), "class_labels": torch.ones(ctx.batch, dtype=torch.long)}


def _pixart(ctx: Ctx) -> dict[str, Any]:
    image = ctx.image()
    side = float(image.shape[-1] * 8)
    return {
        "hidden_states": image,
        "added_cond_kwargs": {
            "resolution": torch.tensor([[side, side]] * ctx.batch),
            "aspect_ratio": torch.ones(ctx.batch, 1),
        },
    }


def _ernie(ctx: Ctx) -> dict[str, Any]:
    width = int(ctx.get("text_in_dim", default=ctx.get("hidden_size")))
    return {
        "hidden_states": ctx.image(),
        "text_bth": ctx.text(width),
        "text_lens": torch.full((ctx.batch,), TEXT, dtype=torch.long),
    }


def _flux2(ctx: Ctx) -> dict[str, Any]:
    axes = rope_axes_count(ctx, 4)
    img, txt = flux_ids(ctx, axes, batched=True)
    return {"hidden_states": ctx.packed(), "img_ids": img, "txt_ids": txt,
            "guidance": torch.full((ctx.batch,), 3.5) if ctx.get("guidance_embeds") else _OMIT}


def _flux3(ctx: Ctx) -> dict[str, Any]:
    axes = rope_axes_count(ctx, 4)
    img, txt = flux_ids(ctx, axes)
    values: dict[str, Any] = {"hidden_states": ctx.packed(), "img_ids": img, "txt_ids": txt}
    if ctx.get("flow_map"):
        values["target_timestep"] = ctx.timestep(0.0)
    return values


def _hidream(ctx: Ctx) -> dict[str, Any]:
    channels = ctx.get("caption_channels", default=[32, 32])
    layers = len(ctx.get("llama_layers", default=[0]))
    return {
        "hidden_states": ctx.image(),
        "encoder_hidden_states_t5": ctx.text(int(channels[0])),
        "encoder_hidden_states_llama3": ctx.randn(layers, ctx.batch, TEXT, int(channels[1])),
        "pooled_embeds": ctx.randn(ctx.batch, int(ctx.get("text_emb_dim"))),
    }


def _hunyuan_video15(ctx: Ctx) -> dict[str, Any]:
    return {
        "hidden_states": ctx.video(),
        "encoder_hidden_states_2": ctx.text(int(ctx.get("text_embed_2_dim"))),
        "encoder_attention_mask_2": ctx.mask(),
        "image_embeds": torch.zeros(ctx.batch, TEXT, int(ctx.get("image_embed_dim"))),
    }


def _hunyuan_framepack(ctx: Ctx) -> dict[str, Any]:
    video = ctx.video()
    return {
        "hidden_states": video,
        "image_embeds": ctx.randn(ctx.batch, TEXT, int(ctx.get("image_proj_dim"))),
        "indices_latents": torch.arange(video.shape[2]),
        # diffusers reads the rope of every history stream, so all of them must be given
        "latents_clean": ctx.randn(*video.shape[:2], 1, *video.shape[3:]),
        "indices_latents_clean": torch.arange(1),
        "latents_history_2x": ctx.randn(*video.shape[:2], 2, *video.shape[3:]),
        "indices_latents_history_2x": torch.arange(2),
        "latents_history_4x": ctx.randn(*video.shape[:2], 4, *video.shape[3:]),
        "indices_latents_history_4x": torch.arange(4),
        "guidance": torch.full((ctx.batch,), 3.5) if ctx.get("guidance_embeds") else _OMIT,
    }


def _ideogram4(ctx: Ctx) -> dict[str, Any]:
    # one packed sequence: TEXT llm tokens (indicator 3) then the image tokens (indicator 2)
    image_tokens = GRID * GRID
    length = TEXT + image_tokens
    indicator = torch.tensor([3] * TEXT + [2] * image_tokens).expand(ctx.batch, -1).clone()
    positions = torch.zeros(ctx.batch, length, 3, dtype=torch.long)
    positions[:, :TEXT, 0] = torch.arange(TEXT)
    positions[:, TEXT:, 0] = TEXT
    positions[:, TEXT:, 1] = torch.arange(image_tokens) // GRID
    positions[:, TEXT:, 2] = torch.arange(image_tokens) % GRID
    return {
        "hidden_states": ctx.packed(length, int(ctx.get("in_channels"))),
        "encoder_hidden_states": ctx.text(int(ctx.get("llm_features_dim")), length),
        "position_ids": positions,
        "segment_ids": torch.zeros(ctx.batch, length, dtype=torch.long),
        "indicator": indicator,
    }


def _joyimage_plus(ctx: Ctx) -> dict[str, Any]:
    pt, ph, pw = ctx.patch()
    patches = FRAMES * GRID * GRID
    return {
        "hidden_states": ctx.randn(ctx.batch, patches, ctx.channels(), pt, ph, pw),
        "shape_list": [[(FRAMES, GRID, GRID)] for _ in range(ctx.batch)],
        "encoder_hidden_states_mask": ctx.mask(dtype=torch.long),
    }


def _kandinsky5(ctx: Ctx) -> dict[str, Any]:
    pt, ph, pw = ctx.patch()
    frames, height, width = pt * FRAMES, ph * GRID, pw * GRID
    return {
        "hidden_states": ctx.randn(ctx.batch, frames, height, width, int(ctx.get("in_visual_dim"))),
        "encoder_hidden_states": ctx.text(int(ctx.get("in_text_dim"))),
        "pooled_projections": ctx.randn(ctx.batch, int(ctx.get("in_text_dim2"))),
        "visual_rope_pos": (torch.arange(FRAMES), torch.arange(GRID), torch.arange(GRID)),
        "text_rope_pos": torch.arange(TEXT),
    }


def _kandinsky6(ctx: Ctx) -> dict[str, Any]:
    pt, ph, pw = ctx.patch()
    channels = int(ctx.get("in_visual_dim"))
    if ctx.get("visual_cond"):
        channels = 2 * channels + 1
    return {
        "hidden_states": ctx.randn(ctx.batch, pt * FRAMES, ph * GRID, pw * GRID, channels),
        "encoder_hidden_states": ctx.text(int(ctx.get("in_text_dim"))),
        "pooled_projections": ctx.randn(ctx.batch, int(ctx.get("in_text_dim2"))),
        "encoder_attention_mask": _OMIT,
    }


def _kandinsky6_sr(ctx: Ctx) -> dict[str, Any]:
    # NABLA attention works on 8×8 token tiles
    pt, ph, pw = ctx.patch()
    grid = 8
    channels = 2 * int(ctx.get("in_visual_dim")) + 1  # noisy latents, low-resolution condition, mask
    return {"hidden_states": ctx.randn(ctx.batch, pt * 1, ph * grid, pw * grid, channels)}


def _krea2(ctx: Ctx) -> dict[str, Any]:
    layers = int(ctx.get("num_text_layers", default=1))
    positions = torch.zeros(TEXT + GRID * GRID, 3, dtype=torch.long)
    positions[:TEXT, 0] = torch.arange(TEXT)
    positions[TEXT:, 1] = torch.arange(GRID * GRID) // GRID
    positions[TEXT:, 2] = torch.arange(GRID * GRID) % GRID
    return {
        "hidden_states": ctx.packed(),
        "encoder_hidden_states": ctx.randn(ctx.batch, TEXT, layers, int(ctx.get("text_hidden_dim"))),
        "position_ids": positions,
    }


def _ltx(ctx: Ctx) -> dict[str, Any]:
    return {
        "hidden_states": ctx.packed(FRAMES * GRID * GRID),
        "num_frames": FRAMES,
        "height": GRID,
        "width": GRID,
    }


def _ltx2(ctx: Ctx) -> dict[str, Any]:
    caption = int(ctx.get("caption_channels"))
    return {
        "hidden_states": ctx.packed(FRAMES * GRID * GRID),
        "audio_hidden_states": ctx.randn(ctx.batch, TEXT, int(ctx.get("audio_in_channels"))),
        "encoder_hidden_states": ctx.text(caption),
        "audio_encoder_hidden_states": ctx.text(caption),
        "audio_encoder_attention_mask": ctx.mask(dtype=torch.long),
        "encoder_attention_mask": ctx.mask(dtype=torch.long),
        "num_frames": FRAMES,
        "height": GRID,
        "width": GRID,
        "audio_num_frames": TEXT,
    }


def _sana_wm_refiner(ctx: Ctx) -> dict[str, Any]:
    model: Any = ctx.model
    rope = model.build_rotary_emb_for_absolute_positions(
        ctx.batch, list(range(FRAMES)), GRID, GRID, torch.device("cpu"), fps=24.0
    )
    return {
        "hidden_states": ctx.packed(FRAMES * GRID * GRID),
        "encoder_hidden_states": ctx.text(int(ctx.get("caption_channels"))),
        "video_rotary_emb": rope,
        "encoder_attention_mask": ctx.mask(dtype=torch.long),
    }


def _sana_wm(ctx: Ctx) -> dict[str, Any]:
    # one timestep per latent frame: (B, 1, F)
    timestep = torch.full((ctx.batch, 1, FRAMES), timestep_value(ctx.model))
    return {"hidden_states": ctx.video(), "timestep": timestep, "encoder_attention_mask": ctx.mask(dtype=torch.long)}


def _latte(ctx: Ctx) -> dict[str, Any]:
    # the temporal position table covers exactly video_length frames
    frames = int(ctx.get("video_length", default=FRAMES))
    return {"hidden_states": ctx.video(frames=frames), "encoder_attention_mask": _OMIT}


def _lumina2(ctx: Ctx) -> dict[str, Any]:
    return {"hidden_states": ctx.image()}


def _minimax_h3(ctx: Ctx) -> dict[str, Any]:
    # one packed sequence: text rows, then video rows, then audio rows; one shared timestep
    video, audio = GRID * GRID, TEXT
    length = TEXT + video + audio
    tags = torch.tensor([1] * TEXT + [0] * video + [2] * audio)
    positions = torch.zeros(length, 3, dtype=torch.long)
    positions[:TEXT, 0] = torch.arange(TEXT)
    positions[TEXT : TEXT + video, 1] = torch.arange(video) // GRID
    positions[TEXT : TEXT + video, 2] = torch.arange(video) % GRID
    positions[TEXT + video :, 0] = torch.arange(audio)
    pt, ph, pw = ctx.patch()
    return {
        "hidden_states": ctx.packed(video, int(ctx.get("in_channels")) * pt * ph * pw),
        "audio_hidden_states": ctx.randn(ctx.batch, audio, int(ctx.get("audio_in_channels"))),
        "encoder_hidden_states": ctx.text(int(ctx.get("text_dim"))),
        "timestep": torch.tensor([0.5]),
        "timestep_indices": torch.zeros(length, dtype=torch.long),
        "token_tags": tags,
        "position_ids": positions,
        "text_indices": torch.arange(TEXT),
        "video_indices": torch.arange(TEXT, TEXT + video),
        "audio_indices": torch.arange(TEXT + video, length),
    }


def _minimax_music3(ctx: Ctx) -> dict[str, Any]:
    length = TEXT
    return {
        "hidden_states": ctx.randn(ctx.batch, int(ctx.get("in_channels")), length),
        "encoder_hidden_states": ctx.randn(ctx.batch, length, int(ctx.get("condition_dim"))),
    }


def _omnigen(ctx: Ctx) -> dict[str, Any]:
    # no text prompt (input_ids=None): the sequence is [time token, image tokens]
    image = ctx.image()
    length = 1 + GRID * GRID
    return {
        "hidden_states": image,
        "input_ids": None,
        "input_img_latents": None,
        "input_image_sizes": None,
        "attention_mask": torch.ones(ctx.batch, length, length),
        "position_ids": torch.arange(length).unsqueeze(0).expand(ctx.batch, -1).clone(),
    }


def _qwenimage(ctx: Ctx) -> dict[str, Any]:
    return {"hidden_states": ctx.packed(), "img_shapes": [[(1, GRID, GRID)]] * ctx.batch}


def _qwenimage21(ctx: Ctx) -> dict[str, Any]:
    # text slots, then one image slot per 4 target tokens (each slot expands to 4 tokens)
    target = GRID * GRID
    slots = target // 4
    mask = torch.tensor([[False] * TEXT + [True] * slots]).expand(ctx.batch, -1).clone()
    return {
        "hidden_states": ctx.packed(target),
        "encoder_hidden_states": ctx.text(int(ctx.get("context_in_dim"))),
        "img_shapes": [[(1, GRID, GRID)]] * ctx.batch,
        "img_mask": mask,
        "encoder_hidden_states_mask": _OMIT,
    }


def _temporal(ctx: Ctx) -> dict[str, Any]:
    # (batch × frames, C, H, W), attention across frames
    return {
        "hidden_states": ctx.randn(ctx.batch * FRAMES, ctx.channels(), GRID, GRID),
        "num_frames": FRAMES,
        "encoder_hidden_states": _OMIT,
    }


def _wan_animate(ctx: Ctx) -> dict[str, Any]:
    video = ctx.video()
    size = int(ctx.get("motion_encoder_size", default=512))
    latent = int(ctx.get("latent_channels", default=16))
    return {
        "hidden_states": video,
        "pose_hidden_states": ctx.randn(ctx.batch, latent, video.shape[2] - 1, video.shape[3], video.shape[4]),
        "face_pixel_values": ctx.randn(ctx.batch, 3, video.shape[2] - 1, size, size),
    }


def _wan_animate2(ctx: Ctx) -> dict[str, Any]:
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    pt, ph, pw = ctx.patch()
    in_dim, out_dim = int(ctx.get("in_dim")), int(ctx.get("out_dim"))
    frames, height, width = pt * FRAMES, ph * GRID, pw * GRID
    grid = torch.tensor([[FRAMES, GRID, GRID]] * ctx.batch)
    return {
        "hidden_states": [ctx.randn(out_dim, frames, height, width) for _ in range(ctx.batch)],
        "condition_latents": [ctx.randn(in_dim - out_dim, frames, height, width) for _ in range(ctx.batch)],
        "encoder_hidden_states": [ctx.randn(TEXT, int(ctx.get("text_dim"))) for _ in range(ctx.batch)],
        "encoder_hidden_states_image": ctx.randn(ctx.batch, TEXT, 1280) if ctx.get("use_img_emb") else _OMIT,
        "kv_cache": WanAnimate2KVCache(int(ctx.get("num_layers"))),
        "kv_cache_mode": "extract",
        "seq_len": FRAMES * GRID * GRID,
        "offset_grid_sizes": grid,
        "reference_grid_sizes": grid.clone(),
    }


def _wan(ctx: Ctx) -> dict[str, Any]:
    """Wan-style image-to-video: the attention splits off the image tokens by assuming 512 text tokens."""
    values: dict[str, Any] = {"hidden_states": ctx.video()}
    if ctx.get("added_kv_proj_dim") is not None:
        values["encoder_hidden_states"] = ctx.text(tokens=512)
        image_dim = ctx.get("image_dim")
        if image_dim is not None:
            values["encoder_hidden_states_image"] = ctx.randn(ctx.batch, TEXT, int(image_dim))
    return values


def _wan_vace(ctx: Ctx) -> dict[str, Any]:
    values = _wan(ctx)
    video = values["hidden_states"]
    values["control_hidden_states"] = ctx.randn(ctx.batch, int(ctx.get("vace_in_channels")), *video.shape[2:])
    return values


def _zimage(ctx: Ctx) -> dict[str, Any]:
    patch = int(ctx.get("all_patch_size", default=(2,))[0])
    f_patch = int(ctx.get("all_f_patch_size", default=(1,))[0])
    channels = int(ctx.get("in_channels"))
    return {
        "x": [ctx.randn(channels, f_patch, patch * GRID, patch * GRID) for _ in range(ctx.batch)],
        "t": ctx.timestep(),
        "cap_feats": [ctx.randn(TEXT, int(ctx.get("cap_feat_dim"))) for _ in range(ctx.batch)],
        "patch_size": patch,
        "f_patch_size": f_patch,
    }



def _cosmos3(ctx: Ctx) -> dict[str, Any]:
    # one packed sequence without batch axis: TEXT text tokens ("und"), then one latent frame of GRID×GRID patches
    patch = int(ctx.get("latent_patch_size", default=2))
    channels = int(ctx.get("latent_channel"))
    vision = GRID * GRID
    length = TEXT + vision
    positions = torch.zeros(3, length, dtype=torch.long)
    positions[:, :TEXT] = torch.arange(TEXT)
    positions[0, TEXT:] = TEXT
    positions[1, TEXT:] = TEXT + torch.arange(vision) // GRID
    positions[2, TEXT:] = TEXT + torch.arange(vision) % GRID
    vision_rows = torch.arange(TEXT, length)
    return {
        "input_ids": torch.randint(0, int(ctx.get("vocab_size")), (TEXT,), generator=ctx.generator),
        "text_indexes": torch.arange(TEXT),
        "position_ids": positions,
        "und_len": TEXT,
        "sequence_length": length,
        "vision_tokens": [ctx.randn(1, channels, 1, patch * GRID, patch * GRID)],
        "vision_token_shapes": [(1, GRID, GRID)],
        "vision_sequence_indexes": vision_rows,
        "vision_mse_loss_indexes": vision_rows.clone(),
        "vision_timesteps": torch.full((vision,), timestep_value(ctx.model)),
        "vision_noisy_frame_indexes": [torch.tensor([0])],
    }


_RECIPES.update({
    "Cosmos3OmniTransformer": _cosmos3,
    "AceStepTransformer1DModel": _ace_step,
    "AnyFlowTransformer3DModel": _anyflow,
    "AnyFlowFARTransformer3DModel": _anyflow_far,
    "BriaTransformer2DModel": _bria,
    "BriaFiboTransformer2DModel": _bria_fibo,
    "BriaFibo2Transformer2DModel": _bria_fibo2,
    "ChromaTransformer2DModel": _flux_like,
    "CogVideoXTransformer3DModel": _cogvideox,
    "ConsisIDTransformer3DModel": _cogvideox,
    "CogView3PlusTransformer2DModel": _cogview4,
    "CogView4Transformer2DModel": _cogview4,
    "CosmosTransformer3DModel": _cosmos,
    "DiTTransformer2DModel": _dit,
    "ErnieImageTransformer2DModel": _ernie,
    "Flux2Transformer2DModel": _flux2,
    "Flux3Transformer2DModel": _flux3,
    "FluxTransformer2DModel": _flux_like,
    "GlmImageTransformer2DModel": _glm_image,
    "HiDreamImageTransformer2DModel": _hidream,
    "HunyuanVideo15Transformer3DModel": _hunyuan_video15,
    "HunyuanVideoFramepackTransformer3DModel": _hunyuan_framepack,
    "Ideogram4Transformer2DModel": _ideogram4,
    "JoyImageEditPlusTransformer3DModel": _joyimage_plus,
    "Kandinsky5Transformer3DModel": _kandinsky5,
    "Kandinsky6Transformer3DModel": _kandinsky6,
    "Kandinsky6SRTransformer3DModel": _kandinsky6_sr,
    "Krea2Transformer2DModel": _krea2,
    "LTXVideoTransformer3DModel": _ltx,
    "LTX2VideoTransformer3DModel": _ltx2,
    "LatteTransformer3DModel": _latte,
    "LongCatImageTransformer2DModel": _flux_like,
    "Lumina2Transformer2DModel": _lumina2,
    "MiniMaxH3Transformer3DModel": _minimax_h3,
    "MiniMaxMusic3Transformer1DModel": _minimax_music3,
    "OmniGenTransformer2DModel": _omnigen,
    "OvisImageTransformer2DModel": _flux_like,
    "PixArtTransformer2DModel": _pixart,
    "QwenImageTransformer2DModel": _qwenimage,
    "QwenImage21Transformer2DModel": _qwenimage21,
    "SanaWMLTX2RefinerTransformer3DModel": _sana_wm_refiner,
    "SanaWMTransformer3DModel": _sana_wm,
    "TransformerTemporalModel": _temporal,
    "WanAnimateTransformer3DModel": _wan_animate,
    "WanAnimate2Transformer3DModel": _wan_animate2,
    "WanVACETransformer3DModel": _wan_vace,
    "WanTransformer3DModel": _wan,
    "ChronoEditTransformer3DModel": _wan,
    "SkyReelsV2Transformer3DModel": _wan,
    "ZImageTransformer2DModel": _zimage,
})
