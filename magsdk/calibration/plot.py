"""``--plot``: the ratio curve of each branch with its spread band (mean ± std across runs)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from magsdk.config import CalibrationEntry, written_file_mode
from magsdk.errors import UsageError


def plot_calibration(entry: CalibrationEntry, path: Path, *, title: str = "") -> Path:
    """Write a PNG (matplotlib, Agg backend) atomically; no display is needed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib: pip install 'magsdk[plot]'") from exc
    figure, axis = plt.subplots(figsize=(7.0, 4.0), dpi=120)
    try:
        steps = list(range(entry.num_steps))
        for branch, curve in entry.branches.items():
            (line,) = axis.plot(steps, curve, marker="o", markersize=3, linewidth=1.5, label=branch)
            spread = entry.spread.get(branch)
            if spread:
                low = [c - s for c, s in zip(curve, spread, strict=True)]
                high = [c + s for c, s in zip(curve, spread, strict=True)]
                axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        axis.set_xlabel("step")
        axis.set_ylabel("norm ratio ‖r_t‖ / ‖r_t-1‖")
        runs = f"{entry.num_prompts or '-'} prompts x {entry.num_seeds or '-'} seeds"
        suffix = " (synthetic)" if entry.synthetic else ""
        axis.set_title(f"{title}\n{entry.num_steps} steps, {runs}, band = ±1 std{suffix}", fontsize=9)
        axis.legend(fontsize=8)
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
        os.close(fd)
        try:
            figure.savefig(tmp, format="png")
            os.chmod(tmp, written_file_mode(path))  # mkstemp makes the file private (0600)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    finally:
        plt.close(figure)
    return path

