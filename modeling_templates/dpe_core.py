# coding=utf-8
# dpe_core.py: Dimension-wise Positional Embeddings Manipulation (DPE, arXiv 2504.18857) for RoPE attention.
#
# This one file is the single source of truth for the DPE math. dpe-export copies it verbatim into every
# exported checkpoint (next to the generated modeling_dpe.py) and imports the very same file for
# calibration and evaluation. It depends on torch and transformers (>= 5) only.
#
# The rule. Query at position i, key at j <= i, distance d = i - j, rotary frequency index f
# (0 <= f < R/2 over the rotary dims R, pairing x[f] with x[f + R/2]) in group g(f) with scale s, window w:
#   d <  w                        -> angle d * theta_f                              (plain RoPE)
#   d >= w and f selected         -> angle (i//s - j//s + w - w//s) * theta_f       (scaled)
#   d >= w and f not selected     -> angle d * theta_f                              (plain RoPE)
# All f are selected when no selection is given; a selection is per (layer, query head, f).
#
# How it runs. DPE is an attention function registered with transformers' AttentionInterface under the name
# "dpe". The family's own attention forward runs unchanged (projections, q/k norms, its own RoPE, its KV
# cache) and calls it with queries and keys already rotated at their plain positions. Rotations compose, so
# the scaled rotation is one more rotation: keys by (j//s - j) * theta_f, queries by (i//s + w - w//s - i) *
# theta_f. Attention is a local part (d < w, plain rotation) and a far part (d >= w, scaled rotation on the
# selected frequencies), each a memory-efficient attention returning its log-sum-exp, merged exactly.
# Layers that are not full attention (sliding windows) keep the base model's attention untouched.
#
# The KV cache. With any cache transformers offers (dynamic, static, offloaded, one the user built) the cache
# holds the family's plain keys and DPE rotates them on the fly: exact, and slower past the window. When the
# model's forward gets a fresh DynamicCache outside torch.compile it turns its full-attention layers into DPE
# layers (a subclass of DynamicLayer) that hold every key in its scaled rotation (what the far part reads) plus
# the plain keys of the last w - 1 positions (what the local part reads): about the base model's cache size, and
# decoding never re-rotates the cache. A top-K selection on which the query heads sharing each KV head agree is per-head scale
# factors (1 on the frequencies not selected) and is stored the same way; otherwise the layer holds both
# rotations of every key.
#
# What this file relies on in transformers, and why (checked on every 5.x release by scripts/compat_matrix.py):
# - AttentionInterface.register("dpe", fn) and ALL_ATTENTION_FUNCTIONS[name]: public, the documented way to
#   plug in an attention function; the family's attention calls it as (module, q, k, v, mask, dropout=,
#   scaling=, **kwargs) with position_ids in kwargs. Each DPE layer's `config` attribute is a view of the
#   model config whose `_attn_implementation` reads "dpe": that attribute is where every family's attention
#   looks the function up. The view changes nothing else, and the base model's choice ("sdpa", "eager",
#   "flash_attention_2") still decides the mask transformers builds and the kernels DPE uses.
# - The family module's own `eager_attention_forward` (transformers registers no "eager" function): below
#   the window, eager DPE layers call it, so they are the base model bit for bit.
# - Cache, DynamicCache, DynamicLayer (`keys`, `values`, `is_initialized`, `update(k, v, *args, **kwargs)`),
#   `cache.layers`: public. DPE layers subclass DynamicLayer; any other layer type is read as plain keys.
# - The base model's forward takes the cache as `past_key_values` (5.0-5.23) or `cache` (5.24+); the name is
#   read from its signature (the newest listed: 5.25 starts listing the old name beside the new one as a
#   deprecated alias, which is moved to the new name), and a Cache under any other name is an error, never ignored.
# Every assumption about what arrives is checked where it is used (positions present and consistent with the
# keys, the keys being the cache's) and a broken one raises DPERuntimeError naming the transformers version.
from __future__ import annotations

import copy
import importlib
import inspect
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

DPE_FORMAT_VERSION = 1
SELECTED_DIMS_FILENAME = "dpe_selected_dims.safetensors"
SELECTED_DIMS_TENSOR = "selected_dims"  # bool [num_hidden_layers, num_attention_heads, rotary_dim/2]
DPE_ATTENTION = "dpe"  # the name DPE is registered under in transformers' AttentionInterface
# The transformers releases this file is checked on (scripts/compat_matrix.py); setup.cfg states the same range.
MIN_TRANSFORMERS_VERSION = "5.0.0"
MAX_TRANSFORMERS_VERSION = "6"  # exclusive
CACHE_ARGUMENT_NAMES = ("past_key_values", "cache")  # 5.0-5.23, 5.24+
MAX_LENGTH = 1 << 30  # windows, scale factors and lengths above this are input errors, not settings


class DPERuntimeError(RuntimeError):
    """Something transformers handed to DPE attention is not what DPE needs; never answered with a guess."""

    def __init__(self, message: str):
        super().__init__(f"DPE: {message} (transformers {_transformers_version()}; the export supports "
                         f"transformers>={MIN_TRANSFORMERS_VERSION},<{MAX_TRANSFORMERS_VERSION})")


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except Exception:  # pragma: no cover
        return "?"


def check_transformers_version() -> None:
    """Fail early, and in one line, on a transformers outside the range this code supports."""
    from packaging import version

    have = version.parse(_transformers_version())
    if have < version.parse(MIN_TRANSFORMERS_VERSION) or have >= version.parse(MAX_TRANSFORMERS_VERSION):
        raise ImportError(
            f"This DPE checkpoint needs transformers>={MIN_TRANSFORMERS_VERSION},<{MAX_TRANSFORMERS_VERSION}, but "
            f"transformers {_transformers_version()} is installed. Install a supported release with: "
            f"pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION},<{MAX_TRANSFORMERS_VERSION}'"
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


def rope_parameters_of(config, layer_type: Optional[str] = None) -> dict:
    """The RoPE parameters of one layer type (families like Gemma 3 keep one dict per layer type)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope and all(isinstance(v, dict) or v is None for v in rope.values()):
        rope = rope.get(layer_type or "full_attention") or {}
    return rope if isinstance(rope, dict) else {}


def rotary_dim_of(config, rotary=None) -> int:
    """R: how many of the head dims rotate (partial rotary embeddings rotate the first R only).

    Taken from the family's own rotary embedding (`rotary`, or one built from the config), which is what the
    model really uses; from the config's partial-rotary factor only where no rotary module can be built.
    """
    if rotary is None:
        rotary = _family_rotary(config)
    if rotary is not None:
        for name, buf in rotary.named_buffers():
            if name.endswith("inv_freq") and "original" not in name:
                return 2 * int(buf.shape[-1])
    head_dim = head_dim_of(config)
    rope = rope_parameters_of(config)
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if factor is None:
        factor = getattr(config, "rotary_pct", None) or 1.0
    dim = int(head_dim * float(factor))
    return dim - dim % 2


def base_model_type(config) -> str:
    """The family's model_type: an export's config class states it (its own model_type is dpe_<family>)."""
    return getattr(config, "dpe_base_model_type", None) or config.model_type


def _family_rotary(config):
    """The family's rotary embedding module built from `config` (None where that cannot be done)."""
    try:
        from transformers.models.auto.configuration_auto import model_type_to_module_name

        name = model_type_to_module_name(base_model_type(config))
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except Exception:
        return None
    classes = [c for n, c in vars(module).items() if n.endswith("RotaryEmbedding") and isinstance(c, type)
               and issubclass(c, torch.nn.Module)]
    for cls in classes:
        try:
            return cls(config=config)
        except Exception:
            continue
    return None


def full_attention_layers(config) -> list[int]:
    """The layers DPE applies to: full attention (sliding-window and chunked layers keep the base's)."""
    n = int(config.num_hidden_layers)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [i for i in range(n) if layer_types[i] == "full_attention"]
    sliding = getattr(config, "sliding_window", None)
    if sliding is not None and getattr(config, "use_sliding_window", True) is not False:
        return []
    return list(range(n))


def check_supported_config(config) -> None:
    """Raise ValueError naming the reason when a model config cannot run DPE attention."""
    rope = rope_parameters_of(config)
    if not rope and getattr(config, "rope_theta", None) is None:
        raise ValueError(f"model type {getattr(config, 'model_type', '?')!r} has no rotary position embeddings (RoPE)")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0
                              or theta == float("inf")):
        raise ValueError(f"rope_theta must be a positive number, got {theta!r}")
    if rope.get("rope_type") in ("mrope", "3d", "m_rope"):
        raise ValueError(f"multimodal RoPE ({rope.get('rope_type')}) is not supported")
    if rotary_dim_of(config) < 2:
        raise ValueError("no dimension of the attention heads rotates")
    if not full_attention_layers(config):
        raise ValueError(
            f"every layer uses sliding-window attention (sliding_window={getattr(config, 'sliding_window', None)}); "
            "DPE applies to full-attention layers (set sliding_window to null if the model does not use it)"
        )


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


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


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs (and float32), float64 for float64: never below the input's precision."""
    return torch.promote_types(dtype, torch.float32)


def rotate_by(x: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate x [B, H, n, D] further by shift [B, n, R/2] (or per head, [B, H, n, R/2]) * inv_freq (a pure
    rotation, no attention scaling).

    Pairs x[f] with x[f + R/2] over the first R = rotary_dim dims, as transformers' rotate_half does; the other
    dims are left alone. Angles are formed in float64 (float32 where the device has none) and the rotation is
    done in float32, so composing it with the family's own rotation adds no more than float rounding.
    """
    wide = torch.float32 if x.device.type == "mps" else torch.float64
    angle = shift.to(wide) * inv_freq.to(device=x.device, dtype=wide)
    work = _work_dtype(x.dtype)
    cos, sin = angle.cos().to(work), angle.sin().to(work)
    if shift.dim() == 3:  # one shift for every head
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, n, R/2]
    h = rotary_dim // 2
    x1, x2 = x[..., :h].to(work), x[..., h:rotary_dim].to(work)
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if rotary_dim < x.shape[-1]:
        parts.append(x[..., rotary_dim:].to(work))
    return torch.cat(parts, dim=-1).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Attention kernels that also return the log-sum-exp of each query row
# ----------------------------------------------------------------------------------------------------------

_LSE_KERNEL_FAILED: set = set()


def attention_with_lse(q, k, v, *, scale: float, causal: bool = False, mask: Optional[torch.Tensor] = None):
    """softmax(q k^T * scale) v and its row log-sum-exp (float32), without an n x n tensor.

    q [B, H, m, D]; k, v [B, Hkv, n, D] with H a multiple of Hkv; with causal, m == n and query t sees keys
    0..t. mask (instead of causal): an additive [m, n] mask in q's dtype, 0 where a key is seen and -inf where
    not; every row must see a key. Uses the fused CPU flash kernel or the CUDA memory-efficient kernel, and
    falls back to a chunked float32 computation elsewhere (or where the fused kernel refuses the shape/dtype).
    """
    device = q.device.type
    kind = device if mask is None else device + "+mask"
    if kind not in _LSE_KERNEL_FAILED:
        try:
            if device == "cpu":
                extra = {} if mask is None else {"attn_mask": mask[None, None]}
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, 0.0, causal, scale=scale, **extra
                )[:2]
                return out, lse
            if device == "cuda":
                k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
                bias = None if mask is None else mask[None, None].expand(q.shape[0], q.shape[1], *mask.shape)
                out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                    q, k, v, bias, True, 0.0, causal, scale=scale
                )[:2]
                return out, lse[..., : q.shape[2]]  # some builds pad the lse rows to a multiple of 32
        except (RuntimeError, NotImplementedError) as err:  # unsupported shape/dtype on this build
            _LSE_KERNEL_FAILED.add(kind)
            import warnings

            warnings.warn(f"DPE: fused attention kernel unavailable on {kind} ({err}); using chunked math")
    return _attention_with_lse_math(q, k, v, scale=scale, causal=causal, mask=mask)


def _attention_with_lse_math(q, k, v, *, scale, causal=False, mask=None, chunk: int = 1024):
    rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, rep), repeat_kv(v, rep)
    work = _work_dtype(q.dtype)
    outs, lses = [], []
    n = k.shape[2]
    for a in range(0, q.shape[2], chunk):
        b = min(a + chunk, q.shape[2])
        s = torch.matmul(q[:, :, a:b].to(work), k.to(work).transpose(-1, -2)) * scale
        if causal:
            t = torch.arange(a, b, device=q.device)[:, None]
            s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > t, float("-inf"))
        if mask is not None:
            s = s + mask[a:b].to(work)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None])
        outs.append(torch.matmul(p, v.to(work)).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def flash_attn_with_lse(q, k, v, *, scale: float, window: Optional[int] = None):
    """flash-attn 2 (CUDA): causal attention, optionally limited to distances < window.

    q [B, H, n, D], k/v [B, Hkv, n, D] -> out [B, n, H, D] (flash-attn's own layout) and lse [B, H, n].
    """
    # Imported by name: transformers' remote-code loader refuses files whose plain imports are missing.
    flash_attn_func = importlib.import_module("flash_attn").flash_attn_func
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


def _selection_mask(selected: torch.Tensor, head_dim: int) -> torch.Tensor:
    """bool [1, H, 1, D]: which dims of each query head take the scaled rotation (non-rotary dims never)."""
    parts = [selected, selected]
    rest = head_dim - 2 * selected.shape[-1]
    if rest:
        parts.append(selected.new_zeros(selected.shape[0], rest))
    return torch.cat(parts, dim=-1)[None, :, None, :]


def far_query_key(q_plain, q_scaled, k_plain, k_scaled, selected: Optional[torch.Tensor]):
    """Far-part query [B, H, m, D] and key [B, H or Hkv, n, D]: the scaled rotation on selected frequencies.

    With a selection the key of a frequency depends on the query head, so keys are gathered per query head.
    """
    if selected is None:
        return q_scaled, k_scaled
    sel = _selection_mask(selected, q_plain.shape[-1])
    rep = q_plain.shape[1] // k_plain.shape[1]
    q = torch.where(sel, q_scaled, q_plain)
    k = torch.where(sel, repeat_kv(k_scaled, rep), repeat_kv(k_plain, rep))
    return q, k


def dpe_attention(
    q_plain: torch.Tensor,
    q_scaled: torch.Tensor,
    k_local: torch.Tensor,
    k_far: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    scale: float,
    selected: Optional[torch.Tensor] = None,
    k_far_plain: Optional[torch.Tensor] = None,
    local_start: int = 0,
    key_valid: Optional[torch.Tensor] = None,
    backend: str = "sdpa",
    softcap: Optional[float] = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """DPE attention of the last m of n positions (the queries are the last m keys).

    q_plain / q_scaled [B, H, m, D]: queries rotated at i and at i//s + w - w//s.
    k_local [B, Hkv, L, D]: plain keys (rotated at j) of positions local_start..n-1, which must cover every
    key within the window of a query. k_far [B, Hkv, n, D]: keys in their scaled rotation (at j//s).
    k_far_plain [B, Hkv, n, D]: plain keys of every position, needed with a selection only.
    v [B, Hkv, n, D]. selected: bool [H, R/2] (None: every frequency). key_valid: bool [B, n] (None: all).
    backend: "eager" (scores materialised a chunk of queries at a time), "sdpa", or "flash_attention_2".
    Returns [B, m, H, D] (the layout the output projection wants; possibly not contiguous).
    """
    m, n = q_plain.shape[2], v.shape[2]
    if selected is not None and k_far_plain is None:
        if local_start != 0:
            raise ValueError("a selection needs the plain rotation of every key (k_far_plain)")
        k_far_plain = k_local
    if key_valid is not None and bool(key_valid.all()):
        key_valid = None
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_plain, q_scaled, k_local, k_far, v))
    fused = backend != "eager" and softcap is None and not dropout and not needs_grad
    # Several queries on a cache (a prompt fed in chunks), and one-token decoding of an every-frequency export:
    # fused kernels. Decoding with a selection stays on the two-matmul path below, which reads the scaled and
    # plain keys in place instead of gathering a key per query head.
    if (fused and m < n and key_valid is None and not backend.startswith("flash_attention")
            and (m > 1 or selected is None)):
        return _dpe_prefill_continued(q_plain, q_scaled, k_local, local_start, k_far, k_far_plain, v, window, scale,
                                      selected)
    if m != n or not fused:
        return _dpe_attention_materialized(q_plain, q_scaled, k_local, local_start, k_far, k_far_plain, v, window,
                                           scale, selected, key_valid, softcap=softcap, dropout=dropout)
    if key_valid is None:
        return _dpe_prefill(q_plain, q_scaled, k_local, k_far, k_far_plain, v, window, scale, selected, backend)
    # Padded batch: run each row on its span of real tokens (left or right padding); pad rows output 0.
    out = q_plain.new_zeros(q_plain.shape[0], q_plain.shape[2], q_plain.shape[1], q_plain.shape[3])
    for b in range(q_plain.shape[0]):
        idx = key_valid[b].nonzero().flatten()
        if idx.numel() == 0:
            continue
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if hi - lo != idx.numel():  # holes inside the row: no span to cut out
            return _dpe_attention_materialized(q_plain, q_scaled, k_local, 0, k_far, k_far_plain, v, window, scale,
                                               selected, key_valid)
        row, span = slice(b, b + 1), slice(lo, hi)
        plain = None if k_far_plain is None else k_far_plain[row, :, span]
        out[row, lo:hi] = _dpe_prefill(q_plain[row, :, span], q_scaled[row, :, span], k_local[row, :, span],
                                       k_far[row, :, span], plain, v[row, :, span], window, scale, selected, backend)
    return out


def _dpe_prefill(q_plain, q_scaled, k_plain, k_scaled, k_far_plain, v, window, scale, selected, backend):
    """Prefill without padding or cache: local and far parts merged by log-sum-exp. Returns [B, n, H, D]."""
    bsz, h, n, d = q_plain.shape
    w, hkv = window, v.shape[1]
    if k_far_plain is None:
        k_far_plain = k_plain
    if n <= w:
        return attention_with_lse(q_plain, k_plain, v, scale=scale, causal=True)[0].transpose(1, 2)
    if backend.startswith("flash_attention"):
        q_far, k_far = far_query_key(q_plain[:, :, w:], q_scaled[:, :, w:], k_far_plain[:, :, : n - w],
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
        q_plain, q_scaled, k_plain, k_scaled, k_far_plain, v = (
            F.pad(x, (0, 0, 0, pad)) for x in (q_plain, q_scaled, k_plain, k_scaled, k_far_plain, v))
    o, lse_a, o_b, lse_b = local_band_blocks(q_plain, k_plain, v, w, scale)  # [B, nb, H, w, D], [B, nb, H, w]
    # Far part: query i >= w sees keys j <= i - w, a causal attention of queries w.. over keys ..N-w.
    m = nb * w - w
    q_far, k_far = far_query_key(q_plain[:, :, w:], q_scaled[:, :, w:], k_far_plain[:, :, :m], k_scaled[:, :, :m],
                                 selected)
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


def _merge_lse(parts, m: int):
    """Join attentions of the same m queries over disjoint key sets: parts of (first query, out [B, H, q, D],
    lse [B, H, q]) covering queries first..first+q-1. Query 0 must be in the first part. Returns [B, H, m, D]."""
    _, o0, l0 = parts[0]
    lse = l0.clone()
    for a, _, l in parts[1:]:
        lse[:, :, a : a + l.shape[2]] = torch.logaddexp(lse[:, :, a : a + l.shape[2]], l)
    work = _work_dtype(o0.dtype)
    out = o0.to(work) * torch.exp(l0 - lse)[..., None]
    for a, o, l in parts[1:]:
        out[:, :, a : a + l.shape[2]] += o.to(work) * torch.exp(l - lse[:, :, a : a + l.shape[2]])[..., None]
    return out.to(o0.dtype)


def _dpe_prefill_continued(q_plain, q_scaled, k_local, local_start, k_far, k_far_plain, v, window, scale, selected,
                           block: Optional[int] = None):
    """The last m of n positions (m < n, no padding) with fused kernels: a prompt fed in chunks on a cache, or decoding.

    Query a (position P + a, P = n - m) sees local keys P + a - w < j <= P + a and far keys j <= P + a - w.
    Local: blocks of queries against their keys with a band mask (block x (block + w) scores at most). Far: keys
    0..P-w are seen by every query (no mask); keys P-w+1..n-w-1 form a causal triangle with the queries from
    t on. Returns [B, m, H, D].
    """
    bsz, h, m, d = q_plain.shape
    n, w, hkv = v.shape[2], window, v.shape[1]
    p = n - m
    block = block or max(w, 256)
    if k_far_plain is None:
        k_far_plain = k_local if local_start == 0 else None
    local = []
    for a in range(0, m, block):
        b = min(a + block, m)
        lo = max(0, p + a - w + 1)
        band = None  # a single query (decoding) sees every key from lo on: no mask to build
        if b - a > 1:
            i = torch.arange(p + a, p + b, device=q_plain.device)[:, None]
            j = torch.arange(lo, p + b, device=q_plain.device)[None, :]
            band = torch.zeros(i.shape[0], j.shape[1], dtype=q_plain.dtype, device=q_plain.device)
            band.masked_fill_(((i - j) < 0) | ((i - j) >= w), float("-inf"))
        o, lse = attention_with_lse(q_plain[:, :, a:b], k_local[:, :, lo - local_start : p + b - local_start],
                                    v[:, :, lo : p + b], scale=scale, mask=band)
        local.append((o, lse))
    parts = [(0, torch.cat([o for o, _ in local], dim=2), torch.cat([lse for _, lse in local], dim=2))]
    far_n = n - w  # keys 0..n-w-1 are far for some query
    if far_n > 0:
        if selected is not None and k_far_plain is None:
            raise ValueError("a selection needs the plain rotation of every key (k_far_plain)")
        kp = None if k_far_plain is None else k_far_plain[:, :, :far_n]
        q_far, kf = far_query_key(q_plain, q_scaled, kp, k_far[:, :, :far_n], selected)
        vf = repeat_kv(v[:, :, :far_n], kf.shape[1] // hkv)
        s2 = max(0, p - w + 1)  # keys below s2 are far for every query
        t = s2 - (p - w)  # the first query that sees key s2
        if s2 > 0:
            o, lse = attention_with_lse(q_far, kf[:, :, :s2], vf[:, :, :s2], scale=scale)
            parts.append((0, o, lse))
        if far_n > s2 and t < m:
            o, lse = attention_with_lse(q_far[:, :, t:], kf[:, :, s2:], vf[:, :, s2:], scale=scale, causal=True)
            parts.append((t, o, lse))
    return _merge_lse(parts, m).transpose(1, 2)


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


def _dpe_attention_materialized(q_plain, q_scaled, k_local, local_start, k_far, k_far_plain, v, window, scale,
                                selected, key_valid, softcap=None, dropout=0.0, budget=2**25):
    """Exact DPE attention with scores materialised for a chunk of queries at a time (decode, eager, training).

    Differentiable (no in-place update of anything autograd saw); softcap (Gemma 2) and dropout as eager does.
    """
    bsz, h, m, d = q_plain.shape
    n, w = v.shape[2], window
    offset = n - m  # global index of the first query
    work = _work_dtype(q_plain.dtype)  # scores and softmax in float32 at least
    if selected is not None:  # far scores = (q_plain on unselected) . k_plain + (q_scaled on selected) . k_scaled
        sel = _selection_mask(selected, d)
        zero = torch.zeros((), dtype=q_plain.dtype, device=q_plain.device)
        q_far_plain, q_far_scaled = torch.where(sel, zero, q_plain), torch.where(sel, q_scaled, zero)
    chunk = max(1, min(m, budget // max(1, bsz * h * n)))
    outs = []
    for a in range(0, m, chunk):
        b = min(a + chunk, m)
        i = torch.arange(offset + a, offset + b, device=q_plain.device)[:, None]
        far_end = max(0, offset + b - w)  # keys 0..far_end-1 may be far for some query of the chunk
        loc_start = max(0, offset + a - w + 1)  # keys loc_start..offset+b-1 may be local
        if loc_start < local_start:
            raise ValueError(f"local keys start at {local_start}, but a query needs key {loc_start}")
        j_loc = torch.arange(loc_start, offset + b, device=q_plain.device)[None, :]
        k_loc = k_local[:, :, loc_start - local_start : offset + b - local_start]
        s_loc = _grouped_scores(q_plain[:, :, a:b], k_loc).to(work) * scale
        ok_loc = ((i - j_loc) >= 0) & ((i - j_loc) < w)
        ok_loc = ok_loc[None, None] if key_valid is None else ok_loc & key_valid[:, None, None, loc_start : offset + b]
        if softcap is not None:
            s_loc = torch.tanh(s_loc / softcap) * softcap
        s_loc = s_loc.masked_fill(~ok_loc, float("-inf"))
        if far_end > 0:
            j_far = torch.arange(0, far_end, device=q_plain.device)[None, :]
            if selected is None:
                s_far = _grouped_scores(q_scaled[:, :, a:b], k_far[:, :, :far_end])
            else:
                s_far = (_grouped_scores(q_far_plain[:, :, a:b], k_far_plain[:, :, :far_end])
                         + _grouped_scores(q_far_scaled[:, :, a:b], k_far[:, :, :far_end]))
            s_far = s_far.to(work) * scale
            if softcap is not None:
                s_far = torch.tanh(s_far / softcap) * softcap
            ok_far = (i - j_far) >= w
            ok_far = ok_far[None, None] if key_valid is None else ok_far & key_valid[:, None, None, :far_end]
            s_far = s_far.masked_fill(~ok_far, float("-inf"))
            s = torch.cat((s_far, s_loc), dim=-1)
        else:
            s = s_loc
        p = torch.softmax(s, dim=-1).nan_to_num(0.0).to(v.dtype)  # rows with no key at all (padding) -> 0
        if dropout:
            p = F.dropout(p, p=dropout, training=True)
        o = _grouped_values(p[..., s.shape[-1] - s_loc.shape[-1] :], v[:, :, loc_start : offset + b])
        if far_end > 0:
            o = o + _grouped_values(p[..., :far_end], v[:, :, :far_end])
        outs.append(o)
    return torch.cat(outs, dim=2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------
# transformers integration: the attention function, the cache layer, the model mixins
# ----------------------------------------------------------------------------------------------------------


class DPELayerState:
    """What one DPE attention layer needs at run time; its DPE cache layers point at it too."""

    def __init__(self, params: DPEParams, decoder, layer_idx: int, rotary_dim: int, first: bool,
                 layer_type: str = "full_attention"):
        self.layer_type = layer_type
        self.window = int(params.local_window_size)
        self.scale_list = params.scale_per_frequency().tolist()  # a list: this may run on the meta device
        self.layer_idx = layer_idx
        self.rotary_dim = rotary_dim
        self.first = first  # the first DPE layer checks what every layer receives (positions, cache lengths)
        self.selected: Optional[torch.Tensor] = None  # bool [H, R/2], or None for every frequency
        # A selection on which the query heads sharing each KV head agree is the same as per-head scale factors
        # that are 1 on the frequencies not selected (angle d, plain RoPE): then keys are stored once, in their
        # scaled rotation, as without a selection. [H, R/2] lists of each query head's scales, or None.
        self.folded: Optional[list] = None
        self.selection_version = 0  # a cache filled under one selection is refused under another
        self._decoder = weakref.ref(decoder)
        self._scale: dict = {}
        self._local = threading.local()

    @property
    def layout(self) -> str:
        """How DPE cache layers of this layer store keys: scaled only, or [plain | scaled] heads (a selection
        whose query heads disagree within a KV group needs both rotations of every key)."""
        return "scaled" if self.selected is None or self.folded is not None else "both"

    def set_selection(self, selected: Optional[torch.Tensor], num_kv_heads: int) -> None:
        """bool [H, R/2] or None; folded into per-head scales when every KV group's query heads agree."""
        self.selected, self.folded, self._scale = selected, None, {}
        self.selection_version += 1
        if selected is None:
            return
        sel = selected.detach().cpu()
        heads = sel.shape[0]
        if num_kv_heads and heads % num_kv_heads == 0:
            groups = sel.view(num_kv_heads, heads // num_kv_heads, -1)
            if bool((groups == groups[:, :1]).all()):
                self.folded = [[s if on else 1 for s, on in zip(self.scale_list, row)] for row in sel.tolist()]
        self._num_kv_heads = num_kv_heads

    def scale(self, device) -> torch.Tensor:
        """Each frequency's scale factor, long [R/2] (the groups' factors, whatever the selection)."""
        s = self._scale.get(device)
        if s is None:
            s = self._scale[device] = torch.tensor(self.scale_list, dtype=torch.long, device=device)
        return s

    def query_key_scales(self, device) -> tuple:
        """(query scales, key scales) for the rotations: [R/2] each, or with a folded selection [H, R/2] and
        [Hkv, R/2]."""
        if self.folded is None:
            s = self.scale(device)
            return s, s
        key = ("folded", device)
        pair = self._scale.get(key)
        if pair is None:
            q = torch.tensor(self.folded, dtype=torch.long, device=device)
            pair = self._scale[key] = (q, q[:: q.shape[0] // self._num_kv_heads].contiguous())
        return pair

    def inv_freq(self) -> torch.Tensor:
        """The inverse frequencies the family's rotary embedding is using now (dynamic RoPE updates them)."""
        decoder = self._decoder()
        rotary = getattr(decoder, "rotary_emb", None)
        inv = getattr(rotary, f"{self.layer_type}_inv_freq", None)  # one per layer type (Gemma 3)
        if inv is None:
            inv = getattr(rotary, "inv_freq", None)
        if inv is None:
            raise DPERuntimeError("the model's rotary embedding (rotary_emb.inv_freq) is gone")
        if 2 * inv.shape[-1] != self.rotary_dim:
            raise DPERuntimeError(f"the rotary embedding has {inv.shape[-1]} frequencies, DPE expects "
                                  f"{self.rotary_dim // 2}")
        return inv

    def base_implementation(self) -> str:
        return self._decoder().config._attn_implementation or "eager"

    def set_past_length(self, past: Optional[int]) -> None:
        """Tokens in the cache before the current forward (DPEModelMixin sets it for every layer; not a keyword
        argument, which some families' decoder layers do not pass on to their attention, e.g. StableLM's)."""
        self._local.past = past

    def past_length(self) -> Optional[int]:
        return getattr(self._local, "past", None)

    def set_pending(self, layer) -> None:
        self._local.pending = weakref.ref(layer)

    def take_pending(self):
        pending = getattr(self._local, "pending", None)
        self._local.pending = None
        return None if pending is None else pending()

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        decoder = self._decoder()
        new._decoder = weakref.ref(memo.get(id(decoder), decoder))
        new._scale, new._local = {}, threading.local()
        new.selected = copy.deepcopy(self.selected, memo)
        return new

    def __getstate__(self):
        raise TypeError("DPE layer state is not picklable; save the model with save_pretrained")


class _Shared:
    """Holds a reference that copies of its holder share (a cache layer copied with deepcopy keeps its layer)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __deepcopy__(self, memo):
        return self


class DPEAttentionConfig:
    """The model config as a DPE attention layer sees it: all of it, except that attention dispatches to DPE.

    Every family's attention looks its function up by `self.config._attn_implementation`; this view answers
    "dpe" there and forwards everything else (reads and writes) to the model's config, so the base model's
    choice of implementation stays in one place.
    """

    __slots__ = ("_dpe_config", "_dpe_implementation")

    def __init__(self, config, implementation: str = DPE_ATTENTION):
        object.__setattr__(self, "_dpe_config", config)
        object.__setattr__(self, "_dpe_implementation", implementation)

    @property
    def _attn_implementation(self) -> str:
        return self._dpe_implementation

    def __getattr__(self, name):
        if name in ("_dpe_config", "_dpe_implementation"):
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "_dpe_config"), name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_dpe_config"), name, value)

    def __reduce__(self):
        return (DPEAttentionConfig, (self._dpe_config, self._dpe_implementation))

    def __repr__(self):
        return f"DPEAttentionConfig({self._dpe_config!r})"


def _is_cache(value) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, Cache)


def _key_valid_from_mask(attention_mask, n_kv: int) -> Optional[torch.Tensor]:
    """Which keys are real tokens (bool [B, n]), from a 2D padding mask or the last query row of a 4D mask."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise DPERuntimeError(f"unexpected attention mask of type {type(attention_mask).__name__}")
    if attention_mask.shape[-1] < n_kv or attention_mask.dim() not in (2, 4):
        raise DPERuntimeError(f"attention mask of shape {list(attention_mask.shape)} for {n_kv} keys")
    # Some releases build masks longer than the keys (their attention functions slice them): do the same.
    row = attention_mask[..., :n_kv] if attention_mask.dim() == 2 else attention_mask[:, 0, -1, :n_kv]
    if row.dtype == torch.bool:
        return row
    if attention_mask.dim() == 2:
        return row != 0
    return row > torch.finfo(row.dtype).min / 2


def _per_class(fn):
    """Cache fn(cls) per class in a plain dict: torch.compile traces it as a dict lookup (it warns on lru_cache)."""
    results: dict = {}

    def cached(cls: type):
        if cls not in results:
            results[cls] = fn(cls)
        return results[cls]

    cached.__doc__ = fn.__doc__
    cached.cache_clear = results.clear
    return cached


@_per_class
def _family_eager_attention(attention_class: type):
    """The eager attention function of the family's own modeling module (transformers registers no "eager"
    interface: each modeling file carries its own), so the base path below the window is the base model's."""
    for cls in attention_class.__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
    raise DPERuntimeError(f"no eager_attention_forward beside any base class of {attention_class.__name__}")


def _base_attention_function(module, implementation: str):
    if implementation == "eager":
        return _family_eager_attention(type(module))
    if implementation == DPE_ATTENTION:
        raise DPERuntimeError("the model's attn_implementation is 'dpe' itself; choose sdpa, eager or flash_attention_2")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    try:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    except KeyError:
        raise DPERuntimeError(f"attn_implementation {implementation!r} is not a registered attention function") from None


_DPE_BACKENDS = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "flash_attention_2",
                 "flash_attention_3": "flash_attention_2", "flex_attention": "sdpa"}


def _require_flash_attn() -> None:
    try:
        importlib.import_module("flash_attn")
    except ImportError as err:
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash-attn package (CUDA only): "
            "pip install flash-attn --no-build-isolation, or load with attn_implementation='sdpa'"
        ) from err


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _check_positions(pos, key_pos, key_valid, n: int) -> None:
    """Positions and keys must describe one sequence per row; anything else is an error, not an answer."""
    m = pos.shape[1]
    slot0_valid = torch.ones_like(key_pos[:, 0], dtype=torch.bool) if key_valid is None else key_valid[:, 0]
    early = (key_pos[:, 0] > 0) & slot0_valid
    if bool(early.any()):
        b = int(early.nonzero()[0])
        raise DPERuntimeError(
            f"the positions say {int(key_pos[b, 0])} tokens came before the {n} keys this attention layer received "
            f"(row {b}): the KV cache did not reach the attention"
        )
    if key_valid is None:
        first = key_pos[:, 0]
        has = torch.ones_like(first, dtype=torch.bool)
    else:
        has = key_valid.any(dim=1)
        first = key_pos.gather(1, key_valid.to(torch.int8).argmax(dim=1, keepdim=True))[:, 0]
    late = (first < 0) & has
    if bool(late.any()):
        b = int(late.nonzero()[0])
        raise DPERuntimeError(
            f"the attention layer received {n} keys but the positions account for only {n + int(first[b])} "
            f"(row {b}): the KV cache holds tokens of another sequence (reset it between prompts)"
        )
    if m > 1:
        step = pos[:, 1:] - pos[:, :-1]
        both = torch.ones_like(step, dtype=torch.bool) if key_valid is None else (
            key_valid[:, n - m + 1 :] & key_valid[:, n - m : n - 1])
        if bool(((step != 1) & both).any()):
            raise DPERuntimeError("position ids are not consecutive within a sequence (packed sequences are not "
                                  "supported by DPE attention)")


def dpe_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """DPE attention with transformers' attention-function contract (registered as "dpe").

    query [B, H, m, D] and key/value [B, Hkv, n, D] as the family's attention hands them over: rotated at their
    plain positions, after the cache update. Returns ([B, m, H, D], None).
    """
    state = module.__dict__.get("dpe")
    if state is None:
        raise DPERuntimeError(f"{type(module).__name__} dispatched to DPE attention without DPE parameters")
    for name, val in kwargs.items():
        if _is_cache(val):
            raise DPERuntimeError(f"a KV cache reached the attention function as {name!r}, which DPE does not know")
    if kwargs.get("s_aux") is not None:
        raise DPERuntimeError("attention sinks (s_aux) are not supported by DPE attention")
    if kwargs.get("sliding_window") is not None:
        raise DPERuntimeError(f"layer {state.layer_idx} is a sliding-window layer; DPE applies to full attention only")
    implementation = state.base_implementation()
    backend = _DPE_BACKENDS.get(implementation)
    if backend is None and implementation != DPE_ATTENTION:
        raise DPERuntimeError(f"DPE attention cannot run under attn_implementation={implementation!r}; "
                              f"use one of {', '.join(_DPE_BACKENDS)}")
    softcap = kwargs.get("softcap")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    bsz, _, m, d = query.shape
    w, rdim = state.window, state.rotary_dim

    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise DPERuntimeError("position_ids did not reach the attention function")
    if position_ids.shape[-1] != m:
        raise DPERuntimeError(f"{position_ids.shape[-1]} position ids for {m} queries")
    pos = position_ids.to(query.device).reshape(-1, m).expand(bsz, m)

    layer = state.take_pending()
    if layer is not None:
        if getattr(layer, "keys", None) is not key or layer._dpe_pending != m:
            raise DPERuntimeError("the keys reaching DPE attention are not the ones its cache layer just stored")
        if layer._dpe_layout != state.layout or layer._dpe_version != state.selection_version:
            raise DPERuntimeError("the top-K selection changed while a KV cache was in use; start a new cache")
    elif getattr(key, "shape", (0, 0, 0, d))[-1] != d:
        raise DPERuntimeError(f"keys of width {key.shape[-1]} for queries of width {d}")

    past = state.past_length()  # tokens in the cache before this forward (DPEModelMixin), None without a cache
    full_key, full_value, full_mask = key, value, attention_mask
    n = key.shape[2]
    key_valid = _key_valid_from_mask(attention_mask, n)
    if n > m and layer is None:
        # Static caches hand over their whole buffer: keep the slots up to the queries' own.
        if past is not None:
            end = past + m
        elif key_valid is not None and bool(key_valid.any()):
            end = int(key_valid.nonzero()[:, 1].max()) + 1
        else:
            end = n
        if end < n:
            key, value, n = key[:, :, :end], value[:, :, :end], end
            key_valid = None if key_valid is None else key_valid[:, :end]
    if n < m:
        raise DPERuntimeError(f"{n} keys for {m} queries")
    # Keys are consecutive positions ending at the last query's (checked below on the first DPE layer).
    key_pos = pos if n == m else pos[:, -1:] - torch.arange(n - 1, -1, -1, device=pos.device)
    if state.first and not _compiling():
        _check_positions(pos, key_pos, key_valid, n)

    q_scale, k_scale = state.query_key_scales(query.device)
    selected = None if state.folded is not None else state.selected  # a folded selection is in the scales
    if k_scale.dim() == 2 and k_scale.shape[0] != value.shape[1]:
        raise DPERuntimeError(f"the selection was folded for {k_scale.shape[0]} KV heads, but the attention has "
                              f"{value.shape[1]}")
    inv_freq = state.inv_freq()
    k_far_plain = None
    if layer is not None:  # a DPE cache layer: store the new keys in their scaled rotation
        hkv = value.shape[1]
        if layer._dpe_layout == "both":  # [plain heads | scaled heads] on the head axis
            new_scaled = rotate_by(key[:, :hkv, n - m :], dpe_delta_positions(pos, k_scale, w, query=False),
                                   inv_freq, rdim)
            key[:, hkv:, n - m :].copy_(new_scaled)
            k_local, local_start, k_far, k_far_plain = key[:, :hkv], 0, key[:, hkv:], key[:, :hkv]
        else:
            k_local, local_start = _window_plain_keys(layer, key, pos, key_pos, k_scale, inv_freq, w, rdim)
            key[:, :, n - m :].copy_(rotate_by(key[:, :, n - m :], dpe_delta_positions(pos, k_scale, w, query=False),
                                               inv_freq, rdim))
            k_far = key
        layer._dpe_pending = 0
        layer._dpe_seen = weakref.ref(key)
        if n <= w:
            base = _base_attention_function(module, implementation)
            return base(module, query, k_local, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    else:
        if n <= w:  # no pair is as far apart as the window: exactly the base model's attention
            base = _base_attention_function(module, implementation)
            return base(module, query, full_key, full_value, full_mask, dropout=dropout, scaling=scaling, **kwargs)
        if selected is not None and selected.device != query.device:  # layers placed by a device map
            selected = state.selected = selected.to(query.device)
        args = (query, key, value, pos, key_pos, q_scale, k_scale, inv_freq, key_valid, selected, w, rdim, scale,
                backend or "sdpa", softcap, float(dropout))
        if _compiling() and not torch.is_grad_enabled():
            return _COMPILED_ATTENTION(*args), None
        return _attention_on_plain_keys(*args), None

    if backend == "flash_attention_2":
        _require_flash_attn()
    if selected is not None and selected.device != query.device:  # layers placed by a device map
        selected = state.selected = selected.to(query.device)
    q_scaled = rotate_by(query, dpe_delta_positions(pos, q_scale, w, query=True), inv_freq, rdim)
    out = dpe_attention(
        query, q_scaled, k_local, k_far, value, window=w, scale=scale, selected=selected, k_far_plain=k_far_plain,
        local_start=local_start, key_valid=key_valid, backend=backend or "sdpa", softcap=softcap, dropout=dropout,
    )
    return out, None


def _attention_on_plain_keys(query, key, value, pos, key_pos, q_scale, k_scale, inv_freq, key_valid, selected,
                             w: int, rdim: int, scale: float, backend: str, softcap, dropout: float):
    """DPE attention over keys in their plain rotation (no DPE cache layer): the scaled keys made on the fly."""
    if backend == "flash_attention_2":
        _require_flash_attn()
    k_far = rotate_by(key, dpe_delta_positions(key_pos, k_scale, w, query=False), inv_freq, rdim)
    q_scaled = rotate_by(query, dpe_delta_positions(pos, q_scale, w, query=True), inv_freq, rdim)
    return dpe_attention(query, q_scaled, key, k_far, value, window=w, scale=scale, selected=selected,
                         k_far_plain=key if selected is not None else None, key_valid=key_valid, backend=backend,
                         softcap=softcap, dropout=dropout)


def _define_compiled_attention_op():
    """_attention_on_plain_keys as a torch custom op, which torch.compile calls as one opaque kernel.

    Traced into, DPE attention came out of inductor (torch 2.13) with wrong numbers past the window: it reused
    buffers the attention still read (issue 33; tests/test_transformers_integration.py and tests/fuzz_runtime.py
    have the cases). As one functional op (fresh output, inputs untouched) there is nothing of it to plan.
    Defined at import, once per copy of this file (two exports' runtimes in one process keep their own).
    """
    import hashlib

    qualname = "dpe_export::attention_" + hashlib.sha1(__name__.encode()).hexdigest()[:16]

    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor,
                  key_pos: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor, inv_freq: torch.Tensor,
                  key_valid: Optional[torch.Tensor], selected: Optional[torch.Tensor], w: int, rdim: int,
                  scale: float, backend: str, softcap: Optional[float], dropout: float) -> torch.Tensor:
        return _attention_on_plain_keys(query, key, value, pos, key_pos, q_scale, k_scale, inv_freq, key_valid,
                                        selected, w, rdim, scale, backend, softcap, dropout).contiguous()

    try:
        op = torch.library.custom_op(qualname, mutates_args=())(attention)
    except RuntimeError:  # this file imported again under the same name (a reload): the op defined then serves
        return getattr(torch.ops.dpe_export, qualname.split("::")[1])

    @op.register_fake
    def _(query, *args):
        bsz, h, m, d = query.shape
        return query.new_empty(bsz, m, h, d)

    return op


_COMPILED_ATTENTION = _define_compiled_attention_op()


def _window_plain_keys(layer, key, pos, key_pos, k_scale, inv_freq, w: int, rdim: int):
    """The plain keys the local part reads, from a DPE cache layer that keeps keys scaled: the last w - 1 cached
    ones and the m new ones (still plain in `key`). Returns (k_local, local_start).

    They live in a buffer of the layer with room for w more, so decoding appends in place and copies the window
    only once every w steps; when the buffer is missing or stale (the cache was cropped, reordered, moved), the
    window is rebuilt from the scaled keys by the inverse rotation.
    """
    bsz, hkv, n, d = key.shape
    m = pos.shape[1]
    keep = min(n - m, max(w - 1, 0))
    new_plain = key[:, :, n - m :]
    buf, blen = layer._dpe_tail, layer._dpe_tail_len
    usable = buf is not None and blen >= keep and buf.shape[0] == bsz and buf.device == key.device
    if usable and m < w and blen + m <= buf.shape[2]:  # decoding: append in place
        buf[:, :, blen : blen + m] = new_plain
        layer._dpe_tail_len = blen + m
        return buf[:, :, blen + m - keep - m : blen + m], n - m - keep
    if not keep:
        old = None
    elif usable:
        old = buf[:, :, blen - keep : blen]
    else:  # rebuild the window's plain keys from their scaled rotation
        lo = n - m - keep
        shift = dpe_delta_positions(key_pos[:, lo : n - m], k_scale, w, query=False)
        old = rotate_by(key[:, :, lo : n - m], -shift, inv_freq, rdim)
    k_local = new_plain.clone() if old is None else torch.cat((old, new_plain), dim=2)
    tail = k_local[:, :, k_local.shape[2] - min(k_local.shape[2], max(w - 1, 0)) :]
    buf = key.new_empty(bsz, hkv, max(w - 1, 0) + w, d)
    buf[:, :, : tail.shape[2]] = tail
    layer._dpe_tail, layer._dpe_tail_len = buf, tail.shape[2]
    return k_local, n - k_local.shape[2]


def register_dpe_attention() -> None:
    """Register dpe_attention_forward with transformers' AttentionInterface (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(DPE_ATTENTION, dpe_attention_forward)


class DPECacheLayerMixin:
    """Mixed into transformers' DynamicLayer: keys are kept in DPE's scaled rotation (see the header).

    `update` stores the family's plain keys as they come; the DPE attention that runs right after it (it has
    the positions) rotates them in place and keeps the plain keys of the last w - 1 positions. Anything that
    replaces `keys` in between (crop, reorder, offload, deepcopy) is noticed, and the window's plain keys are
    rebuilt from the scaled ones.
    """

    def update(self, key_states, value_states, *args, **kwargs):  # noqa: D102
        shared = self.__dict__.get("_dpe_shared")
        if shared is None:
            raise DPERuntimeError("a DPE cache layer lost its attention layer")
        state = shared.value
        if self._dpe_pending:
            raise DPERuntimeError("the keys of the previous cache update never reached DPE attention (did an earlier "
                                  "forward fail?); start a new cache")
        seen = self._dpe_seen
        if seen is None or seen() is not getattr(self, "keys", None):
            self._dpe_tail = None
        if self._dpe_layout == "both":
            key_states = torch.cat((key_states, key_states), dim=1)  # [plain | scaled] heads, the latter filled later
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self._dpe_pending = key_states.shape[-2]
        state.set_pending(self)
        return keys, values


_DPE_LAYER_CLASSES: dict = {}


def _dpe_cache_layer(layer, state: DPELayerState):
    """A DPE cache layer with the (empty) state of `layer`, to take its place in the cache."""
    base = type(layer)
    cls = _DPE_LAYER_CLASSES.get(base)
    if cls is None:
        cls = _DPE_LAYER_CLASSES[base] = type(f"DPE{base.__name__}", (DPECacheLayerMixin, base), {"__module__": __name__})
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    layer = new
    layer._dpe_shared = _Shared(state)
    layer._dpe_pending = 0
    layer._dpe_tail = None
    layer._dpe_tail_len = 0
    layer._dpe_seen = None
    layer._dpe_layout = state.layout
    layer._dpe_version = state.selection_version
    return layer


def prepare_cache(cache, states: dict) -> None:
    """Turn the empty full-attention layers of a DynamicCache into DPE cache layers; leave anything else."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover
        return
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or not states:
        return
    if not layers and getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        layers.extend(DynamicLayer() for _ in range(max(states) + 1))  # what the cache would append lazily
    for idx, state in states.items():
        if idx < len(layers) and type(layers[idx]) is DynamicLayer and not getattr(layers[idx], "is_initialized", True):
            layers[idx] = _dpe_cache_layer(layers[idx], state)


@_per_class
def _forward_parameters(cls: type) -> tuple:
    """Parameter names (without self) of the first forward after DPEModelMixin in cls's MRO."""
    mro = cls.__mro__
    for klass in mro[mro.index(DPEModelMixin) + 1 :]:
        fn = klass.__dict__.get("forward")
        if fn is not None:
            return tuple(inspect.signature(fn).parameters)[1:]
    raise TypeError(f"{cls.__name__} has no forward")


class DPEModelMixin:
    """Mixed into a family's base model (e.g. LlamaModel): a fresh DynamicCache gets DPE cache layers."""

    def forward(self, *args, **kwargs):
        params = _forward_parameters(type(self))
        listed = [p for p in CACHE_ARGUMENT_NAMES if p in params]
        if not listed:
            raise DPERuntimeError(f"{type(self).__name__}.forward takes no KV cache argument DPE knows "
                                  f"({', '.join(CACHE_ARGUMENT_NAMES)})")
        # The newest name the forward lists is the cache's; an older one listed beside it is a deprecated alias
        # (transformers' deprecate_kwarg(..., expose_in_signature=True) adds the old name to a signature).
        name = listed[-1]
        for key in list(kwargs):
            value = kwargs[key]
            if key == name or not (key in listed or _is_cache(value)):
                continue
            if key in listed and (value is None or (_is_cache(value) and kwargs.get(name) is None)):
                del kwargs[key]
                if value is not None:
                    kwargs[name] = value
            else:
                raise DPERuntimeError(f"{type(self).__name__}.forward got a KV cache as {key!r}; this transformers "
                                      f"release takes it as {name!r}")
        idx = params.index(name)
        cache = args[idx] if len(args) > idx else kwargs.get(name)
        if cache is None:
            u = params.index("use_cache") if "use_cache" in params else None
            use_cache = args[u] if u is not None and len(args) > u else kwargs.get("use_cache")
            if use_cache is None:
                use_cache = getattr(self.config, "use_cache", False)
            if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
                use_cache = False
            if use_cache:
                from transformers import DynamicCache

                cache = DynamicCache(config=self.config)
                if len(args) > idx:
                    args = (*args[:idx], cache, *args[idx + 1 :])
                else:
                    kwargs[name] = cache
        past = 0
        states = self.__dict__.get("_dpe_states", {})
        if cache is not None:
            # Under torch.compile the cache keeps plain keys (DPE rotates them on the fly, as for a static cache):
            # inductor (torch 2.13) freed and reused the buffer of a DPE layer it made inside the compiled graph
            # while the layer still held it, and the logits past the window were wrong (issue 33).
            if not _compiling():
                prepare_cache(cache, states)
            past = int(cache.get_seq_length())  # where this forward's keys start
        self._dpe_warn_past_target(past, args, kwargs, params)
        for state in states.values():
            state.set_past_length(past if cache is not None else None)
        try:
            return super().forward(*args, **kwargs)
        finally:
            for state in states.values():
                state.set_past_length(None)

    def _dpe_warn_past_target(self, past: int, args, kwargs, params) -> None:
        """One warning per model when an input reaches past the length the export was made for."""
        if self.__dict__.get("_dpe_warned"):
            return
        dpe = getattr(self.config, "dpe", None) or {}
        target = dpe.get("target_length") if isinstance(dpe, dict) else None
        x = next((v for k, v in list(zip(params, args)) + list(kwargs.items())
                  if k in ("input_ids", "inputs_embeds") and v is not None), None)
        if not target or x is None or past + x.shape[1] <= target:
            return
        self.__dict__["_dpe_warned"] = True
        import warnings

        warnings.warn(
            f"DPE: this input reaches {past + x.shape[1]} tokens, past the {target} this export was made for "
            f"(pretrained on {dpe.get('pretrain_length')}, window {dpe.get('local_window_size')}, scale factors "
            f"{dpe.get('scale_factors')}); quality beyond {target} tokens was not calibrated",
            stacklevel=_caller_stacklevel())


# Frames a warning should not point at: the export's own code, and what runs a model's forward for the user.
_LIBRARY_MODULES = ("torch", "transformers", "transformers_modules", "accelerate", "peft")


def _caller_stacklevel() -> int:
    """The warnings stacklevel, seen from the function that calls this, of the first frame outside this file
    and the libraries that call a model's forward (torch, transformers and its remote code, accelerate, peft):
    the user's model(...) or generate(...) line rather than torch's module dispatch."""
    frame, level = sys._getframe(2), 2
    while frame is not None:
        if frame.f_globals is not globals() and _package_of(frame, _LIBRARY_MODULES) is None:
            return level
        frame, level = frame.f_back, level + 1
    return 2


def _package_of(frame, packages) -> Optional[str]:
    """Which of these top-level packages the frame's code belongs to, if any (by its module's name)."""
    name = str(frame.f_globals.get("__name__", ""))
    return next((p for p in packages if name == p or name.startswith(p + ".")), None)


def cache_argument(model) -> str:
    """The name this transformers release's model forward takes the KV cache under ("past_key_values"/"cache")."""
    params = inspect.signature(type(model).forward).parameters
    for name in reversed(CACHE_ARGUMENT_NAMES):
        if name in params:
            return name
    raise DPERuntimeError(f"{type(model).__name__}.forward takes no KV cache argument DPE knows")


def output_cache(outputs):
    """The KV cache a model output carries, under whichever name this transformers release gives it."""
    for name in reversed(CACHE_ARGUMENT_NAMES):
        if name in outputs:
            return outputs[name]
    return None


def _dpe_subclass(base: type, mixin: type) -> type:
    if issubclass(base, mixin):
        return base
    return type(f"DPE{base.__name__}", (mixin, base), {"__module__": __name__})


def install_dpe(model, params: DPEParams, model_class: Optional[type] = None) -> None:
    """Turn a loaded or freshly built model (causal LM or base model) into its DPE version, in place.

    Points each full-attention layer's attention at DPE (weights, projections and norms untouched), gives the
    base model DPE's cache handling and, when the config's max_position_embeddings was raised to the target
    length, rebuilds the rotary embedding from the pretraining length so that theta and the attention scaling
    stay exactly those of the base model.
    """
    register_dpe_attention()
    config = model.config
    check_supported_config(config)
    decoder = _decoder_of(model)
    rotary = decoder.rotary_emb
    rotary_dim = rotary_dim_of(config, rotary)
    params.validate(rotary_dim)
    if params.pretrain_length and params.pretrain_length != config.max_position_embeddings:
        rope_config = copy.deepcopy(config)
        rope_config.max_position_embeddings = params.pretrain_length
        device = next(rotary.buffers()).device
        decoder.rotary_emb = type(rotary)(config=rope_config).to(device)
    decoder.__class__ = model_class if model_class is not None else _dpe_subclass(type(decoder), DPEModelMixin)
    states: dict = {}
    layer_types = getattr(config, "layer_types", None)
    for idx in full_attention_layers(config):
        attn = attention_module(decoder.layers[idx])
        if not hasattr(attn, "config"):
            raise ValueError(f"{type(attn).__name__} does not dispatch attention through its config")
        _check_rotary_pairing(attn)
        state = DPELayerState(params, decoder, idx, rotary_dim, first=not states,
                              layer_type=layer_types[idx] if layer_types else "full_attention")
        attn.__dict__["dpe"] = state
        if not isinstance(attn.config, DPEAttentionConfig):
            attn.config = DPEAttentionConfig(attn.config)
        states[idx] = state
    decoder.__dict__["_dpe_states"] = states
    model.dpe_params = params


ATTENTION_ATTRIBUTES = ("self_attn", "attention", "attn")  # what decoder layers call their attention


def _decoder_of(model):
    """The base model that holds the layers and the rotary embedding (the model itself for AutoModel)."""
    if isinstance(getattr(model, "layers", None), torch.nn.ModuleList) and hasattr(model, "rotary_emb"):
        return model
    return model.get_decoder()


def _check_rotary_pairing(attn) -> None:
    """DPE's rotation pairs dim f with f + R/2 (transformers' rotate_half). A family whose own rotate_half pairs
    them otherwise (interleaved, as Cohere's) is refused rather than rotated wrongly."""
    fn = getattr(sys.modules.get(type(attn).__module__), "rotate_half", None)
    if fn is None:
        return
    x = torch.arange(1.0, 9.0)[None]
    try:
        same = torch.equal(fn(x), torch.cat((-x[..., 4:], x[..., :4]), dim=-1))
    except Exception:  # pragma: no cover - an unusual signature: nothing to compare
        return
    if not same:
        raise ValueError(f"{type(attn).__name__} pairs its rotary dimensions differently (interleaved); DPE "
                         "supports the half-split pairing of transformers' rotate_half")


def attention_module(layer):
    for name in ATTENTION_ATTRIBUTES:
        attn = getattr(layer, name, None)
        if isinstance(attn, torch.nn.Module):
            return attn
    raise ValueError(f"{type(layer).__name__} has no attention module ({', '.join(ATTENTION_ATTRIBUTES)})")


def set_dpe_selection(model, selected: Optional[torch.Tensor]) -> None:
    """Set the selected frequencies, bool [layers, query heads, R/2]; None selects every frequency."""
    decoder = _decoder_of(model)
    states = decoder.__dict__.get("_dpe_states", {})
    if selected is not None:
        config = model.config
        expected = (config.num_hidden_layers, config.num_attention_heads,
                    rotary_dim_of(config, getattr(decoder, "rotary_emb", None)) // 2)
        if tuple(selected.shape) != expected or selected.dtype != torch.bool:
            raise ValueError(f"selected dims must be bool {list(expected)}, got {selected.dtype} {list(selected.shape)}")
    for idx, state in states.items():
        sel = None if selected is None or bool(selected[idx].all()) else selected[idx]
        attn = attention_module(decoder.layers[idx])
        weight = next(attn.parameters(), None)
        if sel is not None and weight is not None and weight.device.type != "meta":  # meta: offloaded
            sel = sel.to(weight.device)
        # KV heads as the attention module computes them (a config may carry a num_key_value_heads its family
        # ignores, e.g. GPT-NeoX, which is always multi-head)
        rep = int(getattr(attn, "num_key_value_groups", 1) or 1)
        state.set_selection(sel, max(1, int(model.config.num_attention_heads) // rep))
    model.dpe_selected_dims = selected


def apply_dpe(model, params: DPEParams, selected: Optional[torch.Tensor] = None):
    """DPE on an already loaded base model (what dpe-export uses to calibrate and evaluate)."""
    install_dpe(model, params)
    set_dpe_selection(model, selected)
    return model


def _register_weight_conversions(cls) -> None:
    """Give this class the checkpoint key conversions of the family it extends (e.g. GPT-NeoX's embed_out ->
    lm_head, Qwen3-MoE's per-expert weights -> fused ones). transformers applies them by class name or
    model_type, but skips classes from remote code unless they are registered (5.x releases that have
    conversion mappings; older ones convert nothing for anyone)."""
    try:
        from transformers import conversion_mapping as cm
    except ImportError:
        return
    get = getattr(cm, "get_checkpoint_conversion_mapping", None)
    register = getattr(cm, "register_checkpoint_conversion_mapping", None)
    if get is None or register is None or cls.__name__ in getattr(cm, "USER_REGISTERED_MAPPINGS", ()):
        return
    base = next((k for k in cls.__mro__[1:] if k.__module__.startswith("transformers.models.")), None)
    if base is None:
        return
    base_type = getattr(getattr(base, "config_class", None), "model_type", None)
    mapping = get(base.__name__) or get(base_type)
    if mapping:
        register(cls.__name__, mapping, overwrite=True)
        # Releases that look conversions up by config.model_type only (5.0) need them under the export's own
        # model_type (dpe_<family>) too.
        own_type = getattr(getattr(cls, "config_class", None), "model_type", None)
        if own_type and own_type != base_type:
            register(own_type, mapping, overwrite=True)


def _copy_code_files(model, save_directory) -> None:
    """Put this file and the model's modeling file beside a saved export (transformers 5.0 does not)."""
    import os
    import shutil

    for path in (__file__, getattr(sys.modules.get(type(model).__module__), "__file__", None)):
        if path and os.path.isfile(path):
            target = os.path.join(save_directory, os.path.basename(path))
            if not os.path.exists(target):
                shutil.copyfile(path, target)


SERVING_ENGINES = ("vllm", "sglang", "text_generation_server", "tensorrt_llm", "lmdeploy")


def refuse_serving_engines(config=None) -> None:
    """Refuse, in one line, to be built by a serving engine: engines run their own attention and paged KV
    cache, which do not apply DPE (vLLM's Transformers backend swaps in its paged attention), so an export
    served by one would answer as the plain base model, or as garbage. Checked when the config is loaded and
    when a model is built, from the calling code's module names and the attention implementation."""
    implementation = getattr(config, "_attn_implementation", None) if config is not None else None
    engine = implementation if implementation in SERVING_ENGINES else None
    frame = sys._getframe(1)
    while engine is None and frame is not None:
        engine = _package_of(frame, SERVING_ENGINES)
        frame = frame.f_back
    if engine is not None:
        raise DPEServingError(
            f"This is a DPE export (dimension-wise RoPE scaling, arXiv 2504.18857); {engine} cannot serve it: its "
            "attention and KV cache do not apply DPE, so answers would be the base model's or wrong. Run it with "
            "transformers (AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)).")


class DPEServingError(RuntimeError):
    """An engine that cannot run DPE tried to load an export."""

    def __str__(self) -> str:  # one line, whatever the engine prints around it
        return " ".join(super().__str__().split())


class DPEConfigMixin:
    """Mixed into an export's config class (model_type dpe_<family>): refuses serving engines on load."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):  # noqa: D102
        refuse_serving_engines()
        return super().from_pretrained(*args, **kwargs)

    @classmethod
    def from_dict(cls, *args, **kwargs):  # noqa: D102
        refuse_serving_engines()
        return super().from_dict(*args, **kwargs)


def _tie_unloaded_weights(model) -> None:
    """Tie each tied weight that loading left on the meta device to its loaded source.

    transformers 5.3.0 drops a remote-code model's tied weights from the keys it treats as missing, then finds
    "both present" and ties nothing: the output embedding of every export with tied embeddings (Gemma, small
    Llama and Qwen models) stays unloaded and the logits are garbage. 5.4.0 fixed it; on other releases a tied
    weight is never left on the meta device, so this does nothing. A source that is itself on the meta device
    (offloaded with accelerate) is left to accelerate.
    """
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if expand is None:
        return
    for target, source in expand(all_submodels=True).items():
        try:
            target_param, source_param = model.get_parameter(target), model.get_parameter(source)
        except AttributeError:
            continue
        if target_param.device.type == "meta" and source_param.device.type != "meta":
            parent, _, name = target.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, source_param)
            tied = getattr(model, "all_tied_weights_keys", None)
            if isinstance(tied, dict):
                tied[target] = source  # what save_pretrained and resize_token_embeddings read


class DPEPretrainedMixin:
    """from_pretrained / save_pretrained of an export's classes: the selection file and the code files."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        _register_weight_conversions(cls)
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        _tie_unloaded_weights(model)
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
        import os

        if not os.path.isdir(save_directory):
            return
        _copy_code_files(self, save_directory)
        name = self.config.dpe.get("selected_dims")
        if name and self.dpe_selected_dims is not None:
            from safetensors.torch import save_file

            save_file({SELECTED_DIMS_TENSOR: self.dpe_selected_dims.cpu().contiguous()}, os.path.join(save_directory, name))


class DPEForCausalLMMixin(DPEPretrainedMixin):
    """Mixed into a family's causal LM class: installs DPE and carries its selection file."""

    dpe_model_class: Optional[type] = None

    def __init__(self, config, *args, **kwargs):
        check_transformers_version()
        refuse_serving_engines(config)
        super().__init__(config, *args, **kwargs)
        install_dpe(self, DPEParams.from_dict(config.dpe), self.dpe_model_class)
        self.dpe_selected_dims = None


class DPEBaseModelMixin(DPEPretrainedMixin, DPEModelMixin):
    """Mixed into a family's base model class for AutoModel: the same model, DPE included, without the head."""

    def __init__(self, config, *args, **kwargs):
        check_transformers_version()
        refuse_serving_engines(config)
        super().__init__(config, *args, **kwargs)
        install_dpe(self, DPEParams.from_dict(config.dpe), type(self))
        self.dpe_selected_dims = None
