# coding=utf-8
# dpe_kernels.py: attention kernels that also return each query row's log-sum-exp, so that attentions over
# disjoint key sets (DPE's local and far parts) merge exactly: torch's fused CPU flash kernel, its CUDA
# memory-efficient kernel, flash-attn 2, and a chunked float32 fallback.
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .dpe_rule import work_dtype


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
    work = work_dtype(q.dtype)
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
