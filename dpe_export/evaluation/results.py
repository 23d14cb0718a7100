"""The one results API: EvalResult (one run: its records; from_json / to_dict), the one aggregation and the tables
built on it (the CLI's table, ``overall`` in the JSON, the model card's comparison of runs), reading and writing
the eval JSON, and the number formats every table (CLI, card, RESULTS.md) uses (the plots: plots.py).

Records are merged in one place, :class:`Cell`: an accuracy is the sample-weighted mean of the records' accuracies
(one record: its own), a perplexity comes from the summed negative log-likelihood over the summed tokens where
the records carry ``nll`` (else the mean of their perplexities). Per length, :func:`summarize` gives the accuracy
over every sample, the perplexity, or, for a task with subtasks, the unweighted mean over them (as RULER
averages). Whether a task's scores are perplexities (lower is better) is its registered Task's
``lower_is_better``; the records of a task this dpe-export does not know are read by their shape.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from dpe_export.errors import DPEExportError
from dpe_export.evaluation.registry import find_task
from dpe_export.output_files import write_output

logger = logging.getLogger("dpe_export")

Run = tuple[str, str]  # (model, method)

# Characters that have no place in a one-line label (control characters, line and paragraph separators).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ufeff\ud800-\udfff]")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def lower_is_better(task: Optional[str], records: Iterable[dict[str, Any]] = ()) -> bool:
    """Whether ``task``'s scores are lower-is-better values (perplexities): its registered Task says; for a task
    this dpe-export does not know, records without any accuracy say so."""
    found = find_task(task)
    if found is not None:
        return found.lower_is_better
    return not any(_is_number(r.get("accuracy")) for r in records)


# ----------------------------------------------------------------------------------------------------------
# The one aggregation
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# The one aggregation
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """Records of one (run, task, length[, depth or subtask]) merged (see the module docstring)."""

    count: Any = 0  # samples of every record (perplexity windows too); a record without a count is one sample
    samples: Any = 0  # samples of the records with an accuracy
    correct: float = 0.0
    nll: float = 0.0
    nll_tokens: Any = 0  # tokens of the records with an nll
    tokens: Any = 0
    ppls: list = field(default_factory=list)
    has_perplexity: bool = False
    records: list = field(default_factory=list)

    def add(self, r: dict[str, Any]) -> "Cell":
        self.records.append(r)
        samples = r["samples"] if _is_number(r.get("samples")) and r["samples"] > 0 else 1
        self.count += samples
        if _is_number(r.get("accuracy")):
            self.samples += samples
            self.correct += float(r["accuracy"]) * samples
        self.has_perplexity = self.has_perplexity or "perplexity" in r
        if _is_number(r.get("tokens")):
            self.tokens += r["tokens"]
        if _is_number(r.get("perplexity")):
            if _is_number(r.get("nll")) and _is_number(r.get("tokens")) and r["tokens"] > 0:
                self.nll += float(r["nll"])
                self.nll_tokens += r["tokens"]
            else:
                self.ppls.append(float(r["perplexity"]))
        return self

    def accuracy(self) -> Optional[float]:
        if len(self.records) == 1 and _is_number(self.records[0].get("accuracy")):
            return self.records[0]["accuracy"]
        return self.correct / self.samples if self.samples else None

    def perplexity(self) -> Optional[float]:
        if self.nll_tokens:
            return math.exp(self.nll / self.nll_tokens)
        return sum(self.ppls) / len(self.ppls) if self.ppls else None


def _subtask(r: dict[str, Any]) -> str:
    return str(r.get("subtask") or "")


def cells(records: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> dict[Any, Cell]:
    """The records merged into one Cell per ``key(record)``, in first-seen order."""
    out: dict[Any, Cell] = {}
    for r in records:
        out.setdefault(key(r), Cell()).add(r)
    return out


def _is_metric_table(records: Sequence[dict[str, Any]]) -> bool:
    """lm-eval's records (any task through --harness): a value per (task, metric), no accuracy to merge."""
    return bool(records) and all("metric" in r and "value" in r for r in records)


def summarize(task: Optional[str], records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per length, in first-seen order: samples and accuracy over all of them, with the perplexity and tokens where
    the records have a perplexity (accuracy None when lower is better); with subtasks, the unweighted mean of the
    subtasks' accuracies and how many there are. Nothing for lm-eval's metric records, which do not add up."""
    if _is_metric_table(records):
        return []
    lower = lower_is_better(task, records)
    by_length: dict[Any, dict[str, Cell]] = {}
    for r in records:
        by_length.setdefault(r["length"], {}).setdefault(_subtask(r), Cell()).add(r)
    rows = []
    for n, subs in by_length.items():
        if any(subs):  # subtasks: the unweighted mean, as RULER averages
            accs = [c.accuracy() for c in subs.values()]
            rows.append({"length": n, "samples": sum(c.count for c in subs.values()),
                         "accuracy": None if None in accs else sum(accs) / len(accs), "subtasks": len(subs)})
            continue
        c = subs[""]
        row = {"length": n, "samples": c.count}
        if c.has_perplexity:
            row["perplexity"], row["tokens"] = c.perplexity(), c.tokens
        row["accuracy"] = None if lower else c.accuracy()
        rows.append(row)
    return rows


@dataclass
class EvalResult:
    """One evaluation run: settings and its records (one per length and depth, per length, or per subtask and
    length)."""

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
        over subtasks (RULER, as RULER averages); see :func:`summarize`."""
        return summarize(self.task, self.records)

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


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------


def format_table(result) -> str:
    """A plain-text table of one run: one row per (length, depth) and an `all` row per length (accuracies), one row
    per length with perplexity and token count (lower is better), a subtask x length table with the average
    (subtasks), or one row per (task, metric) (lm-eval). ``result``: an EvalResult."""
    task = result.task
    needles = next((r.get("needles") for r in result.records if r.get("needles")), None)
    if needles:
        task += f" ({needles} needles)"
    header = f"task {task}  |  model {result.model}  |  method {result.method}  |  seed {result.seed}"
    if result.settings.get("harness"):
        header += f"  |  {result.settings['harness']}, max_length {result.settings.get('max_length')}"
    if _is_metric_table(result.records):
        rows = _metric_rows(result.records)
    elif any("subtask" in r for r in result.records):
        rows = _subtask_rows(result)
    elif lower_is_better(result.task, result.records):
        rows = [("length", "samples", "tokens", "perplexity")]
        for n, c in cells(result.records, lambda r: r["length"]).items():
            rows.append((str(n), str(c.count), str(c.tokens), format_ppl(c.perplexity())))
    else:
        rows = _depth_rows(result)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [header]
    for k, row in enumerate(rows):
        lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _metric_rows(records) -> list[tuple[str, ...]]:
    rows = [("task", "metric", "value", "stderr", "samples")]
    for r in records:
        stderr = r.get("stderr")
        rows.append((r["subtask"], r["metric"], f"{r['value']:.4f}",
                     "-" if not isinstance(stderr, (int, float)) else f"{stderr:.4f}", str(r.get("samples") or "-")))
    return rows


def _subtask_rows(result) -> list[tuple[str, ...]]:
    by_cell = cells(result.records, lambda r: (_subtask(r), r["length"]))
    lengths = sorted({n for _, n in by_cell})
    rows = [("subtask", *map(str, lengths))]
    for s in dict.fromkeys(s for s, _ in by_cell):
        rows.append((s, *(format_accuracy(by_cell[(s, n)].accuracy()) + f" ({by_cell[(s, n)].count})"
                          if (s, n) in by_cell else "-" for n in lengths)))
    overall = {o["length"]: o for o in result.overall()}
    rows.append(("average", *(format_accuracy(overall[n]["accuracy"]) for n in lengths)))
    return rows


def _depth_rows(result) -> list[tuple[str, ...]]:
    rows = [("length", "depth", "accuracy", "samples")]
    overall = {o["length"]: o for o in result.overall()}
    by_length: dict[Any, dict[Any, Cell]] = {}
    for (n, depth), c in cells(result.records, lambda r: (r["length"], r["depth"])).items():
        by_length.setdefault(n, {})[depth] = c
    for n, by_depth in by_length.items():
        for depth in sorted(by_depth):
            c = by_depth[depth]
            rows.append((str(n), _depth(depth), format_accuracy(c.accuracy()), str(c.count)))
        rows.append((str(n), "all", format_accuracy(overall[n]["accuracy"]), str(overall[n]["samples"])))
    return rows


def comparison_tables(records: Sequence[dict[str, Any]],
                      arrange: Optional[Callable[[list[Run]], list[tuple[Run, str]]]] = None) -> list[dict[str, Any]]:
    """One table per task comparing runs (model, method), for the model card: a row per length (with subtasks, a
    row per subtask and length, then their average), a column per run, cells formatted (accuracy, or perplexity
    when lower is better; '–' where a run has no value). ``arrange(runs)`` orders the columns and labels them
    (default: as first seen, labelled by the model's name and the method). Same aggregation as every table."""
    tasks: dict[str, dict[Run, list[dict[str, Any]]]] = {}
    for r in records:
        run = (str(r.get("model") or "?"), str(r.get("method") or "none"))
        tasks.setdefault(str(r.get("task") or "eval"), {}).setdefault(run, []).append(r)
    arrange = arrange or (lambda runs: [(run, f"{Path(run[0]).name or run[0]} ({run[1]})") for run in runs])
    return [_comparison_table(task, runs, arrange(list(runs))) for task, runs in tasks.items()]


def _comparison_table(task: str, runs: dict[Run, list[dict[str, Any]]], order: list[tuple[Run, str]]) -> dict:
    lower = lower_is_better(task, [r for rs in runs.values() for r in rs])
    by_run = {run: cells(rs, lambda r: (int(r["length"]), _subtask(r))) for run, rs in runs.items()}
    keys = list(dict.fromkeys(k for c in by_run.values() for k in c))
    rows = []
    for n in sorted({n for n, _ in keys}):
        subs = [s for m, s in keys if m == n]
        for s in subs:
            values = [by_run[run][(n, s)] if (n, s) in by_run[run] else None for run, _ in order]
            values = [None if c is None else (c.perplexity() if lower else c.accuracy()) for c in values]
            rows.append({"length": f"{one_line(s)} @ {n:,}" if s else f"{n:,}",
                         "cells": ["–" if v is None else format_ppl(v, 3) if lower else format_accuracy(v)
                                   for v in values]})
        if any(subs):  # the unweighted mean over subtasks, as RULER reports it, where a run has every subtask
            average = []
            for run, _ in order:
                mean = next((o["accuracy"] for o in summarize(task, runs[run]) if o["length"] == n), None)
                whole = all((n, s) in by_run[run] for s in subs)
                average.append(format_accuracy(mean) if whole and mean is not None else "–")
            rows.append({"length": f"average @ {n:,}", "cells": average})
    return {
        "task": task,
        "metric": "perplexity (lower is better)" if lower else "accuracy",
        "columns": [label for _, label in order],
        "runs": [{"label": label, "model": m, "name": Path(m).name or m, "method": meth} for (m, meth), label in order],
        "rows": rows,
    }


def one_line(text: str, limit: int = 40) -> str:
    """``text`` as one line of at most ``limit`` characters (control characters and line breaks as spaces)."""
    return " ".join(_CONTROL.sub(" ", str(text)).split())[:limit]


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def eval_records(data: Any) -> list[dict[str, Any]]:
    """Records from an eval result object, a list of records, or a list of result objects (tolerant): each
    with its run's task, model and method."""
    out: list[dict[str, Any]] = []
    if isinstance(data, dict):
        head = {k: data[k] for k in ("task", "model", "method") if k in data}
        recs = data.get("records")
        if isinstance(recs, list):
            out.extend({**head, **r} for r in recs if isinstance(r, dict))
        elif "length" in data:
            out.append(data)
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, dict) and isinstance(item.get("records"), list):
                out.extend(eval_records(item))
            elif isinstance(item, dict):
                out.append(item)
    return [r for r in out if isinstance(r.get("length"), int) and not isinstance(r.get("length"), bool)]


def load_eval_records(paths: Iterable) -> list[dict[str, Any]]:
    """All records of the given eval JSON files (any shape :func:`eval_records` reads); DPEExportError when
    unusable."""
    records: list[dict[str, Any]] = []
    for path in paths:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DPEExportError(f"cannot read evaluation results {path}: {e}") from None
        found = eval_records(data)
        if not found:
            raise DPEExportError(f"{path} holds no evaluation records (expected the JSON of dpe-export eval --json)")
        records.extend(found)
    return records


def write_json(result, path) -> Path:
    """Write ``result.to_dict()`` to ``path`` (dpe_export.output_files: devices and pipes written through)."""
    return write_output(path, json.dumps(result.to_dict(), indent=2) + "\n")


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (pass-key accuracy over n independent prompts)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def sign_test(higher: int, lower: int) -> float:
    """Exact two-sided sign test: the p-value of `higher` wins against `lower` losses over paired prompts (ties
    dropped before counting)."""
    n, k = higher + lower, min(higher, lower)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired_sign_test(pairs: Iterable[tuple[float, float]]) -> tuple[int, int, float]:
    """Over (first, second) score pairs of the same prompts: how often the first is higher, lower, and the sign test's
    p-value."""
    pairs = list(pairs)
    higher = sum(a > b for a, b in pairs)
    lower = sum(a < b for a, b in pairs)
    return higher, lower, sign_test(higher, lower)


def format_p(p: float) -> str:
    """A p-value for a table: two decimals, three below 0.01, and "<0.001" below that (never a bare 0.00)."""
    return "<0.001" if p < 0.001 else f"{p:.3f}" if p < 0.01 else f"{p:.2f}"


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
