"""Reporting evaluation results: a text table, a JSON file, a heatmap (matplotlib, optional)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from dpe_export.errors import DPEExportError

__all__ = ["format_table", "write_json", "require_matplotlib", "plot_result", "MATPLOTLIB_HINT"]

MATPLOTLIB_HINT = "--plot needs matplotlib: pip install matplotlib (or: pip install 'dpe-export[plot]')"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _depth(d: Optional[float]) -> str:
    return "-" if d is None else f"{d:.2f}"


def _ppl(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if x < 1e4 and math.isfinite(x) else f"{x:.3e}"


def format_table(result) -> str:
    """A plain-text table: one row per (length, depth) and an `all` row per length (retrieval tasks), or
    one row per length with perplexity and token count (ppl). ``result``: an evaluate.EvalResult."""
    task = result.task
    needles = next((r.get("needles") for r in result.records if r.get("needles")), None)
    if needles:
        task += f" ({needles} needles)"
    header = f"task {task}  |  model {result.model}  |  method {result.method}  |  seed {result.seed}"
    lines = [header]
    if result.task == "ppl":
        rows = [("length", "samples", "tokens", "perplexity")]
        for r in result.records:
            rows.append((str(r["length"]), str(r["samples"]), str(r["tokens"]), _ppl(r["perplexity"])))
    else:
        rows = [("length", "depth", "accuracy", "samples")]
        overall = {o["length"]: o for o in result.overall()}
        by_length: dict[int, list[dict[str, Any]]] = {}
        for r in result.records:
            by_length.setdefault(r["length"], []).append(r)
        for length, recs in by_length.items():
            for r in sorted(recs, key=lambda r: r["depth"]):
                rows.append((str(length), _depth(r["depth"]), _pct(r["accuracy"]), str(r["samples"])))
            o = overall[length]
            rows.append((str(length), "all", _pct(o["accuracy"]), str(o["samples"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(result, path) -> Path:
    """Write ``result.to_dict()`` to ``path`` (parent directories created), via a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def require_matplotlib() -> None:
    """DPEExportError with an install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DPEExportError(MATPLOTLIB_HINT) from None


def plot_result(result, path) -> Path:
    """Save a PNG: a depth x length accuracy heatmap (retrieval), or perplexity against length (ppl)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    title = f"{result.task} | {Path(str(result.model)).name} | {result.method}"
    lengths = sorted({r["length"] for r in result.records})
    if result.task == "ppl":
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
