# coding=utf-8
# dpe_core.py: Dimension-wise Positional Embeddings Manipulation (DPE, arXiv 2504.18857) for RoPE attention.
#
# This one file is the single source of truth for the DPE math. dpe-export copies it verbatim into every
# exported checkpoint (next to the generated modeling_dpe.py) and imports the very same file for
# calibration and evaluation. It depends on torch and transformers (>= 5) only.
#
# The rule. Query at position i, key at j <= i, distance d = i - j, rotary frequency index f
# (0 <= f < D/2, pairing x[f] with x[f + D/2]) in group g(f) with scale s, local window w:
#   d <  w                        -> angle d * theta_f                              (plain RoPE)
#   d >= w and f selected         -> angle (i//s - j//s + w - w//s) * theta_f       (scaled)
#   d >= w and f not selected     -> angle d * theta_f                              (plain RoPE)
# All f are selected when no selection is given; a selection is per (layer, query head, f).
#
# How it runs. Every key is rotated twice when it enters the cache: at its plain position j, and per
# frequency at its scaled position j//s. Neither depends on the query, so decoding never re-rotates the
# cache. Queries are rotated at i (local part) and at i//s + w - w//s (far part). Attention is computed as
# a local part (keys with d < w, plain rotation) and a far part (keys with d >= w, scaled rotation for the
# selected frequencies), each as a memory-efficient attention returning its log-sum-exp, and the two are
# merged exactly. With a top-K selection the far query/key of head h use, per frequency, the scaled or the
# plain rotation, so a far key depends on the query head: it is gathered per head from the two rotations.
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

DPE_FORMAT_VERSION = 1
SELECTED_DIMS_FILENAME = "dpe_selected_dims.safetensors"
MIN_TRANSFORMERS_VERSION = "5.0.0"


def check_transformers_version() -> None:
    """Fail early, and clearly, on a transformers older than the one this code was written for."""
    import transformers
    from packaging import version

    if version.parse(transformers.__version__) < version.parse(MIN_TRANSFORMERS_VERSION):
        raise ImportError(
            f"This DPE checkpoint needs transformers>={MIN_TRANSFORMERS_VERSION}, but transformers "
            f"{transformers.__version__} is installed. Upgrade with: pip install -U 'transformers>=5'"
        )


# ----------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------


def even_group_boundaries(num_freqs: int, num_groups: int) -> list[int]:
    """Boundaries that split frequencies [0, num_freqs) evenly into num_groups contiguous groups."""
    if num_groups < 1 or num_groups > num_freqs:
        raise ValueError(f"cannot split {num_freqs} rotary frequencies into {num_groups} groups")
    return [round(g * num_freqs / num_groups) for g in range(num_groups + 1)]


@dataclass
class DPEParams:
    """The `dpe` section of an exported config.json."""

    local_window_size: int
    scale_factors: list[int]
    dimension_groups_range: list[int]
    target_length: Optional[int] = None
    pretrain_length: Optional[int] = None
    selected_dims: Optional[str] = None
    version: int = DPE_FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DPEParams":
        if not isinstance(d, dict):
            raise ValueError(f"the dpe config section must be a mapping, got {type(d).__name__}")
        known = {"version", "local_window_size", "scale_factors", "dimension_groups_range", "selected_dims",
                 "target_length", "pretrain_length"}
        missing = {"local_window_size", "scale_factors", "dimension_groups_range"} - set(d)
        if missing:
            raise ValueError(f"the dpe config section lacks {', '.join(sorted(missing))}")
        version = int(d.get("version", DPE_FORMAT_VERSION))
        if version > DPE_FORMAT_VERSION:
            raise ValueError(f"dpe format version {version} is newer than this code ({DPE_FORMAT_VERSION})")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "local_window_size": self.local_window_size,
            "scale_factors": list(self.scale_factors),
            "dimension_groups_range": list(self.dimension_groups_range),
            "selected_dims": self.selected_dims,
            "target_length": self.target_length,
            "pretrain_length": self.pretrain_length,
        }

    def validate(self, head_dim: int) -> "DPEParams":
        """Check the parameters against a head dimension; raise ValueError with a one-line reason."""
        half = head_dim // 2
        w = self.local_window_size
        if not _is_int(w) or w < 1:
            raise ValueError(f"the local window must be an integer >= 1, got {w!r}")
        s = self.scale_factors
        if not isinstance(s, (list, tuple)) or not s:
            raise ValueError("give at least one scale factor")
        bad = [x for x in s if not _is_int(x) or x < 1]
        if bad:
            raise ValueError(f"scale factors must be integers >= 1, got {bad[0]!r}")
        b = self.dimension_groups_range
        if not isinstance(b, (list, tuple)) or len(b) < 2 or not all(_is_int(x) for x in b):
            raise ValueError(f"dimension group boundaries must be a list of integers, got {b!r}")
        if b[0] != 0 or b[-1] != half:
            raise ValueError(
                f"dimension group boundaries must start at 0 and end at head_dim/2 = {half}, got {list(b)}"
            )
        if any(b1 <= b0 for b0, b1 in zip(b, b[1:])):
            raise ValueError(f"dimension group boundaries must be strictly increasing, got {list(b)}")
        if len(s) != len(b) - 1:
            raise ValueError(
                f"{len(s)} scale factors for {len(b) - 1} dimension groups {list(b)}: give one factor per group"
            )
        for name in ("target_length", "pretrain_length"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ValueError(f"{name.replace('_', ' ')} must be a positive integer, got {v!r}")
        if self.target_length is not None and self.target_length <= w:
            raise ValueError(f"the target length ({self.target_length}) must exceed the local window ({w})")
        return self

    def scale_per_frequency(self) -> torch.Tensor:
        """Long tensor [D/2]: the scale s of each rotary frequency's group."""
        b = self.dimension_groups_range
        out = torch.empty(b[-1], dtype=torch.long)
        for g, s in enumerate(self.scale_factors):
            out[b[g]:b[g + 1]] = int(s)
        return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_supported_config(config) -> None:
    """Raise ValueError naming the reason when a model config cannot run DPE attention."""
    rope = getattr(config, "rope_parameters", None) or {}
    if not rope and getattr(config, "rope_theta", None) is None:
        raise ValueError(f"model type {getattr(config, 'model_type', '?')!r} has no rotary position embeddings (RoPE)")
    if isinstance(rope, dict) and rope and all(isinstance(v, dict) for v in rope.values()):
        raise ValueError("per-layer-type RoPE parameters are not supported yet")
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    if float(partial) < 1.0:
        raise ValueError(f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported yet")
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) is not None or "sliding_attention" in layer_types:
        raise ValueError(
            f"sliding-window attention is enabled (sliding_window={getattr(config, 'sliding_window', None)}); "
            "only full-attention models are supported yet (set sliding_window to null if the model does not use it)"
        )
