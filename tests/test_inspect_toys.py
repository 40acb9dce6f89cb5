"""Inference never guesses silently (issue 12, item 4), on toys in the style of diffusers' MagCache tests.

Every expected number follows from doubling blocks: see ``style_toys.py``. Each test runs the
real runtime (``magsdk.enable`` with first-call tracing or with ``metadata=``) and checks the
values a computed and a skipped step return.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import style_toys
import torch
from style_toys import (
    DoublingStack,
    MixedLists,
    OneScaleBothBlock,
    OneTupleBlock,
    distinct_tokens,
    same_shapes,
)

import magsdk
from magsdk.cli import main
from magsdk.config import InspectionReport
from magsdk.errors import BlockLayoutError
from magsdk.inspect import find_block_containers, inspect_module
from magsdk.runtime import autotrace

#: diffusers' test settings: ratios of 1, so the accumulated error stays 0 and step 1 skips.
SKIP = magsdk.MagCacheConfig(mag_ratios=[1.0, 1.0], threshold=100.0, num_inference_steps=2, retention_ratio=0.0)
TOYS = str(Path(style_toys.__file__))


@pytest.fixture(autouse=True)
def _forget_inferred() -> None:
    autotrace.forget()  # conventions inferred for a class are remembered per process


def _x(value: float) -> torch.Tensor:
    return torch.tensor([[[value]]])


# -- parameter-free blocks ---------------------------------------------------------------------------------
def test_a_list_of_parameter_free_blocks_is_a_block_stack() -> None:
    model = DoublingStack()
    (container,) = find_block_containers(model)
    assert (container.path, container.count, container.block_class) == ("transformer_blocks", 2, "Doubling")
    report = inspect_module(model, (_x(10.0),), {})
    assert (report.head, report.tail) == ("transformer_blocks.0", "transformer_blocks.1")
    assert report.block_groups[0].metadata.output_kind == "tensor" and not report.ambiguous


def test_parameter_free_blocks_cache_through_first_call_tracing() -> None:
    model = DoublingStack()
    with magsdk.enable(model, SKIP) as handle:
        computed = model(_x(10.0))  # 10 · 4; residual 30
        skipped = model(_x(11.0))  # skipped: 11 + 30 (computing would give 44)
    assert computed.item() == 40.0 and skipped.item() == 41.0
    assert handle.stats.computed_steps() == [0] and handle.stats.skipped_steps() == [1]


def test_parameter_free_lists_are_ignored_when_a_parametrised_list_exists() -> None:
    model = MixedLists()
    assert [c.path for c in find_block_containers(model)] == ["blocks"]


# -- single block: the identity pass-through decides the encoder slot ------------------------------------------
def test_an_output_that_is_the_encoder_input_is_the_encoder_slot() -> None:
    args, kwargs = same_shapes()
    report = inspect_module(OneTupleBlock(), args, kwargs)
    meta = report.block_groups[0].metadata
    assert (meta.return_hidden_states_index, meta.return_encoder_hidden_states_index) == (0, 1)
    assert meta.encoder_hidden_states_argument_name == "encoder_hidden_states"
    assert not report.ambiguous and report.ambiguities == []


def test_single_tuple_block_skips_to_input_plus_residual() -> None:
    model = OneTupleBlock()
    encoder = _x(1.0)
    with magsdk.enable(model, SKIP) as handle:
        computed, _ = model(_x(10.0), encoder_hidden_states=encoder)  # 20; residual 10
        skipped, encoder_out = model(_x(11.0), encoder_hidden_states=encoder)
    assert computed.item() == 20.0
    assert skipped.item() == 21.0, "the skip must add the residual of the hidden state, not of the encoder"
    assert encoder_out.item() == 1.0 and handle.stats.skipped_steps() == [1]


# -- two assignments that explain the trace equally well ------------------------------------------------------
def test_an_undecided_pairing_is_reported_as_ambiguous() -> None:
    args, kwargs = same_shapes()
    report = inspect_module(OneScaleBothBlock(), args, kwargs)
    assert report.ambiguous
    (ambiguity,) = report.ambiguities
    assert ambiguity.group == "transformer_blocks" and ambiguity.block_class == "ScaleBoth"
    assert sorted(ambiguity.arguments) == ["encoder_hidden_states", "hidden_states"] and ambiguity.slots == [0, 1]
    notes = [n for n in report.notes if n.code == "ambiguous-output-slot"]
    assert len(notes) == 1 and notes[0].group == "transformer_blocks" and notes[0].message in report.warnings
    assert "--inputs" in notes[0].message and "metadata=" in notes[0].message


def test_the_runtime_refuses_to_cache_an_ambiguous_trace_and_its_hints_work() -> None:
    model = OneScaleBothBlock()
    args, kwargs = same_shapes()
    handle = magsdk.enable(model, SKIP)
    with pytest.raises(BlockLayoutError) as info:
        model(*args, **kwargs)
    message = str(info.value)
    assert "metadata=" in message and "--inputs" in message and "ScaleBoth" in message
    with pytest.raises(BlockLayoutError):  # nothing was remembered: the next call refuses again
        model(*args, **kwargs)
    handle.disable()
    with pytest.raises(BlockLayoutError, match="will not cache with guessed conventions"):
        magsdk.enable(model, SKIP, metadata=inspect_module(model, args, kwargs))  # an ambiguous report, given
    assert "forward" not in model.__dict__

    # hint 1: inspect with inputs whose token counts differ, and pass that report
    report = inspect_module(model, *distinct_tokens())
    meta = report.block_groups[0].metadata
    assert not report.ambiguous and (meta.return_hidden_states_index, meta.return_encoder_hidden_states_index) == (0, 1)
    with magsdk.enable(model, SKIP, metadata=report):
        assert model(*args, **kwargs)[0].item() == 20.0  # residual 10
        assert model(_x(11.0), encoder_hidden_states=_x(1.0))[0].item() == 21.0
    # hint 2: the conventions written out
    written = magsdk.BlockMetadata(encoder_hidden_states_argument_name="encoder_hidden_states",
                                   return_hidden_states_index=0, return_encoder_hidden_states_index=1)
    with magsdk.enable(model, SKIP, metadata={"ScaleBoth": written}):
        assert model(*args, **kwargs)[0].item() == 20.0
        assert model(_x(11.0), encoder_hidden_states=_x(1.0))[0].item() == 21.0


def test_inspect_cli_reports_the_ambiguity(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = f"{TOYS}:OneScaleBothBlock"
    assert main(["inspect", target, "--inputs", f"{TOYS}:same_shapes"]) == 0
    out = capsys.readouterr().out
    assert "ambiguous" in out and "[ambiguous-output-slot]" in out
    path = tmp_path / "report.json"
    assert main(["inspect", target, "--inputs", f"{TOYS}:same_shapes", "--out", str(path), "--json"]) == 0
    capsys.readouterr()
    assert InspectionReport.model_validate_json(path.read_text()).ambiguities[0].group == "transformer_blocks"
    assert main(["inspect", target, "--inputs", f"{TOYS}:distinct_tokens", "--json"]) == 0
    decided = InspectionReport.model_validate_json(capsys.readouterr().out)
    assert decided.ambiguities == [] and decided.block_groups[0].metadata.return_hidden_states_index == 0
