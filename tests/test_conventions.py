"""One conventions module (issue 12, item 11): argument names and the text form of block metadata."""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

import pytest
import torch

import magsdk.conventions as conventions
from magsdk.cli import main
from magsdk.commands.scaffold import metadata_summary
from magsdk.config import BlockMetadata
from magsdk.conventions import LATENT_ARGUMENT_NAMES, TIMESTEP_ARGUMENT_NAMES, metadata_text
from magsdk.inspect import infer, inputs, trace
from magsdk.inspect.infer import summary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_one_timestep_list_holds_every_name_the_old_lists_had() -> None:
    old_runtime = ("timestep", "timesteps", "t", "sigma", "sigmas", "time_step", "noise_level")
    old_inputs = (*old_runtime, "time")
    assert set(old_runtime) | set(old_inputs) <= set(TIMESTEP_ARGUMENT_NAMES)
    assert TIMESTEP_ARGUMENT_NAMES[: len(old_runtime)] == old_runtime  # the runtime reads them in this order
    assert trace.TIMESTEP_NAMES is TIMESTEP_ARGUMENT_NAMES and inputs.TIMESTEP_NAMES is TIMESTEP_ARGUMENT_NAMES
    assert trace.LATENT_NAMES is LATENT_ARGUMENT_NAMES and inputs.HIDDEN_NAMES is LATENT_ARGUMENT_NAMES


def test_a_forward_whose_timestep_is_called_time_is_traced_with_it() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return hidden_states + self.proj(hidden_states)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, sample: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                sample = block(sample)
            return sample

    model = Model()
    recorded, _ = trace.trace_forward(model, (torch.randn(1, 3, 4), torch.tensor([0.5])), {})
    assert recorded.timestep_name == "time" and recorded.latent_name == "sample"
    _, kwargs = inputs.synthesize_inputs(model)
    assert kwargs["time"].shape == (1,)


def test_conventions_imports_only_the_standard_library_and_magsdk_config() -> None:
    tree = ast.parse(Path(conventions.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert imported - {"__future__"} <= {"magsdk.config"} | set(sys.stdlib_module_names), imported


METADATA = [
    BlockMetadata(encoder_hidden_states_argument_name="encoder_hidden_states", return_hidden_states_index=1,
                  return_encoder_hidden_states_index=0),
    BlockMetadata(hidden_states_argument_name="x", encoder_hidden_states_argument_name="context",
                  output_kind="tensor"),
    BlockMetadata(output_kind="dict", return_hidden_states_key="sample", return_encoder_hidden_states_key="context",
                  encoder_hidden_states_argument_name="encoder_hidden_states"),
    BlockMetadata(output_kind="dataclass", return_hidden_states_key="sample"),
    BlockMetadata(output_kind="tensor", fused_sequence_order="text_image", fuses_inputs=True,
                  encoder_hidden_states_argument_name="encoder_hidden_states"),
]


@pytest.mark.parametrize("index", range(len(METADATA)))
def test_metadata_text(index: int) -> None:
    expected = [
        "hidden_states → out[1], encoder_hidden_states → out[0] (tuple)",
        "x → out, context not returned (tensor)",
        "hidden_states → out['sample'], encoder_hidden_states → out['context'] (dict)",
        "hidden_states → out.sample (dataclass)",
        "hidden_states → out, encoder_hidden_states not returned (tensor); fused text_image; fuses its inputs",
    ]
    assert metadata_text(METADATA[index]) == expected[index]


def test_every_display_of_metadata_uses_the_one_function(capsys: pytest.CaptureFixture[str]) -> None:
    from magsdk.inspect import inspect_target
    from tools.zoo import _describe_metadata

    report = inspect_target("FluxTransformer2DModel")
    texts = [metadata_text(g.metadata) for g in report.block_groups]
    assert all(text in summary(report) for text in texts)  # the runtime's log line
    assert _describe_metadata(report) == [f"{g.path}: {t}" for g, t in zip(report.block_groups, texts, strict=True)]
    assert [metadata_summary(g.metadata) for g in report.block_groups] == texts  # scaffold's table
    assert main(["inspect", "FluxTransformer2DModel"]) == 0
    out = capsys.readouterr().out
    assert all(text in out for text in texts)  # inspect's table
    # no other module formats metadata on its own any more
    for module in (infer, inspect.getmodule(metadata_summary)):
        source = inspect.getsource(module)  # type: ignore[arg-type]
        assert "return_hidden_states_index}]" not in source
