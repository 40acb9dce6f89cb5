"""Bad input on the command line: exit code 2, an error that names the option, the value and what to do,
and a hint that works when followed."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from cli_toys import TOY_TRANSFORMER, isolated_cli_logging  # noqa: F401  (autouse fixture)
from pydantic import ValidationError

from magsdk import MagCacheConfig
from magsdk.cli import main

TOY = TOY_TRANSFORMER

INPUTS = textwrap.dedent(
    '''
    import torch


    def kw_only(model):
        return (), {"hidden_states": torch.randn(1, 9, model.proj_in.in_features), "timestep": torch.tensor([0.5])}
    '''
)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())  # rich may wrap a long error


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding a toy transformer and an inputs module, which (as for the ``magsdk``
    console script) is not on ``sys.path``."""
    (tmp_path / "toy_model.py").write_text(TOY)
    (tmp_path / "cli_errors_inputs.py").write_text(INPUTS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    return tmp_path


# 1 ----------------------------------------------------------------------------------------------------
def test_inputs_module_name_is_found_in_the_working_directory(workdir: Path, capsys) -> None:
    code, out, err = run(capsys, "inspect", "toy_model.py:ToyTransformer", "--inputs", "cli_errors_inputs:kw_only")
    assert code == 0, err
    assert "traced one forward with user inputs" in out


def test_inputs_module_that_does_not_import_says_to_give_the_file_path(workdir: Path, capsys) -> None:
    (workdir / "sub").mkdir()
    (workdir / "cli_errors_inputs.py").rename(workdir / "sub" / "elsewhere_inputs.py")
    code, out, err = run(capsys, "inspect", "toy_model.py:ToyTransformer", "--inputs", "elsewhere_inputs:kw_only")
    assert code == 2 and out == ""
    assert "no module 'elsewhere_inputs'" in err and str(workdir) in err
    assert "--inputs path/to/elsewhere_inputs.py:kw_only" in err
    # the hint, followed with the file's real path, works
    code, out, err = run(capsys, "inspect", "toy_model.py:ToyTransformer",
                         "--inputs", "sub/elsewhere_inputs.py:kw_only")
    assert code == 0, err


# 2 ----------------------------------------------------------------------------------------------------
def test_export_names_the_flag_the_value_and_the_range(capsys) -> None:
    code, out, err = run(capsys, "export", "--strategy", "flux.1-dev", "--steps", "20", "--threshold", "-2")
    assert code == 2 and out == ""
    assert "--threshold -2.0: Input should be greater than or equal to 0" in err
    code, out, err = run(capsys, "export", "--strategy", "flux.1-dev", "--steps", "20", "--retention-ratio", "1.5")
    assert code == 2 and out == ""
    assert "--retention-ratio 1.5: Input should be less than 1 (accepted: --retention-ratio >= 0 and < 1)" in err
    # plan words it the same way (one check for both)
    assert run(capsys, "plan", "--strategy", "flux", "--threshold", "-2")[2] == (
        "error: --threshold -2.0: Input should be greater than or equal to 0")


# 3 ----------------------------------------------------------------------------------------------------
def test_export_refuses_fewer_than_two_steps_like_scaffold_demo_and_plan(capsys, tmp_path: Path) -> None:
    expected = "error: --steps must be at least 2 (a ratio curve needs two steps), got 1"
    code, out, err = run(capsys, "export", "--strategy", "flux.1-dev", "--steps", "1")
    assert (code, out, err) == (2, "", expected)
    for command in (["demo", "--out", str(tmp_path / "demo")],
                    ["scaffold", "--model", "FluxTransformer2DModel", "--out", str(tmp_path / "scaffold")]):
        code, out, err = run(capsys, *command, "--steps", "1")
        assert (code, out) == (2, "") and err.endswith(expected), command  # after what transformers may log
    assert not (tmp_path / "demo").exists() and not (tmp_path / "scaffold").exists()
    code, out, err = run(capsys, "plan", "--strategy", "flux", "--steps", "1")
    assert (code, out) == (2, "") and "--steps 1: a plan needs at least 2 steps" in err
    assert not (tmp_path / "demo").exists()


# 4 ----------------------------------------------------------------------------------------------------
def test_setting_errors_keep_the_case_of_the_message(capsys) -> None:
    code, _, err = run(capsys, "plan", "--strategy", "flux", "--speedup", "0.5")
    assert code == 2
    # the config's own wording, spoken in flags (the hint is one the command line takes)
    assert err.startswith("error: --speedup 0.5 is not a finite number >= 1; it is N / (steps computed)")
    assert "use --compute-steps B for an exact count" in err and "value error" not in err.lower()
    assert "speedup=" not in err and "compute_steps" not in err
    code, _, err = run(capsys, "plan", "--strategy", "flux", "--speedup", "2", "--compute-steps", "5")
    assert (code, err) == (2, "error: --compute-steps 5 and --speedup 2 both set a budget; give only one of them")


def test_a_setting_that_is_not_a_number_says_so(capsys) -> None:
    """NaN fails every comparison, so a range message ("should be >= 0") would blame the wrong thing."""
    for flag in ("--threshold", "--retention-ratio"):
        code, out, err = run(capsys, "plan", "--strategy", "flux", flag, "nan")
        assert (code, out, err) == (2, "", f"error: {flag} nan: Input should be a finite number")
    with pytest.raises(ValidationError, match="finite number"):
        MagCacheConfig(threshold=float("nan"))


# 5 ----------------------------------------------------------------------------------------------------
def test_calibrate_reports_where_python_puts_the_syntax_error(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f(:\n    pass\n")
    code, out, err = run(capsys, "calibrate", str(bad), "--model", "FluxTransformer2DModel")
    assert code == 2 and out == ""
    assert "bad.py is not valid Python (line 1, column 7, both counted from 1): invalid syntax in `def f(:`" in err
    assert "error at" not in err and "line 2" not in err
    assert bad.read_text() == "def f(:\n    pass\n"


# 6 ----------------------------------------------------------------------------------------------------
def test_a_value_that_does_not_convert_is_named(capsys) -> None:
    code, out, err = run(capsys, "plan", "--strategy", "flux", "--steps", "abc")
    assert code == 2 and out == ""
    assert "Invalid value for '--steps' / '-n'" in err and "got 'abc'" in err
    code, _, err = run(capsys, "export", "--strategy", "flux.1-dev", "--threshold", "high")
    assert code == 2 and "Invalid value for '--threshold'" in err and "got 'high'" in err


# 7 ----------------------------------------------------------------------------------------------------
def test_unknown_config_keys_are_an_error_naming_them_and_the_accepted_ones(workdir: Path, capsys) -> None:
    code, out, err = run(capsys, "inspect", "FluxTransformer2DModel", "--config", '{"no_such_arg": 1}')
    assert code == 2 and out == ""
    assert "--config gives 'no_such_arg', which FluxTransformer2DModel.__init__ does not take" in err
    assert "FluxTransformer2DModel.__init__ takes: patch_size, in_channels," in err and "num_layers" in err
    code, out, err = run(capsys, "inspect", "toy_model.py:ToyTransformer", "--config", '{"num_layer": 2, "zzz": 1}')
    assert code == 2 and out == ""
    assert "'num_layer', 'zzz'" in err and "did you mean 'num_layer' → 'num_layers'?" in err
    assert "takes: in_channels, dim, num_layers" in err
    # the keys it takes still work; "_"-keys (a config.json's _class_name) are metadata, not arguments
    code, out, err = run(capsys, "inspect", "toy_model.py:ToyTransformer", "--config",
                         '{"num_layers": 2, "dim": 8, "_class_name": "ToyTransformer"}')
    assert code == 0, err
    assert "2 cached blocks" in out
