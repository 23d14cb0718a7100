"""The one results API: EvalResult (one run: a record per length and depth; from_json / to_dict), aggregation,
the CLI's table, the JSON file, the heatmap, and the number formats every table (CLI, card, RESULTS.md) uses.
"""
from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from dpe_export.errors import DPEExportError
from dpe_export.output_files import write_output

logger = logging.getLogger("dpe_export")


@dataclass
class EvalResult:
    """One evaluation run: settings and one record per (length, depth)."""

    task: str
    model: str
    method: str
    seed: int
    records: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    details: list[dict[str, Any]] = field(default_factory=list)

    def full_records(self) -> list[dict[str, Any]]:
        """The records with task, model, method and seed in each."""
        head = {"task": self.task, "model": self.model, "method": self.method, "seed": self.seed}
        return [{**head, **r} for r in self.records]

    def overall(self) -> list[dict[str, Any]]:
        """Per length: accuracy over all its samples (retrieval), the perplexity (ppl), or the unweighted mean
        over subtasks (RULER, as RULER averages)."""
        if self.task == "lm-eval":
            return []
        if any("subtask" in r for r in self.records):
            by_length: dict[int, list[dict[str, Any]]] = {}
            for r in self.records:
                by_length.setdefault(r["length"], []).append(r)
            return [{"length": n, "samples": sum(r["samples"] for r in rs),
                     "accuracy": sum(r["accuracy"] for r in rs) / len(rs), "subtasks": len(rs)}
                    for n, rs in by_length.items()]
        out: dict[int, dict[str, Any]] = {}
        for r in self.records:
            o = out.setdefault(r["length"], {"length": r["length"], "samples": 0, "_correct": 0.0})
            o["samples"] += r["samples"]
            if r.get("accuracy") is not None:
                o["_correct"] += r["accuracy"] * r["samples"]
            if "perplexity" in r:
                o["perplexity"], o["tokens"] = r["perplexity"], r["tokens"]
        rows = []
        for o in out.values():
            correct = o.pop("_correct")
            o["accuracy"] = None if self.task == "ppl" else correct / o["samples"]
            rows.append(o)
        return rows

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EvalResult":
        """An EvalResult from what to_dict() wrote (eval --json)."""
        records = [{k: v for k, v in r.items() if k not in ("task", "model", "method", "seed")} for r in d["records"]]
        return cls(d["task"], d["model"], d["method"], d["seed"], records, d.get("settings", {}), d.get("details", []))

    def accuracy_at(self, length: int) -> Optional[float]:
        """Accuracy over every sample of one length (None when there is none)."""
        return next((o["accuracy"] for o in self.overall() if o["length"] == length), None)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "model": self.model, "method": self.method, "seed": self.seed,
                "settings": self.settings, "records": self.full_records(), "overall": self.overall(),
                "details": self.details}


MATPLOTLIB_HINT = "--plot needs matplotlib: pip install matplotlib (or: pip install 'dpe-export[plot]')"


def format_accuracy(x: Optional[float], decimals: int = 1, sign: bool = True) -> str:
    """0.925 -> '92.5%' (None -> '-'): how every table of dpe-export shows an accuracy."""
    return "-" if x is None else f"{100 * x:.{decimals}f}" + ("%" if sign else "")


def and_list(items) -> str:
    """'a', 'b', 'c' -> 'a, b and c' (for messages that name tasks)."""
    items = [str(i) for i in items]
    return " and ".join(filter(None, [", ".join(items[:-1]), items[-1]])) if items else ""


def _depth(d: Optional[float]) -> str:
    return "-" if d is None else f"{d:.2f}"


def format_ppl(x: Optional[float], digits: int = 4) -> str:
    """A perplexity with `digits` significant digits (exponent form from 10^4; None -> '-'): every table's."""
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if x < 1e4 and math.isfinite(x) else f"{x:.3e}"


@dataclass
class Cell:
    """Records of one (run, task, length) merged: accuracy over all samples, perplexity over all tokens."""

    samples: float = 0.0
    correct: float = 0.0
    nll: float = 0.0
    tokens: float = 0.0
    ppls: list = field(default_factory=list)

    def accuracy(self) -> Optional[float]:
        return self.correct / self.samples if self.samples else None

    def perplexity(self) -> Optional[float]:
        if self.tokens:
            return math.exp(self.nll / self.tokens)
        return sum(self.ppls) / len(self.ppls) if self.ppls else None


def format_table(result) -> str:
    """A plain-text table: one row per (length, depth) and an `all` row per length (retrieval tasks), or
    one row per length with perplexity and token count (ppl). ``result``: an evaluate.EvalResult."""
    task = result.task
    needles = next((r.get("needles") for r in result.records if r.get("needles")), None)
    if needles:
        task += f" ({needles} needles)"
    header = f"task {task}  |  model {result.model}  |  method {result.method}  |  seed {result.seed}"
    if result.settings.get("harness"):
        header += f"  |  {result.settings['harness']}, max_length {result.settings.get('max_length')}"
    lines = [header]
    if result.task == "lm-eval":
        rows = [("task", "metric", "value", "stderr", "samples")]
        for r in result.records:
            stderr = r.get("stderr")
            rows.append((r["subtask"], r["metric"], f"{r['value']:.4f}",
                         "-" if not isinstance(stderr, (int, float)) else f"{stderr:.4f}", str(r.get("samples") or "-")))
    elif any("subtask" in r for r in result.records):
        lengths = sorted({r["length"] for r in result.records})
        cells = {(r["subtask"], r["length"]): r for r in result.records}
        subtasks = list(dict.fromkeys(r["subtask"] for r in result.records))
        rows = [("subtask", *map(str, lengths))]
        for s in subtasks:
            rows.append((s, *(format_accuracy(cells[(s, n)]["accuracy"]) + f" ({cells[(s, n)]['samples']})"
                              if (s, n) in cells else "-" for n in lengths)))
        overall = {o["length"]: o for o in result.overall()}
        rows.append(("average", *(format_accuracy(overall[n]["accuracy"]) for n in lengths)))
    elif result.task == "ppl":
        rows = [("length", "samples", "tokens", "perplexity")]
        for r in result.records:
            rows.append((str(r["length"]), str(r["samples"]), str(r["tokens"]), format_ppl(r["perplexity"])))
    else:
        rows = [("length", "depth", "accuracy", "samples")]
        overall = {o["length"]: o for o in result.overall()}
        by_length: dict[int, list[dict[str, Any]]] = {}
        for r in result.records:
            by_length.setdefault(r["length"], []).append(r)
        for length, recs in by_length.items():
            for r in sorted(recs, key=lambda r: r["depth"]):
                rows.append((str(length), _depth(r["depth"]), format_accuracy(r["accuracy"]), str(r["samples"])))
            o = overall[length]
            rows.append((str(length), "all", format_accuracy(o["accuracy"]), str(o["samples"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(result, path) -> Path:
    """Write ``result.to_dict()`` to ``path`` (dpe_export.output_files: devices and pipes written through)."""
    return write_output(path, json.dumps(result.to_dict(), indent=2) + "\n")


def require_matplotlib() -> None:
    """DPEExportError with an install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DPEExportError(MATPLOTLIB_HINT) from None


def plot_result(result, path) -> Path:
    """Save a PNG: a depth x length accuracy heatmap (retrieval), or perplexity against length (ppl)."""
    if any("subtask" in r for r in result.records):
        raise DPEExportError("--plot draws pass-key, NIAH and perplexity results; RULER and lm-eval print a table")
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
    png = io.BytesIO()
    fig.savefig(png, dpi=120, format="png")
    plt.close(fig)
    return write_output(path, png.getvalue())


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (pass-key accuracy over n independent prompts)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def bootstrap_interval(scores: Sequence[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of a mean over samples, each a score in [0, 1] (NIAH: the fraction of one
    context's needles found; its needles are not independent, so the context is the unit resampled)."""
    import random

    scores = list(scores)
    if not scores:
        return 0.0, 1.0
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(scores) for _ in scores) / len(scores) for _ in range(reps))
    return means[int(0.025 * reps)], means[int(0.975 * reps) - 1]
