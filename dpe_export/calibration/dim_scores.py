"""Key rotary dimensions by their 2-norm attention contribution (DPE's key-dimension identification).

For layer l, query head h and rotary frequency f (the pair x[f], x[f + R/2] over the R rotary dims) the score is
one of two statistics over the tokens t of a sample, averaged over samples and lengths:

    "norms" (default):  mean_t ||(q_f, q_{f+R/2})||_t  *  mean_t ||(k_f, k_{f+R/2})||_t
    "authors":          mean_t ( ||(q_f, q_{f+R/2})||_t * ||(k_f, k_{f+R/2})||_t )

with k from the head's KV group. Either bounds how much frequency f can move an attention logit
(|q_f . R k_f| <= ||q_f|| ||k_f|| for any rotation R), so the top-K frequencies per head are the ones DPE
scales. "norms" treats the query and key of a pair as different tokens, which they are for every pair DPE
changes (distances >= w); "authors" is the same-token product the DPE authors' code averages, offered so their
selections can be reproduced (on tiny models the two pick 0-3 different frequencies of 8).

q and k are taken where the attention sees them, after the family's own q/k norms and RoPE (rotations keep
pair norms): each attention layer is pointed, for the scoring passes only, at a recording attention function
(dpe_export.attention_capture) that then calls the layer's real one. Nothing of q or k is kept beyond a [heads, R/2] sum per layer.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from dpe_export.attention_capture import capture_attention
from dpe_export.output_files import write_output
from dpe_export.sources.loading import input_device
from dpe_export.modeling_templates import dpe_family

SCORES_TENSOR = "scores"


STATISTICS = ("norms", "authors")


def _pair_norms(x: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """[B, heads, n, D] -> [B, heads, n, F] norms of the rotary pairs (f, f + F) (float32)."""
    x = x.float()
    return torch.sqrt(x[..., :num_freqs].square() + x[..., num_freqs : 2 * num_freqs].square())


@dataclass
class DimScoreAccumulator:
    """Points a causal LM's attention layers at a recorder and accumulates per-sample 2-norm contributions."""

    model: torch.nn.Module
    statistic: str = "norms"
    total: Optional[torch.Tensor] = None
    count: int = 0
    _scores: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.statistic not in STATISTICS:
            raise ValueError(f"unknown dimension-score statistic {self.statistic!r}; use one of {', '.join(STATISTICS)}")
        config = self.model.config
        self.heads = config.num_attention_heads
        self.num_freqs = dpe_family.rotary_dim_of(config) // 2
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(capture_attention(self.model, lambda idx, module, q, k, kw: self.record(idx, q, k)))

    def record(self, idx: int, query: torch.Tensor, key: torch.Tensor) -> None:
        rep = query.shape[1] // key.shape[1]
        q = _pair_norms(query, self.num_freqs)  # [B, H, n, F]
        k = _pair_norms(key[:, :, -query.shape[2] :], self.num_freqs).repeat_interleave(rep, dim=1)
        if self.statistic == "norms":
            self._scores[idx] = q.mean(dim=2) * k.mean(dim=2)  # [B, H, F]
        else:
            self._scores[idx] = (q * k).mean(dim=2)

    @torch.no_grad()
    def add(self, input_ids: torch.Tensor) -> None:
        """Run one batch of equal-length samples [B, n] and fold its scores in."""
        self._scores.clear()

        device = input_device(self.model)
        self.model(input_ids.to(device), use_cache=False, logits_to_keep=1)
        score = torch.stack([self._scores[i] for i in sorted(self._scores)], dim=1).sum(dim=0).cpu()  # [L, H, F]
        self.total = score if self.total is None else self.total + score
        self.count += input_ids.shape[0]

    def scores(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError("no samples were scored")
        return self.total / self.count

    def close(self) -> None:
        self._stack.close()


def scoring_lengths(window: int, pretrain_length: int) -> list[int]:
    """Lengths doubling from max(W, L/4) up to L (L included)."""
    start = max(window, pretrain_length // 4)
    lengths, n = [], start
    while n < pretrain_length:
        lengths.append(n)
        n *= 2
    return lengths + [pretrain_length]


def compute_dim_scores(model, samples: Iterable[torch.Tensor], progress=None, statistic: str = "norms") -> torch.Tensor:
    """Average 2-norm contribution [layers, heads, rotary_dim/2] over batches of token ids [B, n]."""
    acc = DimScoreAccumulator(model, statistic)
    try:
        for batch in samples:
            acc.add(batch)
            if progress is not None:
                progress.update(batch.shape[0])
        return acc.scores()
    finally:
        acc.close()


def save_dim_scores(scores: torch.Tensor, path, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save

    write_output(path, save({SCORES_TENSOR: scores.float().contiguous()},
                            metadata={k: str(v) for k, v in (metadata or {}).items()}))

