"""Inspection warnings carry codes, and consumers decide from codes (issue 12, items 6 and 9).

Codegen renders a ``compute_residual`` stub for the codes that mean "the runtime cannot take
this residual", whatever the messages say; ``magsdk inspect`` refuses models that are plainly no
denoising transformer (AutoencoderKL) with exit code 2, and explains its parameter counts when a
model cannot be built small (UNet2DConditionModel).
"""

from __future__ import annotations

from typing import Any, get_args

import pytest
import torch
from torch import nn

import magsdk.config
from magsdk.cli import main
from magsdk.codegen.render import render_strategy, spec_from_report, unsupported_layouts
from magsdk.config import BlockGroupReport, BlockMetadata, InspectionReport
from magsdk.errors import MagSDKError
from magsdk.inspect import inspect_module

DIM, TEXT, IMAGE = 8, 3, 4


class DualBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.img, self.txt = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> Any:
        return encoder_hidden_states + torch.tanh(self.txt(encoder_hidden_states)), hidden_states + torch.tanh(
            self.img(hidden_states))


class SeqBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + torch.tanh(self.proj(hidden_states))


class MiddleFused(nn.Module):
    """Dual-stream blocks, then one sequence [text; image; text]: the image tokens sit in the middle."""

    def __init__(self) -> None:
        super().__init__()
        self.x_in, self.c_in, self.out = nn.Linear(4, DIM), nn.Linear(5, DIM), nn.Linear(DIM, 4)
        self.dual = nn.ModuleList([DualBlock(), DualBlock()])
        self.single = nn.ModuleList([SeqBlock(), SeqBlock()])

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep: torch.Tensor) -> torch.Tensor:
        h, e = self.x_in(hidden_states), self.c_in(encoder_hidden_states)
        for block in self.dual:
            e, h = block(h, e)
        seq = torch.cat([e, h, e], dim=1)
        for block in self.single:
            seq = block(seq)
        return self.out(seq[:, TEXT : TEXT + IMAGE])


def _middle_report() -> InspectionReport:
    torch.manual_seed(0)
    kwargs = {"hidden_states": torch.randn(1, IMAGE, 4), "encoder_hidden_states": torch.randn(1, TEXT, 5),
              "timestep": torch.tensor([500.0])}
    return inspect_module(MiddleFused().eval(), (), kwargs)


def test_every_warning_has_a_coded_note() -> None:
    from magsdk.config import NoteCode

    report = _middle_report()
    assert report.warnings == [note.message for note in report.notes]
    assert "fused-image-in-middle" in report.codes()
    middle = next(n for n in report.notes if n.code == "fused-image-in-middle")
    assert middle.group == "single"
    assert all(note.code in get_args(NoteCode) for note in report.notes)


def test_codegen_stubs_the_residual_for_the_fused_middle_layout() -> None:
    report = _middle_report()
    middle = next(n.message for n in report.notes if n.code == "fused-image-in-middle")
    assert middle in unsupported_layouts(report)
    spec = spec_from_report(report, model="m", module_name="middle")
    assert "def compute_residual(" in render_strategy(spec)


def _report(*notes: magsdk.config.InspectionNote) -> InspectionReport:
    meta = BlockMetadata(encoder_hidden_states_argument_name="encoder_hidden_states",
                         return_hidden_states_index=1, return_encoder_hidden_states_index=0)
    return InspectionReport(
        transformer="Toy", head="blocks.0", tail="blocks.1",
        block_groups=[BlockGroupReport(path="blocks", block_class="Block", count=2, metadata=meta)],
        warnings=[n.message for n in notes], notes=list(notes),
    )


def test_codegen_decides_from_codes_not_from_message_text() -> None:
    from magsdk.codegen.render import UNSUPPORTED_CODES
    from magsdk.config import InspectionNote, NoteCode

    # a message that mentions the residual and compute_residual, under a code the runtime handles
    wordy = InspectionNote(code="side-groups", message="refiner: the residual x_out - x_in is not defined for it; "
                           "a strategy that overrides compute_residual cannot take the residual of it either")
    assert unsupported_layouts(_report(wordy)) == []
    assert "def compute_residual(" not in render_strategy(spec_from_report(_report(wordy), model="m"))
    terse = InspectionNote(code="residual-undefined", message="shapes differ")
    assert unsupported_layouts(_report(wordy, terse)) == ["shapes differ"]
    assert UNSUPPORTED_CODES <= set(get_args(NoteCode))


def test_codegen_refuses_an_ambiguous_report() -> None:
    from magsdk.config import AmbiguousSlots

    report = _report().model_copy(update={"ambiguities": [AmbiguousSlots(
        group="blocks", block_class="Block", arguments=["hidden_states", "encoder_hidden_states"], slots=[0, 1])]})
    with pytest.raises(MagSDKError, match="--inputs"):
        spec_from_report(report, model="m")


# -- item 9: not a denoising transformer, and parameter counts that explain themselves ------------------------
def test_autoencoder_is_not_a_denoising_transformer(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "AutoencoderKL"]) == 2
    err = capsys.readouterr().err
    assert "AutoencoderKL is not a denoising transformer" in err
    assert "no timestep argument" in err and "no single chain of blocks" in err
    assert "cached blocks" not in err


def test_unet_parameter_counts_are_explained(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "UNet2DConditionModel"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "841M parameters (cross_attention_dim 1280→32" in err
    assert "872M parameters (no argument changed: no layer count above 2)" in err
    assert "Layers only holds more parameters than the full shrink because it keeps the widths" in err
    assert "block_out_channels=(320, 640, 1280, 1280)" in err and "--config" in err


def test_following_the_unet_hint_gives_a_clear_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "UNet2DConditionModel", "--config", '{"block_out_channels": [32, 64, 64, 64]}']) == 2
    err = capsys.readouterr().err
    assert "UNet2DConditionModel is not a denoising transformer" in err
    assert "the last block does not return the hidden state in the shape the first block received" in err


def test_docs_show_the_current_report_schema() -> None:
    import json
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "inspect.md").read_text()
    start = text.index("```json", text.index("### JSON schema")) + len("```json")
    shown = json.loads(text[start : text.index("```", start)])
    assert shown == InspectionReport.model_json_schema()
    assert {"warnings", "notes", "ambiguities"} <= set(shown["properties"])
