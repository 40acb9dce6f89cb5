"""`magsdk scaffold --inputs`: the generated test inspects the model again with the same inputs function.

A transformer whose forward takes ``context`` cannot be inspected on synthesized inputs; scaffold is
given ``--inputs`` (and a ``--driver`` for the sampling loop), as docs/adapting-a-new-model.md
("Forward arguments magsdk cannot guess") says, and the test module it writes must pass as written,
run from another working directory.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_toys import TOY_TRANSFORMER, isolated_cli_logging  # noqa: F401  (autouse fixture)

from magsdk.cli import main
from magsdk.codegen import read_calibrations

TESTS = Path(__file__).resolve().parent

INPUTS = textwrap.dedent(
    '''
    import torch


    def make_inputs(model):
        args = ()
        kwargs = {
            "latents": torch.randn(1, 16, 4),
            "context": torch.randn(1, 6, 8),
            "timestep": torch.tensor([0.5]),
        }
        return args, kwargs
    '''
)

DRIVER = textwrap.dedent(
    '''
    import torch


    def generate(transformer, steps, seed):
        """A flow-matching Euler loop over the user's own latents and context."""
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn(1, 16, 4, generator=generator)
        context = torch.randn(1, 6, 8, generator=generator)
        with torch.no_grad():
            for i in range(steps):
                sigma = 1.0 - i / steps
                latents = latents - (1.0 / steps) * transformer(latents, context, torch.full((1,), sigma))
    '''
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """my_model.py (forward(latents, context, timestep)), my_inputs.py and my_loop.py, as a user writes them."""
    (tmp_path / "my_model.py").write_text((TESTS / "bare_model.py").read_text().replace("BareNet", "MyTransformer"))
    (tmp_path / "my_inputs.py").write_text(INPUTS)
    (tmp_path / "my_loop.py").write_text(DRIVER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAGSDK_SKIP_MYPY", "1")  # the generated test is what is checked here
    return tmp_path


@pytest.mark.parametrize("inputs", ["my_inputs.py:make_inputs", "my_inputs:make_inputs"])
def test_the_generated_test_of_a_model_scaffolded_with_inputs_passes(
    workdir: Path, inputs: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = "my_model.py:MyTransformer"
    # Without --inputs the forward's `context` cannot be made up: scaffold says so and writes nothing.
    assert main(["scaffold", "--model", model, "--driver", "my_loop.py:generate", "--steps", "4"]) == 2
    assert "'context'" in capsys.readouterr().err and not (workdir / "strategies").exists()

    assert main(["scaffold", "--model", model, "--inputs", inputs, "--driver", "my_loop.py:generate",
                 "--steps", "4"]) == 0
    module, test = workdir / "strategies" / "my.py", workdir / "strategies" / "tests" / "test_my.py"
    (entry,) = read_calibrations(module.read_text())
    assert entry["num_steps"] == 4 and entry["synthetic"] is False and entry["num_seeds"] == 2

    elsewhere = workdir / "elsewhere"  # the test finds the model and the inputs from its own folder
    elsewhere.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
        capture_output=True, text=True, timeout=300, cwd=elsewhere,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout, done.stdout
    assert f'INPUTS = "{inputs}"' in test.read_text()


def test_the_generated_test_of_a_model_without_inputs_is_unchanged(workdir: Path) -> None:
    """A model inspected on synthesized inputs gets no INPUTS, and its test inspects without them."""
    (workdir / "toy_model.py").write_text(TOY_TRANSFORMER)
    assert main(["scaffold", "--model", "toy_model.py:ToyTransformer", "--name", "toy", "--steps", "3"]) == 0
    text = (workdir / "strategies" / "tests" / "test_toy.py").read_text()
    assert "INPUTS" not in text and "inspect_target(_inspection_target())\n" in text
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "strategies/tests/test_toy.py"],
        capture_output=True, text=True, timeout=300, cwd=workdir,
    )
    assert done.returncode == 0 and "3 passed" in done.stdout, done.stdout + done.stderr
