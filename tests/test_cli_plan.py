"""`magsdk plan` / `magsdk list`: exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys

import magsdk
from magsdk.cli import main


def test_plan_prints_schedule_and_speedup(capsys):
    assert main(["plan", "--strategy", "flux", "--steps", "28", "--threshold", "0.06", "-k", "3",
                 "--retention-ratio", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "2.00x" in out and "CCCCCC.C.C...C...C...C..C.CC" in out
    # Without overrides the settings are the default variant's (flux.1-dev: the MagCache repo's 0.24/5/0.1).
    assert main(["plan", "--strategy", "flux", "--steps", "28"]) == 0
    out = capsys.readouterr().out
    assert "threshold=0.24, K=5, retention=0.1" in out and "3.50x" in out


def plan_json(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_json_and_overrides(capsys):
    """Flags other than the variant's defaults (flux.1-dev: 0.24/5/0.1) give the Python API's plan for them."""
    data = plan_json(capsys, "--strategy", "FluxTransformer2DModel", "--steps", "50", "--threshold", "0.06",
                     "-k", "3", "--retention-ratio", "0.2")
    strategy = magsdk.StrategyRegistry.require("FluxTransformer2DModel")
    overridden = magsdk.plan(None, strategy.default_config(50, threshold=0.06, max_skip_steps=3,
                                                           retention_ratio=0.2), 50)
    defaults = magsdk.plan(None, strategy.default_config(50), 50)
    (name, got), = data.items()
    assert name == "default" and got["num_steps"] == 50
    assert (got["threshold"], got["max_skip_steps"], got["retention_ratio"]) == (0.06, 3, 0.2)
    assert got["computed_steps"] == overridden.computed_steps
    assert overridden.computed_steps != defaults.computed_steps  # the flags changed the plan
    assert len(got["skipped_steps"]) > 0


def test_plan_from_ratio_list_and_file(tmp_path, capsys):
    # the generic defaults (threshold 0.06, K=3) with no retained steps: the error stays under the threshold,
    # so K=3 skips follow step 0 and step 4 computes
    assert main(["plan", "--ratios", "1,1.01,1.0,0.99,1.0,1.0", "--steps", "6", "--retention-ratio", "0"]) == 0
    out = capsys.readouterr().out
    assert "C...C." in out and "3.00x" in out
    listed = magsdk.plan([1, 1.01, 1.0, 0.99, 1.0, 1.0], magsdk.MagCacheConfig(retention_ratio=0.0), 6)
    assert listed.schedule_string() == "C...C."
    # two branches share one schedule, planned on the mean of their curves ([1, 1, 1.15, 1, 1, 1]: step 2 computes)
    curves = {"cond": [1.0] * 6, "uncond": [1.0, 1.0, 1.3, 1.0, 1.0, 1.0]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(curves))
    assert main(["plan", "--ratios", str(path), "--steps", "6", "--retention-ratio", "0"]) == 0
    assert "all (cond, uncond)" in capsys.readouterr().out
    data = plan_json(capsys, "--ratios", str(path), "--steps", "6", "--retention-ratio", "0")
    config = magsdk.MagCacheConfig(retention_ratio=0.0)
    assert list(data) == ["cond"]
    assert data["cond"]["computed_steps"] == magsdk.plan(curves, config, 6, "cond").computed_steps == [0, 2]
    assert magsdk.plan(curves["cond"], config, 6).computed_steps == [0, 4]  # not the cond curve's own plan


def test_usage_errors_exit_2_with_a_message(capsys):
    assert main(["plan", "--strategy", "nope"]) == 2
    assert "no MagCache strategy found for 'nope'" in capsys.readouterr().err
    assert main(["plan", "--ratios", "1,nan"]) == 2
    assert "nan" in capsys.readouterr().err
    assert main(["plan", "--strategy", "flux", "--steps", "0"]) == 2
    assert main(["plan", "--strategy", "flux", "--threshold", "-1"]) == 2
    assert "threshold" in capsys.readouterr().err
    assert main(["plan"]) == 2


def test_console_script_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "magsdk.cli", "plan", "--strategy", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "no MagCache strategy found" in proc.stderr


def test_list_shows_both_strategies(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "FluxTransformer2DModel" in out and "Flux2Transformer2DModel" in out and "strategies.flux2_klein" in out


def test_bad_settings_name_the_flag_and_the_value(capsys):
    cases = [
        (["--threshold", "-1"], "--threshold -1.0"),
        (["-k", "-2"], "--max-skip-steps/-k -2"),
        (["--retention-ratio", "1.5"], "--retention-ratio 1.5"),
        (["--steps", "1"], "--steps 1"),
    ]
    for extra, message in cases:
        assert main(["plan", "--strategy", "flux", *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_output_to_a_file_is_not_truncated(capsys):
    """Captured output is not a terminal: a 150-step schedule and every name stay whole, on one line."""
    assert main(["plan", "--strategy", "flux", "--steps", "150", "--threshold", "0.24"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "default" in line]
    assert len(rows) == 1 and len(rows[0].split("│")[5].strip()) == 150
    assert "MagCache plan: FluxStrategy flux.1-dev, 150 steps, threshold=0.24, K=5, retention=0.1" in out


def test_out_of_range_warning_gives_the_timesteps_and_the_calibrated_range(capsys):
    """docs/user-guide.md promises "one warning with the numbers": the run's timesteps beyond the calibrated ones
    and the calibrated range, the same numbers as the plan's own ``out_of_range`` and the calibration's schedule."""
    from magsdk.variants import resolve_name

    assert main(["plan", "--strategy", "flux", "--steps", "50"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert lines == [
        "warning: 1 of this run's 50 timesteps (60.5503) lies outside the calibrated range 104.721..1000 of the "
        "28-step calibration; the curve is held flat (ratio 1) there. A calibration at 50 steps covers them"
    ]
    outside = plan_json(capsys, "--strategy", "flux", "--steps", "50")["default"]["out_of_range"]
    cls, variant = resolve_name("flux")
    (entry,) = [e for e in cls.for_target(None, variant).calibration_entries() if e.num_steps == 28]
    assert entry.schedule is not None
    calibrated = entry.schedule.timesteps
    assert [f"{t:g}" for t in outside] == ["60.5503"]
    assert f"{min(calibrated):g}..{max(calibrated):g}" == "104.721..1000"
    # on the calibration's own schedule there is nothing to warn about
    assert main(["plan", "--strategy", "flux", "--steps", "28"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_a_ratios_value_shaped_like_a_path_is_a_file_that_was_not_found(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in ("nofile.json", "curves/nofile"):
        assert main(["plan", "--ratios", value]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert err == (
            f"error: --ratios {value}: no such file ({(tmp_path / value).resolve()} does not exist); give the path "
            "of a JSON file (a list, a dict branch -> list, or a saved calibration) or a comma-separated list such "
            "as 1.0,0.98,0.95"
        ), value
    assert main(["plan", "--ratios", "1,0.9,x"]) == 2
    assert " ".join(capsys.readouterr().err.split()) == (
        "error: --ratios '1,0.9,x' is neither a file nor a comma-separated list of numbers; give the path of a JSON "
        "file or numbers such as 1.0,0.98,0.95"
    )
    # the example the errors give works
    assert main(["plan", "--ratios", "1.0,0.98,0.95"]) == 0
    capsys.readouterr()
