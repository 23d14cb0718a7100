"""An independent, dense float64 reference of the DPE rule: every (query, key, frequency) angle spelled out.

It shares no attention code with the runtime (only the rule itself, dpe_rule.dpe_relative_positions, whose
plain form tests/test_runtime.py checks against the definition): it patches a plain transformers model so that each attention layer computes
scores as Re(sum_f zq_f * conj(zk_f) * exp(i * angle(i, j, f) * theta_f)), with z_f = x[f] + i x[f + D/2],
and angle from the rule in DEVELOPERS.md.
"""
from __future__ import annotations

import types

import torch

from dpe_export.modeling_templates.dpe_rule import dpe_relative_positions


def _per_frequency_scale(scale_factors, groups):
    return torch.tensor([s for g, s in enumerate(scale_factors) for _ in range(groups[g], groups[g + 1])])


def reference_attention(q, k, v, positions, inv_freq, attention_scaling, scaling, window, scale, selected):
    """q [B,H,n,D], k/v [B,Hkv,n,D], positions [B,n]; selected bool [H, D/2] or None. float64 throughout."""
    bsz, h, n, d = q.shape
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    half = d // 2
    zq = torch.complex(q[..., :half], q[..., half:])
    zk = torch.complex(k[..., :half], k[..., half:])
    i = positions[:, :, None, None]  # [B, n, 1, 1]
    j = positions[:, None, :, None]  # [B, 1, n, 1]
    dist = i - j
    rule = dpe_relative_positions(i, j, scale, window)  # [B, n, n, D/2]: the rule file every backend imports
    sel = torch.ones(h, half, dtype=torch.bool) if selected is None else selected
    use_rule = sel[None, :, None, None, :].expand(bsz, h, n, n, half)  # [B, H, n, n, D/2]
    angle = torch.where(use_rule, rule[:, None].expand_as(use_rule), dist[:, None].expand_as(use_rule))
    phase = torch.polar(torch.ones_like(angle, dtype=torch.float64), angle.double() * inv_freq.double())
    prod = zq[:, :, :, None, :] * zk.conj()[:, :, None, :, :]
    scores = (prod * phase).real.sum(-1) * attention_scaling**2 * scaling
    causal = positions[:, None, :, None] >= positions[:, None, None, :]
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def reference_model(base_model, window, scale_factors, groups, selected=None):
    """Patch a plain transformers causal LM (converted to float64) to run the reference DPE attention."""
    model = base_model.double().eval()
    decoder = model.get_decoder()
    rotary = decoder.rotary_emb
    scale = _per_frequency_scale(scale_factors, groups)

    for idx, layer in enumerate(decoder.layers):
        attn = layer.self_attn

        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                    _idx=idx, **kwargs):
            bsz, n, _ = hidden_states.shape
            shape = (bsz, n, -1, self.head_dim)
            q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
            k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
            v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
            positions = kwargs["position_ids"].expand(bsz, n)
            sel = None if selected is None else selected[_idx]
            out = reference_attention(q, k, v, positions, rotary.inv_freq, rotary.attention_scaling,
                                      self.scaling, window, scale, sel)
            return self.o_proj(out.transpose(1, 2).reshape(bsz, n, -1)), None

        attn.forward = types.MethodType(forward, attn)
    return model
