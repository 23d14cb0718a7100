"""An independent dense float64 reference of DPE for any family, computed from the family's own forward.

The base model (converted to float64) runs with a registered attention function that receives, as every
attention function does, the queries and keys the family already normed and rotated, and the positions.
It adds the DPE correction angle per (query, key, frequency), spelled out with complex numbers,
    far pairs on selected frequencies: (i//s - j//s + w - w//s) - (i - j)   (times theta_f)
and evaluates attention densely in float64 with the window rule; sliding-window layers get plain dense
attention limited to their window. It shares no code with the runtime: theta comes from the model's own rotary
embedding (per layer type), positions and layers from what transformers hands over.
"""
from __future__ import annotations

import torch


def tiny_family_model(arch, seed: int = 0, **overrides):
    """A 2-layer random model of `arch` (a registry entry), head_dim 16, GQA where the family has it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
    kwargs.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in arch.test_config})
    kwargs.update(overrides)
    try:
        config = AutoConfig.for_model(arch.model_type, **kwargs)
    except Exception:  # some releases type-check fields oddly (OLMo 2 on 5.4: tie_word_embeddings as int)
        kwargs.pop("tie_word_embeddings")
        config = AutoConfig.for_model(arch.model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if hasattr(model, "set_experts_implementation") and getattr(config, "num_experts", None):
        model.set_experts_implementation("eager")  # grouped matmuls have no float64 kernel (the reference's dtype)
    with torch.no_grad():  # sharper attention, so position errors show in the logits
        for name, p in model.named_parameters():
            if any(t in name for t in ("q_proj.weight", "k_proj.weight", "qkv_proj.weight", "query_key_value.weight")):
                p.mul_(3.0)
    return model


def _layer_types(config) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers


def reference_attention_fn(model, window: int, scale_per_freq: torch.Tensor, selected=None):
    config = model.config
    types = _layer_types(config)
    rotary = model.get_decoder().rotary_emb

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                  softcap=None, **kwargs):
        q, k, v = query.double(), key.double(), value.double()
        bsz, h, n, d = q.shape
        rep = h // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        pos = kwargs["position_ids"].expand(bsz, n).double()
        i, j = pos[:, :, None], pos[:, None, :]
        dist = i - j
        layer_type = types[module.layer_idx]
        if layer_type == "full_attention":
            inv = getattr(rotary, f"{layer_type}_inv_freq", None)
            inv = (rotary.inv_freq if inv is None else inv).double()
            f = inv.numel()
            zq = torch.complex(q[..., :f], q[..., f : 2 * f])
            zk = torch.complex(k[..., :f], k[..., f : 2 * f])
            s = scale_per_freq.double()
            far = (torch.div(i[..., None], s, rounding_mode="floor") - torch.div(j[..., None], s, rounding_mode="floor")
                   + window - torch.div(torch.full_like(s, window), s, rounding_mode="floor"))
            corr = far - dist[..., None]  # [B, n, n, F]
            sel = torch.ones(h, f, dtype=torch.bool) if selected is None else selected[module.layer_idx]
            use = (dist >= window)[:, None, :, :, None] & sel[None, :, None, None, :]  # [B, H, n, n, F]
            phase = torch.polar(torch.ones_like(corr), corr * inv)[:, None].expand(bsz, h, n, n, f)
            phase = torch.where(use, phase, torch.ones_like(phase))
            scores = (zq[:, :, :, None, :] * zk.conj()[:, :, None, :, :] * phase).real.sum(-1)
            scores = scores + q[..., 2 * f :] @ k[..., 2 * f :].transpose(-1, -2)  # dims that do not rotate
        else:
            scores = q @ k.transpose(-1, -2)
        scores = scores * (scaling if scaling is not None else d**-0.5)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        visible = dist >= 0
        if layer_type != "full_attention" and sliding_window is not None:
            visible = visible & (dist < sliding_window)
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        return out.transpose(1, 2).to(query.dtype), None

    return attention


def reference_logits(base_model, ids, window: int, scale_factors, groups, selected=None):
    """Logits of `ids` under the DPE rule, through the family's own forward in float64 (no cache)."""
    import copy

    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    model = copy.deepcopy(base_model).double().eval()
    scale = torch.tensor([s for g, s in enumerate(scale_factors) for _ in range(groups[g], groups[g + 1])])
    AttentionInterface.register("dpe_reference", reference_attention_fn(model, window, scale, selected))
    AttentionMaskInterface.register("dpe_reference", eager_mask)
    model.set_attn_implementation("dpe_reference")
    if hasattr(model, "set_experts_implementation") and getattr(model.config, "num_experts", None):
        model.set_experts_implementation("eager")  # grouped matmuls have no float64 kernel
    with torch.no_grad():
        return model(ids, use_cache=False).logits
