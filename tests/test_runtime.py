"""DPE attention in exported checkpoints, checked against an independent dense reference of the rule."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import (
    RUNTIME_FILES,
    apply_rotary,
    assert_batch_generates_as_alone,
    rotary_cos_sin,
    save_tiny_model,
    tiny_model,
)
from reference import reference_model


os.environ["HF_HUB_OFFLINE"] = "1"

from transformers import AutoModelForCausalLM  # noqa: E402

from dpe_export import dpe_ops  # noqa: E402
from dpe_export.modeling_templates import (  # noqa: E402
    dpe_attention,
    dpe_guards,
    dpe_hf_attention,
    dpe_kernels,
    dpe_params,
    dpe_rule,
)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}


def convert(base_dir, out_dir, window, scales, groups=None, selected=None, target=512):
    from dpe_export.export.convert import convert as export_convert

    params = dpe_params.DPEParams(local_window_size=window, scale_factors=list(scales),
                                dimension_groups_range=groups or dpe_ops.even_group_boundaries(8, len(scales)),
                                target_length=target)
    return export_convert(base_dir, out_dir, params, selected)


def load_export(path, attn="sdpa", dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation=attn,
                                                dtype=dtype).eval()


def random_selection(seed=0, layers=2, heads=4, k=3):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(layers, heads, 8, generator=g)
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


CASES = {
    # name: (family, config overrides, window, scale factors, groups, top-K selection?)
    "llama-all-dims": ("llama", {}, 4, [1, 2, 4, 8], None, False),
    "llama-topk": ("llama", {}, 6, [2, 3, 4, 16], None, True),
    "llama-llama3-rope": ("llama", {"rope_parameters": LLAMA3_ROPE}, 5, [8, 2, 4, 1], None, True),
    "llama-yarn-rope": ("llama", {"rope_parameters": YARN_ROPE}, 4, [3, 5], [0, 3, 8], False),
    "qwen2-topk": ("qwen2", {}, 4, [2, 8, 2, 8], None, True),
    "mistral-mha": ("mistral", {"num_key_value_heads": 4}, 7, [4, 16, 2, 16], None, False),
}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_export_matches_dense_reference(tmp_path, case, attn):
    family, overrides, window, scales, groups, topk = CASES[case]
    base = save_tiny_model(tmp_path / "base", family, **overrides)
    selected = random_selection() if topk else None
    out = convert(base, tmp_path / "out", window, scales, groups, selected)
    model = load_export(out, attn)
    groups = groups or dpe_ops.even_group_boundaries(8, len(scales))
    ref = reference_model(tiny_model(family, **overrides), window, scales, groups, selected)
    ids = torch.randint(4, 128, (2, 72), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(ids).logits.double()
        want = ref(ids).logits
        plain = tiny_model(family, **overrides).double()(ids).logits
    err = (got - want).abs().max().item()
    assert err < 2e-4, f"{case}/{attn}: max |export - reference| = {err}"
    # The check has teeth: DPE logits differ from plain RoPE far more than the tolerance.
    assert (plain - want).abs().max().item() > 100 * max(err, 1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_below_window_is_base_model(tmp_path, family):
    base = save_tiny_model(tmp_path / "base", family)
    out = convert(base, tmp_path / "out", 32, [2, 4, 8, 16])
    ids = torch.randint(4, 128, (3, 32), generator=torch.Generator().manual_seed(2))
    for attn in ("sdpa", "eager"):
        ref = AutoModelForCausalLM.from_pretrained(base, attn_implementation=attn).eval()
        model = load_export(out, attn)
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-6, rtol=0)


def test_rotary_is_the_base_models_for_every_rope_type(tmp_path):
    ropes = [None, LLAMA3_ROPE, YARN_ROPE, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
             {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}]
    for i, rope in enumerate(ropes):
        overrides = {} if rope is None else {"rope_parameters": rope}
        base = save_tiny_model(tmp_path / f"base{i}", "llama", **overrides)
        out = convert(base, tmp_path / f"out{i}", 4, [2, 4], target=4096)
        model = load_export(out)
        assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 4096
        ref = AutoModelForCausalLM.from_pretrained(base).eval()
        got, want = model.model.rotary_emb, ref.model.rotary_emb
        assert torch.equal(got.inv_freq, want.inv_freq), rope
        assert got.attention_scaling == want.attention_scaling, rope


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_decoding_equals_full_forward(tmp_path, attn):
    base = save_tiny_model(tmp_path / "base", "llama")
    out = convert(base, tmp_path / "out", 6, [2, 8, 3, 4], selected=random_selection(3))
    model = load_export(out, attn)
    prompt = torch.randint(4, 128, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=40, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=40, do_sample=False, use_cache=False)
        assert cached.tolist() == uncached.tolist()
        # Logits step by step through the cache equal one forward pass over the whole sequence.
        full = model(cached).logits
        step = model(cached[:, :3], use_cache=True)
        past, logits = step.past_key_values, [step.logits]
        for t in range(3, cached.shape[1]):
            # the cache under its pre-5.24 name on purpose: callers still pass it so, and it must keep working
            step = model(cached[:, t : t + 1], past_key_values=past, use_cache=True)
            past = step.past_key_values
            logits.append(step.logits)
        assert torch.allclose(torch.cat(logits, dim=1), full, atol=1e-5, rtol=0)


def test_padded_batch_generates_what_each_prompt_generates_alone(tmp_path):
    base = save_tiny_model(tmp_path / "base", "llama")
    out = convert(base, tmp_path / "out", 5, [2, 8, 4, 16], selected=random_selection(5))
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(4, 128, (n,), generator=g) for n in (30, 11, 19)]
    for attn in ("sdpa", "eager"):
        assert_batch_generates_as_alone(load_export(out, attn), prompts, 12, attn)


def test_export_loads_where_dpe_export_cannot_be_imported(tmp_path):
    base = save_tiny_model(tmp_path / "base", "qwen2")
    out = convert(base, tmp_path / "out", 4, [2, 4, 8, 16], selected=random_selection(7))
    ids = torch.randint(4, 128, (1, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = load_export(out)(ids).logits
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["dpe_export"] = None  # any import of dpe_export now fails
        try:
            import dpe_export
        except ImportError:
            pass
        else:
            raise SystemExit("dpe_export was importable")
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        ids = torch.tensor({ids.tolist()})
        with torch.no_grad():
            print(json.dumps(m(ids).logits[0, -5:].tolist()))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = torch.tensor(json.loads(res.stdout.strip().splitlines()[-1]))
    assert torch.allclose(got, want[0, -5:], atol=1e-5)


def test_save_pretrained_of_a_loaded_export_reloads(tmp_path):
    base = save_tiny_model(tmp_path / "base", "mistral")
    selected = random_selection(9)
    out = convert(base, tmp_path / "out", 4, [2, 4, 8, 16], selected=selected)
    model = load_export(out)
    model.save_pretrained(tmp_path / "again")
    saved = sorted(p.name for p in (tmp_path / "again").iterdir())
    assert {"modeling_dpe.py", *RUNTIME_FILES, dpe_params.SELECTED_DIMS_FILENAME} <= set(saved), saved
    again = load_export(tmp_path / "again")
    assert torch.equal(again.dpe_selected_dims, selected)
    ids = torch.randint(4, 128, (1, 30), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_bf16_and_fp16_run_and_track_fp32(tmp_path):
    base = save_tiny_model(tmp_path / "base", "llama")
    out = convert(base, tmp_path / "out", 4, [2, 4, 8, 16], selected=random_selection(11))
    ids = torch.randint(4, 128, (1, 48), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        want = load_export(out)(ids).logits
        for dtype in (torch.bfloat16, torch.float16):
            for attn in ("sdpa", "eager"):
                got = load_export(out, attn, dtype)(ids).logits.float()
                assert torch.isfinite(got).all()
                assert (got - want).abs().max() < 0.1, (dtype, attn)


# ---- the attention function itself: efficient path == materialised path == reference ------------------


def _random_qkv(bsz, h, hkv, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bsz, x, n, d, generator=g) * 2 for x in (h, hkv, hkv)]


def _rotated(q, k, w, scales, groups, positions):
    """Plain and scaled rotations of q and k at `positions`, built the way the export builds them."""
    params = dpe_params.DPEParams(w, scales, groups)
    d = q.shape[-1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = rotary_cos_sin(positions[..., None], inv_freq, 1.0, torch.float32)
    qp, kp = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scale = params.scale_per_frequency()
    qs = dpe_rule.rotate_by(qp, dpe_rule.dpe_delta_positions(positions, scale, w, query=True), inv_freq, d)
    ks = dpe_rule.rotate_by(kp, dpe_rule.dpe_delta_positions(positions, scale, w, query=False), inv_freq, d)
    return qp, qs, kp, ks


@pytest.mark.parametrize("topk", [False, True])
def test_efficient_and_materialised_paths_agree(topk):
    bsz, h, hkv, n, d, w = 2, 4, 2, 700, 16, 100
    q, k, v = _random_qkv(bsz, h, hkv, n, d, 0)
    pos = torch.arange(n)[None].expand(bsz, n)
    qp, qsc, kp, ks = _rotated(q, k, w, [2, 8, 4, 16], [0, 2, 4, 6, 8], pos)
    sel = random_selection(1, layers=1)[0] if topk else None
    valid = torch.ones(bsz, n, dtype=torch.bool)
    valid[1, :37] = False  # left padding in the second row
    kw = dict(window=w, scale=d**-0.5, selected=sel, key_valid=valid, k_far_plain=kp)
    fast = dpe_attention.dpe_attention(qp, qsc, kp, ks, v, backend="sdpa", **kw)
    slow = dpe_attention.dpe_attention(qp, qsc, kp, ks, v, backend="eager", **kw)
    keep = valid[:, :, None, None].expand_as(fast)
    assert torch.allclose(fast[keep], slow[keep], atol=2e-5, rtol=0)
    # The far part matters here: without it the answer is different.
    local_only = dpe_attention.dpe_attention(qp, qsc, kp, ks, v, backend="eager", **{**kw, "window": n})
    assert (local_only[keep] - slow[keep]).abs().max() > 1e-2
    # Local keys given only for the window of the last queries (as the DPE cache layer keeps them) agree too.
    m = 3
    tail = dpe_attention.dpe_attention(qp[:, :, -m:], qsc[:, :, -m:], kp[:, :, n - m - w + 1 :], ks, v, backend="eager",
                                  **{**kw, "local_start": n - m - w + 1, "k_far_plain": kp})
    assert torch.allclose(tail, slow[:, -m:], atol=2e-5, rtol=0)


@pytest.mark.parametrize("topk", [False, True])
def test_several_queries_on_a_cache_take_the_fused_path_and_agree_with_eager(monkeypatch, topk):
    """A prompt fed in chunks: the last m of n positions, m below, at and above the window, with the local keys
    given from position 0 or only from the window of the first query on (as the DPE cache layer keeps them)."""
    bsz, h, hkv, n, d, w = 1, 4, 2, 500, 16, 64
    q, k, v = _random_qkv(bsz, h, hkv, n, d, 11)
    pos = torch.arange(n)[None]
    qp, qsc, kp, ks = _rotated(q, k, w, [2, 8, 4, 16], [0, 2, 4, 6, 8], pos)
    sel = random_selection(7, layers=1)[0] if topk else None
    kw = dict(window=w, scale=d**-0.5, selected=sel, k_far_plain=kp)
    want = dpe_attention.dpe_attention(qp, qsc, kp, ks, v, backend="eager", **kw)
    calls = []
    monkeypatch.setattr(dpe_attention, "_dpe_attention_materialized", lambda *a, **k: calls.append(1))
    for m in (2, 40, 64, 65, 300, 499):
        for start in sorted({0, max(0, n - m - w + 1)}):
            got = dpe_attention.dpe_attention(qp[:, :, -m:], qsc[:, :, -m:], kp[:, :, start:], ks, v, backend="sdpa",
                                         local_start=start, **kw)
            assert torch.allclose(got, want[:, -m:], atol=2e-5, rtol=0), (m, start)
    assert not calls
    monkeypatch.setattr(dpe_kernels, "_LSE_KERNEL_FAILED", {"cpu", "cpu+mask"})  # the math fallback, masks included
    got = dpe_attention.dpe_attention(qp[:, :, -100:], qsc[:, :, -100:], kp, ks, v, backend="sdpa", **kw)
    assert torch.allclose(got, want[:, -100:], atol=2e-5, rtol=0)


def test_long_prefill_never_materialises_scores(monkeypatch):
    """At 8K tokens the sdpa path runs the fused kernels only: the chunked score path is never entered."""
    def forbidden(*args, **kwargs):
        raise AssertionError("materialised path used for a long prefill")

    monkeypatch.setattr(dpe_attention, "_dpe_attention_materialized", forbidden)
    monkeypatch.setattr(dpe_kernels, "_attention_with_lse_math", forbidden)
    n, d, w = 8192, 16, 512
    q, k, v = _random_qkv(1, 2, 1, n, d, 3)
    out = dpe_attention.dpe_attention(q, q, k, k, v, window=w, scale=0.25, selected=random_selection(2, 1, 2)[0])
    assert out.shape == q.transpose(1, 2).shape and torch.isfinite(out).all()


def test_flash_attention_without_the_package_is_a_clear_error(tmp_path):
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("flash-attn is installed here")
    base = save_tiny_model(tmp_path / "base", "llama")
    out = convert(base, tmp_path / "out", 4, [2, 4])
    with pytest.raises(ImportError, match="FlashAttention2|flash-attn"):
        load_export(out, "flash_attention_2")
    with pytest.raises(ImportError, match="pip install flash-attn"):
        dpe_hf_attention._require_flash_attn()


def test_generated_code_refuses_transformers_4_with_a_clear_message(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    with pytest.raises(ImportError, match=r"needs transformers>=5.0.0,<6, but transformers 4.57.1 is installed"):
        dpe_guards.check_transformers_version()


def _fake_flash_attn_func(q, k, v, softmax_scale, causal, window_size, return_attn_probs):
    """flash-attn 2's flash_attn_func contract in plain torch: [B, n, H, D] in and out, lse [B, H, n],
    causal aligned to the bottom right, window_size=(left, right) limiting j to [i - left, i + right]."""
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = q @ k.transpose(-1, -2) * softmax_scale
    i = torch.arange(q.shape[2])[:, None] + (k.shape[2] - q.shape[2])
    j = torch.arange(k.shape[2])[None, :]
    ok = (j <= i) if causal else torch.ones_like(j - i, dtype=torch.bool)
    if window_size[0] >= 0:
        ok = ok & (j >= i - window_size[0])
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.softmax(s, dim=-1) @ v
    return out.transpose(1, 2), lse, None


@pytest.mark.parametrize("topk", [False, True])
def test_flash_attention_glue_matches_sdpa(monkeypatch, topk):
    """The flash-attn path's layouts, window and log-sum-exp merge, checked against a stand-in kernel with
    flash-attn 2's documented contract (no GPU here; the real kernel is exercised on CUDA only)."""
    import types

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=_fake_flash_attn_func))
    bsz, h, hkv, n, d, w = 1, 4, 2, 300, 16, 64
    q, k, v = _random_qkv(bsz, h, hkv, n, d, 5)
    q2 = torch.randn_like(q)
    k2 = torch.randn_like(k)
    sel = random_selection(4, layers=1)[0] if topk else None
    kw = dict(window=w, scale=d**-0.5, selected=sel)
    flash = dpe_attention.dpe_attention(q, q2, k, k2, v, backend="flash_attention_2", **kw)
    sdpa = dpe_attention.dpe_attention(q, q2, k, k2, v, backend="sdpa", **kw)
    assert flash.shape == sdpa.shape == (bsz, n, h, d)
    assert torch.allclose(flash, sdpa, atol=2e-5, rtol=0)


def test_chunked_math_fallback_equals_the_fused_kernel():
    q, k, v = _random_qkv(2, 4, 2, 300, 16, 9)
    for causal in (True, False):
        fused = dpe_kernels.attention_with_lse(q, k, v, scale=0.25, causal=causal)
        math = dpe_kernels._attention_with_lse_math(q, k, v, scale=0.25, causal=causal, chunk=128)
        assert torch.allclose(fused[0], math[0], atol=1e-5) and torch.allclose(fused[1], math[1], atol=1e-5)


def test_prefill_through_the_fallback_equals_the_fused_path(monkeypatch):
    q, k, v = _random_qkv(1, 4, 2, 400, 16, 10)
    q_scaled, k_scaled = torch.randn_like(q), torch.randn_like(k)
    kw = dict(window=48, scale=0.25, selected=random_selection(6, layers=1)[0])
    fused = dpe_attention.dpe_attention(q, q_scaled, k, k_scaled, v, **kw)
    monkeypatch.setattr(dpe_kernels, "_LSE_KERNEL_FAILED", {"cpu"})  # as if the fused kernel had refused
    fallback = dpe_attention.dpe_attention(q, q_scaled, k, k_scaled, v, **kw)
    assert torch.allclose(fused, fallback, atol=1e-5)


def test_the_rule_file_is_the_definition_and_the_rotations_compose_to_it():
    """dpe_rule.dpe_relative_positions against the rule spelled out with Python integers, and the runtime's
    composed form (the family's plain rotation, then dpe_delta_positions for query and key) against it, for
    windows and scales drawn at random: scales that do not divide the window, larger than it, and 1."""
    rng = __import__("random").Random(20261207)
    for _ in range(400):
        w, s = rng.randint(1, 40), rng.choice([1, 2, 3, 5, 7, 8, 16, 64, 100])
        i = torch.tensor([rng.randint(0, 300) for _ in range(16)])
        j = torch.tensor([rng.randint(0, int(x)) for x in i])
        scale = torch.tensor([s])
        got = dpe_rule.dpe_relative_positions(i[:, None], j[:, None], scale, w)[:, 0]
        want = [a - b if a - b < w else a // s - b // s + w - w // s for a, b in zip(i.tolist(), j.tolist())]
        assert got.tolist() == want, (w, s)
        qi = i + dpe_rule.dpe_delta_positions(i[None], scale, w, query=True)[0, :, 0]
        kj = j + dpe_rule.dpe_delta_positions(j[None], scale, w, query=False)[0, :, 0]
        far = (i - j) >= w
        assert (qi - kj)[far].tolist() == got[far].tolist(), (w, s)
