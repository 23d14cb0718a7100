"""calibration.json: what `dpe-export calibrate` writes, as the typed `Calibration` convert reads (from_json /
to_json), its checks against the model it was made on, and the top-K selection stored beside it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dpe_export.calibration import selection
from dpe_export.errors import DPEExportError
from dpe_export.output_files import write_output
from dpe_export.safefiles import safe_file

logger = logging.getLogger(__name__)


logger = logging.getLogger("dpe_export")


CALIBRATION_SCHEMA_VERSION = 1


CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class Calibration:
    """A calibration.json that `dpe-export calibrate` wrote: the settings convert takes from it, validated, and the
    whole record (grid, cells, timings) for the model card."""

    window: int
    target_length: int
    pretrain_length: int
    dimension_groups_range: tuple[int, ...]
    chosen: tuple[int, ...]  # the scale factor chosen for each group
    top_k: Optional[int]
    dim_scores: Optional[str]  # the scores file beside it, with top_k
    data: dict = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any, model_dir=None) -> "Calibration":
        """Validate a parsed calibration.json (and, with `model_dir`, that it was made on that model)."""
        if not isinstance(data, dict):
            raise DPEExportError("a calibration file must hold a JSON object")
        check_calibration_for(data, model_dir)
        return cls(window=data["window"], target_length=data["target_length"],
                   pretrain_length=data["pretrain_length"],
                   dimension_groups_range=tuple(data["dimension_groups_range"]), chosen=tuple(data["chosen"]),
                   top_k=data["top_k"], dim_scores=data["dim_scores"], data=data)

    def to_json(self) -> dict:
        return self.data

    def selection(self, calibration_dir: Path):
        """The top-K mask it used, read from the scores file beside it (None when it scaled every frequency)."""
        return selection_from(self.data, calibration_dir)


def read_calibration(path: Path, model_dir=None) -> Optional[Calibration]:
    """The Calibration in file `path` (checked against `model_dir`), or None for a hand-made grid (a JSON object
    without schema_version: shown in the card, never used for settings)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DPEExportError(f"cannot read calibration file {path}: {e}") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        return None
    return Calibration.from_json(data, model_dir if model_dir and Path(model_dir, "config.json").is_file() else None)


def check_calibration_for(calibration: dict, model_dir) -> None:
    """Refuse a calibration that `dpe-export calibrate` did not write, or (with `model_dir`) one made on another
    model, naming the mismatch."""
    if calibration.get("schema_version") != CALIBRATION_SCHEMA_VERSION:
        raise DPEExportError(f"unsupported calibration schema version {calibration.get('schema_version')!r}")
    def is_int(x, low=1):
        return isinstance(x, int) and not isinstance(x, bool) and x >= low

    checks = {
        "chosen": lambda v: isinstance(v, list) and v and all(is_int(x) for x in v),
        "dimension_groups_range": lambda v: isinstance(v, list) and len(v) >= 2 and all(is_int(x, 0) for x in v),
        "window": is_int, "target_length": is_int, "pretrain_length": is_int,
        "top_k": lambda v: v is None or is_int(v),
        "dim_scores": lambda v: v is None or (isinstance(v, str) and Path(v).name == v and v not in (".", "..")),
    }
    for key, ok in checks.items():
        if key not in calibration or not ok(calibration[key]):
            shown = repr(calibration.get(key))[:80] if key in calibration else "missing"
            raise DPEExportError(f"the calibration's {key!r} is {shown}; this is not a calibration.json that "
                                 "`dpe-export calibrate` wrote (run it again)")
    base = calibration.get("base_model") or {}
    if model_dir is not None and base.get("config_sha256") != config_hash(model_dir):
        raise DPEExportError(
            f"the calibration was made for {base.get('path')!r}, whose config.json differs from {model_dir}'s "
            "(config sha256 mismatch); calibrate this model instead")


def write_json_atomic(path: Path, data: Any) -> None:
    write_output(path, json.dumps(data, indent=2) + "\n")


def selection_from(calibration: dict, calibration_dir: Path):
    """The top-K mask a calibration used (None when it scaled every frequency)."""
    if not calibration.get("top_k"):
        return None
    from safetensors.torch import load_file


    name = calibration.get("dim_scores") or DIM_SCORES_FILE
    if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
        raise DPEExportError(f"the calibration names its scores file {name!r}; it must be a file name beside it")
    path = safe_file(calibration_dir, name)
    if path is None:
        raise DPEExportError(f"the calibration used top-{calibration['top_k']} dimensions, but "
                             f"{Path(calibration_dir) / name} is missing")
    return selection.top_k_mask(load_file(str(path))[selection.SCORES_TENSOR], int(calibration["top_k"]))


def load_calibration(path) -> dict[str, Any]:
    """Read and check a calibration JSON file (shape in the module docstring); DPEExportError when invalid."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DPEExportError(f"cannot read calibration file {path}: {e}") from None
    try:
        return normalize_calibration(data)
    except ValueError as e:
        raise DPEExportError(f"calibration file {path}: {e}") from None


def normalize_calibration(data: Any, num_freqs: Optional[int] = None) -> dict[str, Any]:
    """Check a calibration dict and return it with groups as [first, end) pairs; ValueError with the reason."""
    if not isinstance(data, dict):
        raise ValueError("must be a JSON object with groups, scales and grid")
    groups, scales, grid = data.get("groups"), data.get("scales"), data.get("grid")
    if not isinstance(groups, list) or not groups:
        raise ValueError("'groups' must be a non-empty list")
    if all(_is_int(x) for x in groups):  # boundary list
        if len(groups) < 2 or any(a >= b for a, b in zip(groups, groups[1:])):
            raise ValueError("'groups' as boundaries must be at least two strictly increasing integers")
        pairs = [[int(a), int(b)] for a, b in zip(groups, groups[1:])]
    elif all(isinstance(p, list) and len(p) == 2 and all(_is_int(x) for x in p) and p[0] < p[1] for p in groups):
        pairs = [[int(p[0]), int(p[1])] for p in groups]
    else:
        raise ValueError("'groups' must be [first, end) pairs or a list of boundaries")
    if num_freqs is not None and pairs[-1][1] > num_freqs:
        raise ValueError(f"'groups' go up to frequency {pairs[-1][1]}, but the model has {num_freqs}")
    if not isinstance(scales, list) or not scales or not all(_is_number(s) and s > 0 for s in scales):
        raise ValueError("'scales' must be a non-empty list of positive numbers")
    if not isinstance(grid, list) or len(grid) != len(pairs):
        raise ValueError(f"'grid' must have one row per group ({len(pairs)})")
    rows = []
    for i, row in enumerate(grid):
        if not isinstance(row, list) or len(row) != len(scales):
            raise ValueError(f"'grid' row {i} must have one score per scale ({len(scales)})")
        if not all(x is None or _is_number(x) for x in row):
            raise ValueError(f"'grid' row {i} must hold numbers (or null)")
        rows.append([None if x is None or not math.isfinite(float(x)) else float(x) for x in row])
    chosen = data.get("chosen")
    if chosen is not None:
        if not isinstance(chosen, list) or len(chosen) != len(pairs) or not all(_is_number(c) for c in chosen):
            raise ValueError(f"'chosen' must be one number per group ({len(pairs)})")
    metric = data.get("metric", "score")
    out = {
        "groups": pairs,
        "scales": [_num(s) for s in scales],
        "grid": rows,
        "chosen": [_num(c) for c in chosen] if chosen is not None else None,
        "metric": str(metric) if metric is not None else "score",
        "higher_is_better": bool(data.get("higher_is_better", True)),
        "length": int(data["length"]) if _is_int(data.get("length")) else None,
        "window": int(data["window"]) if _is_int(data.get("window")) else None,
        # a name only: the card shows the registered procedure's own words for it, never the file's
        "procedure": data["procedure"] if isinstance(data.get("procedure"), str) else None,
    }
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _num(x: Any):
    return int(x) if float(x).is_integer() else float(x)


DIM_SCORES_FILE = "dim_scores.safetensors"


def config_hash(model_dir: Path) -> str:
    """sha256 of the base model's config.json: a calibration belongs to one model."""
    return hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()

