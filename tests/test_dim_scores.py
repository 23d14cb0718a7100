"""Key-dimension scores: hooks on the projections give the directly computed 2-norm contribution."""
import torch

from helpers import tiny_model

from dpe_export.dim_scores import compute_dim_scores, scoring_lengths


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
    # the hooks are gone afterwards
    assert all(not layer.self_attn.q_proj._forward_hooks for layer in model.model.layers)


def test_scoring_lengths_double_from_a_quarter_of_the_pretraining_length():
    assert scoring_lengths(64, 256) == [64, 128, 256]
    assert scoring_lengths(1024, 8192) == [2048, 4096, 8192]
    assert scoring_lengths(300, 256) == [256]
