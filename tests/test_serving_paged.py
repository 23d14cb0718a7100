"""The serving path's DPE attention over a paged KV cache (dpe_export/serving/paged.py), checked against the dense
float64 reference of the rule (tests/reference.py). Pure torch: runs without vLLM.

Covers what a serving engine does to a sequence: keys written to scattered blocks, queries arriving all at once
(prefill), in chunks (chunked prefill, or a prefix found in the cache) or one at a time (decoding), several
sequences of different lengths in one batch; at the distances around the window (w - 1, w, w + 1), with scale
factors that do not divide the window, partial rotary dims and top-K frequency selections.
"""
from __future__ import annotations

import pytest
import torch
from reference import reference_attention

from dpe_export.modeling_templates.dpe_rule import rotate_by
from dpe_export.serving.paged import dpe_paged_attention, dpe_sequence_attention, gather_kv, write_kv

H, HKV, D = 4, 2, 16


def _case(n, *, rotary_dim=D, seed=0, dtype=torch.float64):
    """Unrotated q/k/v [1, H(kv), n, D], plus the plain-rotated q [n, H, D] and k [Hkv, n, D] a serving engine
    holds after the family's RoPE."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, n, D, generator=g, dtype=dtype)
    k = torch.randn(1, HKV, n, D, generator=g, dtype=dtype)
    v = torch.randn(1, HKV, n, D, generator=g, dtype=dtype)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    pos = torch.arange(n)[None, :, None].expand(1, n, rotary_dim // 2)
    q_rot = rotate_by(q, pos, inv_freq, rotary_dim)[0].transpose(0, 1)  # [n, H, D]
    k_rot = rotate_by(k, pos, inv_freq, rotary_dim)[0]  # [Hkv, n, D]
    return q, k, v, q_rot, k_rot, inv_freq


def _reference(q, k, v, inv_freq, window, scales, selected):
    """[n, H, D]: the reference's DPE attention of every position (it rotates all D dims)."""
    n = q.shape[2]
    pos = torch.arange(n)[None]
    out = reference_attention(q, k, v, pos, inv_freq, 1.0, D ** -0.5, window, scales, selected)
    return out[0].transpose(0, 1)


def _scales(groups_scales, rotary_dim=D):
    per = rotary_dim // 2 // len(groups_scales)
    return torch.tensor([s for s in groups_scales for _ in range(per)], dtype=torch.long)


def _selection(seed=1, k=3):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(H, D // 2, generator=g).topk(k, dim=-1).indices
    return torch.zeros(H, D // 2, dtype=torch.bool).scatter_(-1, idx, True)


CASES = {
    "every-frequency": dict(window=8, scales=(4, 4, 2, 2), selected=False),
    "scales-not-dividing-window": dict(window=10, scales=(3, 4, 7, 16), selected=False),
    "top-k-selection": dict(window=10, scales=(3, 4, 7, 16), selected=True),
    "window-1": dict(window=1, scales=(2, 3, 5, 8), selected=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_matches_reference(case):
    c = CASES[case]
    n = 3 * c["window"] + 5
    q, k, v, q_rot, k_rot, inv_freq = _case(n)
    scales = _scales(c["scales"])
    sel = _selection() if c["selected"] else None
    want = _reference(q, k, v, inv_freq, c["window"], scales, sel)
    got = dpe_sequence_attention(q_rot, k_rot, v[0], window=c["window"], scales=scales, inv_freq=inv_freq,
                                 rotary_dim=D, scale=D ** -0.5, selected=sel)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("extra", [0, 1, 2])  # the farthest key at distance w - 1, w, w + 1
def test_decode_at_window_edges(case, extra):
    c = CASES[case]
    w = c["window"]
    n = w + extra
    q, k, v, q_rot, k_rot, inv_freq = _case(n, seed=extra)
    scales = _scales(c["scales"])
    sel = _selection() if c["selected"] else None
    want = _reference(q, k, v, inv_freq, w, scales, sel)[-1:]
    got = dpe_sequence_attention(q_rot[-1:], k_rot, v[0], window=w, scales=scales, inv_freq=inv_freq,
                                 rotary_dim=D, scale=D ** -0.5, selected=sel)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_queries_match_one_prefill(case):
    """Queries in chunks of any size on the keys so far (chunked prefill, a cached prefix) = one prefill."""
    c = CASES[case]
    w = c["window"]
    n = 4 * w + 3
    q, k, v, q_rot, k_rot, inv_freq = _case(n, seed=3)
    scales = _scales(c["scales"])
    sel = _selection() if c["selected"] else None
    want = _reference(q, k, v, inv_freq, w, scales, sel)
    bounds = sorted({0, w - 1, w + 1, 2 * w, 2 * w + 1, 3 * w + 2, n})
    for a, b in zip(bounds, bounds[1:]):
        got = dpe_sequence_attention(q_rot[a:b], k_rot[:, :b], v[0, :, :b], window=w, scales=scales,
                                     inv_freq=inv_freq, rotary_dim=D, scale=D ** -0.5, selected=sel)
        torch.testing.assert_close(got, want[a:b], rtol=1e-9, atol=1e-9, msg=f"queries {a}..{b}")


def test_partial_rotary_dims_match_full_rotary_on_the_rotated_part():
    """With R < D rotary dims the other dims carry no position: DPE rotates only the first R (pairs f, f + R/2).

    Checked by building q/k whose non-rotary dims are zero: attention then equals the full-rotary result on an
    R-dim head, computed by the reference."""
    w, r = 8, 8
    n = 3 * w + 1
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, H, n, r, generator=g, dtype=torch.float64)
    k = torch.randn(1, HKV, n, r, generator=g, dtype=torch.float64)
    v = torch.randn(1, HKV, n, r, generator=g, dtype=torch.float64)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    scales = torch.tensor([5, 5, 3, 3])
    want = reference_attention(q, k, v, torch.arange(n)[None], inv_freq, 1.0, r ** -0.5, w, scales, None)[0]
    pos = torch.arange(n)[None, :, None].expand(1, n, r // 2)
    pad = (0, D - r)
    q_rot = torch.nn.functional.pad(rotate_by(q, pos, inv_freq, r), pad)[0].transpose(0, 1)
    k_rot = torch.nn.functional.pad(rotate_by(k, pos, inv_freq, r), pad)[0]
    got = dpe_sequence_attention(q_rot, k_rot, torch.nn.functional.pad(v[0], pad), window=w, scales=scales,
                                 inv_freq=inv_freq, rotary_dim=r, scale=r ** -0.5)
    torch.testing.assert_close(got[..., :r], want.transpose(0, 1), rtol=1e-9, atol=1e-9)


def test_paged_batch_of_sequences_matches_reference():
    """Two sequences of different lengths in scattered blocks: one decoding, one prefilling its last chunk."""
    w, bs = 10, 4
    scales = _scales((3, 4, 7, 16))
    sel = _selection()
    lens, qlens = [37, 23], [1, 9]
    seqs = [_case(n, seed=10 + i) for i, n in enumerate(lens)]
    nblocks = sum(-(-n // bs) for n in lens) + 3
    cache = torch.zeros(nblocks, HKV, bs, 2 * D, dtype=torch.float64)
    perm = torch.randperm(nblocks, generator=torch.Generator().manual_seed(0))
    rows, used = [], 0
    for n in lens:
        nb = -(-n // bs)
        rows.append(perm[used : used + nb])
        used += nb
    width = max(len(r) for r in rows)
    block_table = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])
    # The cached tokens first (earlier steps), then this step's, as vLLM's slot mapping gives them.
    for step in ("past", "now"):
        for (q, k, v, q_rot, k_rot, _), n, m, row in zip(seqs, lens, qlens, rows):
            t = torch.arange(0, n - m) if step == "past" else torch.arange(n - m, n)
            slots = row[t // bs] * bs + t % bs
            write_kv(cache, k_rot[:, t].transpose(0, 1), v[0, :, t].transpose(0, 1), slots)
    # gather_kv returns what was written
    k0, v0 = gather_kv(cache, block_table[0], lens[0], D)
    torch.testing.assert_close(k0, seqs[0][4])
    query = torch.cat([s[3][n - m :] for s, n, m in zip(seqs, lens, qlens)])
    qsl = [0, qlens[0], qlens[0] + qlens[1]]
    out = torch.full_like(query, float("nan"))
    dpe_paged_attention(query, cache, out, query_start_loc=qsl, seq_lens=lens, block_table=block_table,
                        head_size=D, window=w, scales=scales, inv_freq=seqs[0][5], rotary_dim=D, scale=D ** -0.5,
                        selected=sel)
    for r, ((q, k, v, _, _, inv_freq), n, m) in enumerate(zip(seqs, lens, qlens)):
        want = _reference(q, k, v, inv_freq, w, scales, sel)[n - m :]
        torch.testing.assert_close(out[qsl[r] : qsl[r + 1]], want, rtol=1e-9, atol=1e-9)


def test_write_kv_skips_padding_slots():
    cache = torch.zeros(2, HKV, 4, 2 * D)
    key, value = torch.ones(3, HKV, D), 2 * torch.ones(3, HKV, D)
    write_kv(cache, key, value, torch.tensor([5, -1, 0]))
    assert cache[1, :, 1, :D].eq(1).all() and cache[1, :, 1, D:].eq(2).all()
    assert cache[0, :, 0].ne(0).all()
    assert cache.ne(0).sum() == 2 * HKV * 2 * D


def test_key_rotation_table_is_rotate_by_bit_for_bit():
    """The cached cos/sin table (KeyRotations) rotates keys exactly as rotate_by does, in float32 and float64, at
    lengths below and past its first size (the table grows), for two specs kept side by side."""
    from dpe_export.modeling_templates.dpe_rule import dpe_delta_positions, rotate_with
    from dpe_export.serving.paged import KeyRotations

    table = KeyRotations(limit=2)
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        for n, groups in ((100, (3, 4, 7, 16)), (5000, (3, 4, 7, 16)), (9000, (1, 2, 2, 128)), (300, (3, 4, 7, 16))):
            scales = _scales(groups)
            inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
            k = torch.randn(1, HKV, n, D, generator=g, dtype=dtype)
            want = rotate_by(k, dpe_delta_positions(torch.arange(n)[None], scales, 10, query=False), inv_freq, D)
            cos, sin = table.get(n, scales, inv_freq, dtype, k.device)
            assert torch.equal(rotate_with(k, cos, sin, D), want)
    assert len(table.tables) == 2


def test_paged_attention_fuzz_against_reference():
    """A seeded search for a counterexample: random windows, scales (dividing the window or not), head counts,
    block sizes, sequence lengths, query counts (prefill, chunks, decoding) and selections, several sequences in
    scattered blocks per batch, against the float64 reference (partial rotary dims: the test above)."""
    rng = torch.Generator().manual_seed(2026)

    def pick(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=rng))

    for trial in range(40):
        h_kv = pick(1, 2)
        h = h_kv * pick(1, 3)
        d = 2 * pick(2, 8)
        r = d
        w, bs = pick(1, 12), pick(1, 8)
        scales = torch.tensor([pick(1, 20) for _ in range(r // 2)], dtype=torch.long)
        sel = None
        if pick(0, 1):
            sel = torch.rand(h, r // 2, generator=rng) < 0.5
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
        nseq = pick(1, 3)
        lens = [pick(1, 70) for _ in range(nseq)]
        qlens = [pick(1, n) for n in lens]
        nblocks = sum(-(-n // bs) for n in lens)
        cache = torch.zeros(nblocks, h_kv, bs, 2 * d, dtype=torch.float64)
        perm = torch.randperm(nblocks, generator=rng)
        rows, used, queries, wants = [], 0, [], []
        for n, m in zip(lens, qlens):
            nb = -(-n // bs)
            row = perm[used : used + nb]
            used += nb
            rows.append(row)
            q = torch.randn(1, h, n, d, generator=rng, dtype=torch.float64)
            k = torch.randn(1, h_kv, n, d, generator=rng, dtype=torch.float64)
            v = torch.randn(1, h_kv, n, d, generator=rng, dtype=torch.float64)
            pos = torch.arange(n)[None, :, None].expand(1, n, r // 2)
            q_rot, k_rot = rotate_by(q, pos, inv_freq, r)[0].transpose(0, 1), rotate_by(k, pos, inv_freq, r)[0]
            t = torch.arange(n)
            write_kv(cache, k_rot.transpose(0, 1), v[0].transpose(0, 1), row[t // bs] * bs + t % bs)
            queries.append(q_rot[n - m :])
            ref = reference_attention(q, k, v, torch.arange(n)[None], inv_freq, 1.0, d ** -0.5, w, scales, sel)
            wants.append(ref[0].transpose(0, 1)[n - m :])
        width = max(len(x) for x in rows)
        table = torch.stack([torch.nn.functional.pad(x, (0, width - len(x))) for x in rows])
        qsl = [0]
        for m in qlens:
            qsl.append(qsl[-1] + m)
        query = torch.cat(queries)
        out = torch.full_like(query, float("nan"))
        dpe_paged_attention(query, cache, out, query_start_loc=qsl, seq_lens=lens, block_table=table, head_size=d,
                            window=w, scales=scales, inv_freq=inv_freq, rotary_dim=r, scale=d ** -0.5, selected=sel)
        for i, want in enumerate(wants):
            torch.testing.assert_close(out[qsl[i] : qsl[i + 1]], want, rtol=1e-9, atol=1e-9,
                                       msg=lambda m: f"trial {trial}, sequence {i}: {m}")
