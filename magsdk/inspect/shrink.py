"""Build a transformer class small: same structure, a few layers, narrow widths, random weights.

Inspection needs the block structure and the data flow between blocks, never the weights, so a
12B-parameter architecture can be traced on a CPU in seconds if it is built tiny. Shrinking is
driven by the ``__init__`` parameter names (``num_layers``, ``*_layers``, ``num_attention_heads``,
``attention_head_dim``, text / time / FFN widths, rope axes …), keeps the couplings a model relies
on (heads × head dim = width, rope axes summing to the head dim, GQA ratios, widths that other
parameters repeat by value) and then applies a few per-class fixups for what names cannot tell.

Every candidate is first built on the ``meta`` device (no memory, no time) to check that it
constructs and to count its parameters; if the full shrink does not construct, less aggressive
shrinks are tried, and nothing above ``MAX_PARAMETERS`` is ever materialised.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from magsdk.errors import UsageError

logger = logging.getLogger("magsdk")

#: Layer count of every block group after shrinking (two, so that head and tail blocks differ).
LAYERS = 2
#: Attention heads after shrinking.
HEADS = 2
#: Preferred head dimension after shrinking (rope axes may force another one).
HEAD_DIM = 32
#: Width of text / image-conditioning / pooled embeddings after shrinking.
COND_DIM = 32
#: Width of timestep embeddings after shrinking.
TIME_DIM = 32
#: A shrunk model above this many parameters is refused rather than materialised.
MAX_PARAMETERS = 60_000_000

_LAYER_RE = re.compile(
    r"^(num_layers|depth|n_layers|num_hidden_layers|mmdit_layers|num_blocks|"
    r"(num|n)_\w*(layers|blocks)|\w+_layers|\w+_depth|num_\w+_blocks)$",
    re.IGNORECASE,
)
_LAYER_LIST_RE = re.compile(r"(layers|layer_ids|_blocks)$")
_HEADS_RE = re.compile(r"^(num_attention_heads|n_heads|num_heads|num_cross_attention_heads|\w+_num_heads|"
                       r"\w+_num_attention_heads|cross_attn_num_heads)$", re.IGNORECASE)
_KV_HEADS_RE = re.compile(r"^(num_key_value_heads|n_kv_heads|num_kv_heads|\w+_num_key_value_heads)$")
_HEAD_DIM_RE = re.compile(r"^(attention_head_dim|head_dim|\w+_head_dim|\w*dim_head|linear_head_dim)$",
                          re.IGNORECASE)
_WIDTH_RE = re.compile(r"^(dim|hidden_size|model_dim|inner_dim|embed_dim)$")
_FFN_RE = re.compile(r"^(ffn_dim|ff_dim|intermediate_size|ffn_hidden_size|ff_inner_dim|moe_intermediate_dim|"
                     r"\w+_intermediate_size|\w+_ff_dim|ff_dim_\w+|mlp_dim)$")
_COND_RE = re.compile(
    r"^(joint_attention_dim|text_dim|text_embed_dim|text_embed_2_dim|text_embed_dim_t5|caption_channels|"
    r"cap_feat_dim|siglip_feat_dim|pooled_projection_dim|context_in_dim|text_in_dim|in_text_dim\d*|"
    r"text_hidden_dim|text_emb_dim|text_encoder_dim|llm_features_dim|encoder_hidden_size|cross_attention_dim|"
    r"\w+_cross_attention_dim|caption_projection_dim|image_dim|image_embed_dim|image_proj_dim|condition_dim|"
    r"encoder_hidden_states_channels|crossattn_proj_in_channels|img_context_dim_in|img_context_dim_out)$"
)
_TIME_RE = re.compile(
    r"^(time_embed_dim|freq_dim|time_dim|time_dim_\w+|timestep_guidance_channels|timestep_channels|"
    r"timestep_embed_dim|time_step_dim|adaln_dim|adaln_lora_dim|approximator_hidden_dim|fourier_embedding_dim|"
    r"time_embed_hidden_dim|ofs_embed_dim)$"
)
_AXES_RE = re.compile(r"^(axes_dims_rope|axes_dim_rope|axes_dims|axes_dim|rope_axes_dim|rope_dim_list|rope_dim|"
                      r"axes_dims_\w+)$")

Fixup = Callable[[dict[str, Any], dict[str, Any]], None]
"""(original kwargs, shrunk kwargs) -> edits the shrunk kwargs in place."""


# -- public API ---------------------------------------------------------------------------------------
def build_small(
    cls: type[torch.nn.Module], config: Mapping[str, Any] | None = None, *, seed: int = 0
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Instantiate ``cls`` from ``config`` (or its ``__init__`` defaults) shrunk to a tiny size.

    Returns ``(model.eval() in float32, {param: [old, new]})`` for every parameter that was
    changed. Parameters that were initialised to exactly zero (adaLN-zero gates, zero output
    projections) get small random values, so that every block really transforms its input and
    the data flow between blocks can be told apart from identity.
    """
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise UsageError(f"{cls!r} is not a torch.nn.Module subclass; inspect needs a transformer class")
    original = _initial_kwargs(cls, config)
    errors: list[str] = []
    too_big: list[tuple[str, dict[str, Any], int]] = []
    for label, kwargs in _candidates(cls, original):
        try:
            with torch.device("meta"):
                probe = cls(**kwargs)
            count = sum(p.numel() for p in probe.parameters())
            del probe
        except Exception as exc:  # a shrink that breaks an invariant: try a milder one
            if label != "full":
                errors.append(f"{label}: {type(exc).__name__}: {exc}")
                continue
            # some constructors compute on their buffers and cannot run on "meta"; the full shrink is small
            # by construction, so it is safe to try for real
            count = 0
        if count > MAX_PARAMETERS:
            errors.append(f"{label}: {count / 1e6:.0f}M parameters")
            too_big.append((label, kwargs, count))
            continue
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = cls(**kwargs)
                _randomize_zero_parameters(model)
        except Exception as exc:
            errors.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        count = sum(p.numel() for p in model.parameters())
        if count > MAX_PARAMETERS:
            errors.append(f"{label}: {count / 1e6:.0f}M parameters")
            too_big.append((label, kwargs, count))
            del model
            continue
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
            model = model.to(torch.float32)
        model.eval()
        changed = {k: [original.get(k), v] for k, v in kwargs.items() if original.get(k, _NOTHING) != v}
        if label != "full":
            logger.info("%s: built with the %r shrink (%s)", cls.__name__, label, "; ".join(errors))
        return model, changed
    if too_big and len(too_big) == len(errors):
        raise UsageError(_too_big_message(cls, original, too_big))
    raise UsageError(
        f"cannot build {cls.__name__} small from its config: "
        + " | ".join(errors)
        + ". Pass a smaller configuration with --config JSON."
    )


_SHRINK_LABELS = {
    "full": "the full shrink (layer counts to 2 and every width it recognises)",
    "layers only": "layers only (layer counts to 2, widths kept)",
    "as configured": "as configured (nothing changed)",
}


def _too_big_message(
    cls: type[torch.nn.Module], original: Mapping[str, Any], attempts: list[tuple[str, dict[str, Any], int]]
) -> str:
    """Every shrink is still too big: say what each changed, so the counts explain themselves.

    The shrinks are tried from the smallest expected to the largest, but a "layers only" build can
    hold more parameters than the "full" one (it keeps the widths the full shrink narrowed), and
    neither touches sizes whose names it does not recognise; both facts used to be left for the
    reader to guess from two bare numbers.
    """
    parts = []
    for label, kwargs, count in attempts:
        changed = [f"{k} {_short(original.get(k))}→{_short(v)}" for k, v in kwargs.items() if original.get(k) != v]
        what = ", ".join(changed) if changed else (
            "no argument changed" + (": no layer count above 2" if label == "layers only" else "")
        )
        parts.append(f"{_SHRINK_LABELS.get(label, label)}: {count / 1e6:.0f}M parameters ({what})")
    full = next((kwargs for label, kwargs, _ in attempts if label == "full"), None)
    kept = [
        f"{k}={_short(v)}" for k, v in original.items()
        if _is_size(v) and (full is None or full.get(k) == v)
    ]
    text = (
        f"cannot build {cls.__name__} small: every shrink magsdk tried still has more than "
        f"{MAX_PARAMETERS // 1_000_000}M parameters — " + "; ".join(parts) + "."
    )
    counts = {label: count for label, _, count in attempts}
    if counts.get("layers only", 0) > counts.get("full", math.inf):
        text += (
            " Layers only holds more parameters than the full shrink because it keeps the widths the full shrink "
            "narrowed."
        )
    if kept:
        text += (
            " No shrink narrows sizes whose names magsdk does not recognise as transformer widths, and these were "
            f"kept: {', '.join(kept)}."
        )
    return text + (
        " magsdk inspects diffusion transformers (lists of repeated blocks that keep the hidden state's shape); "
        "for another architecture pass smaller sizes with --config JSON, e.g. --config '{\"" +
        (kept[0].split("=")[0] if kept else "num_layers") + "\": ...}'."
    )


def _is_size(value: Any) -> bool:
    if _is_int(value):
        return bool(value >= 64)
    return isinstance(value, (list, tuple)) and bool(value) and all(_is_int(v) for v in value) and max(value) >= 64


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "…"


# -- config handling --------------------------------------------------------------------------------
_NOTHING = object()


def _init_parameters(cls: type[torch.nn.Module]) -> list[inspect.Parameter]:
    return list(inspect.signature(cls.__init__).parameters.values())[1:]


def check_config_keys(cls: type[torch.nn.Module], config: Mapping[str, Any] | None) -> None:
    """Refuse keys of a user's ``--config`` that ``cls.__init__`` does not take.

    A folder's config.json may carry keys of another library version, and ``_initial_kwargs`` drops
    them quietly; a key the user typed is a typo or a key of another class, and building without it
    would inspect a model other than the one asked for. Keys starting with ``_`` (``_class_name``)
    are metadata, and a constructor with ``**kwargs`` takes anything.
    """
    params = _init_parameters(cls)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = [key for key in (config or {}) if not key.startswith("_") and key not in names]
    if not unknown:
        return
    guesses = [f"{key!r} → {close[0]!r}" for key in unknown if (close := difflib.get_close_matches(key, names, 1))]
    raise UsageError(
        f"--config gives {', '.join(map(repr, unknown))}, which {cls.__name__}.__init__ does not take"
        + (f" (did you mean {', '.join(guesses)}?)" if guesses else "")
        + f"; fix or remove {'it' if len(unknown) == 1 else 'them'}. {cls.__name__}.__init__ takes: "
        + (", ".join(names) or "no arguments")
    )


def _initial_kwargs(cls: type[torch.nn.Module], config: Mapping[str, Any] | None) -> dict[str, Any]:
    params = _init_parameters(cls)
    names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    kwargs: dict[str, Any] = {
        p.name: p.default
        for p in params
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.default is not inspect.Parameter.empty
    }
    base = _BASES.get(cls.__name__)
    if base is not None:
        kwargs.update({k: v for k, v in base.items() if k in names or var_kw})
    for key, value in (config or {}).items():
        if key.startswith("_"):
            continue
        if key in names or var_kw:
            kwargs[key] = value
    missing = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               and p.name not in kwargs]
    if missing:
        raise UsageError(
            f"{cls.__name__}.__init__ needs {', '.join(missing)} and the config does not give "
            f"{'it' if len(missing) == 1 else 'them'}; pass --config '{{\"{missing[0]}\": ...}}' "
            "or a model folder with a config.json"
        )
    return kwargs


def _candidates(cls: type[torch.nn.Module], original: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    full = shrink_config(cls, original)
    layers_only = dict(original)
    for key, value in original.items():
        if _is_layer_count(key, value):
            layers_only[key] = min(value, LAYERS)
    _fix_layer_lists(original, layers_only)
    out = [("full", full), ("layers only", layers_only), ("as configured", dict(original))]
    unique: list[tuple[str, dict[str, Any]]] = []
    for label, kwargs in out:
        if all(kwargs != seen for _, seen in unique):
            unique.append((label, kwargs))
    return unique


def shrink_config(cls: type[torch.nn.Module], original: Mapping[str, Any]) -> dict[str, Any]:
    """The shrunk ``__init__`` keyword arguments (generic rules, then the class's fixups)."""
    new = dict(original)
    _shrink_layers(original, new)
    _shrink_widths(original, new)
    _fix_layer_lists(original, new)
    for name in [c.__name__ for c in cls.__mro__]:
        fixup = _FIXUPS.get(name)
        if fixup is not None:
            fixup(dict(original), new)
            break
    return new


# -- generic rules ----------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_layer_count(key: str, value: Any) -> bool:
    return _is_int(value) and value > LAYERS and bool(_LAYER_RE.match(key))


def _shrink_layers(original: Mapping[str, Any], new: dict[str, Any]) -> None:
    for key, value in original.items():
        if _is_layer_count(key, value):
            new[key] = LAYERS


def _fix_layer_lists(original: Mapping[str, Any], new: dict[str, Any]) -> None:
    """Lists of layer indices (``vace_layers``, ``dual_attention_layers`` …) must stay in range."""
    counts = [v for k, v in new.items() if _is_int(v) and _LAYER_RE.match(k)]
    limit = min(counts) if counts else LAYERS
    for key, value in original.items():
        if not isinstance(value, (list, tuple)) or not value or not all(_is_int(v) for v in value):
            continue
        if not _LAYER_LIST_RE.search(key):
            continue
        kept = [v for v in value if v < limit]
        if not kept and value:
            kept = list(range(min(len(value), limit)))
        new[key] = type(value)(kept)


def _first(original: Mapping[str, Any], pattern: re.Pattern[str]) -> tuple[str, int] | None:
    for key, value in original.items():
        if _is_int(value) and pattern.match(key):
            return key, value
    return None


def _rope_axes(original: Mapping[str, Any]) -> tuple[str, list[int]] | None:
    for key, value in original.items():
        if _AXES_RE.match(key) and isinstance(value, (list, tuple)) and value and all(_is_int(v) for v in value):
            return key, list(value)
    return None


def _pick_head_dim(old_head_dim: int, axes: list[int] | None) -> tuple[int, list[int] | None]:
    """A small head dim; when rope axes split the head dim, scale them so they still sum to it."""
    if old_head_dim <= HEAD_DIM:
        return old_head_dim, axes
    if axes is not None and sum(axes) == old_head_dim:
        for factor in (4, 8, 2, 16):
            if old_head_dim % factor == 0 and all(a % factor == 0 and (a // factor) % 2 == 0 for a in axes):
                if old_head_dim // factor >= 16:
                    return old_head_dim // factor, [a // factor for a in axes]
        return old_head_dim, axes
    if axes is not None and sum(axes) * 2 == old_head_dim:  # axes in half-dims (mrope sections)
        for factor in (4, 8, 2):
            if all(a % factor == 0 for a in axes) and old_head_dim // factor >= 16:
                return old_head_dim // factor, [a // factor for a in axes]
        return old_head_dim, axes
    factor = max(1, old_head_dim // HEAD_DIM)
    while factor > 1 and old_head_dim % factor:
        factor -= 1
    return old_head_dim // factor, axes


def _shrink_widths(original: Mapping[str, Any], new: dict[str, Any]) -> None:
    heads = _first(original, _HEADS_RE)
    head_dim = _first(original, _HEAD_DIM_RE)
    width = _first(original, _WIDTH_RE)
    axes = _rope_axes(original)
    old_heads = heads[1] if heads else None
    old_head_dim = head_dim[1] if head_dim else None
    if old_head_dim is None and old_heads is None and width and axes and width[1] % sum(axes[1]) == 0:
        old_head_dim = sum(axes[1])  # Kandinsky: the rope axes define the head dim
    if old_head_dim is None and width and old_heads and width[1] % old_heads == 0:
        old_head_dim = width[1] // old_heads
    if old_heads is None and width and old_head_dim and width[1] % old_head_dim == 0:
        old_heads = width[1] // old_head_dim
    old_inner = old_heads * old_head_dim if old_heads and old_head_dim else (width[1] if width else None)

    new_head_dim, new_axes = _pick_head_dim(old_head_dim, axes[1] if axes else None) if old_head_dim else (None, None)
    new_heads = min(old_heads, HEADS) if old_heads else None
    new_inner = new_heads * new_head_dim if new_heads and new_head_dim else None
    if axes is not None and new_axes is not None and new_axes != axes[1]:
        value = original[axes[0]]
        new[axes[0]] = type(value)(new_axes)

    remap: dict[int, int] = {}  # old value -> new value, for widths repeated by value elsewhere
    if old_inner and new_inner:
        remap[old_inner] = new_inner
    for key, value in original.items():
        if not _is_int(value) or value <= 0:
            continue
        if _HEADS_RE.match(key) and new_heads:
            new[key] = min(value, HEADS)
        elif _KV_HEADS_RE.match(key) and old_heads and new_heads:
            new[key] = new_heads if value >= old_heads else 1
        elif _HEAD_DIM_RE.match(key) and new_head_dim and old_head_dim:
            new[key] = new_head_dim if value == old_head_dim else max(8, value // max(1, old_head_dim // new_head_dim))
        elif _WIDTH_RE.match(key) and new_inner:
            new[key] = new_inner if value == old_inner else remap.setdefault(value, new_inner)
        elif _FFN_RE.match(key) and value > 2 * (new_inner or 32):
            new[key] = 2 * (new_inner or 32)
        elif _COND_RE.match(key) and value > COND_DIM:
            new[key] = remap[value] if value in remap else COND_DIM
        elif _TIME_RE.match(key) and value > TIME_DIM:
            new[key] = remap[value] if value in remap else TIME_DIM
        elif "dim" in key and old_inner and new_inner and value == old_inner:
            new[key] = new_inner  # a width that repeats the model width (Wan's added_kv_proj_dim)
    # lists of conditioning widths (HiDream's caption_channels)
    for key, value in original.items():
        if _COND_RE.match(key) and isinstance(value, (list, tuple)) and value and all(_is_int(v) for v in value):
            new[key] = type(value)(min(v, COND_DIM) for v in value)


def _randomize_zero_parameters(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.numel() > 1 and not param.any():
                param.normal_(0.0, 0.02)


# -- per-class fixups -------------------------------------------------------------------------------
def _set(**values: Any) -> Fixup:
    def fixup(original: dict[str, Any], new: dict[str, Any]) -> None:
        new.update(values)

    return fixup


_FIXUPS: dict[str, Fixup] = {}


def register_fixup(class_name: str, fixup: Fixup) -> None:
    """Per-class edits after the generic rules (for couplings that parameter names do not reveal)."""
    _FIXUPS[class_name] = fixup


def _head_dim_of(new: dict[str, Any], width_key: str, heads_key: str) -> int:
    return int(new[width_key]) // int(new[heads_key])


def _fix_groups(original: dict[str, Any], new: dict[str, Any]) -> None:
    channels, groups = new.get("in_channels"), new.get("norm_num_groups")
    if isinstance(channels, int) and isinstance(groups, int):
        new["norm_num_groups"] = math.gcd(groups, channels)  # group norm needs groups | channels


def _fix_prx(original: dict[str, Any], new: dict[str, Any]) -> None:
    head_dim = _head_dim_of(new, "hidden_size", "num_heads")
    new["axes_dim"] = [head_dim // 2, head_dim - head_dim // 2]


def _fix_hidream(original: dict[str, Any], new: dict[str, Any]) -> None:
    # one llama layer feeds each block, double-stream blocks first
    new["llama_layers"] = list(range(int(new["num_layers"]) + int(new["num_single_layers"])))


def _fix_omnigen(original: dict[str, Any], new: dict[str, Any]) -> None:
    half = _head_dim_of(new, "hidden_size", "num_attention_heads") // 2
    new["rope_scaling"] = {"type": "su", "short_factor": [1.0] * half, "long_factor": [1.0] * half}


def _fix_bria_fibo2(original: dict[str, Any], new: dict[str, Any]) -> None:
    # a few gist tokens instead of 256-512
    new.update(min_num_gist_tokens=4, max_num_gist_tokens=8, gist_step=4)


def _fix_ideogram4(original: dict[str, Any], new: dict[str, Any]) -> None:
    # interleaved mrope sections (t, h, w) index into head_dim / 2 frequencies: keep their proportions
    new["attention_head_dim"] = 64
    new["mrope_section"] = tuple(int(v) * 64 // int(original["attention_head_dim"]) for v in original["mrope_section"])


def _fix_minimax_h3(original: dict[str, Any], new: dict[str, Any]) -> None:
    # 2 * 3 * rope_freq_dim rotary channels must fit in the head dim
    ratio = int(original["attention_head_dim"]) // int(new["attention_head_dim"])
    new["rope_freq_dim"] = max(2, int(original["rope_freq_dim"]) // ratio)


def _fix_wan_animate(original: dict[str, Any], new: dict[str, Any]) -> None:
    # the face motion encoder halves a size×size face image down to 4×4: 16 px needs two stages, not seven
    new.update(
        motion_encoder_size=16, motion_encoder_channel_sizes={"16": 16, "8": 16, "4": 16}, motion_style_dim=32,
        motion_encoder_dim=32, face_encoder_hidden_dim=32,
    )
    new["inject_face_latents_blocks"] = LAYERS  # one face adapter per this many blocks: keep one


def _fix_wan_animate2(original: dict[str, Any], new: dict[str, Any]) -> None:
    new["text_len"] = 8  # text is zero-padded to text_len tokens


def _fix_cosmos3(original: dict[str, Any], new: dict[str, Any]) -> None:
    new["vocab_size"] = 256  # a 151936-token embedding would dominate the small model


def _fix_latte(original: dict[str, Any], new: dict[str, Any]) -> None:
    new["video_length"] = 2  # the temporal position table spans exactly this many frames


def _fix_cosmos(original: dict[str, Any], new: dict[str, Any]) -> None:
    # diffusers resizes the padding mask with torchvision, which magsdk does not depend on; the mask only adds
    # one input channel to the patch embedding and changes nothing in the blocks
    new["concat_padding_mask"] = False


def _fix_cogvideox(original: dict[str, Any], new: dict[str, Any]) -> None:
    new["max_text_seq_length"] = 4  # the sincos table spans exactly this many text tokens


#: Published reference configs for classes whose ``__init__`` defaults do not describe a real model
#: (``in_channels=None`` …); a user config still overrides them.
_BASES: dict[str, dict[str, Any]] = {
    "Transformer2DModel": {"in_channels": 32, "cross_attention_dim": 32},
    "DreamLiteTransformer2DModel": {"in_channels": 32, "cross_attention_dim": 32},
    "TransformerTemporalModel": {"in_channels": 32},
    "HunyuanVideoFramepackTransformer3DModel": {"has_image_proj": True, "has_clean_x_embedder": True},
    "Cosmos3OmniTransformer": {"rope_axes_dim": [24, 20, 20]},
    "EasyAnimateTransformer3DModel": {"in_channels": 16, "out_channels": 16, "patch_size": 2},
    "HiDreamImageTransformer2DModel": {
        "patch_size": 2, "in_channels": 16, "out_channels": 16, "caption_channels": [4096, 4096],
        "axes_dims_rope": [64, 32, 32], "llama_layers": list(range(48)),
    },
    "LatteTransformer3DModel": {
        "in_channels": 4, "out_channels": 8, "patch_size": 2, "caption_channels": 4096, "cross_attention_dim": 1152,
        "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
        "norm_eps": 1e-6, "attention_head_dim": 72, "num_attention_heads": 16, "num_layers": 28,
        "activation_fn": "gelu-approximate", "attention_bias": True,
    },
}

_FIXUPS.update({
    "Transformer2DModel": _fix_groups,
    "DreamLiteTransformer2DModel": _fix_groups,
    "TransformerTemporalModel": _fix_groups,
    "PRXTransformer2DModel": _fix_prx,
    "HiDreamImageTransformer2DModel": _fix_hidream,
    "OmniGenTransformer2DModel": _fix_omnigen,
    "BriaFibo2Transformer2DModel": _fix_bria_fibo2,
    "Ideogram4Transformer2DModel": _fix_ideogram4,
    "MiniMaxH3Transformer3DModel": _fix_minimax_h3,
    "WanAnimateTransformer3DModel": _fix_wan_animate,
    "WanAnimate2Transformer3DModel": _fix_wan_animate2,
    "CosmosTransformer3DModel": _fix_cosmos,
    "CogVideoXTransformer3DModel": _fix_cogvideox,
    "ConsisIDTransformer3DModel": _fix_cogvideox,
    "LatteTransformer3DModel": _fix_latte,
    "Cosmos3OmniTransformer": _fix_cosmos3,
})
