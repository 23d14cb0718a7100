"""Which DPE settings an export gets: the user's flags, a preset and a calibration, resolved by one pure function.

The rule, for each setting: an explicit flag wins; else the calibration's value (calibrate chose it for this
model); else the preset's; else the default. Two settings belong together and are never mixed silently: the
calibration's scale factors are the best scale *of each of its groups*, so taking its factors with other group
boundaries is refused (give --scale-factors too, or drop --dimension-groups). A top-K selection comes from
--dim-scores, else from the calibration when its factors are used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from dpe_export.errors import UsageError


@dataclass(frozen=True)
class ConvertFlags:
    """What the user gave on the command line (None: not given)."""

    window: Optional[int] = None
    scale_factors: Optional[list[int]] = None
    dimension_groups: Optional[list[int]] = None
    target_length: Optional[int] = None
    pretrain_length: Optional[int] = None
    topk: Optional[int] = None
    dim_scores: Optional[Any] = None  # a path to a scores file


@dataclass(frozen=True)
class ConvertSettings:
    """The resolved settings, and where the selection comes from ("dim_scores", "calibration" or None)."""

    window: int
    scale_factors: list[int]
    dimension_groups: Optional[list[int]]  # None: an even split
    target_length: Optional[int]  # None: the default (4 x the base model's length)
    pretrain_length: Optional[int]  # None: the base model's max_position_embeddings
    topk: Optional[int]
    selection: Optional[str]
    sources: dict  # setting -> "flag", "calibration", "preset" (for messages)


def _pick(name: str, *candidates: tuple[str, Any]) -> tuple[Any, Optional[str]]:
    for origin, value in candidates:
        if value is not None:
            return value, origin
    return None, None


def resolve_settings(flags: ConvertFlags, preset=None, calibration=None) -> ConvertSettings:
    """Resolve flags, preset (export.presets.Preset) and calibration (calibration.result.Calibration); pure.

    UsageError names what is missing or contradictory.
    """
    if flags.dim_scores is not None and flags.topk is None:
        raise UsageError("--dim-scores needs --topk K")
    use_calibration = calibration is not None and flags.scale_factors is None
    cal = calibration if use_calibration else None
    if cal is not None and flags.dimension_groups is not None and \
            list(flags.dimension_groups) != list(cal.dimension_groups_range):
        raise UsageError(
            f"--dimension-groups {','.join(map(str, flags.dimension_groups))} differs from the calibration's groups "
            f"{','.join(map(str, cal.dimension_groups_range))}, whose scale factors it chose; give --scale-factors "
            "too, or drop --dimension-groups")
    p = preset
    found = {}
    scale_factors, found["scale_factors"] = _pick(
        "scale_factors", ("flag", flags.scale_factors), ("calibration", cal and list(cal.chosen)),
        ("preset", p and list(p.scale_factors)))
    if scale_factors is None:
        raise UsageError("give --scale-factors (one per dimension group), a --preset that sets them, or a "
                             "--calibration")
    groups, found["dimension_groups"] = _pick(
        "dimension_groups", ("flag", flags.dimension_groups),
        ("calibration", cal and list(cal.dimension_groups_range)), ("preset", p and list(p.dimension_groups_range)))
    window, found["window"] = _pick("window", ("flag", flags.window), ("calibration", cal and cal.window),
                                    ("preset", p and p.local_window_size))
    if window is None:
        raise UsageError("give --window (the local window size in tokens) or a --preset that sets it")
    target, found["target_length"] = _pick("target_length", ("flag", flags.target_length),
                                           ("calibration", cal and cal.target_length),
                                           ("preset", p and p.target_length))
    pretrain, found["pretrain_length"] = _pick("pretrain_length", ("flag", flags.pretrain_length),
                                               ("calibration", cal and cal.pretrain_length))
    selection = "dim_scores" if flags.dim_scores is not None else ("calibration" if cal and cal.top_k else None)
    topk = flags.topk if flags.dim_scores is not None else (cal.top_k if selection == "calibration" else None)
    if flags.topk is not None and selection is None:
        raise UsageError("--topk needs --dim-scores FILE (or a calibration that computes them)")
    if selection == "calibration" and flags.topk is not None and flags.topk != cal.top_k:
        raise UsageError(f"--topk {flags.topk} differs from the calibration's top-{cal.top_k} selection; give "
                             "--dim-scores FILE to select anew")
    return ConvertSettings(window=window, scale_factors=list(scale_factors),
                           dimension_groups=None if groups is None else list(groups), target_length=target,
                           pretrain_length=pretrain, topk=topk, selection=selection,
                           sources={k: v for k, v in found.items() if v})
