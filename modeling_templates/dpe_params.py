# coding=utf-8
# dpe_params.py: an export's DPE parameters, the `dpe` section of its config.json, and their checks.
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


DPE_FORMAT_VERSION = 1


SELECTED_DIMS_FILENAME = "dpe_selected_dims.safetensors"


SELECTED_DIMS_TENSOR = "selected_dims"  # bool [num_hidden_layers, num_attention_heads, rotary_dim/2]


MAX_LENGTH = 1 << 30  # windows, scale factors and lengths above this are input errors, not settings


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
        version = d.get("version", DPE_FORMAT_VERSION)
        if not _is_int(version):
            raise ValueError(f"the dpe format version must be an integer, got {version!r}")
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
        if not _is_int(w) or w < 1 or w > MAX_LENGTH:
            raise ValueError(f"the local window must be an integer from 1 to {MAX_LENGTH}, got {w!r}")
        s = self.scale_factors
        if not isinstance(s, (list, tuple)) or not s:
            raise ValueError("give at least one scale factor")
        bad = [x for x in s if not _is_int(x) or x < 1 or x > MAX_LENGTH]
        if bad:
            raise ValueError(f"scale factors must be integers from 1 to {MAX_LENGTH}, got {bad[0]!r}")
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
            if v is not None and (not _is_int(v) or v < 1 or v > MAX_LENGTH):
                raise ValueError(f"{name.replace('_', ' ')} must be an integer from 1 to {MAX_LENGTH}, got {v!r}")
        sel = self.selected_dims
        if sel is not None and (not isinstance(sel, str) or not sel or "/" in sel or "\\" in sel or sel.startswith(".")):
            raise ValueError(f"selected_dims must be a file name beside config.json, got {sel!r}")
        if self.target_length is not None and self.target_length <= w:
            raise ValueError(f"the target length ({self.target_length}) must exceed the local window ({w})")
        return self

    def scale_per_frequency(self) -> torch.Tensor:
        """Long tensor [D/2]: the scale s of each rotary frequency's group."""
        b = self.dimension_groups_range
        per_freq = [int(s) for g, s in enumerate(self.scale_factors) for _ in range(b[g], b[g + 1])]
        return torch.tensor(per_freq, dtype=torch.long, device="cpu")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
