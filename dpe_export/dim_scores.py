"""Key rotary dimensions by their 2-norm attention contribution (DPE's key-dimension identification).

For layer l, query head h and rotary frequency f (the pair x[f], x[f + D/2]) the score is

    mean over tokens of ||(q_f, q_{f+D/2})||  *  mean over tokens of ||(k_f, k_{f+D/2})||

with k from the head's KV group, averaged over samples and lengths. It bounds how much frequency f can move
an attention logit (|q_f . R k_f| <= ||q_f|| ||k_f|| for any rotation R), so the top-K frequencies per head
are the ones DPE scales. Rotations preserve pair norms, so the projections' outputs are hooked directly:
nothing of q or k is kept beyond a [heads, D/2] running sum per layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

SCORES_TENSOR = "scores"


def _pair_norms(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, n, heads * D] projection output -> [B, heads, D/2] pair norms averaged over the n tokens (float32)."""
    b, n, _ = x.shape
    x = x.float().view(b, n, heads, -1)
    half = x.shape[-1] // 2
    return torch.sqrt(x[..., :half].square() + x[..., half:].square()).mean(dim=1)


@dataclass
class DimScoreAccumulator:
    """Hooks a causal LM's q/k projections and accumulates per-sample 2-norm contributions."""

    model: torch.nn.Module
    total: Optional[torch.Tensor] = None
    count: int = 0
    _q: dict = field(default_factory=dict)
    _k: dict = field(default_factory=dict)
    _tokens: int = 0
    _handles: list = field(default_factory=list)

    def __post_init__(self):
        config = self.model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        for idx, layer in enumerate(self.model.get_decoder().layers):
            attn = layer.self_attn
            self._handles.append(attn.q_proj.register_forward_hook(self._hook(self._q, idx, self.heads)))
            self._handles.append(attn.k_proj.register_forward_hook(self._hook(self._k, idx, self.kv_heads)))

    @staticmethod
    def _hook(store: dict, idx: int, heads: int):
        def hook(module, args, output):
            store[idx] = _pair_norms(output, heads)

        return hook

    @torch.no_grad()
    def add(self, input_ids: torch.Tensor) -> None:
        """Run one batch of equal-length samples [B, n] and fold its mean norms into the scores."""
        self._q.clear(), self._k.clear()
        from dpe_export.methods import input_device

        device = input_device(self.model)
        self.model(input_ids.to(device), use_cache=False, logits_to_keep=1)
        rep = self.heads // self.kv_heads
        layers = sorted(self._q)
        q = torch.stack([self._q[i] for i in layers], dim=1)  # [B, L, H, D/2]
        k = torch.stack([self._k[i] for i in layers], dim=1).repeat_interleave(rep, dim=2)
        score = (q * k).sum(dim=0).cpu()  # summed over the batch's samples
        self.total = score if self.total is None else self.total + score
        self.count += input_ids.shape[0]

    def scores(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError("no samples were scored")
        return self.total / self.count

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def scoring_lengths(window: int, pretrain_length: int) -> list[int]:
    """Lengths doubling from max(W, L/4) up to L (L included)."""
    start = max(window, pretrain_length // 4)
    lengths, n = [], start
    while n < pretrain_length:
        lengths.append(n)
        n *= 2
    return lengths + [pretrain_length]


def compute_dim_scores(model, samples: Iterable[torch.Tensor], progress=None) -> torch.Tensor:
    """Average 2-norm contribution [layers, heads, head_dim/2] over batches of token ids [B, n]."""
    acc = DimScoreAccumulator(model)
    try:
        for batch in samples:
            acc.add(batch)
            if progress is not None:
                progress.update(batch.shape[0])
        return acc.scores()
    finally:
        acc.close()


def save_dim_scores(scores: torch.Tensor, path, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    save_file({SCORES_TENSOR: scores.float().contiguous()}, str(path),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
