"""Perplexity of held-out text at given lengths, logits computed a chunk of positions at a time.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from dpe_export.errors import DPEExportError
from dpe_export.evaluation.generation import _model_device, fixed_rope_for_length
from dpe_export.evaluation.haystack import generate_haystack, load_haystack
from dpe_export.evaluation.prompts import DEFAULT_SAMPLES, ppl_haystack_seed
from dpe_export.evaluation.tasks.builder import PromptBuilder
from dpe_export.progress import progress_bar

logger = logging.getLogger("dpe_export")


LOGITS_BUDGET = 1 << 24  # elements of the float32 logits chunk in ppl (64 MiB)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def ppl_token_stream(tokenizer, num_tokens: int, seed: int = 0, haystack: Optional[Path] = None) -> list[int]:
    """At least ``num_tokens`` token ids of held-out text: generated haystack (seed ``ppl_haystack_seed(seed)``)
    or the ``haystack`` file (repeated, with a warning, when too short)."""
    if haystack is not None:

        try:
            ids = _encode(tokenizer, load_haystack(haystack))
        except (OSError, ValueError) as e:
            raise DPEExportError(f"cannot read the haystack file {haystack}: {e}") from None
        if not ids:
            raise DPEExportError(f"the haystack file {haystack} has no tokens")
        if len(ids) < num_tokens:
            reps = -(-num_tokens // len(ids))
            logger.warning("haystack file %s has %d tokens, fewer than the %d needed; repeating it %d times",
                           haystack, len(ids), num_tokens, reps)
            ids = ids * reps
        return ids

    words = max(64, num_tokens)
    while True:
        ids = _encode(tokenizer, generate_haystack(words, seed=ppl_haystack_seed(seed)))
        if len(ids) >= num_tokens:
            return ids
        words = 2 * words + 64


def ppl_windows(tokenizer, lengths: Sequence[int], samples: int, seed: int = 0,
                haystack: Optional[Path] = None, prefix_ids: Optional[Sequence[int]] = None) -> dict[int, list[list[int]]]:
    """Per length, ``samples`` windows of exactly that many tokens: the leading special tokens (BOS) then
    consecutive, non-overlapping stretches of the held-out text (the same text for every length)."""
    if prefix_ids is None:

        prefix_ids = PromptBuilder(tokenizer).prefix_ids
    prefix = list(prefix_ids)
    p = len(prefix)
    too_short = [n for n in lengths if n < p + 2]
    if too_short:
        raise DPEExportError(f"length {too_short[0]} is too short for perplexity (need at least {p + 2} tokens)")
    stream = ppl_token_stream(tokenizer, samples * (max(lengths) - p), seed, haystack)
    return {n: [prefix + stream[i * (n - p):(i + 1) * (n - p)] for i in range(samples)] for n in lengths}


def sequence_nll(model, input_ids, chunk_size: Optional[int] = None):
    """Summed next-token negative log-likelihood of each row (float64 [batch]) over its ``n - 1`` predictions.

    Runs the decoder once for the hidden states and applies the output head and cross-entropy
    ``chunk_size`` positions at a time, so full-length logits never exist at once.
    """
    import torch
    import torch.nn.functional as F

    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    batch, n = input_ids.shape
    vocab = head.weight.shape[0]
    if chunk_size is None:
        chunk_size = max(16, LOGITS_BUDGET // max(1, batch * vocab))
    total = torch.zeros(batch, dtype=torch.float64, device=input_ids.device)
    with fixed_rope_for_length(model, n), torch.inference_mode():
        hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
        targets = input_ids[:, 1:]
        for s in range(0, n - 1, chunk_size):
            e = min(s + chunk_size, n - 1)
            logits = head(hidden[:, s:e]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, s:e].reshape(-1),
                                  reduction="none")
            total += nll.view(batch, e - s).sum(dim=1).double()
    return total


def evaluate_ppl(model, tokenizer, lengths: Sequence[int], samples: int = DEFAULT_SAMPLES, seed: int = 0,
                 haystack: Optional[Path] = None, batch_size: int = 1, chunk_size: Optional[int] = None,
                 progress: bool = False) -> list[dict[str, Any]]:
    """Perplexity per length over ``samples`` windows (one record per length; depth None, accuracy None)."""
    import torch

    if batch_size < 1:
        raise DPEExportError("the batch size must be >= 1")
    windows = ppl_windows(tokenizer, lengths, samples, seed, haystack)
    device = _model_device(model)
    records = []
    with progress_bar(len(lengths) * samples, "ppl", progress) as bar:
        for n in lengths:
            bar.set_postfix(length=n)
            nll = 0.0
            for s in range(0, samples, batch_size):
                ids = torch.tensor(windows[n][s:s + batch_size], dtype=torch.long, device=device)
                nll += float(sequence_nll(model, ids, chunk_size).sum())
                bar.update(ids.shape[0])
            tokens = samples * (n - 1)
            records.append({"length": n, "depth": None, "accuracy": None, "samples": samples,
                            "perplexity": math.exp(nll / tokens), "tokens": tokens, "nll": nll})
    return records

