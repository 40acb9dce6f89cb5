"""`magsdk plan` / `magsdk list`: exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_plan_json_and_overrides(capsys):
    assert main(["plan", "--strategy", "FluxTransformer2DModel", "--steps", "50", "--threshold", "0.24",
                 "-k", "5", "--retention-ratio", "0.1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["default"]["num_steps"] == 50 and len(data["default"]["skipped_steps"]) > 25


def test_plan_from_ratio_list_and_file(tmp_path, capsys):
    assert main(["plan", "--ratios", "1,1.01,1.0,0.99,1.0,1.0", "--steps", "6", "--retention-ratio", "0"]) == 0
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"cond": [1.0, 1.0, 1.0], "uncond": [1.0, 1.5, 1.5]}))
    assert main(["plan", "--ratios", str(path), "--steps", "3", "--retention-ratio", "0"]) == 0
    out = capsys.readouterr().out
    assert "cond" in out and "uncond" in out


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
                          capture_output=True, text=True)
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
