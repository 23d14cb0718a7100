"""DPE attention over a paged KV cache, in plain torch (no vLLM import): what the vLLM plugin's CPU backend runs.

The cache keeps every token's key in its plain rotation (the one the family's RoPE gave it at its position),
in vLLM's per-layer logical layout [num_blocks, num_kv_heads, block_size, head_size + head_size_v] with the
key in the first head_size channels and the value in the rest. A sequence's attention is a pure function of
its cached plain keys and values and its positions (0 .. seq_len - 1, in block-table order): the scaled keys
of the far part are made on the fly with the rule's rotation (dpe_rule.dpe_delta_positions / rotate_by; the
keys' cos and sin depend on the position only, so KeyRotations keeps them in a table that grows with the longest
sequence), and
the local and far parts are computed and merged by log-sum-exp in dpe_attention.dpe_attention. So chunked
prefill, prefix caching (a cached block holds the same plain keys whoever computed it) and preemption
(recomputation writes the same keys) give the same answer as one prefill.
"""
from __future__ import annotations

from typing import Optional

import torch

from dpe_export.modeling_templates.dpe_attention import dpe_attention
from dpe_export.modeling_templates.dpe_rule import dpe_delta_positions, rotate_by, rotate_with, rotation


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store key [T, Hkv, Dk] and value [T, Hkv, Dv] at slots (block * block_size + offset); slots < 0 skipped.

    kv_cache [num_blocks, Hkv, block_size, Dk + Dv] (any strides): the key in channels :Dk, the value after.
    Only the first len(slot_mapping) tokens are written (the rest are padding).
    """
    n = int(slot_mapping.shape[0])
    if n == 0:
        return
    slots = slot_mapping.to(device=kv_cache.device, dtype=torch.long)
    key, value = key[:n], value[:n]
    valid = slots >= 0
    if not bool(valid.all()):
        slots, key, value = slots[valid], key[valid], value[valid]
    block_size, dk = kv_cache.shape[2], key.shape[-1]
    blocks, offsets = slots // block_size, slots % block_size
    # Two advanced indices around a slice: the indexed view is [n, Hkv, channels].
    kv_cache[blocks, :, offsets, :dk] = key.to(kv_cache.dtype)
    kv_cache[blocks, :, offsets, dk:] = value.to(kv_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, block_row: torch.Tensor, seq_len: int, head_size: int):
    """One sequence's keys and values, [Hkv, seq_len, Dk] and [Hkv, seq_len, Dv], from its block-table row.

    The whole blocks are gathered first (contiguous copies), then keys and values are laid out head-major.
    """
    block_size = kv_cache.shape[2]
    nblocks = -(-seq_len // block_size)
    rows = block_row[:nblocks].to(device=kv_cache.device, dtype=torch.long)
    kv = kv_cache.index_select(0, rows)  # [nb, Hkv, bs, C]
    hkv = kv.shape[1]
    k = kv[..., :head_size].transpose(0, 1).reshape(hkv, nblocks * block_size, head_size)
    v = kv[..., head_size:].transpose(0, 1).reshape(hkv, nblocks * block_size, kv.shape[-1] - head_size)
    return k[:, :seq_len], v[:, :seq_len]


class KeyRotations:
    """cos and sin of the far keys' rotation (the key shift j//s - j times each frequency), [n, R/2] for positions
    0 .. n - 1: the same values rotate_by forms, computed once per (scales, frequencies, dtype, device) and grown
    by doubling, instead of every layer recomputing float64 sines of every key at every step."""

    def __init__(self, limit: int = 8):
        self.tables: dict = {}
        self.limit = limit  # distinct specs kept (a model has one per layer type, or a few with selections)

    def get(self, n: int, scales: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, device: torch.device):
        # the keys' shift j//s - j does not depend on the window (the queries' does): not part of the key
        key = (tuple(scales.tolist()), tuple(inv_freq.tolist()), dtype, str(device))
        table = self.tables.get(key)
        if table is None or table[0].shape[0] < n:
            size = max(n, 2 * table[0].shape[0] if table is not None else 4096)
            pos = torch.arange(size, device=device)[None]
            shift = dpe_delta_positions(pos, scales.to(device), 0, query=False)[0]  # [size, R/2]
            if table is None and len(self.tables) >= self.limit:
                self.tables.pop(next(iter(self.tables)))
            table = self.tables[key] = rotation(shift, inv_freq, dtype)
        return table[0][:n], table[1][:n]


KEY_ROTATIONS = KeyRotations()


def dpe_sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, scales: torch.Tensor,
                           inv_freq: torch.Tensor, rotary_dim: int, scale: float,
                           selected: Optional[torch.Tensor] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """DPE attention of one sequence's last m positions.

    q [m, H, D]: the queries of positions n - m .. n - 1, rotated at their plain positions by the family's RoPE.
    k [Hkv, n, D], v [Hkv, n, Dv]: every key and value of positions 0 .. n - 1, keys in their plain rotation.
    scales: long [R/2], each rotary frequency's scale factor; selected: bool [H, R/2] or None (every frequency).
    Returns [m, H, Dv].
    """
    m, n = q.shape[0], k.shape[1]
    if n < m:
        raise ValueError(f"{n} keys for {m} queries")
    if m == 0:  # torch's fused CPU kernel faults on empty inputs
        return q.new_empty(0, q.shape[1], v.shape[-1])
    qh = q.transpose(0, 1)[None]  # [1, H, m, D]
    kh, vh = k[None], v[None]  # [1, Hkv, n, D]
    key_pos = torch.arange(n, device=q.device)[None]  # [1, n]
    pos = key_pos[:, n - m :]
    scales = scales.to(q.device)
    cos, sin = KEY_ROTATIONS.get(n, scales, inv_freq, k.dtype, k.device)
    k_far = rotate_with(kh, cos, sin, rotary_dim)
    q_scaled = rotate_by(qh, dpe_delta_positions(pos, scales, window, query=True), inv_freq, rotary_dim)
    out = dpe_attention(qh, q_scaled, kh, k_far, vh, window=window, scale=scale, selected=selected,
                        k_far_plain=kh if selected is not None else None, softcap=softcap)
    return out[0]  # [m, H, Dv]


def dpe_paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, output: torch.Tensor, *,
                        query_start_loc: list, seq_lens: list, block_table: torch.Tensor, head_size: int,
                        window: int, scales: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int, scale: float,
                        selected: Optional[torch.Tensor] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """DPE attention of a batch of sequences on a paged cache that already holds this step's keys.

    query [T, H, D] (requests' queries back to back, query_start_loc[r] .. query_start_loc[r + 1]); request r has
    seq_lens[r] tokens in the cache, its queries being the last ones. Writes output [T, H, Dv] and returns it.
    """
    for r, n in enumerate(seq_lens):
        a, b = int(query_start_loc[r]), int(query_start_loc[r + 1])
        if b <= a:
            continue
        k, v = gather_kv(kv_cache, block_table[r], int(n), head_size)
        out = dpe_sequence_attention(query[a:b], k.to(query.dtype), v.to(query.dtype), window=window,
                                     scales=scales, inv_freq=inv_freq, rotary_dim=rotary_dim, scale=scale,
                                     selected=selected, softcap=softcap)
        output[a:b] = out.to(output.dtype)
    return output
