"""``magsdk inspect`` on the command line: targets, --json / --out, --inputs, and bad input with exit codes."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from cli_toys import TOY_TRANSFORMER, isolated_cli_logging  # noqa: F401  (autouse fixture)
from diffusers import FluxPipeline  # noqa: F401  (imports transformers now, so its log handler is not bound to a test's capture)
from diffusers_features import needs_flux2

# Building a target small and synthesizing inputs are another module's job; these tests need them (a plain import:
# if either is missing or broken, the tests fail instead of skipping).
import magsdk.inspect.inputs
import magsdk.inspect.shrink  # noqa: F401
from magsdk.cli import main
from magsdk.config import InspectionReport

MODULE = TOY_TRANSFORMER + textwrap.dedent(
    '''


    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, hidden_states, timestep):
            return self.b(self.a(hidden_states))


    class Broken(ToyTransformer):
        def forward(self, hidden_states, timestep):
            raise ValueError("Broken needs a mask argument")


    class NotAModule:
        pass


    def make_inputs(model):
        return (), {"hidden_states": torch.randn(1, 9, model.proj_in.in_features), "timestep": torch.tensor([0.5])}


    def make_kwargs():
        return {"hidden_states": torch.randn(1, 9, 4), "timestep": torch.tensor([0.5])}


    def bad_inputs():
        return [1, 2, 3]
    '''
)


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    path = tmp_path / "toy_model.py"
    path.write_text(MODULE)
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["inspect", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_diffusers_class_json_is_an_inspection_report(capsys):
    code, out, err = run_cli(capsys, "FluxTransformer2DModel", "--json")
    assert code == 0, err
    report = InspectionReport.model_validate_json(out)
    assert [g.path for g in report.block_groups] == ["transformer_blocks", "single_transformer_blocks"]
    assert report.block_groups[0].metadata.return_hidden_states_index == 1
    assert report.inputs == "synthesized" and report.shrunk["num_layers"] == [19, 2]
    assert report.seconds is not None and report.seconds > 0


@needs_flux2
def test_table_on_the_terminal_and_out_file(capsys, tmp_path):
    target = tmp_path / "out" / "flux2.json"
    code, out, err = run_cli(capsys, "Flux2Transformer2DModel", "--out", str(target))
    assert code == 0, err
    assert "single_transformer_blocks" in out and "head block: transformer_blocks.0" in out
    assert "text_image" in out and f"wrote {target}" in out
    report = InspectionReport.model_validate_json(target.read_text())
    single = report.metadata_by_class()["Flux2SingleTransformerBlock"]
    assert single.fused_sequence_order == "text_image" and single.output_kind == "tensor"


def test_python_file_target_with_inputs_function(capsys, toy):
    code, out, err = run_cli(capsys, f"{toy}:ToyTransformer", "--inputs", f"{toy}:make_inputs", "--json")
    assert code == 0, err
    report = InspectionReport.model_validate_json(out)
    assert report.transformer == "ToyTransformer" and report.inputs == "user"
    assert [(g.path, g.block_class, g.count) for g in report.block_groups] == [("stack", "Block", 2)]
    meta = report.block_groups[0].metadata
    assert (meta.hidden_states_argument_name, meta.output_kind) == ("x", "tensor")
    assert (report.head, report.tail) == ("stack.0", "stack.1")


def test_inputs_function_without_model_argument_returning_kwargs(capsys, toy):
    code, out, err = run_cli(capsys, f"{toy}:ToyTransformer", "--inputs", f"{toy}:make_kwargs", "--json")
    assert code == 0, err
    assert InspectionReport.model_validate_json(out).block_groups[0].metadata.hidden_states_argument_name == "x"


def test_model_folder_and_pipeline_folder(capsys, tmp_path):
    from tiny_models import tiny_flux

    tiny_flux().save_config(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]})
    )
    for folder in (tmp_path / "pipe" / "transformer", tmp_path / "pipe"):
        code, out, err = run_cli(capsys, str(folder), "--json", "--config", '{"num_single_layers": 3}')
        assert code == 0, err
        report = InspectionReport.model_validate_json(out)
        assert report.transformer == "FluxTransformer2DModel"
        assert [g.count for g in report.block_groups] == [2, 2]  # the folder's 2 layers; 3 single shrunk to 2


@pytest.mark.parametrize(
    ("target", "needle"),
    [
        ("NoSuchTransformer2DModel", "has no class named 'NoSuchTransformer2DModel'"),
        ("FluxTransformer2DModle", "Did you mean FluxTransformer2DModel"),
        ("no_such_package.models:Thing", "cannot import module 'no_such_package.models'"),
        ("FlowMatchEulerDiscreteScheduler", "not a torch.nn.Module subclass"),
        ("FluxPipeline", "inspect its transformer class instead"),
    ],
)
def test_bad_targets_are_usage_errors(capsys, target, needle):
    code, out, err = run_cli(capsys, target)
    assert code == 2
    assert needle in err and "Traceback" not in err + out


def test_bad_targets_in_a_file(capsys, toy, tmp_path):
    cases = [
        (f"{toy}:NotAModule", "not a torch.nn.Module subclass"),
        (f"{toy}:Missing", "defines no 'Missing'"),
        (f"{tmp_path / 'absent.py'}:Model", "no such file"),
        (f"{toy}:NoBlocks", "holds no list of repeated blocks"),
    ]
    for target, needle in cases:
        code, out, err = run_cli(capsys, target)
        assert code == 2, (target, err)
        assert needle in err and "Traceback" not in err + out


def test_hub_id_offline_fails_fast_and_suggests_a_local_folder(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(capsys, "some-org/some-transformer")
    assert code == 2
    assert "Hub" in err and "local" in err and "magsdk inspect some-transformer/transformer" in err


def test_forward_that_raises_with_synthesized_inputs(capsys, toy):
    code, out, err = run_cli(capsys, f"{toy}:Broken")
    assert code == 1
    assert "ValueError: Broken needs a mask argument" in err and "synthesized inputs" in err
    assert "--inputs FILE.py:FUNC" in err and "def make_inputs(model)" in err
    assert "Traceback" not in err + out


def test_forward_that_raises_with_given_inputs_and_debug_shows_the_traceback(capsys, toy):
    code, _, err = run_cli(capsys, f"{toy}:Broken", "--inputs", f"{toy}:make_inputs")
    assert code == 1 and "with the user inputs" in err
    # --debug adds the traceback and keeps the exit code.
    assert main(["--debug", "inspect", f"{toy}:Broken", "--inputs", f"{toy}:make_inputs"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ForwardFailedError" in err


@pytest.mark.parametrize(
    ("inputs", "needle"),
    [
        ("{toy}:bad_inputs", "must return (args, kwargs)"),
        ("{toy}:absent_function", "has no function 'absent_function'"),
        ("{tmp}/missing.py:make_inputs", "no such file"),
        ("make_inputs", "expected FILE.py:FUNC"),
    ],
)
def test_bad_inputs_option_is_a_usage_error(capsys, toy, tmp_path, inputs, needle):
    spec = inputs.format(toy=toy, tmp=tmp_path)
    code, _, err = run_cli(capsys, f"{toy}:ToyTransformer", "--inputs", spec)
    assert code == 2 and needle in err, err


def test_bad_config_option_is_a_usage_error(capsys):
    code, _, err = run_cli(capsys, "FluxTransformer2DModel", "--config", "{num_layers: 2")
    assert code == 2 and "--config is not valid JSON" in err
    code, _, err = run_cli(capsys, "FluxTransformer2DModel", "--config", "[1, 2]")
    assert code == 2 and "must be a JSON object" in err


def test_a_hub_id_is_read_from_the_local_cache(capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """inspect.md: an ``org/name`` target is looked up in the local Hugging Face cache first. It never was
    (``ModelMixin.load_config`` does not exist; the error was taken for "not cached")."""
    import shutil

    import huggingface_hub.constants

    from magsdk.reference import reference_model_path

    snapshot = tmp_path / "hub" / "models--myorg--digits" / "snapshots" / "abc123"
    (snapshot / "transformer").mkdir(parents=True)
    shutil.copy(Path(reference_model_path()) / "transformer" / "config.json", snapshot / "transformer")
    (tmp_path / "hub" / "models--myorg--digits" / "refs").mkdir()
    (tmp_path / "hub" / "models--myorg--digits" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, out, err = run_cli(capsys, "myorg/digits", "--json")
    assert code == 0, err
    report = InspectionReport.model_validate_json(out)
    assert report.transformer == "FluxTransformer2DModel" and len(report.block_groups) == 2
    code, out, err = run_cli(capsys, "myorg/absent")  # not cached, offline: what to download, and the command after
    assert code == 2 and out == ""
    assert "hf download myorg/absent transformer/config.json --local-dir absent" in err
    assert "magsdk inspect absent/transformer" in err


def test_a_config_file_that_does_not_exist_is_named(capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to say "--config is not valid JSON (Expecting value ...)" about a file name."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "FluxTransformer2DModel", "--config", "nofile.json")
    assert (code, out) == (2, "")
    assert f"--config 'nofile.json': no such file ({tmp_path.resolve() / 'nofile.json'} does not exist)" in err


def test_an_out_path_that_cannot_be_written_is_named(capsys, tmp_path: Path) -> None:
    """It was ``FileNotFoundError`` about the temporary file beside it, exit 1."""
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    code, _, err = run_cli(capsys, "FluxTransformer2DModel", "--out", str(blocked / "report.json"))
    assert code == 2  # the table was printed; the report file is what could not be written
    assert f"cannot write {blocked / 'report.json'}:" in err and "choose a path in a folder you can write to" in err
    assert ".tmp" not in err
