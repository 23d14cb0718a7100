"""Plots of evaluation results: the heatmap or perplexity curve of one run (``dpe-export eval --plot``).

matplotlib is imported by the functions (``pip install 'dpe-export[plot]'``). Which tasks draw a plot is their
Task's ``plots``; tasks with subtasks (RULER) and lm-eval print a table only.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

from dpe_export.errors import DPEExportError
from dpe_export.evaluation.registry import find_task, registered_tasks
from dpe_export.evaluation.results import and_list, lower_is_better
from dpe_export.output_files import write_output

MATPLOTLIB_HINT = "--plot needs matplotlib: pip install matplotlib (or: pip install 'dpe-export[plot]')"


def require_matplotlib() -> None:
    """DPEExportError with an install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DPEExportError(MATPLOTLIB_HINT) from None


def plot_refusal() -> str:
    """What --plot draws and what prints a table only, from the registered tasks."""
    drawn = and_list(t.name for t in registered_tasks() if t.plots)
    tables = and_list([t.pretty_name for t in registered_tasks() if not t.plots] + ["lm-eval"])
    return f"--plot draws {drawn} results; {tables} print a table"


def plot_result(result, path) -> Path:
    """Save a PNG: a depth x length accuracy heatmap, or (lower is better) perplexity against length."""
    task = find_task(result.task)
    if (task is not None and not task.plots) or any("subtask" in r for r in result.records):
        raise DPEExportError(plot_refusal())
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    title = f"{result.task} | {Path(str(result.model)).name} | {result.method}"
    lengths = sorted({r["length"] for r in result.records})
    if lower_is_better(result.task, result.records):
        ppl = {r["length"]: r["perplexity"] for r in result.records}
        fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.9 * len(lengths)), 3.5))
        ax.plot(range(len(lengths)), [ppl[n] for n in lengths], marker="o")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("perplexity")
        values = [v for v in ppl.values() if v and math.isfinite(v)]
        if values and max(values) / min(values) > 10:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    else:
        import numpy as np

        depths = sorted({r["depth"] for r in result.records})
        grid = np.full((len(depths), len(lengths)), np.nan)
        for r in result.records:
            grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
        fig, ax = plt.subplots(figsize=(max(4.0, 1.5 + 0.9 * len(lengths)), max(3.0, 1.2 + 0.45 * len(depths))))
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=120, format="png")
    plt.close(fig)
    return write_output(path, png.getvalue())
