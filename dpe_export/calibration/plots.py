"""Plots of a calibration's results: the scale grid (calibration.json) and the top-K frequency selection.

matplotlib is imported by the functions (the plot extra); the model card draws these into an export
(dpe_export.export.card.render_images). PNG metadata carries no version string: the same inputs give the same
bytes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from dpe_export.evaluation.results import one_line

_PNG_METADATA = {"Software": None}  # no version string: the same inputs give the same bytes


def format_scale(v: float) -> str:
    """A scale factor as a label: 8 for 8.0, 1.5 for 1.5."""
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def plot_calibration(calibration: dict[str, Any], path: Path) -> None:
    """The calibration grid as a heatmap (one row per group, one column per scale), the chosen cells framed; a
    normalized calibration (calibration.result.normalize_calibration)."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    grid = np.array([[np.nan if v is None else v for v in row] for row in calibration["grid"]], dtype=float)
    scales, groups = calibration["scales"], calibration["groups"]
    fig, ax = plt.subplots(figsize=(2.5 + 0.7 * len(scales), 2.0 + 0.45 * len(groups)), dpi=100)
    cmap = "viridis" if calibration["higher_is_better"] else "viridis_r"
    im = ax.imshow(grid, cmap=cmap, aspect="auto")
    finite = grid[np.isfinite(grid)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for g in range(grid.shape[0]):
        for s in range(grid.shape[1]):
            v = grid[g, s]
            if np.isfinite(v):
                good = (v > mid) == calibration["higher_is_better"]
                ax.text(s, g, f"{v:.2g}", ha="center", va="center", fontsize=8, color="black" if good else "white")
    if calibration["chosen"]:
        for g, c in enumerate(calibration["chosen"]):
            if c in scales:
                s = scales.index(c)
                ax.add_patch(Rectangle((s - 0.5, g - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(scales)), [format_scale(s) for s in scales])
    ax.set_yticks(range(len(groups)), [f"g{g}: {a}–{b - 1}" for g, (a, b) in enumerate(groups)])
    ax.set_xlabel("scale factor")
    ax.set_ylabel("group: frequencies")
    metric = one_line(calibration["metric"], 60)
    title = f"Calibration: {metric}"
    if calibration["length"]:
        title += f" at {calibration['length']:,} tokens"
    ax.set_title(title, fontsize=9, usetex=False, parse_math=False)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, metadata=_PNG_METADATA)
    plt.close(fig)


def plot_selection(selected, boundaries: Sequence[int], path: Path) -> None:
    """Which frequencies DPE applies to per (layer, head) (a bool tensor [layers, heads, freqs]) and the share
    selected per frequency, with the group boundaries."""
    import matplotlib.pyplot as plt

    mask = selected.to("cpu").bool()
    layers, heads, freqs = mask.shape
    flat = mask.reshape(layers * heads, freqs).float().numpy()
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(7, 3.0 + min(6.0, 0.02 * layers * heads)), dpi=100,
        gridspec_kw={"height_ratios": [3, 1]}, sharex=True,
    )
    top.imshow(flat, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1)
    for b in boundaries[1:-1]:
        top.axvline(b - 0.5, color="tab:red", linewidth=0.8)
        bottom.axvline(b - 0.5, color="tab:red", linewidth=0.8)
    if layers <= 64:
        for layer in range(1, layers):
            top.axhline(layer * heads - 0.5, color="tab:blue", linewidth=0.4)
    step = max(1, layers // 16)
    ticks = range(0, layers, step)
    top.set_yticks([layer * heads + (heads - 1) / 2 for layer in ticks], [str(layer) for layer in ticks])
    top.set_ylabel("layer (rows: heads)")
    top.set_title("Frequencies with DPE per (layer, head) (black: selected)", fontsize=9)
    bottom.bar(range(freqs), mask.float().mean(dim=(0, 1)).numpy(), color="black", width=0.9)
    bottom.set_ylim(0, 1)
    bottom.set_ylabel("share")
    bottom.set_xlabel("rotary frequency index (group boundaries in red)")
    fig.tight_layout()
    fig.savefig(path, metadata=_PNG_METADATA)
    plt.close(fig)
