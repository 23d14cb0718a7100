"""Perplexity of held-out text: ``samples`` consecutive windows of exactly ``length`` tokens (the generated
haystack with its own seed, or ``--haystack``), one record per length; no depths. The computation (logits a
chunk of positions at a time) is :mod:`dpe_export.evaluation.ppl`.
"""
from __future__ import annotations

from dataclasses import dataclass

from dpe_export.evaluation.ppl import evaluate_ppl
from dpe_export.evaluation.tasks.base import EvalOptions, Task, TaskRun


@dataclass(frozen=True, kw_only=True)
class PerplexityTask(Task):
    """Perplexity per length: lower is better, and every position's logits are computed (in chunks)."""

    kind: str = "ppl"
    lower_is_better: bool = True
    all_logits: bool = True

    def evaluate(self, loaded, tokenizer, prepared, opts: EvalOptions) -> TaskRun:
        records = evaluate_ppl(loaded.model, tokenizer, opts.lengths, opts.samples, opts.seed, opts.haystack,
                               opts.batch_size, opts.chunk_size, opts.progress)
        return TaskRun(records)


TASK = PerplexityTask(
    name="ppl", pretty_name="perplexity", metric="perplexity (lower is better)",
    help="perplexity of held-out text", samples_help="text windows per length",
)
