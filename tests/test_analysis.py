"""dpe-export analyze: per-frequency contributions, the dominant dimension, Spearman's rho, positional heads."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import save_tiny_model

from dpe_export import analysis
from dpe_export.attention_capture import capture_attention
from dpe_export.export.convert import convert
from dpe_export.sources import load_model, parse_method
from dpe_export.modeling_templates import dpe_family, dpe_params

os.environ["HF_HUB_OFFLINE"] = "1"


def test_per_frequency_contributions_sum_to_the_models_own_attention_scores(tmp_path):
    """softmax over keys of sum_f c_f x scaling is the attention the model computes (eager, its own weights)."""
    base = save_tiny_model(tmp_path / "base", "llama")
    model = load_model(base, parse_method("none"), device="cpu", attn="eager").model
    seen = {}

    def grab(idx, module, q, k, kwargs):
        seen[idx] = (q.detach().clone(), k.detach().clone(), float(kwargs.get("scaling") or q.shape[-1] ** -0.5))

    ids = torch.randint(4, 120, (1, 24), generator=torch.Generator().manual_seed(0))
    with capture_attention(model, grab), torch.no_grad():
        out = model(ids, output_attentions=True)
    num_freqs = dpe_family.rotary_dim_of(model.config) // 2
    for idx, (q, k, scaling) in seen.items():
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        c = analysis.pair_contributions(q[0][:, :, None], k[0][:, None], num_freqs)  # [H, i, j, F]
        logits = c.sum(-1) * scaling
        n = logits.shape[-1]
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(torch.softmax(logits, -1), out.attentions[idx][0].float(), atol=1e-5, rtol=1e-4)


def _direct_spearman(x, y):
    def ranks(v):
        order = sorted(range(len(v)), key=lambda t: v[t])
        r = [0.0] * len(v)
        a = 0
        while a < len(order):
            b = a
            while b + 1 < len(order) and v[order[b + 1]] == v[order[a]]:
                b += 1
            for t in range(a, b + 1):
                r[order[t]] = (a + b) / 2
            a = b + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return num / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def test_spearman_matches_a_direct_rank_computation_with_ties():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 20, (300,), generator=g).float()
    y = x + torch.randint(0, 15, (300,), generator=g).float()
    assert analysis.spearman(x, y) == pytest.approx(_direct_spearman(x.tolist(), y.tolist()), abs=1e-12)
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return
    assert analysis.spearman(x, y) == pytest.approx(spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)


def test_a_head_whose_dominant_frequency_tracks_distance_has_rho_near_one():
    d = torch.unique(torch.floor(torch.exp(torch.linspace(0, math.log(4096), 3000))).long())  # log-spaced, as sampled
    band = analysis.distance_bins(d)  # 0..12
    c = torch.zeros(len(d), 16)
    c[torch.arange(len(d)), band] = 30.0  # all weight on frequency = distance band
    dom = analysis.dominant_dimension(c)
    assert analysis.spearman(d, dom) > 0.97
    assert analysis.spearman(d, dom.flip(0)) < -0.97
    flat = analysis.dominant_dimension(torch.zeros(len(d), 16))
    assert analysis.spearman(d, flat) == 0.0


def test_below_the_window_an_export_has_the_base_models_scores_and_beyond_it_the_dpe_angle(tmp_path):
    base = save_tiny_model(tmp_path / "base", "llama")
    params = dpe_params.DPEParams(6, [2, 8], [0, 4, 8], target_length=256)
    export = convert(base, tmp_path / "dpe", params)
    b = load_model(base, parse_method("none"), device="cpu")
    e = load_model(export, parse_method("none"), device="cpu")
    ids = list(range(4, 100))
    rb = analysis.analyze_prompt(b.model, ids, pairs=256, seed=3)
    re_ = analysis.analyze_prompt(e.model, ids, pairs=256, seed=3)
    for idx in rb:
        d, dom_b = rb[idx]
        d2, dom_e = re_[idx]
        assert torch.equal(d, d2)
        near = d < 6
        if idx == 0:  # layer 0 sees the same hidden states: identical below the window, changed beyond
            torch.testing.assert_close(dom_e[:, near], dom_b[:, near], atol=1e-5, rtol=0)
            assert (dom_e[:, ~near] - dom_b[:, ~near]).abs().max() > 1e-3


def test_analyze_cli_writes_records_and_refuses_bad_input_in_one_line(tmp_path, run_cli):
    base = save_tiny_model(tmp_path / "base", "llama", max_position_embeddings=64)
    out = tmp_path / "heads.json"
    r = run_cli("analyze", base, "--lengths", "1x,96", "--samples", "1", "--pairs", "64", "--json", out,
                "--no-progress")
    assert r.exit_code == 0, r.stderr
    assert "rho>0.5" in r.stdout
    records = json.loads(out.read_text())["records"]
    assert {x["length"] for x in records} == {64, 96}
    assert {"length", "layer", "head", "rho", "dominant_by_distance_bin"} <= set(records[0])
    layers, heads = 2, 4
    assert len(records) == 2 * layers * heads and all(-1 <= x["rho"] <= 1 for x in records)
    for args, needle in ((["--lengths", "0x"], "or multiples of the pretraining length"),
                         (["--lengths", "1x", "--top", "99"], "more than the model's 8 attention heads"),
                         (["--lengths", str(1 << 40)], "give shorter --lengths")):
        r = run_cli("analyze", base, *args, "--no-progress")
        lines = r.stderr.splitlines()
        assert r.exit_code != 0 and len(lines) == 1 and needle in lines[0], r.stderr


def test_zeroing_a_head_equals_zeroing_its_output_projection_columns(tmp_path):
    base = save_tiny_model(tmp_path / "base", "llama")
    model = load_model(base, parse_method("none"), device="cpu").model
    ids = torch.randint(4, 120, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(ids).logits
        with analysis.zeroed_heads(model, [(1, 2)]):
            zeroed = model(ids).logits
        assert torch.equal(model(ids).logits, plain)  # the hook is gone after the block
        o_proj = model.model.layers[1].self_attn.o_proj
        saved = o_proj.weight.clone()
        o_proj.weight[:, 2 * 16:3 * 16] = 0
        want = model(ids).logits
        o_proj.weight.copy_(saved)
    torch.testing.assert_close(zeroed, want)
    assert (zeroed - plain).abs().max() > 1e-4


def test_ablate_reports_top_k_against_random_draws_and_refuses_k_above_the_head_count(tmp_path, run_cli):
    base = save_tiny_model(tmp_path / "base", "llama", max_position_embeddings=64)
    out = tmp_path / "a.json"
    r = run_cli("analyze", base, "--lengths", "1x", "--samples", "1", "--pairs", "32", "--ablate", "top:2",
                "--draws", "3", "--ablate-samples", "1", "--json", out, "--no-progress")
    assert r.exit_code == 0, r.stderr
    ab = json.loads(out.read_text())["ablation"]
    assert ab["k"] == 2 and len(ab["top"]["heads"]) == 2 and len(ab["random"]["draws"]) == 3
    assert "top-2 positional heads zeroed" in r.stdout
    assert ab["length"] == 64  # --ablate-length defaults to the pretraining length
    r = run_cli("analyze", base, "--lengths", "1x", "--samples", "1", "--pairs", "32", "--ablate", "top:2",
                "--draws", "1", "--ablate-samples", "1", "--ablate-length", "48", "--json", out, "--no-progress")
    assert r.exit_code == 0, r.stderr
    assert json.loads(out.read_text())["ablation"]["length"] == 48
    for args, needle in ((("--ablate", "top:9"), "more than the model's 8 attention heads"),
                         (("--ablate", "best:2"), "top:K or random:K"),
                         (("--ablate", "top:2", "--ablate-length", "32,48"), "--ablate-length takes one length")):
        r = run_cli("analyze", base, "--lengths", "1x", *args, "--no-progress")
        lines = r.stderr.splitlines()
        assert r.exit_code != 0 and len(lines) == 1 and needle in lines[0], r.stderr


def test_card_puts_one_positional_heads_section_into_an_exports_card(tmp_path, run_cli):
    base = save_tiny_model(tmp_path / "base", "llama", max_position_embeddings=64)
    export = convert(base, tmp_path / "dpe", dpe_params.DPEParams(6, [2, 8], [0, 4, 8], target_length=256))
    before = (export / "README.md").read_text()
    for lengths in ("1x", "1x,2x"):
        r = run_cli("analyze", export, "--lengths", lengths, "--samples", "1", "--pairs", "32", "--card",
                    "--no-progress")
        assert r.exit_code == 0, r.stderr
    card = (export / "README.md").read_text()
    assert card.startswith(before.rstrip("\n")) and card.count(analysis.CARD_BEGIN) == 1
    assert "## Positional heads" in card and "| 128 |" in card
    r = run_cli("analyze", base, "--lengths", "1x", "--card", "--no-progress")
    assert r.exit_code == 2 and "model card of a DPE export" in r.stderr
