"""DPE attention over vLLM's paged KV cache with flash-attention varlen calls: the GPU path of the vLLM plugin.

It reads the same cache as the torch path (paged.py): vLLM's per-layer logical layout
[num_blocks, num_kv_heads, block_size, head_size + head_size_v], every key in its plain rotation, so KV memory
stays 1x the base model's. A batch (requests' queries back to back, query_start_loc; request r's queries are the
last of its seq_lens[r] cached tokens) takes two flash calls and one merge:
- local part (distances 0 .. w - 1, plain RoPE): one paged call on the cache (block_table, seqused_k = seq_lens),
  causal with window_size (w - 1, 0);
- far part (distances >= w): the keys 0 .. seq_len - w - 1 of each request are gathered from their blocks and
  rotated on the fly by the rule's key shift (cos and sin from paged.KEY_ROTATIONS, the table of rotate_by's
  values by position), the queries by the query shift; one varlen call over them (cu_seqlens_k), causal with flash's bottom-right alignment, so that query i
  sees keys j <= i - w. The gathered keys and values are a transient buffer of at most one layer's KV (the
  batch's far keys), reused layer after layer;
- the two outputs merged by their log-sum-exp (vLLM's merge_attn_states when vLLM is there, else merge_lse).
A top-K selection (bool [H, R/2]) is exact in the same calls: the far query is [q_plain off the selection,
q_scaled on it] and the far key [k_plain, k_scaled], twice the head size (the value is zero-padded to match), so
q'.k' sums the plain products of unselected frequencies and the scaled ones of selected frequencies, per query
head, with keys still shared by the KV heads' query groups.

The flash function is a parameter (`flash`), with vllm.vllm_flash_attn.flash_attn_varlen_func's contract:
keyword arguments q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k or seqused_k, softmax_scale,
causal (bottom-right aligned), window_size, softcap, block_table, return_softmax_lse; returns (out [T, H, Dv],
lse [H, T] float32; a query with no key has out 0 and lse +inf or -inf). Tests pass a torch stand-in written from
that contract; on a GPU the plugin passes vLLM's kernel (load_flash_varlen). Needs torch only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from dpe_export.modeling_templates.dpe_attention import _selection_mask
from dpe_export.modeling_templates.dpe_rule import dpe_delta_positions, rotate_by, rotate_with
from dpe_export.serving.paged import KEY_ROTATIONS

FLASH_MAX_HEAD_SIZE = 256  # the largest head size flash-attention's kernels are built for


def load_flash_varlen() -> Optional[Callable]:
    """vLLM's flash varlen function when it can run here (a CUDA device and vllm.vllm_flash_attn), else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def load_merge() -> Callable:
    """vLLM's merge_attn_states (CUDA or Triton kernel) when vLLM is importable, else merge_lse (same contract)."""
    try:
        from vllm.v1.attention.ops.merge_attn_states import merge_attn_states
    except ImportError:
        return merge_lse
    return merge_attn_states


def merge_lse(output: torch.Tensor, prefix_output: torch.Tensor, prefix_lse: torch.Tensor,
              suffix_output: torch.Tensor, suffix_lse: torch.Tensor) -> None:
    """Join two attentions of the same queries over disjoint keys, as vLLM's merge_attn_states does.

    outputs [T, H, D], lse [H, T]; an lse of +inf or -inf marks a query with no key in that part (flash-attention 2
    reports +inf there). Writes output (0 where neither part has a key).
    """
    wide = torch.promote_types(prefix_lse.dtype, torch.float32)
    lse_a = prefix_lse.to(wide).masked_fill(prefix_lse == float("inf"), float("-inf"))
    lse_b = suffix_lse.to(wide).masked_fill(suffix_lse == float("inf"), float("-inf"))
    top = torch.maximum(lse_a, lse_b)
    empty = top == float("-inf")
    top = top.masked_fill(empty, 0.0)
    wa, wb = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = (wa + wb).masked_fill(empty, 1.0)
    wa, wb = (wa / total).transpose(0, 1)[..., None], (wb / total).transpose(0, 1)[..., None]
    work = torch.promote_types(output.dtype, torch.float32)
    output.copy_((prefix_output.to(work) * wa.to(work) + suffix_output.to(work) * wb.to(work)).to(output.dtype))


@dataclass
class FlashBatch:
    """What the flash path needs of a batch's layout, built once per step (plan_batch) and shared by its layers."""

    cu_seqlens_q: torch.Tensor  # int32 [R + 1]
    seq_lens: torch.Tensor  # int32 [R]
    max_query_len: int
    max_seq_len: int
    query_positions: torch.Tensor  # long [T]: each query's position in its request
    far_cu_seqlens_k: torch.Tensor  # int32 [R + 1]: request r's far keys are 0 .. seq_lens[r] - w - 1
    max_far_len: int
    far_blocks: torch.Tensor  # long [Nf]: the cache block of every far key, request after request
    far_offsets: torch.Tensor  # long [Nf]: its offset in the block
    far_positions: torch.Tensor  # long [Nf]
    window: int


def plan_batch(query_start_loc: list, seq_lens: list, block_table: torch.Tensor, block_size: int,
               window: int) -> FlashBatch:
    """The flash calls' varlen layout of a batch (python ints in, tensors on block_table's device out)."""
    device = block_table.device
    qsl = [int(x) for x in query_start_loc]
    lens = [int(x) for x in seq_lens]
    qlens = [b - a for a, b in zip(qsl, qsl[1:])]
    if any(q > n for q, n in zip(qlens, lens)):
        raise ValueError(f"more queries than cached tokens: query lengths {qlens}, seq lens {lens}")
    query_positions = torch.cat([torch.arange(n - q, n) for q, n in zip(qlens, lens)] or [torch.zeros(0)]).long()
    far_lens = [max(0, n - window) for n in lens]
    far_cu = [0]
    for f in far_lens:
        far_cu.append(far_cu[-1] + f)
    far_positions = torch.cat([torch.arange(f) for f in far_lens] or [torch.zeros(0)]).long()
    far_rows = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(far_lens, dtype=torch.long))
    far_positions, far_rows = far_positions.to(device), far_rows.to(device)
    blocks = block_table[far_rows, far_positions // block_size].long()
    return FlashBatch(
        cu_seqlens_q=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        max_query_len=max(qlens, default=0),
        max_seq_len=max(lens, default=0),
        query_positions=query_positions.to(device),
        far_cu_seqlens_k=torch.tensor(far_cu, dtype=torch.int32, device=device),
        max_far_len=max(far_lens, default=0),
        far_blocks=blocks,
        far_offsets=far_positions % block_size,
        far_positions=far_positions,
        window=int(window),
    )


def _rotate_tokens(x: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor, window: int, query: bool,
                   inv_freq: torch.Tensor, rotary_dim: int, length: int = 0) -> torch.Tensor:
    """x [N, heads, D] rotated at its plain positions -> DPE's scaled rotation (the rule's query or key shift).
    Keys (positions below `length`) take the cached table of the key shift's cos and sin, by position."""
    if not query:
        cos, sin = KEY_ROTATIONS.get(length, scales, inv_freq, x.dtype, x.device)
        return rotate_with(x, cos[positions][:, None], sin[positions][:, None], rotary_dim)
    shift = dpe_delta_positions(positions[None], scales.to(x.device), window, query=query)  # [1, N, R/2]
    return rotate_by(x.transpose(0, 1)[None], shift, inv_freq, rotary_dim)[0].transpose(0, 1)


def dpe_flash_paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, output: torch.Tensor, *,
                              batch: FlashBatch, block_table: torch.Tensor, head_size: int, window: int,
                              scales: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int, scale: float,
                              selected: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                              flash: Callable, merge: Callable = merge_lse) -> torch.Tensor:
    """DPE attention of a batch on a paged cache that already holds this step's keys, with two flash calls.

    query [T, H, D] rotated at its plain positions; kv_cache [num_blocks, Hkv, block_size, D + Dv] (paged.py's
    layout); batch from plan_batch with the same window; scales long [R/2]; selected bool [H, R/2] or None.
    Writes output [T, H, Dv] and returns it. Same arguments and result as paged.dpe_paged_attention.
    """
    if batch.window != window:
        raise ValueError(f"the batch plan is for window {batch.window}, the layer's is {window}")
    t, h, d = query.shape
    if t == 0:
        return output
    dv = kv_cache.shape[-1] - head_size
    # Flash's paged layout [num_blocks, block_size, Hkv, D] as views of the cache (no copy; stride(-1) == 1).
    k_cache = kv_cache[..., :head_size].transpose(1, 2)
    v_cache = kv_cache[..., head_size:].transpose(1, 2)
    common = dict(max_seqlen_q=batch.max_query_len, cu_seqlens_q=batch.cu_seqlens_q, softmax_scale=scale,
                  causal=True, softcap=float(softcap or 0.0), return_softmax_lse=True)
    out_local, lse_local = flash(q=query, k=k_cache, v=v_cache, max_seqlen_k=batch.max_seq_len,
                                 seqused_k=batch.seq_lens, block_table=block_table, window_size=[window - 1, 0],
                                 **common)
    if batch.far_blocks.numel() == 0:  # no request reaches distance w: plain RoPE only
        output.copy_(out_local.to(output.dtype))
        return output

    # One gather of the far tokens' pages (two advanced indices around a slice: [Nf, Hkv, D + Dv]); reshaping the
    # strided views instead would copy the layer's whole cache.
    kv_far = kv_cache[batch.far_blocks, :, batch.far_offsets].to(query.dtype)
    k_plain, v_far = kv_far[..., :head_size], kv_far[..., head_size:]
    k_scaled = _rotate_tokens(k_plain, batch.far_positions, scales, window, False, inv_freq, rotary_dim,
                              length=batch.max_far_len)
    q_scaled = _rotate_tokens(query, batch.query_positions, scales, window, True, inv_freq, rotary_dim)
    if selected is None:
        q_far, k_far = q_scaled, k_scaled
    else:
        sel = _selection_mask(selected.to(query.device), d)[0, :, 0]  # [H, D]: dims taking the scaled rotation
        zero = query.new_zeros(())
        q_far = torch.cat((torch.where(sel, zero, query), torch.where(sel, q_scaled, zero)), dim=-1)
        k_far = torch.cat((k_plain, k_scaled), dim=-1)  # [Nf, Hkv, 2D]
    width = k_far.shape[-1]
    if width > FLASH_MAX_HEAD_SIZE:
        raise ValueError(f"the far part's head size {width} exceeds flash-attention's {FLASH_MAX_HEAD_SIZE}"
                         " (a top-K selection doubles it); use the torch path")
    if width != dv:
        v_far = F.pad(v_far, (0, width - dv))
    out_far, lse_far = flash(q=q_far, k=k_far, v=v_far, max_seqlen_k=batch.max_far_len,
                             cu_seqlens_k=batch.far_cu_seqlens_k, **common)
    out_far = out_far[..., :dv]
    if width != dv:
        out_far = out_far.contiguous()
    merge(output, out_local, lse_local, out_far, lse_far)
    return output
