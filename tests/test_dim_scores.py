"""Key-dimension scores: the recorded 2-norm contribution equals a direct computation, on the queries and keys
the attention sees (after the family's q/k norms)."""
import torch
from helpers import tiny_model

from dpe_export.calibration.dim_scores import compute_dim_scores, scoring_lengths


def test_scores_equal_a_direct_computation():
    model = tiny_model("llama")  # 4 query heads, 2 KV heads, head_dim 16
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(4, 128, (2, 24), generator=g), torch.randint(4, 128, (1, 40), generator=g)]
    got = compute_dim_scores(model, batches)
    assert got.shape == (2, 4, 8)

    want = torch.zeros(2, 4, 8)
    count = 0
    for batch in batches:
        for row in batch:
            h = model.model.embed_tokens(row[None])
            for layer_idx, layer in enumerate(model.model.layers):
                x = layer.input_layernorm(h)
                q = layer.self_attn.q_proj(x).view(1, -1, 4, 16)
                k = layer.self_attn.k_proj(x).view(1, -1, 2, 16)
                qn = (q[..., :8] ** 2 + q[..., 8:] ** 2).sqrt().mean(dim=1)[0]  # [4, 8]
                kn = (k[..., :8] ** 2 + k[..., 8:] ** 2).sqrt().mean(dim=1)[0].repeat_interleave(2, dim=0)
                want[layer_idx] += (qn * kn).detach()
                h = layer(h, position_embeddings=model.model.rotary_emb(h, torch.arange(h.shape[1])[None]),
                          attention_mask=None, position_ids=torch.arange(h.shape[1])[None])
            count += 1
    assert torch.allclose(got, want / count, rtol=1e-4, atol=1e-6)
    # the layers are the model's own again afterwards
    assert all(type(layer.self_attn.config).__name__ != "DPEAttentionConfig" for layer in model.model.layers)
    assert all("_dpe_recorder" not in layer.self_attn.__dict__ for layer in model.model.layers)


def test_scoring_lengths_double_from_a_quarter_of_the_pretraining_length():
    assert scoring_lengths(64, 256) == [64, 128, 256]
    assert scoring_lengths(1024, 8192) == [2048, 4096, 8192]
    assert scoring_lengths(300, 256) == [256]


def test_scores_are_taken_after_the_familys_qk_norms_and_either_statistic_is_available():
    from family_reference import tiny_family_model

    from dpe_export.architectures import ARCHITECTURES

    model = tiny_family_model(ARCHITECTURES["qwen3"])
    with torch.no_grad():  # make the norms matter
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.mul_(torch.linspace(0.2, 3.0, 16))
            layer.self_attn.k_norm.weight.mul_(torch.linspace(3.0, 0.2, 16))
    batch = torch.randint(4, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    want = {"norms": torch.zeros(2, 4, 8), "authors": torch.zeros(2, 4, 8)}
    pre = torch.zeros(2, 4, 8)
    captured = {}

    def grab(idx):
        def hook(module, args, kwargs, output):
            captured[idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hook

    handles = [layer.self_attn.register_forward_hook(grab(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(batch, use_cache=False)
        for h in handles:
            h.remove()
        for i, layer in enumerate(model.model.layers):
            x, a = captured[i], layer.self_attn
            q_raw = a.q_proj(x).view(1, -1, 4, 16)
            k_raw = a.k_proj(x).view(1, -1, 2, 16)
            q, k = a.q_norm(q_raw), a.k_norm(k_raw)

            def pairs(t):
                return (t[..., :8] ** 2 + t[..., 8:] ** 2).sqrt()[0]  # [n, heads, 8]

            qn, kn = pairs(q), pairs(k).repeat_interleave(2, dim=1)
            want["norms"][i] = qn.mean(0) * kn.mean(0)
            want["authors"][i] = (qn * kn).mean(0)
            pre[i] = pairs(q_raw).mean(0) * pairs(k_raw).repeat_interleave(2, dim=1).mean(0)
    for stat in ("norms", "authors"):
        got = compute_dim_scores(model, [batch], statistic=stat)
        assert torch.allclose(got, want[stat], rtol=1e-4, atol=1e-6), stat
    assert not torch.allclose(want["norms"], pre, rtol=1e-2)  # the projections alone would be wrong here
    assert not torch.allclose(want["norms"], want["authors"], rtol=1e-3)
