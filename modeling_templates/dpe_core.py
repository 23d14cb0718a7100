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

import functools
import math
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

DPE_FORMAT_VERSION = 1
SELECTED_DIMS_FILENAME = "dpe_selected_dims.safetensors"
SELECTED_DIMS_TENSOR = "selected_dims"  # bool [num_hidden_layers, num_attention_heads, head_dim/2]
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


# ----------------------------------------------------------------------------------------------------------
# Rotations
# ----------------------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, n, D] by cos/sin [B, n, D] (the same arithmetic as transformers' Llama)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float, dtype: torch.dtype):
    """cos/sin [B, n, D] for per-frequency integer positions [B, n, D/2] (or [B, n, 1] to broadcast)."""
    freqs = positions.float() * inv_freq.to(device=positions.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


class DPERope:
    """Scaled rotations shared by all layers of one model; theta and scaling come from its rotary embedding.

    Keys are rotated at j//s, queries at i//s + w - w//s, with s the scale of each frequency's group.
    The result is memoised for the position tensor of the current forward pass, which all layers share.
    """

    def __init__(self, decoder, params: DPEParams):
        self._decoder = decoder
        self.window = int(params.local_window_size)
        self._scale_list = params.scale_per_frequency().tolist()  # a list: __init__ may run on the meta device
        self._scale: dict = {}
        self._memo_key: tuple = ()
        self._memo_value = None

    @property
    def rotary(self):
        return self._decoder.rotary_emb

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """((key_cos, key_sin), (query_cos, query_sin)) for the scaled (far) rotation."""
        rotary = self.rotary
        key = (position_ids, rotary.inv_freq, dtype)
        if len(self._memo_key) == 3 and all(a is b for a, b in zip(key, self._memo_key)):
            return self._memo_value
        scale = self._scale.get(position_ids.device)
        if scale is None:
            scale = self._scale[position_ids.device] = torch.tensor(self._scale_list, device=position_ids.device)
        pos_k = torch.div(position_ids[..., None], scale, rounding_mode="floor")
        pos_q = pos_k + (self.window - self.window // scale)
        value = (
            rotary_cos_sin(pos_k, rotary.inv_freq, rotary.attention_scaling, dtype),
            rotary_cos_sin(pos_q, rotary.inv_freq, rotary.attention_scaling, dtype),
        )
        self._memo_key, self._memo_value = key, value
        return value


# ----------------------------------------------------------------------------------------------------------
# Attention kernels that also return the log-sum-exp of each query row
# ----------------------------------------------------------------------------------------------------------

_LSE_KERNEL_FAILED: set = set()


def attention_with_lse(q, k, v, *, scale: float, causal: bool = False):
    """softmax(q k^T * scale) v and its row log-sum-exp (float32), without an n x n tensor.

    q [B, H, m, D]; k, v [B, Hkv, n, D] with H a multiple of Hkv; with causal, m == n and query t sees keys
    0..t. Uses the fused CPU flash kernel or the CUDA memory-efficient kernel, and falls back to a chunked
    float32 computation elsewhere (or where the fused kernel refuses the shape or dtype).
    """
    device = q.device.type
    if device not in _LSE_KERNEL_FAILED:
        try:
            if device == "cpu":
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, 0.0, causal, scale=scale
                )[:2]
                return out, lse
            if device == "cuda":
                k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
                out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                    q, k, v, None, True, 0.0, causal, scale=scale
                )[:2]
                return out, lse[..., : q.shape[2]]  # some builds pad the lse rows to a multiple of 32
        except (RuntimeError, NotImplementedError) as err:  # unsupported shape/dtype on this build
            _LSE_KERNEL_FAILED.add(device)
            import warnings

            warnings.warn(f"DPE: fused attention kernel unavailable on {device} ({err}); using chunked math")
    return _attention_with_lse_math(q, k, v, scale=scale, causal=causal)


def _attention_with_lse_math(q, k, v, *, scale, causal=False, chunk: int = 1024):
    rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, rep), repeat_kv(v, rep)
    outs, lses = [], []
    n = k.shape[2]
    for a in range(0, q.shape[2], chunk):
        b = min(a + chunk, q.shape[2])
        s = torch.matmul(q[:, :, a:b].float(), k.float().transpose(-1, -2)) * scale
        if causal:
            t = torch.arange(a, b, device=q.device)[:, None]
            s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > t, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None])
        outs.append(torch.matmul(p, v.float()).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def flash_attn_with_lse(q, k, v, *, scale: float, window: Optional[int] = None):
    """flash-attn 2 (CUDA): causal attention, optionally limited to distances < window.

    q [B, H, n, D], k/v [B, Hkv, n, D] -> out [B, n, H, D] (flash-attn's own layout) and lse [B, H, n].
    """
    from flash_attn import flash_attn_func

    win = (-1, -1) if window is None else (window - 1, 0)
    out, lse, _ = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        softmax_scale=scale, causal=True, window_size=win, return_attn_probs=True,
    )
    return out, lse


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


# ----------------------------------------------------------------------------------------------------------
# DPE attention
# ----------------------------------------------------------------------------------------------------------


def far_query_key(q_plain, q_scaled, k_plain, k_scaled, selected: Optional[torch.Tensor]):
    """Far-part query [B, H, m, D] and key [B, H or Hkv, n, D]: the scaled rotation on selected frequencies.

    With a selection the key of a frequency depends on the query head, so keys are gathered per query head.
    """
    if selected is None:
        return q_scaled, k_scaled
    sel = torch.cat((selected, selected), dim=-1)[None, :, None, :]  # [1, H, 1, D]
    rep = q_plain.shape[1] // k_plain.shape[1]
    q = torch.where(sel, q_scaled, q_plain)
    k = torch.where(sel, repeat_kv(k_scaled, rep), repeat_kv(k_plain, rep))
    return q, k


def dpe_attention(
    q_plain: torch.Tensor,
    q_scaled: torch.Tensor,
    k_both: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    scale: float,
    selected: Optional[torch.Tensor] = None,
    key_valid: Optional[torch.Tensor] = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """DPE attention of the last m of n positions.

    q_plain / q_scaled [B, H, m, D]: queries rotated at i and at i//s + w - w//s.
    k_both [B, 2*Hkv, n, D]: keys rotated at j (heads 0..Hkv-1) and at j//s (heads Hkv..2*Hkv-1), as the cache
    holds them (stacked on the head axis, so that each rotation is a contiguous slab per head).
    v [B, Hkv, n, D]. selected: bool [H, D/2] (None: every frequency). key_valid: bool [B, n] (None: all).
    backend: "eager" (scores materialised a chunk of queries at a time), "sdpa", or "flash_attention_2".
    Returns [B, m, H, D] (the layout the output projection wants; possibly not contiguous).
    """
    m, n = q_plain.shape[2], k_both.shape[2]
    if key_valid is not None and bool(key_valid.all()):
        key_valid = None
    if m != n or backend == "eager":
        return _dpe_attention_materialized(q_plain, q_scaled, k_both, v, window, scale, selected, key_valid)
    if key_valid is None:
        return _dpe_prefill(q_plain, q_scaled, k_both, v, window, scale, selected, backend)
    # Padded batch: run each row on its span of real tokens (left or right padding); pad rows output 0.
    out = q_plain.new_zeros(q_plain.shape[0], q_plain.shape[2], q_plain.shape[1], q_plain.shape[3])
    for b in range(q_plain.shape[0]):
        idx = key_valid[b].nonzero().flatten()
        if idx.numel() == 0:
            continue
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if hi - lo != idx.numel():  # holes inside the row: no span to cut out
            return _dpe_attention_materialized(q_plain, q_scaled, k_both, v, window, scale, selected, key_valid)
        row = slice(b, b + 1)
        args = (q_plain[row, :, lo:hi], q_scaled[row, :, lo:hi], k_both[row, :, lo:hi], v[row, :, lo:hi])
        out[row, lo:hi] = _dpe_prefill(*args, window, scale, selected, backend)
    return out


def _dpe_prefill(q_plain, q_scaled, k_both, v, window, scale, selected, backend):
    """Prefill without padding or cache: local and far parts merged by log-sum-exp. Returns [B, n, H, D]."""
    bsz, h, n, d = q_plain.shape
    w, hkv = window, v.shape[1]
    k_plain, k_scaled = k_both[:, :hkv], k_both[:, hkv:]
    if n <= w:
        return attention_with_lse(q_plain, k_plain, v, scale=scale, causal=True)[0].transpose(1, 2)
    if backend == "flash_attention_2":
        q_far, k_far = far_query_key(q_plain[:, :, w:], q_scaled[:, :, w:], k_plain[:, :, : n - w],
                                     k_scaled[:, :, : n - w], selected)
        v_far = repeat_kv(v[:, :, : n - w], k_far.shape[1] // hkv)
        o_loc, lse_loc = flash_attn_with_lse(q_plain, k_plain, v, scale=scale, window=w)  # [B, n, H, D]
        o_far, lse_far = flash_attn_with_lse(q_far, k_far, v_far, scale=scale)
        tail, lse_tail = o_loc[:, w:], lse_loc[:, :, w:].transpose(1, 2)
        lse = torch.logaddexp(lse_tail, lse_far.transpose(1, 2))
        tail.mul_(torch.exp(lse_tail - lse)[..., None])
        tail.addcmul_(o_far, torch.exp(lse_far.transpose(1, 2) - lse)[..., None])
        return o_loc

    # Work on nb blocks of w positions; trailing pad queries are dropped at the end and pad keys are seen
    # by pad queries only (everything below is causal).
    nb = -(-n // w)
    pad = nb * w - n
    if pad:
        q_plain, q_scaled, k_plain, k_scaled, v = (F.pad(x, (0, 0, 0, pad)) for x in (q_plain, q_scaled, k_plain, k_scaled, v))
    o, lse_a, o_b, lse_b = local_band_blocks(q_plain, k_plain, v, w, scale)  # [B, nb, H, w, D], [B, nb, H, w]
    # Far part: query i >= w sees keys j <= i - w, a causal attention of queries w.. over keys ..N-w.
    m = nb * w - w
    q_far, k_far = far_query_key(q_plain[:, :, w:], q_scaled[:, :, w:], k_plain[:, :, :m], k_scaled[:, :, :m], selected)
    o_f, lse_f = attention_with_lse(q_far, k_far, repeat_kv(v[:, :, :m], k_far.shape[1] // hkv), scale=scale, causal=True)
    o_f = o_f.view(bsz, h, nb - 1, w, d).transpose(1, 2)  # block layout views
    lse_f = lse_f.view(bsz, h, nb - 1, w).transpose(1, 2)
    # Merge, for blocks 1..: (A) own block, (B) previous block (none for the last query of a block), far.
    la = lse_a[:, 1:]
    lb = F.pad(lse_b, (0, 1), value=float("-inf"))
    lse = torch.logsumexp(torch.stack((la, lb, lse_f)), dim=0)
    tail = o[:, 1:]
    tail.mul_(torch.exp(la - lse).unsqueeze(-1).to(o.dtype))
    tail[..., : w - 1, :].addcmul_(o_b, torch.exp(lb - lse)[..., : w - 1].unsqueeze(-1).to(o.dtype))
    tail.addcmul_(o_f, torch.exp(lse_f - lse).unsqueeze(-1).to(o.dtype))
    return o.permute(0, 1, 3, 2, 4).reshape(bsz, nb * w, h, d)[:, :n]


def local_band_blocks(q, k, v, w: int, scale: float):
    """Causal attention limited to distances < w, as two maskless causal attentions on blocks of w.

    q [B, H, N, D], k/v [B, Hkv, N, D], N a multiple of w. Query a of block b sees (A) keys 0..a of its own
    block and (B) keys a+1..w-1 of block b-1. (A) is causal attention within each block; (B) is strictly upper
    triangular, and with queries and keys both reversed it is causal too. Work: N*w score pairs, no mask.
    Returns (A) out/lse [B, nb, H, w, D] / [B, nb, H, w] and (B) out/lse [B, nb-1, H, w-1, D] for queries
    0..w-2 of blocks 1.. (query w-1 has no key in the previous block).
    """
    bsz, h, n, d = q.shape
    hkv, nb = k.shape[1], n // w
    qb, kb, vb = (x.view(bsz, x.shape[1], nb, w, d).transpose(1, 2) for x in (q, k, v))  # [B, nb, X, w, D]
    o_a, lse_a = attention_with_lse(qb.reshape(bsz * nb, h, w, d), kb.reshape(bsz * nb, hkv, w, d),
                                    vb.reshape(bsz * nb, hkv, w, d), scale=scale, causal=True)
    o_a, lse_a = o_a.view(bsz, nb, h, w, d), lse_a.view(bsz, nb, h, w)
    if nb == 1 or w == 1:
        return o_a, lse_a, o_a[:, 1:, :, :0], lse_a[:, 1:, :, :0]
    qr = qb[:, 1:, :, : w - 1].flip(3).reshape(bsz * (nb - 1), h, w - 1, d)
    kr = kb[:, :-1, :, 1:].flip(3).reshape(bsz * (nb - 1), hkv, w - 1, d)
    vr = vb[:, :-1, :, 1:].flip(3).reshape(bsz * (nb - 1), hkv, w - 1, d)
    o_b, lse_b = attention_with_lse(qr, kr, vr, scale=scale, causal=True)
    return o_a, lse_a, o_b.view(bsz, nb - 1, h, w - 1, d).flip(3), lse_b.view(bsz, nb - 1, h, w - 1).flip(3)


def _grouped_scores(q, k):
    """q [B, H, m, E] @ k [B, Hkv, n, E]^T -> [B, H, m, n] without repeating k."""
    bsz, h, m, e = q.shape
    hkv = k.shape[1]
    s = torch.matmul(q.reshape(bsz, hkv, (h // hkv) * m, e), k.transpose(-1, -2))
    return s.view(bsz, h, m, k.shape[2])


def _grouped_values(p, v):
    """p [B, H, m, n] @ v [B, Hkv, n, D] -> [B, H, m, D]."""
    bsz, h, m, n = p.shape
    hkv = v.shape[1]
    return torch.matmul(p.reshape(bsz, hkv, (h // hkv) * m, n), v).view(bsz, h, m, v.shape[-1])


def _dpe_attention_materialized(q_plain, q_scaled, k_both, v, window, scale, selected, key_valid, budget=2**25):
    """Exact DPE attention with scores materialised for a chunk of queries at a time (decode, eager, caches)."""
    bsz, h, m, d = q_plain.shape
    n, w, hkv = k_both.shape[2], window, v.shape[1]
    offset = n - m  # global index of the first query
    k_plain, k_scaled = k_both[:, :hkv], k_both[:, hkv:]
    if selected is not None:  # far scores = (q_plain on unselected) . k_plain + (q_scaled on selected) . k_scaled
        sel = torch.cat((selected, selected), dim=-1)[None, :, None, :]
        zero = torch.zeros((), dtype=q_plain.dtype, device=q_plain.device)
        q_far_plain, q_far_scaled = torch.where(sel, zero, q_plain), torch.where(sel, q_scaled, zero)
    chunk = max(1, min(m, budget // max(1, bsz * h * n)))
    outs = []
    for a in range(0, m, chunk):
        b = min(a + chunk, m)
        i = torch.arange(offset + a, offset + b, device=q_plain.device)[:, None]
        far_end = max(0, offset + b - w)  # keys 0..far_end-1 may be far for some query of the chunk
        loc_start = max(0, offset + a - w + 1)  # keys loc_start..offset+b-1 may be local
        j_loc = torch.arange(loc_start, offset + b, device=q_plain.device)[None, :]
        s_loc = _grouped_scores(q_plain[:, :, a:b], k_plain[:, :, loc_start : offset + b]).float() * scale
        ok_loc = ((i - j_loc) >= 0) & ((i - j_loc) < w)
        ok_loc = ok_loc[None, None] if key_valid is None else ok_loc & key_valid[:, None, None, loc_start : offset + b]
        s_loc = s_loc.masked_fill(~ok_loc, float("-inf"))
        if far_end > 0:
            j_far = torch.arange(0, far_end, device=q_plain.device)[None, :]
            if selected is None:
                s_far = _grouped_scores(q_scaled[:, :, a:b], k_scaled[:, :, :far_end])
            else:
                s_far = _grouped_scores(q_far_plain[:, :, a:b], k_plain[:, :, :far_end])
                s_far += _grouped_scores(q_far_scaled[:, :, a:b], k_scaled[:, :, :far_end])
            s_far = s_far.float() * scale
            ok_far = (i - j_far) >= w
            ok_far = ok_far[None, None] if key_valid is None else ok_far & key_valid[:, None, None, :far_end]
            s_far = s_far.masked_fill(~ok_far, float("-inf"))
            s = torch.cat((s_far, s_loc), dim=-1)
        else:
            s = s_loc
        p = torch.softmax(s, dim=-1).nan_to_num(0.0).to(v.dtype)  # rows with no key at all (padding) -> 0
        o = _grouped_values(p[..., s.shape[-1] - s_loc.shape[-1] :], v[:, :, loc_start : offset + b])
        if far_end > 0:
            o = o + _grouped_values(p[..., :far_end], v[:, :, :far_end])
        outs.append(o)
    return torch.cat(outs, dim=2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------
# transformers integration: attention and causal-LM mixins
# ----------------------------------------------------------------------------------------------------------


def _key_valid_from_mask(attention_mask: Optional[torch.Tensor], n_kv: int) -> Optional[torch.Tensor]:
    """Which keys are real tokens, from a 2D padding mask or the last query row of a 4D mask."""
    if attention_mask is None or attention_mask.shape[-1] != n_kv:
        return None
    if attention_mask.dim() == 2:
        return attention_mask.bool()
    if attention_mask.dim() == 4:
        row = attention_mask[:, 0, -1, :]
        return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    return None


class DPEAttentionMixin:
    """Mixed into a family's attention class (e.g. LlamaAttention): same projections, DPE attention."""

    dpe_rope: DPERope
    dpe_selected: Optional[torch.Tensor]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values=None,
        **kwargs,
    ):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        m = q.shape[2]

        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            past = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
            position_ids = torch.arange(past, past + m, device=q.device)[None]
        cos, sin = position_embeddings
        (k_cos, k_sin), (q_cos, q_sin) = self.dpe_rope.cos_sin(position_ids, q.dtype)
        q_plain = apply_rotary(q, cos, sin)
        # Every key enters the cache with both rotations, stacked on the head axis: [plain at j ; scaled at j//s].
        hkv = k.shape[1]
        k_both = torch.cat((apply_rotary(k, cos, sin), apply_rotary(k, k_cos, k_sin)), dim=1)
        if past_key_values is not None:
            k_both, v = past_key_values.update(k_both, v, self.layer_idx)
        n = k_both.shape[2]

        backend = self.config._attn_implementation or "eager"
        if n <= self.dpe_rope.window:
            # No pair is farther apart than the window: exactly the base model's attention.
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            interface = ALL_ATTENTION_FUNCTIONS.get_interface(backend, _family_eager_attention(type(self)))
            out, _ = interface(
                self, q_plain, k_both[:, :hkv], v, attention_mask,
                dropout=0.0, scaling=self.scaling, **kwargs,
            )
        else:
            if backend.startswith("flash_attention"):
                _require_flash_attn()
            key_valid = kwargs.get("dpe_key_valid")
            if key_valid is None:
                key_valid = _key_valid_from_mask(attention_mask, n)
            selected = self.dpe_selected
            if selected is not None and selected.device != q.device:  # layers placed by a device map
                selected = self.dpe_selected = selected.to(q.device)
            out = dpe_attention(
                q_plain, apply_rotary(q, q_cos, q_sin), k_both, v,
                window=self.dpe_rope.window, scale=self.scaling, selected=selected,
                key_valid=key_valid, backend=backend,
            )
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), None


@functools.lru_cache(maxsize=None)
def _family_eager_attention(attention_class: type):
    """The eager attention function of the family's own modeling module (transformers registers no "eager"
    interface: each modeling file carries its own), so the base path below the window is the base model's."""
    for cls in attention_class.__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
    raise TypeError(f"no eager_attention_forward beside any base class of {attention_class.__name__}")


def _require_flash_attn() -> None:
    try:
        import flash_attn  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash-attn package (CUDA only): "
            "pip install flash-attn --no-build-isolation, or load with attn_implementation='sdpa'"
        ) from err


def install_dpe(model, params: DPEParams, attention_class: Optional[type] = None) -> None:
    """Turn a loaded or freshly built causal LM into its DPE version, in place.

    Swaps each layer's attention class to a DPE subclass (projections and weights untouched) and, when the
    config's max_position_embeddings was raised to the target length, rebuilds the rotary embedding from the
    pretraining length so that theta and the attention scaling stay exactly those of the base model.
    """
    import copy

    config = model.config
    check_supported_config(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params.validate(head_dim)
    decoder = model.get_decoder()
    rotary = decoder.rotary_emb
    if params.pretrain_length and params.pretrain_length != config.max_position_embeddings:
        rope_config = copy.deepcopy(config)
        rope_config.max_position_embeddings = params.pretrain_length
        device = rotary.inv_freq.device
        decoder.rotary_emb = type(rotary)(config=rope_config).to(device)
    rope = DPERope(decoder, params)
    for layer in decoder.layers:
        attn = layer.self_attn
        if attention_class is None:
            attention_class = _dpe_subclass(type(attn), DPEAttentionMixin)
        attn.__class__ = attention_class
        attn.__dict__["dpe_rope"] = rope  # shared, and not registered as a submodule
        attn.dpe_selected = None
    model.dpe_params = params


def _dpe_subclass(base: type, mixin: type) -> type:
    if issubclass(base, mixin):
        return base
    return type(f"DPE{base.__name__}", (mixin, base), {"__module__": __name__})


def set_dpe_selection(model, selected: Optional[torch.Tensor]) -> None:
    """Set the selected frequencies, bool [layers, query heads, D/2]; None selects every frequency."""
    layers = model.get_decoder().layers
    if selected is not None:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        expected = (config.num_hidden_layers, config.num_attention_heads, head_dim // 2)
        if tuple(selected.shape) != expected or selected.dtype != torch.bool:
            raise ValueError(f"selected dims must be bool {list(expected)}, got {selected.dtype} {list(selected.shape)}")
    for idx, layer in enumerate(layers):
        attn = layer.self_attn
        sel = None if selected is None or bool(selected[idx].all()) else selected[idx]
        if sel is not None and attn.q_proj.weight.device.type != "meta":  # meta: offloaded by a device map
            sel = sel.to(attn.q_proj.weight.device)
        attn.dpe_selected = sel
    model.dpe_selected_dims = selected


def apply_dpe(model, params: DPEParams, selected: Optional[torch.Tensor] = None):
    """DPE on an already loaded base model (what dpe-export uses to calibrate and evaluate)."""
    model.__class__ = _dpe_subclass(type(model), DPEForCausalLMMixin)
    install_dpe(model, params)
    set_dpe_selection(model, selected)
    return model


class DPEForCausalLMMixin:
    """Mixed into a family's causal LM class: installs DPE attention and carries its selection file."""

    dpe_attention_class: Optional[type] = None

    def __init__(self, config, *args, **kwargs):
        check_transformers_version()
        super().__init__(config, *args, **kwargs)
        install_dpe(self, DPEParams.from_dict(config.dpe), self.dpe_attention_class)
        self.dpe_selected_dims = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        name = model.config.dpe.get("selected_dims")
        if name:
            from safetensors.torch import load_file
            from transformers.utils import cached_file

            hub = {k: kwargs[k] for k in ("cache_dir", "force_download", "local_files_only", "token",
                                          "revision", "subfolder") if k in kwargs}
            path = cached_file(str(pretrained_model_name_or_path), name, **hub)
            set_dpe_selection(model, load_file(path)[SELECTED_DIMS_TENSOR])
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        name = self.config.dpe.get("selected_dims")
        if name and self.dpe_selected_dims is not None:
            import os

            from safetensors.torch import save_file

            save_file({SELECTED_DIMS_TENSOR: self.dpe_selected_dims.cpu().contiguous()}, os.path.join(save_directory, name))

    # The explicit signature matters: generate() inspects it to decide whether to pass position_ids.
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values=None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep=0,
        **kwargs,
    ):
        # DPE attention reads padding from a [batch, keys] mask. Past the window it needs nothing else, so the
        # [batch, 1, queries, keys] mask that transformers would otherwise build is not made at all.
        if attention_mask is not None and attention_mask.dim() == 2:
            if not bool(attention_mask.all()):
                kwargs["dpe_key_valid"] = attention_mask.bool()
            if attention_mask.shape[-1] > self.dpe_params.local_window_size:
                attention_mask = None
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
            logits_to_keep=logits_to_keep, **kwargs,
        )
