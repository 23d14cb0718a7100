# coding=utf-8
# dpe_rule.py: the DPE rule (Dimension-wise Positional Embeddings Manipulation, arXiv 2504.18857), and the
# rotation that applies it. Shipped in every export; imported by dpe-export, its tests' reference checks and any
# serving backend. Depends on torch only.
#
# Query at position i, key at j <= i, distance d = i - j, rotary frequency index f (0 <= f < R/2 over the rotary
# dims R, pairing x[f] with x[f + R/2]) in group g(f) with scale s, local window w:
#   d <  w                        -> angle d * theta_f                              (plain RoPE)
#   d >= w and f selected         -> angle (i//s - j//s + w - w//s) * theta_f       (scaled)
#   d >= w and f not selected     -> angle d * theta_f                              (plain RoPE)
# All f are selected when no selection is given; a selection is per (layer, query head, f).
#
# Rotations compose, so the scaled angle is the plain one plus one more rotation: of the key by j//s - j and of
# the query by i//s + w - w//s - i (dpe_delta_positions). The runtime rotates queries and keys that the family's
# own RoPE already rotated at their plain positions, and so never touches a family's RoPE code.
from __future__ import annotations

import torch


def dpe_relative_positions(i: torch.Tensor, j: torch.Tensor, scale: torch.Tensor, window: int) -> torch.Tensor:
    """The rule itself: the relative position whose angle DPE gives a (query i, key j) pair on a scaled frequency
    (integer tensors that broadcast: positions i and j, each frequency's scale s). d < w: i - j; else
    i//s - j//s + w - w//s."""
    far = torch.div(i, scale, rounding_mode="floor") - torch.div(j, scale, rounding_mode="floor")
    far = far + (window - torch.div(torch.full_like(scale, window), scale, rounding_mode="floor"))
    return torch.where(i - j < window, i - j, far)


def dpe_delta_positions(positions: torch.Tensor, scale: torch.Tensor, window: int, query: bool) -> torch.Tensor:
    """Per-frequency position shift [B, n, R/2] that turns the plain rotation at p into DPE's scaled one.

    Keys: j//s - j. Queries: i//s + w - w//s - i. `scale` is the long tensor [R/2] of each frequency's scale, or
    [heads, R/2] of each head's (a selection folded into scales, 1 where plain), giving a shift [B, heads, n, R/2].
    """
    if scale.dim() == 2:
        p, scale = positions[:, None, :, None], scale[None, :, None, :]
    else:
        p = positions[..., None]
    shift = torch.div(p, scale, rounding_mode="floor") - p
    if query:
        shift = shift + (window - torch.div(torch.full_like(scale, window), scale, rounding_mode="floor"))
    return shift


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs (and float32), float64 for float64: never below the input's precision."""
    return torch.promote_types(dtype, torch.float32)


def rotation(shift: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos and sin of shift [..., R/2] * inv_freq for rotating a tensor of `dtype` (rotate_by's angles), each
    [..., R/2]. Angles are formed in float64 (float32 where the device has none: mps) and returned in the work
    dtype (float32 at least)."""
    wide = torch.float32 if shift.device.type == "mps" else torch.float64
    angle = shift.to(wide) * inv_freq.to(device=shift.device, dtype=wide)
    work = work_dtype(dtype)
    return angle.cos().to(work), angle.sin().to(work)


def rotate_with(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate x [..., D] by the angles whose cos and sin (broadcasting to [..., R/2]) are given; see rotate_by."""
    work = cos.dtype
    h = rotary_dim // 2
    x1, x2 = x[..., :h].to(work), x[..., h:rotary_dim].to(work)
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if rotary_dim < x.shape[-1]:
        parts.append(x[..., rotary_dim:].to(work))
    return torch.cat(parts, dim=-1).to(x.dtype)


def rotate_by(x: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate x [B, H, n, D] further by shift [B, n, R/2] (or per head, [B, H, n, R/2]) * inv_freq (a pure
    rotation, no attention scaling).

    Pairs x[f] with x[f + R/2] over the first R = rotary_dim dims, as transformers' rotate_half does; the other
    dims are left alone. Angles are formed in float64 (float32 where the device has none) and the rotation is
    done in float32, so composing it with the family's own rotation adds no more than float rounding.
    """
    cos, sin = rotation(shift.to(x.device), inv_freq, x.dtype)
    if shift.dim() == 3:  # one shift for every head
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, n, R/2]
    return rotate_with(x, cos, sin, rotary_dim)
