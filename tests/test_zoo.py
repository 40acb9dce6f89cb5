"""Inspection against ground truth and across the whole diffusers transformer zoo.

(a) diffusers keeps a hand-written table of block conventions
    (``diffusers.hooks._helpers.TransformerBlockRegistry``). Reading it here is allowed — it is the
    ground truth — while magsdk itself never reads it. For each registered block class, the transformer
    that contains it is found by scanning built models (not by a hand-made map), built tiny, inspected,
    and the inferred conventions must equal the table's.
(b) ``tools/zoo.py`` over every exported transformer class (65 in diffusers 0.42, 28 in 0.35): inspect,
    enable, skip a step, and compare the skipped step's output with a reference computed without magsdk's
    runtime (``tools/skip_reference.py``).
(c) shrinking the published FLUX.1-dev config keeps its structure.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch
from diffusers_features import VERSION, lacks, needs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magsdk.errors import UsageError
from magsdk.inspect import inspect_module
from magsdk.inspect.inputs import InputSynthesisError, synthesize_inputs
from magsdk.inspect.shrink import build_small
from tools import zoo
from tools.skip_reference import skip_reference
from tools.zoo import ATOL, FLUX_DEV_CONFIG, RTOL, run_zoo, transformer_classes

warnings.filterwarnings("ignore")


# -- (a) ground truth from diffusers' registry ---------------------------------------------------------
def _diffusers_table() -> dict[type, Any]:
    from diffusers.hooks._helpers import TransformerBlockRegistry

    TransformerBlockRegistry._register()
    return dict(TransformerBlockRegistry._registry)


TABLE = _diffusers_table()

#: Transformers that are not among the 65 "…Transformer…Model" names but hold a registered block.
EXTRA_TRANSFORMERS = ["Cosmos3OmniTransformer"]
#: Config variants scanned in addition to each class's defaults (a block class only some configs build).
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "HunyuanVideoTransformer3DModel": [{"image_condition_type": "token_replace"}],
}

#: Entries of diffusers' table that contradict diffusers' own code; magsdk must infer what the code does.
DIFFUSERS_TABLE_ERRORS: dict[str, dict[str, Any]] = {
    # transformer_bria.py, BriaTransformerBlock.forward ends with `return encoder_hidden_states, hidden_states`;
    # diffusers registers it with BasicTransformerBlock's metadata (hidden at 0, no encoder output).
    "BriaTransformerBlock": {"return_hidden_states_index": 1, "return_encoder_hidden_states_index": 0},
    # transformer_z_image.py, ZImageTransformerBlock.forward(self, x, attn_mask, freqs_cis, adaln_input, ...):
    # there is no `hidden_states` argument; diffusers' lookup by that name would raise.
    "ZImageTransformerBlock": {"hidden_states_argument_name": "x"},
}


def _table_error_is_real(block_cls: type) -> bool:
    """Check against the code that the listed table entry really is wrong (so a diffusers fix is noticed)."""
    source = inspect.getsource(block_cls.forward)
    params = list(inspect.signature(block_cls.forward).parameters)[1:]
    if block_cls.__name__ == "BriaTransformerBlock":
        return "return encoder_hidden_states, hidden_states" in source
    if block_cls.__name__ == "ZImageTransformerBlock":
        return "hidden_states" not in params and params[0] == "x"
    return False


def _expected(block_cls: type) -> dict[str, Any]:
    entry = TABLE[block_cls]
    # diffusers < 0.37 has no argument-name fields: its hooks read the arguments by these names
    expected: dict[str, Any] = {
        "hidden_states_argument_name": getattr(entry, "hidden_states_argument_name", "hidden_states"),
        "return_hidden_states_index": entry.return_hidden_states_index,
        "return_encoder_hidden_states_index": entry.return_encoder_hidden_states_index,
    }
    # diffusers fills the encoder name with a default even for blocks without an encoder output; it only
    # means something when the block returns the encoder stream
    if entry.return_encoder_hidden_states_index is not None:
        expected["encoder_hidden_states_argument_name"] = getattr(
            entry, "encoder_hidden_states_argument_name", "encoder_hidden_states")
    expected.update(DIFFUSERS_TABLE_ERRORS.get(block_cls.__name__, {}))
    return expected


@functools.cache
def _build(name: str, variant: tuple[tuple[str, Any], ...] = ()) -> torch.nn.Module:
    import diffusers

    model, _ = build_small(getattr(diffusers, name), dict(variant) or None)
    return model


def _candidates() -> list[tuple[str, tuple[tuple[str, Any], ...]]]:
    out: list[tuple[str, tuple[tuple[str, Any], ...]]] = []
    for name in transformer_classes() + EXTRA_TRANSFORMERS:
        out.append((name, ()))
        for variant in VARIANTS.get(name, []):
            out.append((name, tuple(sorted(variant.items()))))
    return out


@functools.cache
def _block_owners() -> dict[type, tuple[str, tuple[tuple[str, Any], ...]]]:
    """Registered block class -> the transformer (and config variant) whose built module contains it.

    A transformer defined in the block's own module is preferred (WanTransformerBlock -> the Wan model,
    not ChronoEdit which reuses it); otherwise the first class, alphabetically, that builds the block.
    """
    owners: dict[type, list[tuple[str, tuple[tuple[str, Any], ...]]]] = {}
    for name, variant in _candidates():
        try:
            model = _build(name, variant)
        except Exception:  # a class the shrinker cannot build owns nothing; the zoo reports it
            continue
        for cls in {type(m) for m in model.modules()} & set(TABLE):
            owners.setdefault(cls, []).append((name, variant))
    chosen = {}
    import diffusers

    for cls, found in owners.items():
        same_module = [f for f in found if getattr(diffusers, f[0]).__module__ == cls.__module__]
        chosen[cls] = (same_module or found)[0]
    return chosen


@pytest.mark.parametrize("block_cls", sorted(TABLE, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_inferred_metadata_matches_diffusers_table(block_cls: type) -> None:
    owners = _block_owners()
    assert block_cls in owners, f"no transformer class builds a {block_cls.__name__}; add a config variant"
    name, variant = owners[block_cls]
    model = _build(name, variant)
    args, kwargs = synthesize_inputs(model)
    report = inspect_module(model, args, kwargs, inputs="synthesized")
    groups = [g for g in report.block_groups if g.block_class == block_cls.__name__]
    assert groups, (
        f"{name}{dict(variant) or ''}: inspection found no group of {block_cls.__name__}; groups: "
        f"{[(g.path, g.block_class) for g in report.block_groups]}; warnings: {report.warnings}"
    )
    meta = groups[0].metadata
    expected = _expected(block_cls)
    inferred = {key: getattr(meta, key) for key in expected}
    assert inferred == expected, f"{name}{dict(variant) or ''}: {block_cls.__name__} inferred {inferred}"


@pytest.mark.parametrize("block_name", sorted(DIFFUSERS_TABLE_ERRORS))
def test_listed_diffusers_table_errors_are_real(block_name: str) -> None:
    block_cls = next((c for c in TABLE if c.__name__ == block_name), None)
    if block_cls is None:
        pytest.skip(lacks(f"a TransformerBlockRegistry entry for {block_name}"))
    entry = TABLE[block_cls]
    corrected = DIFFUSERS_TABLE_ERRORS[block_name]
    assert any(getattr(entry, key) != value for key, value in corrected.items())
    assert _table_error_is_real(block_cls)


# -- (b) the zoo ---------------------------------------------------------------------------------------
#: Common families, run by default; the rest are marked slow (they still run in CI).
FAST = [
    "FluxTransformer2DModel", "Flux2Transformer2DModel",
    "SD3Transformer2DModel", "WanTransformer3DModel", "HunyuanVideoTransformer3DModel",
    "CogVideoXTransformer3DModel", "LTXVideoTransformer3DModel", "MochiTransformer3DModel",
    "QwenImageTransformer2DModel", "ChromaTransformer2DModel", "HiDreamImageTransformer2DModel",
    "Lumina2Transformer2DModel", "SanaTransformer2DModel", "PixArtTransformer2DModel",
    "AllegroTransformer3DModel", "CosmosTransformer3DModel", "ZImageTransformer2DModel",
    "Kandinsky5Transformer3DModel", "SkyReelsV2Transformer3DModel", "LTX2VideoTransformer3DModel",
]


#: How many "…Transformer…Model" classes each diffusers release exports (tools/zoo.py's rule, counted on each
#: release's package); a release not listed is checked against its own export table only.
CLASS_COUNTS = {"0.35": 28, "0.36": 40, "0.37": 44, "0.38": 47, "0.39": 54, "0.40": 58, "0.41": 59, "0.42": 65}


def test_zoo_finds_every_transformer_class_of_the_installed_diffusers() -> None:
    names = transformer_classes()
    declared = {n for group in diffusers._import_structure.values() for n in group}
    exported = {n for n in declared if "Transformer" in n and "Model" in n}
    assert set(names) == exported  # every class diffusers declares in its lazy-import table, and nothing else
    release = ".".join(VERSION.split(".")[:2])
    if release in CLASS_COUNTS:
        assert len(names) == CLASS_COUNTS[release], (VERSION, names)
    assert {name for name in FAST if hasattr(diffusers, name)} <= set(names)
    assert "FluxTransformer2DModel" in names and len(names) >= CLASS_COUNTS["0.35"]  # the oldest supported release


def _fast(name: str) -> Any:
    """A common family, skipped where the installed diffusers has no such class yet."""
    return pytest.param(name, marks=needs(f"diffusers.{name}"), id=name)


def _check(name: str) -> None:
    (result,) = run_zoo([name])
    assert result.passed, f"{name} failed at {result.stage}: {result.reason}"
    assert result.computed_steps == [0] and result.skipped_steps == [1]
    # the skipped output is the reference's, and the reference is not what computing step 1 gives
    assert result.skip_max_diff is not None and result.reference_scale is not None
    assert result.skip_max_diff <= ATOL + RTOL * result.reference_scale
    assert result.skip_vs_compute is not None and result.skip_vs_compute > ATOL + RTOL * result.reference_scale


@pytest.mark.parametrize("name", [_fast(name) for name in FAST])
def test_zoo_common_families(name: str) -> None:
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(transformer_classes()) - set(FAST)))
def test_zoo_other_families(name: str) -> None:
    _check(name)


def test_reference_of_a_skip_is_input_plus_residual_by_the_numbers() -> None:
    """diffusers-style doubling blocks: 10 → 40 computed (residual 30); step 1 at 11 is 41 skipped, 44 computed."""
    from style_toys import DoublingStack, OneTupleBlock

    model = DoublingStack()
    report = inspect_module(model, (torch.tensor([[[10.0]]]),), {})
    ref = skip_reference(model, report, ((torch.tensor([[[10.0]]]),), {}), ((torch.tensor([[[11.0]]]),), {}))
    assert (ref.computed.item(), ref.residual.item(), ref.uncached_next.item(), ref.skipped_next.item()) == (
        40.0, 30.0, 44.0, 41.0)
    assert model.transformer_blocks[0].forward.__func__ is type(model.transformer_blocks[0]).forward  # untouched

    single = OneTupleBlock()
    enc = {"encoder_hidden_states": torch.tensor([[[1.0]]])}
    report = inspect_module(single, (torch.tensor([[[10.0]]]),), enc)
    ref = skip_reference(single, report, ((torch.tensor([[[10.0]]]),), enc), ((torch.tensor([[[11.0]]]),), enc))
    assert [t.item() for t in ref.skipped_next] == [21.0, 1.0] and [t.item() for t in ref.uncached_next] == [22.0, 1.0]


def test_zoo_fails_a_class_whose_skipped_output_is_not_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    real = zoo.skip_reference

    def off_by_a_little(*args: Any, **kwargs: Any) -> Any:
        ref = real(*args, **kwargs)
        ref.skipped_next = (zoo._first_tensor(ref.skipped_next) + 1e-3,)
        return ref

    monkeypatch.setattr(zoo, "skip_reference", off_by_a_little)
    (result,) = run_zoo(["FluxTransformer2DModel"])
    assert not result.passed and result.stage == "check"
    assert "differs from the reference" in result.reason and result.skip_max_diff == pytest.approx(1e-3, rel=1e-2)


# -- (c) shrinking -------------------------------------------------------------------------------------
def test_flux_dev_config_shrinks_keeping_structure() -> None:
    from diffusers import FluxTransformer2DModel

    model, shrunk = build_small(FluxTransformer2DModel, FLUX_DEV_CONFIG)
    cfg = model.config
    assert cfg.num_layers == 2 and cfg.num_single_layers == 2
    assert len(model.transformer_blocks) == 2 and len(model.single_transformer_blocks) == 2
    assert cfg.attention_head_dim * cfg.num_attention_heads == model.inner_dim
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim  # rope still splits the head dim
    assert all(a % 2 == 0 for a in cfg.axes_dims_rope)
    assert cfg.in_channels == 64 and cfg.guidance_embeds  # the latent layout and guidance embedding are kept
    assert hasattr(model.time_text_embed, "guidance_embedder")
    assert shrunk["num_single_layers"] == [38, 2] and shrunk["axes_dims_rope"][0] == [16, 56, 56]
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    args, kwargs = synthesize_inputs(model)
    with torch.no_grad():
        out = model(*args, **kwargs)[0]
    assert out.shape == kwargs["hidden_states"].shape and torch.isfinite(out).all()


def test_shrink_keeps_gqa_group_norm_and_rope_axis_couplings() -> None:
    from diffusers import Lumina2Transformer2DModel, Transformer2DModel

    lumina, _ = build_small(Lumina2Transformer2DModel)
    head_dim = lumina.config.hidden_size // lumina.config.num_attention_heads
    assert sum(lumina.config.axes_dim_rope) == head_dim
    assert lumina.config.num_attention_heads % lumina.config.num_kv_heads == 0
    assert lumina.config.num_kv_heads < lumina.config.num_attention_heads  # still grouped-query attention
    t2d, _ = build_small(Transformer2DModel)
    assert t2d.config.in_channels % t2d.config.norm_num_groups == 0


def test_shrink_generic_rules_on_an_unknown_class() -> None:
    class Block(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.proj(x)

    class Custom(torch.nn.Module):
        def __init__(self, hidden_size: int = 4096, num_layers: int = 40, num_attention_heads: int = 32,
                     text_dim: int = 4096) -> None:
            super().__init__()
            assert hidden_size % num_attention_heads == 0
            self.text = torch.nn.Linear(text_dim, hidden_size)
            self.blocks = torch.nn.ModuleList(Block(hidden_size) for _ in range(num_layers))

    model, shrunk = build_small(Custom)
    assert len(model.blocks) == 2
    assert shrunk["hidden_size"] == [4096, 64] and shrunk["num_attention_heads"] == [32, 2]
    assert not model.training


def test_build_small_rejects_non_modules() -> None:
    with pytest.raises(UsageError, match=r"not a torch\.nn\.Module"):
        build_small(dict)  # type: ignore[arg-type]


def test_input_synthesis_names_the_parameter_and_shows_inputs_usage() -> None:
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, hidden_states: torch.Tensor, wobble_factor: torch.Tensor) -> torch.Tensor:
            return self.proj(hidden_states) * wobble_factor

    with pytest.raises(InputSynthesisError) as info:
        synthesize_inputs(Odd())
    assert info.value.parameter == "wobble_factor"
    assert "--inputs" in str(info.value) and "def make_inputs" in str(info.value)
    assert info.value.exit_code == 2


def test_synthesized_inputs_keep_text_and_image_token_counts_apart() -> None:
    from diffusers import FluxTransformer2DModel

    model = _build("FluxTransformer2DModel")
    assert isinstance(model, FluxTransformer2DModel)
    _, kwargs = synthesize_inputs(model)
    image, text = kwargs["hidden_states"].shape[1], kwargs["encoder_hidden_states"].shape[1]
    assert image != text and math.gcd(image, text) < min(image, text)


def test_synthesis_reads_layout_and_text_width_from_layers_of_an_unknown_model() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return tokens + self.attn(tokens, context, context)[0]

    class Video(torch.nn.Module):
        """No config at all: a Conv3d patch embedding and a text projection are all there is to go by."""

        def __init__(self) -> None:
            super().__init__()
            self.patch_embedding = torch.nn.Conv3d(5, 16, kernel_size=(1, 2, 2), stride=(1, 2, 2))
            self.context_embedder = torch.nn.Linear(24, 16)
            self.blocks = torch.nn.ModuleList(Block() for _ in range(2))

        def forward(self, noisy: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    return_dict: bool = True) -> torch.Tensor:
            h = self.patch_embedding(noisy).flatten(2).transpose(1, 2)
            context = self.context_embedder(encoder_hidden_states)
            for block in self.blocks:
                h = block(h, context)
            return h

    model = Video().eval()
    args, kwargs = synthesize_inputs(model)
    assert kwargs["noisy"].shape[1] == 5 and kwargs["noisy"].ndim == 5
    assert kwargs["encoder_hidden_states"].shape[-1] == 24
    assert kwargs["return_dict"] is False
    with torch.no_grad():
        assert torch.isfinite(model(*args, **kwargs)).all()


#: Published configs (from the models' transformer/config.json) that differ from the class defaults in ways
#: that matter to shrinking or to inputs: dual-attention layer lists, temporal patches, GQA-free cross
#: attention widths, image-to-video added K/V projections, channel-concatenated conditioning.
PUBLISHED = {
    "SD3.5-medium": ("SD3Transformer2DModel", {
        "attention_head_dim": 64, "caption_projection_dim": 1536, "dual_attention_layers": list(range(13)),
        "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24, "pooled_projection_dim": 2048,
        "pos_embed_max_size": 384, "qk_norm": "rms_norm", "sample_size": 128}),
    "CogVideoX1.5-5B": ("CogVideoXTransformer3DModel", {
        "attention_head_dim": 64, "num_attention_heads": 48, "num_layers": 42, "patch_size_t": 2, "patch_bias": False,
        "sample_height": 300, "sample_width": 300, "sample_frames": 81, "use_rotary_positional_embeddings": True}),
    "Sana-1600M": ("SanaTransformer2DModel", {
        "attention_head_dim": 32, "caption_channels": 2304, "cross_attention_dim": 2240,
        "cross_attention_head_dim": 112, "num_attention_heads": 70, "num_cross_attention_heads": 20, "num_layers": 20,
        "sample_size": 32}),
    "PixArt-Sigma": ("PixArtTransformer2DModel", {
        "attention_head_dim": 72, "caption_channels": 4096, "cross_attention_dim": 1152, "interpolation_scale": 2,
        "num_attention_heads": 16, "num_layers": 28, "out_channels": 8, "sample_size": 128,
        "use_additional_conditions": False}),
    "Wan2.1-I2V-14B": ("WanTransformer3DModel", {
        "added_kv_proj_dim": 5120, "attention_head_dim": 128, "ffn_dim": 13824, "image_dim": 1280, "in_channels": 36,
        "num_attention_heads": 40, "num_layers": 40, "out_channels": 16, "text_dim": 4096}),
    "HunyuanVideo-I2V": ("HunyuanVideoTransformer3DModel", {
        "in_channels": 33, "image_condition_type": "latent_concat"}),
}


@pytest.mark.parametrize("label", sorted(PUBLISHED))
def test_published_configs_shrink_and_inspect(label: str) -> None:
    import diffusers

    name, config = PUBLISHED[label]
    model, shrunk = build_small(getattr(diffusers, name), config)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000, shrunk
    args, kwargs = synthesize_inputs(model)
    report = inspect_module(model, args, kwargs, inputs="synthesized")
    assert report.block_groups and all(g.count <= 2 for g in report.block_groups)
