"""The vLLM plugin's GPU path (dpe_export/serving/flash.py) on CPU, with a torch stand-in for flash-attention.

`flash_stand_in` below implements vllm.vllm_flash_attn.flash_attn_varlen_func's documented contract (its
docstring, quoted where used), independently of the production code: varlen batches (cu_seqlens_q, and
cu_seqlens_k or seqused_k), a paged cache (block_table: k/v [num_blocks, block_size, Hkv, D]), causal with
bottom-right alignment, window_size, softcap, GQA, and (out, lse [H, T]) with +inf for a query that sees no key,
as flash-attention 2 reports it. The flash path is checked against the torch path (paged.py) and the dense float64
reference of the rule (tests/reference.py): prefill, decoding with the farthest key at w - 1, w, w + 1, scales that
do not divide the window, top-K selections, several sequences of different lengths in scattered blocks, chunked
queries on a cache, GQA, on many seeded shapes. No vLLM and no GPU needed.
"""
from __future__ import annotations

import random

import pytest
import torch
from reference import reference_attention

from dpe_export.modeling_templates.dpe_rule import rotate_by
from dpe_export.serving.flash import dpe_flash_paged_attention, merge_lse, plan_batch
from dpe_export.serving.paged import dpe_paged_attention, write_kv

TOL = dict(rtol=1e-9, atol=1e-9)


# --- the stand-in: flash_attn_varlen_func's contract in plain torch -------------------------------------------

def flash_stand_in(*, q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k=None, seqused_k=None,
                   softmax_scale=None, causal=False, window_size=None, softcap=0.0, block_table=None,
                   return_softmax_lse=False, calls=None):
    """q [total_q, H, D]; k/v [total_k, Hkv, D], or [num_blocks, block_size, Hkv, D] with block_table.

    "If causal=True, the causal mask is aligned to the bottom right corner of the attention matrix."
    "If window_size != (-1, -1) ... query at position i will only attend to keys between
    [i + seqlen_k - seqlen_q - window_size[0], i + seqlen_k - seqlen_q + window_size[1]] inclusive."
    "If the row of the mask is all zero, the output will be zero." softmax_lse: (nheads, total_q_seqlen).
    """
    assert (cu_seqlens_k is None) != (seqused_k is None), "exactly one of cu_seqlens_k and seqused_k"
    assert block_table is None or seqused_k is not None, "seqused_k must be provided with block_table"
    assert cu_seqlens_q.dtype == torch.int32 and (block_table is None or seqused_k.dtype == torch.int32)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert q.shape[-1] == k.shape[-1] == v.shape[-1], "flash-attention 2 wants one head size for q, k and v"
    if calls is not None:
        calls.append(dict(paged=block_table is not None, window_size=window_size, causal=causal))
    total_q, h, _ = q.shape
    hkv = k.shape[-2]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    left, right = (-1, -1) if window_size is None else tuple(window_size)
    work = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(total_q, h, v.shape[-1], dtype=q.dtype)
    lse = torch.full((h, total_q), float("inf"), dtype=torch.float32 if work == torch.float32 else work)
    for b in range(cu_seqlens_q.numel() - 1):
        qa, qb = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        assert qb - qa <= max_seqlen_q
        if block_table is not None:
            n, bs = int(seqused_k[b]), k.shape[1]
            j = torch.arange(n)
            blocks = block_table[b, j // bs].long()
            kb, vb = k[blocks, j % bs], v[blocks, j % bs]  # [n, Hkv, D]
        else:
            ka, kz = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
            kb, vb = k[ka:kz], v[ka:kz]
            n = kz - ka
        assert n <= max_seqlen_k
        sq = qb - qa
        if sq == 0:
            continue
        i = torch.arange(sq)[:, None] + (n - sq)  # the query's diagonal, aligned bottom right
        j = torch.arange(n)[None, :]
        seen = torch.ones(sq, n, dtype=torch.bool)
        if causal:
            seen &= j <= i
        if left >= 0:
            seen &= j >= i - left
        if right >= 0:
            seen &= j <= i + right
        kh = kb.to(work).repeat_interleave(h // hkv, dim=1)  # head t uses KV head t // (H / Hkv)
        vh = vb.to(work).repeat_interleave(h // hkv, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[qa:qb].to(work), kh) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~seen, float("-inf"))
        row = torch.logsumexp(s, dim=-1)  # [H, sq]; -inf where nothing is seen
        p = torch.exp(s - row[..., None]).nan_to_num(0.0)
        out[qa:qb] = torch.einsum("hqk,khd->qhd", p, vh).to(q.dtype)
        lse[:, qa:qb] = torch.where(seen.any(-1)[None], row, torch.full_like(row, float("inf"))).to(lse.dtype)
    return (out, lse) if return_softmax_lse else out


def test_stand_in_follows_the_documented_masks():
    """The docstring's examples: seqlen_q=2, seqlen_k=5 -> [[1 1 1 1 0], [1 1 1 1 1]]; seqlen_q=5, seqlen_k=2 ->
    [[0 0], [0 0], [0 0], [1 0], [1 1]] (rows with no key: output 0); and a window (1, 0) on the first."""
    def seen(sq, sk, window=None):
        # one head, D = sk, keys the identity: out[q] = the softmax weights of query q over the keys
        q = torch.zeros(sq, 1, sk, dtype=torch.float64)
        k = torch.eye(sk, dtype=torch.float64)[:, None]
        out = flash_stand_in(q=q, k=k, v=k, max_seqlen_q=sq, cu_seqlens_q=torch.tensor([0, sq], dtype=torch.int32),
                             max_seqlen_k=sk, cu_seqlens_k=torch.tensor([0, sk], dtype=torch.int32), causal=True,
                             window_size=window)
        return (out[:, 0] > 0).int().tolist()

    assert seen(2, 5) == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert seen(5, 2) == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]
    assert seen(2, 5, [1, 0]) == [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]


# --- test data: sequences in scattered blocks --------------------------------------------------------------------

def _rotary(rotary_dim):
    return 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))


def _sequence(n, h, hkv, d, seed, dtype=torch.float64):
    """Unrotated q/k/v [1, H(kv), n, D] and the plain-rotated q [n, H, D], k [Hkv, n, D] an engine holds."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, hkv, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(1, hkv, n, d, generator=g, dtype=torch.float64)
    pos = torch.arange(n)[None, :, None].expand(1, n, d // 2)
    inv_freq = _rotary(d)
    q_rot = rotate_by(q, pos, inv_freq, d)[0].transpose(0, 1).to(dtype)
    k_rot = rotate_by(k, pos, inv_freq, d)[0].to(dtype)
    return q, k, v, q_rot, k_rot


class Paged:
    """Sequences' keys in scattered blocks of a DPE_TORCH-layout cache [num_blocks, Hkv, bs, 2D], as vLLM lays
    them out (block tables padded with block 0, spare blocks holding garbage)."""

    def __init__(self, lens, *, h, hkv, d, bs, seed, dtype=torch.float64):
        self.lens, self.h, self.hkv, self.d, self.bs = list(lens), h, hkv, d, bs
        self.seqs = [_sequence(n, h, hkv, d, seed * 101 + r, dtype) for r, n in enumerate(lens)]
        need = [-(-n // bs) for n in lens]
        nblocks = sum(need) + 5
        g = torch.Generator().manual_seed(seed)
        self.cache = torch.randn(nblocks, hkv, bs, 2 * d, generator=g).to(dtype) * 100  # garbage where unwritten
        perm = torch.randperm(nblocks, generator=g)
        rows, used = [], 0
        for nb in need:
            rows.append(perm[used : used + nb])
            used += nb
        width = max(need) + 2
        self.block_table = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows]).int()
        self.written = [0] * len(lens)

    def write(self, r, upto):
        """Write request r's keys and values a .. upto - 1 through slots, as do_kv_cache_update does."""
        a = self.written[r]
        _, _, v, _, k_rot = self.seqs[r]
        t = torch.arange(a, upto)
        slots = self.block_table[r, t // self.bs].long() * self.bs + t % self.bs
        write_kv(self.cache, k_rot[:, t].transpose(0, 1), v[0, :, t].transpose(0, 1).to(self.cache.dtype), slots)
        self.written[r] = upto

    def step(self, qlens):
        """This step: request r has its first seq_lens[r] tokens cached, the last qlens[r] of them its queries."""
        seq_lens = [w for w in self.written]
        query = torch.cat([s[3][n - m : n] for s, n, m in zip(self.seqs, seq_lens, qlens)])
        qsl = [0]
        for m in qlens:
            qsl.append(qsl[-1] + m)
        return query, qsl, seq_lens

    def reference(self, r, window, scales, selected):
        q, k, v, _, _ = self.seqs[r]
        n = q.shape[2]
        out = reference_attention(q, k, v, torch.arange(n)[None], _rotary(self.d), 1.0, self.d ** -0.5, window,
                                  scales, selected)
        return out[0].transpose(0, 1)  # [n, H, D]


def _scales(groups, d):
    per = d // 2 // len(groups)
    return torch.tensor([s for s in groups for _ in range(per)], dtype=torch.long)


def _selection(h, d, seed, k=3):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(h, d // 2, generator=g).topk(k, dim=-1).indices
    return torch.zeros(h, d // 2, dtype=torch.bool).scatter_(-1, idx, True)


def _run_both(p: Paged, qlens, *, window, scales, selected, softcap=None, calls=None):
    """(flash path with the stand-in, torch path) outputs of this step, and the step's layout."""
    query, qsl, seq_lens = p.step(qlens)
    common = dict(head_size=p.d, window=window, scales=scales, inv_freq=_rotary(p.d), rotary_dim=p.d,
                  scale=p.d ** -0.5, selected=selected, softcap=softcap)
    batch = plan_batch(qsl, seq_lens, p.block_table, p.bs, window)
    got = dpe_flash_paged_attention(query, p.cache, torch.full_like(query, float("nan")), batch=batch,
                                    block_table=p.block_table,
                                    flash=lambda **kw: flash_stand_in(calls=calls, **kw), **common)
    torch_path = dpe_paged_attention(query, p.cache, torch.full_like(query, float("nan")), query_start_loc=qsl,
                                     seq_lens=seq_lens, block_table=p.block_table, **common)
    return got, torch_path, qsl, seq_lens


CASES = {
    "every-frequency": dict(window=8, scales=(4, 4, 2, 2), selected=False),
    "scales-not-dividing-window": dict(window=10, scales=(3, 4, 7, 16), selected=False),
    "top-k-selection": dict(window=10, scales=(3, 4, 7, 16), selected=True),
    "window-1": dict(window=1, scales=(2, 3, 5, 8), selected=False),
    "window-2-top-k": dict(window=2, scales=(3, 3, 5, 5), selected=True),
}
SHAPES = {"gqa-4-2": (4, 2, 16), "mha-2-2": (2, 2, 8), "mqa-6-1": (6, 1, 16)}


def _setup(case, shape, seed):
    c = CASES[case]
    h, hkv, d = SHAPES[shape]
    scales = _scales(c["scales"], d)
    sel = _selection(h, d, seed) if c["selected"] else None
    return c["window"], scales, sel, h, hkv, d


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_batch_matches_torch_path_and_reference(case, shape):
    """Whole prompts of different lengths (shorter than, at and beyond the window) in one batch."""
    w, scales, sel, h, hkv, d = _setup(case, shape, seed=1)
    lens = [1, w, w + 1, 3 * w + 5, 2 * w + 3]
    p = Paged(lens, h=h, hkv=hkv, d=d, bs=4, seed=2)
    for r, n in enumerate(lens):
        p.write(r, n)
    calls = []
    got, torch_path, qsl, _ = _run_both(p, lens, window=w, scales=scales, selected=sel, calls=calls)
    assert [c["paged"] for c in calls] == [True, False] and calls[0]["window_size"] == [w - 1, 0]
    torch.testing.assert_close(got, torch_path, **TOL)
    for r in range(len(lens)):
        torch.testing.assert_close(got[qsl[r] : qsl[r + 1]], p.reference(r, w, scales, sel), **TOL)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("extra", [0, 1, 2])  # the farthest key at distance w - 1, w, w + 1
def test_decode_at_window_edges(case, extra):
    w, scales, sel, h, hkv, d = _setup(case, "gqa-4-2", seed=extra)
    lens = [w + extra, w + extra + 3, max(1, w + extra - 1)]
    p = Paged(lens, h=h, hkv=hkv, d=d, bs=3, seed=extra)
    for r, n in enumerate(lens):
        p.write(r, n)
    got, torch_path, qsl, _ = _run_both(p, [1, 1, 1], window=w, scales=scales, selected=sel)
    torch.testing.assert_close(got, torch_path, **TOL)
    for r in range(len(lens)):
        torch.testing.assert_close(got[qsl[r] : qsl[r + 1]], p.reference(r, w, scales, sel)[-1:], **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_prefill_then_decode_matches_reference(case):
    """Two requests fed in steps of uneven chunks (chunked prefill, a cached prefix), then decoded together:
    every step's queries sit on the keys cached by earlier steps."""
    w, scales, sel, h, hkv, d = _setup(case, "gqa-4-2", seed=3)
    lens = [4 * w + 3, 3 * w + 1]
    p = Paged(lens, h=h, hkv=hkv, d=d, bs=4, seed=3)
    cuts = [sorted({0, w - 1, w + 1, 2 * w, 2 * w + 1, 3 * w + 2, lens[0] - 2}),
            sorted({0, 1, w, w + 2, 3 * w - 1})]
    refs = [p.reference(r, w, scales, sel) for r in range(2)]
    steps = max(len(c) for c in cuts)
    for s in range(1, steps + 2):
        qlens = []
        for r, c in enumerate(cuts):
            upto = c[s] if s < len(c) else min(lens[r], p.written[r] + 1)  # then one token a step
            qlens.append(upto - p.written[r])
            p.write(r, upto)
        got, torch_path, qsl, seq_lens = _run_both(p, qlens, window=w, scales=scales, selected=sel)
        torch.testing.assert_close(got, torch_path, **TOL)
        for r in range(2):
            want = refs[r][seq_lens[r] - qlens[r] : seq_lens[r]]
            torch.testing.assert_close(got[qsl[r] : qsl[r + 1]], want, **TOL, msg=f"step {s} request {r}")


@pytest.mark.parametrize("seed", range(12))
def test_random_batches(seed):
    """Seeded random batches: window, scales, head layout, block size, lengths and query lengths all drawn."""
    rnd = random.Random(seed)
    h, hkv, d = rnd.choice(list(SHAPES.values()))
    w = rnd.choice([1, 2, 3, 5, 8, 13])
    scales = _scales(tuple(rnd.choice([1, 2, 3, 4, 5, 7, 16]) for _ in range(2)), d)
    sel = _selection(h, d, seed, k=rnd.randint(1, d // 2)) if rnd.random() < 0.4 else None
    nreq = rnd.randint(1, 5)
    lens = [rnd.randint(1, 4 * w + 12) for _ in range(nreq)]
    p = Paged(lens, h=h, hkv=hkv, d=d, bs=rnd.choice([1, 2, 4, 16]), seed=seed)
    qlens = [rnd.choice([1, n, rnd.randint(1, n)]) for n in lens]
    for r, n in enumerate(lens):
        p.write(r, n - qlens[r])
        p.write(r, n)
    got, torch_path, qsl, _ = _run_both(p, qlens, window=w, scales=scales, selected=sel)
    torch.testing.assert_close(got, torch_path, **TOL)
    for r, (n, m) in enumerate(zip(lens, qlens)):
        torch.testing.assert_close(got[qsl[r] : qsl[r + 1]], p.reference(r, w, scales, sel)[n - m :], **TOL)


def test_softcap_matches_torch_path():
    """Soft-capped scores (Gemma 2 style): the flash calls get softcap, as the torch path applies it."""
    w, scales, sel, h, hkv, d = _setup("scales-not-dividing-window", "gqa-4-2", seed=4)
    lens = [3 * w + 2, w + 1]
    p = Paged(lens, h=h, hkv=hkv, d=d, bs=4, seed=4)
    for r, n in enumerate(lens):
        p.write(r, n - 3)
        p.write(r, n)
    got, torch_path, _, _ = _run_both(p, [3, 3], window=w, scales=scales, selected=None, softcap=2.0)
    torch.testing.assert_close(got, torch_path, **TOL)


def test_half_precision_cache_close_to_float64():
    """A bfloat16 cache and queries (what a GPU serves): within bfloat16 rounding of the float64 reference."""
    w, scales, sel, h, hkv, d = _setup("top-k-selection", "gqa-4-2", seed=5)
    lens = [3 * w + 4, 2 * w]
    p = Paged(lens, h=h, hkv=hkv, d=d, bs=4, seed=5, dtype=torch.bfloat16)
    for r, n in enumerate(lens):
        p.write(r, n - 2)
        p.write(r, n)
    got, torch_path, qsl, _ = _run_both(p, [2, 2], window=w, scales=scales, selected=sel)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), torch_path.double(), rtol=0.05, atol=0.05)
    for r, n in enumerate(lens):
        torch.testing.assert_close(got[qsl[r] : qsl[r + 1]].double(), p.reference(r, w, scales, sel)[n - 2 :],
                                   rtol=0.05, atol=0.05)


def test_no_far_keys_is_one_local_call():
    """A batch no request of which reaches distance w: the local call's output, no far call."""
    p = Paged([3, 5], h=4, hkv=2, d=16, bs=4, seed=6)
    p.write(0, 3)
    p.write(1, 5)
    calls = []
    got, torch_path, _, _ = _run_both(p, [3, 2], window=8, scales=_scales((2, 3), 16), selected=None, calls=calls)
    assert len(calls) == 1 and calls[0]["paged"]
    torch.testing.assert_close(got, torch_path, **TOL)


def test_selection_too_wide_for_flash_is_refused():
    """A top-K selection doubles the far part's head size; over flash's 256 the path refuses in one line."""
    d = 136
    p = Paged([12], h=2, hkv=1, d=d, bs=4, seed=7)
    p.write(0, 12)
    query, qsl, seq_lens = p.step([1])
    batch = plan_batch(qsl, seq_lens, p.block_table, p.bs, 4)
    with pytest.raises(ValueError, match="exceeds flash-attention's 256"):
        dpe_flash_paged_attention(query, p.cache, torch.empty_like(query), batch=batch, block_table=p.block_table,
                                  head_size=d, window=4, scales=_scales((2,), d), inv_freq=_rotary(d), rotary_dim=d,
                                  scale=d ** -0.5, selected=_selection(2, d, 0), flash=flash_stand_in)


def test_plan_refuses_more_queries_than_tokens_and_other_window():
    bt = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="more queries than cached tokens"):
        plan_batch([0, 5], [4], bt, 4, 2)
    batch = plan_batch([0, 1], [4], bt, 4, 2)
    with pytest.raises(ValueError, match="window"):
        dpe_flash_paged_attention(torch.zeros(1, 2, 8), torch.zeros(1, 1, 4, 16), torch.zeros(1, 2, 8), batch=batch,
                                  block_table=bt, head_size=8, window=3, scales=_scales((2,), 8), inv_freq=_rotary(8),
                                  rotary_dim=8, scale=1.0, flash=flash_stand_in)


def test_merge_lse_handles_empty_parts():
    """+inf (flash-attention 2's mark) and -inf lse mean no key in that part; both empty gives 0."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 2, 8, generator=g, dtype=torch.float64), torch.randn(4, 2, 8, generator=g, dtype=torch.float64)
    la, lb = torch.randn(2, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
    la[:, 1], lb[:, 2] = float("inf"), float("-inf")
    la[:, 3], lb[:, 3] = float("inf"), float("inf")
    out = torch.empty_like(a)
    merge_lse(out, a, la, b, lb)
    wa = torch.sigmoid(la - lb).transpose(0, 1)[..., None]
    torch.testing.assert_close(out[0], (wa * a + (1 - wa) * b)[0])
    torch.testing.assert_close(out[1], b[1])
    torch.testing.assert_close(out[2], a[2])
    assert out[3].eq(0).all()
