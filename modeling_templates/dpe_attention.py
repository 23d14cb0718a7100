# coding=utf-8
# dpe_attention.py: DPE attention on tensors. A query sees its keys within the window in their plain rotation
# (the local part) and the keys at least w behind it in their scaled rotation on the selected frequencies (the far
# part); each part is a memory-efficient attention returning its log-sum-exp, and the two are merged exactly.
# Prefill works on blocks of w positions with no mask; a prompt continued on a cache and decoding use a band mask
# of at most block x (block + w) scores; training, softcap, dropout and padded rows materialise scores a chunk of
# queries at a time. Knows nothing of transformers: a serving backend can call it.
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .dpe_kernels import attention_with_lse, flash_attn_with_lse, repeat_kv
from .dpe_rule import work_dtype


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
    work = work_dtype(o0.dtype)
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
    work = work_dtype(q_plain.dtype)  # scores and softmax in float32 at least
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
