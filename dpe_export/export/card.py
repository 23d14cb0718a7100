"""The model card (README.md) of an export, and the values and tables that go into it (its images are drawn by
dpe_export.calibration.plots, its evaluation tables built by dpe_export.evaluation.results).

The card is rendered from ``modeling_templates/model_card.md.jinja``. Every value that comes from the user or
from the base model's files (model and repo names, the base model id, its license, the run labels of evaluation
results) passes through one of the escaping filters below, so that no such value can break the YAML front
matter, the Markdown, or the Python snippet of the card. The generated modeling files never see these values:
their only template variables come from the architecture registry (``architectures.py``).

Calibration (optional; ``convert --calibration FILE``). A JSON object::

    {
      "groups": [[0, 8], [8, 16], ...],   # one [first, end) range of rotary frequencies per dimension group,
                                          # or the boundary list [0, 8, 16, ..., head_dim/2]
      "scales": [1, 2, 4, 8, 16, 32],     # the candidate scale factors tried (grid columns)
      "grid":   [[0.25, 0.5, ...], ...],  # one score per scale, one row per group (null: not measured)
      "chosen": [2, 8, ...],              # optional: the scale picked for each group
      "metric": "passkey accuracy",       # optional: what the scores are
      "higher_is_better": true,           # optional, default true
      "length": 32768, "window": 1024     # optional: the context length and window the grid was measured at
    }

It is drawn as a heatmap (``dpe_calibration.png``) and also written as a Markdown table.

Evaluation results (optional; ``convert --eval-json FILE``, repeatable, or the ``eval*.json`` files beside the
calibration file): the JSON that ``dpe-export eval --json`` writes (an object with a ``records`` list), a bare
list of records, or a list of such objects. A record is one (length, depth) cell of one run::

    {"task": "passkey", "model": "./llama", "method": "none", "length": 4096, "depth": 0.5,
     "accuracy": 0.9, "samples": 10}                       # retrieval tasks
    {"task": "ppl", "model": "./llama-dpe", "method": "none", "length": 4096, "perplexity": 7.1,
     "samples": 4, "tokens": 16380, "nll": 32140.2}        # perplexity

The records are read and tabled by dpe_export.evaluation.results (``load_eval_records``, ``comparison_tables``:
the aggregation every results table uses): one table per task, one row per length (per subtask and length, and
their average, for RULER) and one column per run; the card orders the runs, the base model's first, and labels
them.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from dpe_export import __version__
from dpe_export.calibration.plots import format_scale, plot_calibration, plot_selection
from dpe_export.calibration.procedures import PROCEDURES
from dpe_export.calibration.result import (
    load_calibration,
    normalize_calibration,
)
from dpe_export.calibration.selection import describe_selection
from dpe_export.errors import DPEExportError
from dpe_export.evaluation.results import comparison_tables, load_eval_records
from dpe_export.generated import (
    MODEL_CARD_FILE,
    model_card_template_path,
    render_template,
)
from dpe_export.modeling_templates import dpe_family, dpe_guards
from dpe_export.sources.checkpoint import Checkpoint

logger = logging.getLogger("dpe_export")


CALIBRATION_IMAGE = "dpe_calibration.png"


SELECTION_IMAGE = "dpe_selected_dims.png"


EVAL_FILE_GLOB = "eval*.json"


MATPLOTLIB_MISSING = (
    "matplotlib is not installed, so the model card has no images (pip install matplotlib, "
    "or: pip install 'dpe-export[plot]')"
)


# A Hub repo id (optionally namespaced): only such values become links (license ids: sources/checkpoint.py).
_HUB_ID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,95})(?:/[A-Za-z0-9](?:[A-Za-z0-9._-]{0,95}))?$")


# Characters YAML does not accept raw in a stream, or reads as line breaks (NEL, LS, PS), and the BOM;
# JSON leaves them unescaped with ensure_ascii=False. Lone surrogates cannot be encoded at all.
_YAML_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff\ud800-\udfff]")


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ufeff\ud800-\udfff]")


_MD_SPECIAL = re.compile(r"([\\`*_\[\]#|~$])")


def yaml_str(value: Any) -> str:
    """A double-quoted YAML scalar: JSON string syntax, which YAML reads, with every risky character escaped."""
    return _YAML_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(str(value), ensure_ascii=False))


def md_text(value: Any) -> str:
    """Inline Markdown text (also a table cell): one line, Markdown syntax backslash-escaped, no raw HTML."""
    text = " ".join(_CONTROL.sub(" ", str(value)).split())
    text = _MD_SPECIAL.sub(r"\\\1", text)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def py_str(value: Any) -> str:
    """A Python string literal that is safe inside a Markdown code fence (ASCII, no backticks, no HTML)."""
    text = json.dumps(str(value), ensure_ascii=True)
    return text.replace("`", "\\u0060").replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def hub_id_or_none(value: Optional[str]) -> Optional[str]:
    """`value` if it has the form of a Hub repo id (so it can be linked), else None."""
    return value if isinstance(value, str) and _HUB_ID.match(value) and ".." not in value else None


def effective_distance(window: int, scale: float, pretrain_length: int) -> int:
    """The largest query-key distance a group with `scale` sees within its pretraining range: w + s * (L - w).

    Beyond the window a distance d is seen as about w + (d - w) / s, which stays below the pretraining length L
    up to d = w + s * (L - w). With scale 1 this is L itself.
    """
    return int(window + scale * (pretrain_length - window))


def group_rows(params: dict[str, Any], head_dim: int, theta: Optional[float], selected=None) -> list[dict[str, Any]]:
    """One row per dimension group: frequencies, wavelengths, scale, effective distance, share selected."""
    b = params["dimension_groups_range"]
    w, pre, target = params["local_window_size"], params["pretrain_length"], params["target_length"]
    rows = []
    for g, scale in enumerate(params["scale_factors"]):
        first, last = b[g], b[g + 1] - 1
        eff = effective_distance(w, scale, pre)
        row = {
            "index": g,
            "first": first,
            "last": last,
            "scale": scale,
            "wavelengths": None,
            "effective": f"{eff:,}",
            "covers_target": target is not None and eff >= target,
            "selected": None,
        }
        if theta:
            wl = [2 * math.pi * float(theta) ** (2 * f / head_dim) for f in (first, last)]
            row["wavelengths"] = f"{format_tokens(wl[0])} – {format_tokens(wl[1])}"
        if selected is not None:
            part = selected[..., first : last + 1]
            row["selected"] = f"{100.0 * float(part.float().mean()):.0f}%"
        rows.append(row)
    return rows


def format_tokens(x: float) -> str:
    if x < 100:
        return f"{x:.1f}"
    if x < 1e7:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def calibration_table(calibration: dict[str, Any]) -> dict[str, Any]:
    """The grid as Markdown-ready rows: header scales, one row per group, the chosen cell in bold."""
    scales = calibration["scales"]
    rows = []
    for g, ((first, end), scores) in enumerate(zip(calibration["groups"], calibration["grid"])):
        chosen = calibration["chosen"][g] if calibration["chosen"] else None
        cells = []
        for s, v in zip(scales, scores):
            text = "–" if v is None else _fmt_score(v)
            cells.append(f"**{text}**" if chosen is not None and s == chosen else text)
        rows.append({"index": g, "first": first, "last": end - 1, "cells": cells})
    return {"scales": [format_scale(s) for s in scales], "rows": rows}


def calibration_procedure(calibration: dict[str, Any]) -> Optional[dict[str, str]]:
    """The registered procedure a calibration names (its title, summary and source), or None."""
    proc = PROCEDURES.get(calibration.get("procedure") or "")
    if proc is None:
        return None
    return {"name": proc.name, "title": proc.title, "summary": proc.summary, "reference": proc.reference}


def _fmt_score(v: float) -> str:
    return f"{v:.3g}"


@dataclass
class CardInputs:
    """What the card shows beyond the export itself: a calibration grid (calibrate's or a hand-made one), eval
    records, and the GGUF the base model came from. Read and checked before anything is written."""

    calibration: Optional[dict[str, Any]] = None
    eval_records: Optional[list[dict[str, Any]]] = None
    gguf: Optional[dict[str, Any]] = None

    @classmethod
    def from_files(cls, calibration_file: Optional[Path] = None, eval_files: Sequence = ()) -> "CardInputs":
        """From --calibration FILE and --eval-json FILE... (without the latter: the eval*.json beside the former)."""
        calibration = load_calibration(calibration_file) if calibration_file is not None else None
        files = list(eval_files)
        if not files and calibration_file is not None:
            files = find_eval_files(calibration_file)
        return cls(calibration, load_eval_records(files) if files else None)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CardInputs":
        return cls(data.get("calibration"), data.get("eval_records"), data.get("gguf"))

    def to_json(self) -> dict[str, Any]:
        """The keyword arguments export.convert.convert() takes for the card."""
        return {"calibration": self.calibration, "eval_records": self.eval_records, "gguf": self.gguf}


def find_eval_files(calibration_path) -> list[Path]:
    """The eval*.json files beside a calibration file, sorted by name."""
    parent = Path(calibration_path).parent
    return sorted(p for p in parent.glob(EVAL_FILE_GLOB) if p.is_file())


def eval_tables(records: Sequence[dict[str, Any]], base_dir=None, export_dir=None) -> list[dict[str, Any]]:
    """One table per task (:func:`dpe_export.evaluation.results.comparison_tables`): a column per run, the base
    model's runs first, then DPE's, rows lengths; cells formatted strings.

    `base_dir` / `export_dir` help tell the base model's runs from the export's (see run_kind).
    """
    return comparison_tables(records, lambda runs: _arrange_runs(runs, base_dir, export_dir))


def _arrange_runs(runs: Sequence[tuple[str, str]], base_dir, export_dir) -> list[tuple[tuple[str, str], str]]:
    """The runs ordered base, DPE, other (stable), each with its column label."""
    rank = {"base": 0, "dpe": 1, "other": 2}
    kinds = {run: run_kind(*run, base_dir=base_dir, export_dir=export_dir) for run in runs}
    order = sorted(runs, key=lambda run: rank[kinds[run]])
    return list(zip(order, _run_labels(order, [kinds[run] for run in order])))


def run_kind(model: str, method: str, base_dir=None, export_dir=None) -> str:
    """'base' for the base model as it is, 'dpe' for DPE (an export, or dpe:/self-extend on the fly), else 'other'.

    `base_dir` / `export_dir`: the base model's and the export's directories, when known.
    """
    if method.startswith(("dpe", "self-extend")):
        return "dpe"
    if method not in ("none", "", "base"):
        return "other"
    if export_dir is not None and _same_path(model, export_dir):
        return "dpe"
    if base_dir is not None and _same_path(model, base_dir):
        return "base"
    return "dpe" if _is_dpe_export(model) else "base"


def _same_path(a, b) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return False


def _is_dpe_export(model: str) -> bool:
    """What the run's model directory says (Checkpoint.is_export); a run read from an eval --json file may name a
    directory that is not on this machine, and then its name decides."""
    try:
        ckpt = Checkpoint(model)
        if ckpt.has_config:
            return ckpt.is_export
    except (OSError, ValueError, TypeError, DPEExportError):
        pass
    return "dpe" in Path(model).name.lower()


def _run_labels(runs: Sequence[tuple[str, str]], kinds: Sequence[str]) -> list[str]:
    """'base', 'DPE', or the method; the model's name is added where two runs would share a label."""
    short = []
    for (model, method), kind in zip(runs, kinds):
        short.append("base" if kind == "base" else "DPE" if method in ("none", "", "base") else method)
    labels = []
    for (model, _), label in zip(runs, short):
        if short.count(label) > 1:
            label = f"{label} ({Path(model).name or model})"
        labels.append(label)
    return labels


def render_images(out_dir: Path, params: dict[str, Any], calibration=None, selected=None) -> dict[str, str]:
    """Draw the calibration heatmap and the selected-dimension map into out_dir; {kind: file name}.

    Without matplotlib nothing is drawn and a warning says so (the card then has the tables only).
    """
    if calibration is None and selected is None:
        return {}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        logger.warning(MATPLOTLIB_MISSING)
        return {}
    images = {}
    if calibration is not None:
        plot_calibration(calibration, Path(out_dir) / CALIBRATION_IMAGE)
        images["calibration"] = CALIBRATION_IMAGE
    if selected is not None:
        plot_selection(selected, params["dimension_groups_range"], Path(out_dir) / SELECTION_IMAGE)
        images["selection"] = SELECTION_IMAGE
    return images


CARD_FILTERS = {"yaml": yaml_str, "md": md_text, "py": py_str}


def card_variables(
    info,
    params: dict[str, Any],
    selected=None,
    *,
    base_model: Optional[str],
    model_name: str,
    repo_id: Optional[str] = None,
    calibration: Optional[dict[str, Any]] = None,
    eval_records: Optional[Sequence[dict[str, Any]]] = None,
    images: Optional[dict[str, str]] = None,
    export_dir=None,
) -> dict[str, Any]:
    """The template variables of the card of an export of `info` (an export.ModelInfo) with `params`.

    `export_dir`: where the export will live (to recognise its evaluation runs).
    """

    config = info.config
    rope = dpe_family.rope_parameters_of(config)  # the full-attention layers' (per layer type where it differs)
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    tables = eval_tables(eval_records, info.model_dir, export_dir) if eval_records else []
    return {
        "model_name": repo_id or model_name,
        "repo_ref": repo_id,  # None: the snippet gets a placeholder that says what to put there
        "local_name": model_name,
        "base_model": base_model,
        "base_model_link": hub_id_or_none(base_model),
        "license": info.checkpoint.license,
        "license_files": info.checkpoint.license_files,
        "family": info.architecture.display_name,
        "dpe_causal_lm_class": info.architecture.dpe_causal_lm_class,
        "params": params,
        "groups": group_rows(params, 2 * info.num_freqs, theta, selected),
        "has_selection": selected is not None,
        "head_dim": info.head_dim,
        "rotary_dim": 2 * info.num_freqs,
        "num_layers": info.num_layers,
        "dpe_layers": dpe_family.full_attention_layers(config),
        "num_freqs": info.num_freqs,
        "selection": describe_selection(selected),
        "rope_type": rope.get("rope_type", "default") if isinstance(rope, dict) else "default",
        "calibration": calibration,
        "calibration_table": calibration_table(calibration) if calibration else None,
        "calibration_procedure": calibration_procedure(calibration) if calibration else None,
        "eval_tables": tables,
        "eval_runs": _unique_runs(tables),
        "images": images or {},
        "tool_version": __version__,
        "transformers_range": f">={dpe_guards.MIN_TRANSFORMERS_VERSION},<{dpe_guards.MAX_TRANSFORMERS_VERSION}",
    }


def _unique_runs(tables: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for t in tables:
        for r in t["runs"]:
            key = (r["label"], r["model"], r["method"])
            if key not in seen:
                seen.add(key)
                out.append(r)
    return out


def write_model_card(
    info,
    params,
    selected,
    out_dir: Path,
    *,
    base_model: Optional[str],
    model_name: str,
    repo_id: Optional[str] = None,
    calibration: Optional[dict[str, Any]] = None,
    eval_records: Optional[Sequence[dict[str, Any]]] = None,
    export_dir=None,
    gguf: Optional[dict[str, Any]] = None,
) -> str:
    """Write README.md (and its images) into out_dir; return the card text.

    `params` is a DPEParams (or its dict); `calibration` a dict of the documented shape (checked here against the
    model); `eval_records` records as dpe_export.evaluation.results.eval_records() returns them.
    """

    params = params.to_dict() if hasattr(params, "to_dict") else dict(params)
    if calibration is not None:
        try:
            calibration = normalize_calibration(calibration, info.num_freqs)
        except ValueError as e:
            raise DPEExportError(f"invalid calibration: {e}") from None
    images = render_images(out_dir, params, calibration, selected)
    variables = card_variables(
        info, params, selected, base_model=base_model, model_name=model_name, repo_id=repo_id,
        calibration=calibration, eval_records=eval_records, images=images, export_dir=export_dir,
    )
    variables["gguf"] = gguf
    text = render_template(model_card_template_path(), variables, CARD_FILTERS)
    (Path(out_dir) / MODEL_CARD_FILE).write_text(text, encoding="utf-8")
    return text

