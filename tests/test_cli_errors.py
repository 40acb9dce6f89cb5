"""Bad input on the command line: exit code 2, an error that names the option, the value and what to do,
and a hint that works when followed."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import stat
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


# 8 ----------------------------------------------------------------------------------------------------
ODD = TOY.replace("class ToyTransformer", "class OddTransformer").replace(
    "def forward(self, hidden_states, timestep):", "def forward(self, hidden_states, timestep, frobnicator):")

ODD_INPUTS = textwrap.dedent(
    '''
    import torch


    def make_inputs(model):
        x = torch.randn(1, 9, model.proj_in.in_features)
        return (), {"hidden_states": x, "timestep": torch.tensor([0.5]), "frobnicator": torch.zeros(1)}
    '''
)


def test_inspect_inputs_hint_repeats_the_target_as_typed(workdir: Path, capsys) -> None:
    """The hint is the user's own command with --inputs added (a file.py:Class target is no diffusers class name)."""
    from magsdk.inspect import inspect_target
    from magsdk.inspect.inputs import InputSynthesisError

    (workdir / "odd_model.py").write_text(ODD)
    code, out, err = run(capsys, "inspect", "odd_model.py:OddTransformer", "--json")
    assert (code, out) == (2, "")
    assert err.startswith("error: cannot synthesize the 'frobnicator' argument of OddTransformer.forward: its name "
                          "does not say what it holds.")
    hint = err.rsplit("then run the command again with the option added: ", 1)[1]
    assert hint == "magsdk inspect odd_model.py:OddTransformer --json --inputs my_inputs.py:make_inputs"
    (workdir / "my_inputs.py").write_text(ODD_INPUTS)
    code, out, err = run(capsys, *shlex.split(hint)[1:])
    assert code == 0, err
    assert json.loads(out)["transformer"] == "OddTransformer"
    # from Python, the hint names the target as it was given too
    with pytest.raises(InputSynthesisError) as caught:
        inspect_target("odd_model.py:OddTransformer")
    assert str(caught.value).endswith("magsdk inspect odd_model.py:OddTransformer --inputs my_inputs.py:make_inputs")


# 9 ----------------------------------------------------------------------------------------------------
def test_a_missing_local_model_path_is_named_before_it_is_taken_for_a_hub_id(workdir: Path, capsys) -> None:
    """``./nope`` is shaped like ``org/name``; it was loaded as a Hub id (HFValidationError, exit 1)."""
    strategy = workdir / "my_strategy.py"
    strategy.write_text((Path(__file__).parents[1] / "strategies" / "flux.py").read_text())
    before = strategy.read_bytes()
    missing = (workdir / "nope").resolve()
    expected = (f"error: --model './nope': no such file or folder ({missing} does not exist); give a diffusers "
                "pipeline folder (model_index.json), a transformer folder (config.json), a class name or file.py:Class")
    assert run(capsys, "calibrate", str(strategy), "--model", "./nope") == (2, "", expected)
    assert strategy.read_bytes() == before
    code, out, err = run(capsys, "scaffold", "--model", "./nope", "--out", "out")
    assert (code, out, err) == (2, "", expected)
    code, out, err = run(capsys, "demo", "--model", "./nope", "--out", "demo-out")
    assert (code, out) == (2, "") and err.endswith(
        f"error: --model './nope': no such folder ({missing} does not exist); `magsdk demo` generates images with "
        "a whole diffusers pipeline, so it needs a pipeline folder (with model_index.json), or leave --model out for "
        "the bundled digits pipeline")
    assert not (workdir / "out").exists() and not (workdir / "demo-out").exists()


# 10 ---------------------------------------------------------------------------------------------------
def _hinted(err: str, before: str) -> list[str]:
    """The command a hint gives after ``before``, as arguments of ``main``."""
    return shlex.split(err.split(before, 1)[1].split("`", 1)[0])[1:]


def test_offline_hub_id_hints_fit_the_command(workdir: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """scaffold / calibrate need the pipeline's weights (a config-only folder gives a synthetic curve), demo a
    local pipeline folder; each says how to download it, and the commands they give work once it is here."""
    from magsdk.reference import reference_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as a machine without network sees the Hub
    monkeypatch.setenv("MAGSDK_SKIP_MYPY", "1")
    repo, local = "some-org/Digits-Pipeline", "Digits-Pipeline"
    (workdir / "one.txt").write_text("a handwritten digit 3\n")
    here = (workdir / repo).resolve()
    code, out, err = run(capsys, "scaffold", "--model", repo, "--steps", "2", "--prompts", "one.txt", "--out", "out")
    assert (code, out) == (2, "")
    assert err.endswith(  # after what transformers may log on import
        f"error: --model '{repo}' looks like a Hugging Face Hub id (there is no local folder {here}), but the "
        "pipeline is not in the local Hugging Face cache and the Hub cannot be reached (offline?). `magsdk scaffold` "
        "calibrates on the pipeline's own generations, so it needs the whole pipeline with its weights: on a machine "
        f"with network run `hf download {repo} --local-dir {local}` (huggingface_hub < 0.34: `huggingface-cli "
        "download` with the same arguments; log in first with `hf auth login` for a gated model), bring the folder "
        f"here and run `magsdk scaffold --model {local} --steps 2 --prompts one.txt --out out`. A folder with only "
        f"the transformer's config (`hf download {repo} transformer/config.json --local-dir {local}`, then `magsdk "
        f"scaffold --model {local}/transformer --steps 2 --prompts one.txt --out out`) gives a synthetic calibration: "
        "random weights on synthesized inputs, a curve of the architecture, not of the trained model"
    )
    assert "magsdk inspect" not in err and not (workdir / "out").exists()
    # the config-only folder: a synthetic curve, as the hint says
    (workdir / local / "transformer").mkdir(parents=True)
    shutil.copy(reference_model_path() / "transformer" / "config.json", workdir / local / "transformer")
    code, out, err = run(capsys, *_hinted(err, "then `"))
    assert code == 0, err
    assert "this curve is synthetic" in " ".join(out.split())
    # the whole pipeline: calibrated on its generations
    shutil.rmtree(workdir / local)
    shutil.copytree(reference_model_path(), workdir / local)
    code, out, err = run(capsys, "scaffold", "--model", repo, "--steps", "2", "--prompts", "one.txt", "--out", "real")
    code, out, err = run(capsys, *_hinted(err, "bring the folder here and run `"))
    assert code == 0, err
    assert "synthetic" not in out and "wrote real/digits_pipeline.py" in " ".join(out.split())
    # calibrate names itself, and its strategy file is left as it was
    module = (workdir / "real" / "digits_pipeline.py").read_bytes()
    code, out, err = run(capsys, "calibrate", "real/digits_pipeline.py", "-m", repo, "--steps", "3")
    assert (code, out) == (2, "")
    assert "`magsdk calibrate` calibrates on the pipeline's own generations" in err
    assert "run `magsdk calibrate real/digits_pipeline.py -m Digits-Pipeline --steps 3`" in err
    assert (workdir / "real" / "digits_pipeline.py").read_bytes() == module
    # demo never downloads: a local pipeline folder, not "a bare transformer"
    code, out, err = run(capsys, "demo", "--model", repo, "--steps", "2", "--rounds", "1", "--prompts", "one.txt",
                         "--out", "demo-out")
    assert (code, out) == (2, "")
    assert err.endswith(
        f"error: --model '{repo}' looks like a Hugging Face Hub id, but `magsdk demo` runs on a local pipeline folder "
        f"only (it does not download, and there is no folder {here}): on a machine with network run `hf download "
        f"{repo} --local-dir {local}` (huggingface_hub < 0.34: `huggingface-cli download` with the same arguments; "
        "log in first with `hf auth login` for a gated model), bring the folder here and run `magsdk demo --model "
        f"{local} --steps 2 --rounds 1 --prompts one.txt --out demo-out`"
    )
    assert "bare transformer" not in err and not (workdir / "demo-out").exists()
    code, out, err = run(capsys, *_hinted(err, "bring the folder here and run `"))
    assert code == 0, err
    # a transformer folder is what demo sends to scaffold
    code, out, err = run(capsys, "demo", "--model", f"{local}/transformer")
    assert (code, out) == (2, "") and err.endswith(
        f"error: --model '{local}/transformer' is a transformer folder (config.json, no model_index.json); `magsdk "
        "demo` generates images with a whole diffusers pipeline, so it needs a pipeline folder (with "
        f"model_index.json). To calibrate this transformer alone, use `magsdk scaffold --model {local}/transformer`")


# 11 ---------------------------------------------------------------------------------------------------
COMMANDS = ("inspect", "scaffold", "calibrate", "plan", "list", "export", "demo")


def _synopses() -> dict[str, str]:
    """Each command's synopsis in docs/cli.md (the code block under its heading)."""
    text = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    found: dict[str, str] = {}
    for block in re.findall(r"```\n(magsdk .*?)```", text, flags=re.S):
        command = block.split()[1]
        if command in COMMANDS and (command not in found or block.startswith(f"magsdk {command} --from-cache")):
            found[command] = found.get(command, "") + " " + " ".join(block.split())  # the synopsis, not an example
    return found


def test_help_reads_like_docs_cli_md(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command is listed; values are named as docs/cli.md names them (--out DIR, not <path>), flags get no
    label, and arguments are TARGET / STRATEGY_FILE, not typer's {target}."""
    monkeypatch.setenv("COLUMNS", "300")  # one row per option
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "MagCache for any diffusion transformer: inspect, scaffold, calibrate, plan, list, export, demo." in out
    listed = [line.split()[1] for line in out.splitlines() if len(line.split()) > 1 and line.split()[1] in COMMANDS]
    assert listed == list(COMMANDS)
    synopses = _synopses()
    assert sorted(synopses) == sorted(COMMANDS)
    for command in COMMANDS:
        assert main([command, "--help"]) == 0, command
        out = capsys.readouterr().out
        assert not re.search(r"<(bool|str|int|float|path|list)", out) and "{" not in out, (command, out)
        words = synopses[command].replace("[", " ").replace("]", " ").replace("(", " ").replace(")", " ").split()
        pairs = [(flag, value) for flag, value in itertools.pairwise(words)
                 if flag.startswith("-") and not value.startswith("-") and value not in ("|", "...")]
        for flag, value in pairs:
            row = rf"(?<!\S){re.escape(flag)}(?!\S).*(?<!\S){re.escape(value)}(?!\S)"
            assert any(re.search(row, line) for line in out.splitlines()), (command, flag, value)
    assert main(["inspect", "--help"]) == 0
    assert "Usage: magsdk inspect [OPTIONS] TARGET" in capsys.readouterr().out
    assert main(["calibrate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage: magsdk calibrate [OPTIONS] STRATEGY_FILE" in out
    # the --call-arg example is the one docs/cli.md gives (a JSON empty string)
    assert "--call-arg negative_prompt='\"\"'" in " ".join(out.split())
    assert "--call-arg negative_prompt='\"\"'" in (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    assert run(capsys, "inspect") == (2, "", "Usage: magsdk inspect [OPTIONS] TARGET Try 'magsdk inspect --help' "
                                             "for help. Error: Missing argument 'TARGET'.")


# 12 ---------------------------------------------------------------------------------------------------
def test_plot_png_gets_the_usual_file_mode(workdir: Path, capsys) -> None:
    """mkstemp makes a private (0600) file; the PNG gets 0666 & ~umask, like the module and the JSON files."""
    old = os.umask(0o027)
    try:
        code, _, err = run(capsys, "scaffold", "--model", "toy_model.py:ToyTransformer", "--inputs",
                             "cli_errors_inputs.py:kw_only", "--steps", "3", "--out", "out", "--no-test",
                             "--plot", "curve.png")
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE((workdir / "curve.png").stat().st_mode) == 0o640
    assert stat.S_IMODE((workdir / "out" / "toy.py").stat().st_mode) == 0o640
