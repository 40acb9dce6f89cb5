"""Inspection infers block conventions by data flow, and the runtime caches with what it inferred.

Each unusual convention is a small transformer written here (latents in, blocks in a list, a
timestep argument, latents-shaped output). For each one the test checks the inferred
``BlockMetadata`` and then that ``magsdk.enable(model, config, metadata=report)`` really skips:
blocks do not run on skipped steps, and on a skipped step the stack's output equals its input
plus the residual of the last computed step, exactly. Real diffusers transformers (Flux, Flux2,
SD3) are traced with explicit inputs and compared with the hand-written strategies.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers_features import needs_mag_cache
from tiny_models import ComputeRecorder, denoise, diffusers_mag_cache, flux_inputs, fresh_copy, tiny_flux, tiny_flux2
from torch import nn

import magsdk
from magsdk.config import BlockMetadata, InspectionReport
from magsdk.inspect import inspect_module
from magsdk.runtime import autotrace

DIM, CHANNELS, TEXT_DIM, TEXT_TOKENS, SIDE = 16, 4, 12, 5, 4
STEPS = 12
# All ratios 1 and a generous threshold: after the first step, compute one step in three (K = 2).
CONFIG = magsdk.MagCacheConfig(mag_ratios=[1.0] * STEPS, threshold=0.5, max_skip_steps=2, retention_ratio=0.0)


# -- building blocks of the test transformers ---------------------------------------------------------------
class Counted(nn.Module):
    """Counts how often its own forward body runs (not the runtime's wrapper)."""

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0
        self.img = nn.Linear(DIM, DIM)
        self.txt = nn.Linear(DIM, DIM)

    def step(self, h: torch.Tensor, e: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.runs += 1
        mix = torch.cat([e, h], dim=1).mean(dim=1, keepdim=True)
        h = h + 0.3 * torch.tanh(self.img(h + mix + temb[:, None]))
        e = e + 0.3 * torch.tanh(self.txt(e + mix))
        return h, e


class TupleEncoderFirst(Counted):
    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor) -> Any:
        h, e = self.step(hidden_states, encoder_hidden_states, temb)
        return e, h


class DictBlock(Counted):
    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor) -> Any:
        h, e = self.step(hidden_states, encoder_hidden_states, temb)
        return {"context": e, "sample": h}


@dataclasses.dataclass
class BlockOutput:
    context: torch.Tensor
    sample: torch.Tensor


class DataclassBlock(Counted):
    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor) -> Any:
        h, e = self.step(hidden_states, encoder_hidden_states, temb)
        return BlockOutput(context=e, sample=h)


class XBlock(Counted):
    def forward(self, x: torch.Tensor, context: torch.Tensor, t: torch.Tensor) -> Any:
        h, e = self.step(x, context, t)
        return h, e


class TokensBlock(Counted):
    """Single stream with cross-attention-like conditioning that is never returned."""

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h, _ = self.step(tokens, cond, t)
        return h


class FusedBlock(Counted):
    """Takes one [text; image] (or [image; text]) sequence and returns it."""

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        self.runs += 1
        return hidden_states + 0.3 * torch.tanh(self.img(hidden_states + temb[:, None]))


class TinyDiT(nn.Module):
    """Packed latents [B, N, C] in and out; subclasses define how the blocks are called."""

    def __init__(self, block_cls: type[nn.Module], count: int = 3, attr: str = "transformer_blocks") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.x_in = nn.Linear(CHANNELS, DIM)
        self.c_in = nn.Linear(TEXT_DIM, DIM)
        self.t_in = nn.Linear(1, DIM)
        self.out = nn.Linear(DIM, CHANNELS)
        self.attr = attr
        setattr(self, attr, nn.ModuleList([block_cls() for _ in range(count)]))

    def blocks(self) -> nn.ModuleList:
        return getattr(self, self.attr)  # type: ignore[no-any-return]

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor) -> Any:
        h = self.x_in(hidden_states)
        e = self.c_in(encoder_hidden_states)
        temb = self.t_in(timestep.reshape(-1, 1).to(h.dtype))
        h = self.run_blocks(h, e, temb)
        return self.out(h)

    def run_blocks(self, h: torch.Tensor, e: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in self.blocks():
            e, h = block(h, e, temb)
        return h


class DictDiT(TinyDiT):
    def run_blocks(self, h: torch.Tensor, e: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in self.blocks():
            out = block(hidden_states=h, encoder_hidden_states=e, temb=temb)
            h, e = out["sample"], out["context"]
        return h


class DataclassDiT(TinyDiT):
    def run_blocks(self, h: torch.Tensor, e: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in self.blocks():
            out = block(h, e, temb)
            h, e = out.sample, out.context
        return h


class PatchedXDiT(TinyDiT):
    """Latents as an image [B, C, H, W], patchified 2x2 into tokens; blocks take ``x`` / ``context``."""

    def __init__(self) -> None:
        super().__init__(XBlock, count=3, attr="layers")
        self.x_in = nn.Linear(CHANNELS * 4, DIM)
        self.out = nn.Linear(DIM, CHANNELS * 4)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor) -> Any:
        b, c, height, width = hidden_states.shape
        patches = hidden_states.reshape(b, c, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
        h = self.x_in(patches.reshape(b, (height // 2) * (width // 2), c * 4))
        e = self.c_in(encoder_hidden_states)
        temb = self.t_in(timestep.reshape(-1, 1))
        for block in self.blocks():
            h, e = block(x=h, context=e, t=temb)
        out = self.out(h).reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, height, width)


class TokensDiT(TinyDiT):
    def run_blocks(self, h: torch.Tensor, e: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in self.blocks():
            h = block(h, e, temb)
        return h


class NestedDiT(TinyDiT):
    """Blocks under a custom, nested attribute: ``trunk.stack``."""

    def __init__(self) -> None:
        super().__init__(TupleEncoderFirst, count=3, attr="unused")
        del self.unused
        self.trunk = nn.Module()
        self.trunk.stack = nn.ModuleList([TupleEncoderFirst() for _ in range(3)])

    def blocks(self) -> nn.ModuleList:
        return self.trunk.stack  # type: ignore[return-value]


class TwoGroupDiT(TinyDiT):
    """Double-stream blocks, then single-stream blocks on ``cat`` of their two outputs (Flux2-like)."""

    def __init__(self, order: str = "text_image") -> None:
        super().__init__(TupleEncoderFirst, count=2, attr="double_blocks")
        self.order = order
        self.single_blocks = nn.ModuleList([FusedBlock() for _ in range(2)])

    def run_blocks(self, h: torch.Tensor, e: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in self.double_blocks:
            e, h = block(h, e, temb)
        text = e.shape[1]
        joint = torch.cat([e, h], dim=1) if self.order == "text_image" else torch.cat([h, e], dim=1)
        for block in self.single_blocks:
            joint = block(joint, temb)
        return joint[:, text:] if self.order == "text_image" else joint[:, : h.shape[1]]


def packed_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, SIDE * SIDE, CHANNELS, generator=g),
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g),
        "timestep": torch.tensor([1.0]),
    }


def image_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    inputs = packed_inputs(seed)
    g = torch.Generator().manual_seed(seed)
    inputs["hidden_states"] = torch.randn(1, CHANNELS, 2 * SIDE, 2 * SIDE, generator=g)
    return inputs


def run(model: nn.Module, inputs: dict[str, torch.Tensor], steps: int = STEPS) -> torch.Tensor:
    """A plain Euler flow-matching loop: the timestep changes every step (step tracking)."""
    x = inputs["hidden_states"].clone()
    cond = {k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep")}
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([1.0 - i / steps])
            x = x - model(hidden_states=x, timestep=t, **cond) / steps
    return x


# -- the runtime check: skipping really skips, and adds the residual once ----------------------------------
def assert_caches(model: nn.Module, report: InspectionReport, inputs: dict[str, torch.Tensor]) -> None:
    """Every test model embeds with ``x_in`` before its stack and projects with ``out`` after it."""
    seen: list[list[torch.Tensor]] = []
    hooks = [
        model.x_in.register_forward_hook(lambda m, a, out: seen.append([out.detach().clone()])),
        model.out.register_forward_pre_hook(lambda m, a: seen[-1].append(a[0].detach().clone())),
    ]
    blocks = [b for g in report.block_groups for b in model.get_submodule(g.path)]
    try:
        with magsdk.enable(model, CONFIG, metadata=report) as handle:
            run(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    stats = handle.stats
    assert stats.computed_calls + stats.skipped_calls == STEPS
    assert stats.skipped_calls >= STEPS // 2, stats.per_branch()
    for block in blocks:  # on skipped steps no block body ran, on computed steps all did
        assert block.runs == stats.computed_calls
    residual = None
    for record, (stack_in, stack_out) in zip(stats.calls, seen, strict=True):
        if record.computed:
            residual = stack_out - stack_in
        else:
            assert residual is not None
            assert torch.equal(stack_out, stack_in + residual), f"step {record.step}: output is not input + residual"


def infer(model: nn.Module, inputs: dict[str, torch.Tensor]) -> InspectionReport:
    report = inspect_module(model, (), inputs)
    for block in model.modules():
        if isinstance(block, Counted):
            block.runs = 0
    return report


# -- conventions ------------------------------------------------------------------------------------------------
def test_blocks_returning_encoder_then_hidden():
    model = TinyDiT(TupleEncoderFirst)
    report = infer(model, packed_inputs())
    assert [g.path for g in report.block_groups] == ["transformer_blocks"]
    assert report.block_groups[0].metadata == BlockMetadata(
        hidden_states_argument_name="hidden_states",
        encoder_hidden_states_argument_name="encoder_hidden_states",
        return_hidden_states_index=1,
        return_encoder_hidden_states_index=0,
        output_kind="tuple",
    )
    assert (report.head, report.tail, report.timestep_argument_name) == (
        "transformer_blocks.0", "transformer_blocks.2", "timestep"
    )
    assert report.warnings == []
    assert_caches(model, report, packed_inputs())


def test_blocks_returning_a_dict():
    model = DictDiT(DictBlock)
    report = infer(model, packed_inputs())
    meta = report.block_groups[0].metadata
    assert (meta.output_kind, meta.return_hidden_states_key, meta.return_encoder_hidden_states_key) == (
        "dict", "sample", "context"
    )
    assert (meta.hidden_states_argument_name, meta.encoder_hidden_states_argument_name) == (
        "hidden_states", "encoder_hidden_states"
    )
    assert_caches(model, report, packed_inputs())


def test_blocks_returning_a_dataclass():
    model = DataclassDiT(DataclassBlock)
    report = infer(model, packed_inputs())
    meta = report.block_groups[0].metadata
    assert (meta.output_kind, meta.return_hidden_states_key, meta.return_encoder_hidden_states_key) == (
        "dataclass", "sample", "context"
    )
    assert (meta.return_hidden_states_index, meta.return_encoder_hidden_states_index) == (1, 0)
    assert_caches(model, report, packed_inputs())


def test_hidden_state_named_x_with_patchified_image_latents():
    model = PatchedXDiT()
    report = infer(model, image_inputs())
    assert report.block_groups[0].path == "layers"
    meta = report.block_groups[0].metadata
    assert (meta.hidden_states_argument_name, meta.encoder_hidden_states_argument_name) == ("x", "context")
    assert (meta.return_hidden_states_index, meta.return_encoder_hidden_states_index) == (0, 1)
    assert report.warnings == []
    assert_caches(model, report, image_inputs())


def test_single_stream_named_tokens_with_constant_conditioning():
    model = TokensDiT(TokensBlock)
    report = infer(model, packed_inputs())
    assert report.block_groups[0].metadata == BlockMetadata(
        hidden_states_argument_name="tokens",
        encoder_hidden_states_argument_name="cond",
        return_hidden_states_index=0,
        output_kind="tensor",
    )
    assert_caches(model, report, packed_inputs())


def test_blocks_under_a_custom_nested_attribute():
    model = NestedDiT()
    report = infer(model, packed_inputs())
    assert [g.path for g in report.block_groups] == ["trunk.stack"]
    assert (report.head, report.tail) == ("trunk.stack.0", "trunk.stack.2")
    assert report.block_groups[0].metadata.return_hidden_states_index == 1
    assert_caches(model, report, packed_inputs())


def test_single_block_model():
    model = TinyDiT(TupleEncoderFirst, count=1)
    report = infer(model, packed_inputs())
    assert report.head == report.tail == "transformer_blocks.0"
    meta = report.block_groups[0].metadata
    assert (meta.return_hidden_states_index, meta.return_encoder_hidden_states_index) == (1, 0)
    assert meta.encoder_hidden_states_argument_name == "encoder_hidden_states"
    assert_caches(model, report, packed_inputs())


@pytest.mark.parametrize("order", ["text_image", "image_text"])
def test_second_group_consumes_the_concatenation_of_the_first_groups_outputs(order):
    model = TwoGroupDiT(order)
    report = infer(model, packed_inputs())
    assert [g.path for g in report.block_groups] == ["double_blocks", "single_blocks"]
    double, single = (g.metadata for g in report.block_groups)
    assert (double.return_hidden_states_index, double.return_encoder_hidden_states_index) == (1, 0)
    assert double.fused_sequence_order is None
    assert single.output_kind == "tensor"
    assert single.hidden_states_argument_name == "hidden_states"
    assert single.fused_sequence_order == order
    assert (report.head, report.tail) == ("double_blocks.0", "single_blocks.1")
    assert_caches(model, report, packed_inputs())


# -- warnings: what makes head/tail caching unsafe --------------------------------------------------------------
class ControlDiT(TinyDiT):
    """Adds a 'control residual' to the hidden state between blocks (as ControlNet pipelines do)."""

    def run_blocks(self, h: torch.Tensor, e: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in self.blocks():
            e, h = block(h, e, temb)
            h = h + 0.05
        return h


class MixedFormsDiT(TinyDiT):
    def run_blocks(self, h: torch.Tensor, e: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks()):
            e, h = block(h, e, temb) if i == 0 else block(hidden_states=h, encoder_hidden_states=e, temb=temb)
        return h


class RefinerDiT(TinyDiT):
    """A text refiner (a block list of its own) runs before the main blocks."""

    def __init__(self) -> None:
        super().__init__(TupleEncoderFirst)
        self.text_refiner = nn.ModuleList([TokensBlock() for _ in range(2)])

    def run_blocks(self, h: torch.Tensor, e: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in self.text_refiner:
            e = block(e, e, temb)
        return super().run_blocks(h, e, temb)


class SwitchBlock(Counted):
    """One class, two conventions: (encoder, hidden) with an encoder, the fused sequence without one."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: Any, temb: torch.Tensor) -> Any:
        if encoder_hidden_states is None:
            self.runs += 1
            return hidden_states + 0.3 * torch.tanh(self.img(hidden_states + temb[:, None]))
        h, e = self.step(hidden_states, encoder_hidden_states, temb)
        return e, h


class SharedClassDiT(TinyDiT):
    def __init__(self) -> None:
        super().__init__(SwitchBlock, count=2, attr="dual")
        self.mono = nn.ModuleList([SwitchBlock() for _ in range(2)])

    def run_blocks(self, h: torch.Tensor, e: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in self.dual:
            e, h = block(h, e, temb)
        joint = torch.cat([e, h], dim=1)
        for block in self.mono:
            joint = block(joint, None, temb)
        return joint[:, e.shape[1]:]


def test_one_block_class_with_two_conventions_is_keyed_by_group():
    model = SharedClassDiT()
    report = infer(model, packed_inputs())
    double, single = (g.metadata for g in report.block_groups)
    assert (double.output_kind, double.return_hidden_states_index) == ("tuple", 1)
    assert (single.output_kind, single.fused_sequence_order, single.fuses_inputs) == ("tensor", "text_image", True)
    assert any("SwitchBlock is used by dual and mono" in w for w in report.warnings), report.warnings
    assert_caches(model, report, packed_inputs())


class InterleavedDiT(TinyDiT):
    """Spatial and temporal blocks alternate (Latte-like): one stack spread over two lists."""

    def __init__(self) -> None:
        super().__init__(TokensBlock, count=2, attr="spatial")
        self.temporal = nn.ModuleList([TokensBlock() for _ in range(2)])

    def run_blocks(self, h: torch.Tensor, e: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for spatial, temporal in zip(self.spatial, self.temporal, strict=True):
            h = temporal(spatial(h, e, temb).flip(1), e, temb).flip(1)
        return h


def test_interleaved_block_lists_are_flagged():
    report = infer(InterleavedDiT(), packed_inputs())
    assert any("runs interleaved" in w and "temporal" in w for w in report.warnings), report.warnings


class TwoOutputDiT(TinyDiT):
    """Returns the image and the second stream (audio-like), both carried by the blocks."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor) -> Any:
        h, e = self.x_in(hidden_states), self.c_in(encoder_hidden_states)
        temb = self.t_in(timestep.reshape(-1, 1))
        for block in self.blocks():
            e, h = block(h, e, temb)
        return self.out(h), self.out(e)


def test_a_second_stream_returned_by_the_transformer_is_flagged():
    report = infer(TwoOutputDiT(TupleEncoderFirst), packed_inputs())
    assert any("a second modality?" in w and "'encoder_hidden_states'" in w for w in report.warnings), report.warnings
    assert infer(TinyDiT(TupleEncoderFirst), packed_inputs()).warnings == []


def test_work_between_blocks_is_flagged():
    report = infer(ControlDiT(TupleEncoderFirst), packed_inputs())
    assert report.block_groups[0].metadata.hidden_states_argument_name == "hidden_states"
    assert any("outside any block" in w and "transformer_blocks" in w for w in report.warnings), report.warnings


def test_mixed_positional_and_keyword_calls_are_flagged():
    report = infer(MixedFormsDiT(TupleEncoderFirst), packed_inputs())
    assert report.block_groups[0].metadata.return_hidden_states_index == 1
    assert any("positionally in some calls and by keyword in others" in w for w in report.warnings), report.warnings


def test_side_group_is_reported_and_not_cached():
    model = RefinerDiT()
    report = infer(model, packed_inputs())
    assert [g.path for g in report.block_groups] == ["transformer_blocks"]
    assert any("text_refiner" in w and "not cached" in w for w in report.warnings), report.warnings
    assert_caches(model, report, packed_inputs())


# -- real diffusers transformers with explicit inputs -------------------------------------------------------------
def flux_call_inputs(model: nn.Module) -> dict[str, Any]:
    inputs = flux_inputs(model)
    inputs["hidden_states"] = torch.randn(1, 16, model.config.in_channels, generator=torch.Generator().manual_seed(3))
    inputs["timestep"] = torch.tensor([0.7])
    return inputs


@pytest.mark.parametrize("make", [tiny_flux, tiny_flux2], ids=["flux", "flux2"])
def test_flux_and_flux2_match_their_strategies(make):
    from strategies.flux import FluxStrategy
    from strategies.flux2_klein import Flux2KleinStrategy

    model = make()
    strategy = FluxStrategy if isinstance(model, FluxTransformer2DModel) else Flux2KleinStrategy
    report = inspect_module(model, (), flux_call_inputs(model))
    assert tuple(g.path for g in report.block_groups) == strategy.block_groups
    assert report.metadata_by_class() == strategy.block_metadata
    assert (report.head, report.tail) == ("transformer_blocks.0", "single_transformer_blocks.1")
    assert report.warnings == []


def tiny_sd3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16,
    ).eval()


def sd3_inputs(t: float = 500.0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
        "pooled_projections": torch.randn(1, 8, generator=g),
        "timestep": torch.tensor([t]),
        "return_dict": False,
    }


SD3_TIMESTEPS = [1000.0 - 80 * i for i in range(STEPS)]


def run_sd3(model: nn.Module) -> list[torch.Tensor]:
    """One transformer call per step, the timestep going down: what a pipeline's loop feeds the cache."""
    with torch.no_grad():
        return [model(**sd3_inputs(t))[0] for t in SD3_TIMESTEPS]


def test_sd3_last_block_returning_none_for_the_encoder():
    """docs/design.md trap 9: the last JointTransformerBlock (context_pre_only) returns (None, hidden)."""
    model = tiny_sd3()
    report = inspect_module(model, (), sd3_inputs())
    assert report.block_groups[0].metadata == BlockMetadata(
        hidden_states_argument_name="hidden_states",
        encoder_hidden_states_argument_name="encoder_hidden_states",
        return_hidden_states_index=1,
        return_encoder_hidden_states_index=0,
        output_kind="tuple",
    )
    assert report.tail == "transformer_blocks.2" and report.warnings == []
    # the block stack's input (pos_embed's output) and output (norm_out's input) on every call
    seen: list[list[torch.Tensor]] = []
    hooks = [
        model.pos_embed.register_forward_hook(lambda m, a, out: seen.append([out.detach().clone()])),
        model.norm_out.register_forward_pre_hook(lambda m, a: seen[-1].append(a[0].detach().clone())),
    ]
    handle = magsdk.enable(model, CONFIG, metadata=report)
    recorder = ComputeRecorder(model, model.transformer_blocks[0])
    try:
        run_sd3(model)
    finally:
        for hook in hooks:
            hook.remove()
    stats = handle.stats
    assert 0 < stats.skipped_calls < STEPS
    assert recorder.flags == [call.computed for call in stats.calls]  # skipped calls ran no block
    residual = None
    for record, (stack_in, stack_out) in zip(stats.calls, seen, strict=True):
        if record.computed:
            residual = stack_out - stack_in
        else:  # the image stream of the last computed step's residual, reused exactly
            assert residual is not None
            assert torch.equal(stack_out, stack_in + residual), f"step {record.step}: output is not input + residual"


@needs_mag_cache
def test_sd3_cached_outputs_equal_diffusers_mag_cache():
    """The same skips and bit-identical outputs as diffusers' apply_mag_cache (index mode) on the same model."""
    base = tiny_sd3()
    report = inspect_module(base, (), sd3_inputs())
    ours_model, theirs_model = fresh_copy(base), fresh_copy(base)
    handle = magsdk.enable(ours_model, CONFIG, metadata=report)
    our_rec = ComputeRecorder(ours_model, ours_model.transformer_blocks[0])
    ours = run_sd3(ours_model)
    with diffusers_mag_cache(theirs_model, [1.0] * STEPS, CONFIG.threshold, CONFIG.max_skip_steps,
                             CONFIG.retention_ratio, STEPS):
        their_rec = ComputeRecorder(theirs_model, theirs_model.transformer_blocks[0])
        theirs = run_sd3(theirs_model)
    assert 0 < handle.stats.skipped_calls < STEPS  # the comparison is not vacuous
    assert our_rec.flags == their_rec.flags
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(a, b), f"step {step}: max |diff| {float((a - b).abs().max()):.2e}"


# -- runtime: inference on the first real call when nothing is known -------------------------------------------
def test_enable_without_strategy_or_metadata_traces_the_first_call(caplog):
    autotrace.forget()
    plain_report = infer(TwoGroupDiT(), packed_inputs())
    model = TwoGroupDiT()
    with caplog.at_level(logging.INFO, logger="magsdk"):
        handle = magsdk.enable(model, CONFIG)
        assert handle.blocks == []  # attached at the first call
        traced = run(model, packed_inputs())
    assert any("inferred from its first call" in r.message and "TwoGroupDiT" in r.message for r in caplog.records)
    assert autotrace.known_report(model) == plain_report.model_copy(update={"seconds": None})
    stats = handle.stats
    assert stats.calls[0].computed and stats.calls[0].step == 0  # the traced call computed and counted
    assert stats.computed_calls + stats.skipped_calls == STEPS and stats.skipped_calls > 0
    assert handle.blocks[0] == "double_blocks.0 (head)" and handle.blocks[-1] == "single_blocks.1 (tail)"
    handle.disable()
    assert not {"forward", "cache_context", "_magsdk_session"} & model.__dict__.keys()
    reference = TwoGroupDiT()
    with magsdk.enable(reference, CONFIG, metadata=plain_report) as known:
        expected = run(reference, packed_inputs())
    assert torch.equal(traced, expected)
    assert known.stats.per_branch() == stats.per_branch()


def test_traced_conventions_are_cached_per_class_and_calibration_works():
    autotrace.forget()
    model = TinyDiT(TupleEncoderFirst)
    with magsdk.calibrate(model) as cal:
        run(model, packed_inputs(), steps=6)
    assert cal.result is not None and len(cal.result.branches["pass0"].norm_ratios) == 6
    assert autotrace.known_report(model) is not None
    second = magsdk.enable(TinyDiT(TupleEncoderFirst), CONFIG)
    assert second.blocks[0] == "transformer_blocks.0 (head)"  # known class: attached at once, no tracing
    second.disable()


def test_an_exception_in_the_traced_call_leaves_nothing_behind():
    autotrace.forget()
    model = TinyDiT(TupleEncoderFirst)
    handle = magsdk.enable(model, CONFIG)
    bad = packed_inputs()
    bad["encoder_hidden_states"] = torch.randn(1, TEXT_TOKENS, TEXT_DIM + 1)
    with pytest.raises(RuntimeError):
        model(**bad)
    assert handle.sessions == [] and handle.stats.total_calls == 0
    assert all("forward" not in b.__dict__ for b in model.blocks())
    run(model, packed_inputs())
    assert handle.stats.total_calls == STEPS and handle.stats.skipped_calls > 0
    handle.disable()


def test_flux_subclass_without_strategy_matches_the_flux_strategy_bit_for_bit(caplog):
    """A Flux subclass whose block classes are not registered either: its conventions come from tracing its
    first call, and the cache then runs exactly as the hand-written Flux strategy does."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    from strategies.flux import FluxStrategy

    class MyFlux(FluxTransformer2DModel):
        pass

    class MyDouble(FluxTransformerBlock):
        pass

    class MySingle(FluxSingleTransformerBlock):
        pass

    autotrace.forget()
    base = tiny_flux()
    known, unknown = fresh_copy(base), fresh_copy(base)
    unknown.__class__ = MyFlux
    for block in unknown.transformer_blocks:
        block.__class__ = MyDouble
    for block in unknown.single_transformer_blocks:
        block.__class__ = MySingle
    config = magsdk.MagCacheConfig(mag_ratios=[1.0] * 10, threshold=0.5, max_skip_steps=2, retention_ratio=0.1)
    with caplog.at_level(logging.INFO, logger="magsdk"):
        with magsdk.enable(known, config) as a, magsdk.enable(unknown, config) as b:
            assert a.metadata_sources == {"transformer": "strategy"}
            assert b.metadata_sources == {"transformer": "inferred"}
            assert b.blocks == []  # nothing known: attached at the first call
            assert torch.equal(denoise(known, 10, cfg=True), denoise(unknown, 10, cfg=True))
            assert a.stats.per_branch() == b.stats.per_branch() and b.stats.skipped_calls > 0
            assert b.blocks[0] == "transformer_blocks.0 (head)" and b.blocks[-1] == "single_transformer_blocks.1 (tail)"
    assert any("inferred from its first call" in r.message and "MyFlux" in r.message for r in caplog.records)
    traced = autotrace.known_report(unknown)
    assert traced is not None and (traced.head, traced.tail) == ("transformer_blocks.0", "single_transformer_blocks.1")
    # what the trace inferred is the strategy's hand-written metadata, block class for block class
    renamed = {"MyDouble": "FluxTransformerBlock", "MySingle": "FluxSingleTransformerBlock"}
    inferred = {renamed[name]: meta for name, meta in traced.metadata_by_class().items()}
    assert inferred == FluxStrategy.block_metadata
    autotrace.forget(MyFlux)
