"""Pass-key retrieval: one 5-digit pass key hidden in filler at a given depth, asked for at the end.

``samples`` prompts per depth of the ``depths`` grid (depth 0: right after the instructions, 1: right before the
question), each with its own key and filler; a (length, depth) cell is the fraction of its prompts whose first
generated number is the key. The prompt wording is the one of Mohtashami & Jaggi's landmark-attention pass-key
test; its text and exact-length assembly are in :mod:`dpe_export.evaluation.tasks.builder`.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

from dpe_export.evaluation import prompts
from dpe_export.evaluation.generation import GenerateFn
from dpe_export.evaluation.tasks.builder import PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUERY, score_answer
from dpe_export.evaluation.tasks.retrieval import EvalItem, RetrievalTask, min_prompt_tokens

DIGITS = prompts.PASSKEY_DIGITS


def build_prompts(builder, length: int, depths: Sequence[float], samples: int, seed: int,
                  needles: Optional[int] = None) -> Iterator[EvalItem]:
    """``samples`` pass-key prompts per depth, built lazily (depth-major); ``needles`` is not used."""
    for d_idx, depth in enumerate(depths):
        for i in range(samples):
            p = builder.passkey(length, depth=float(depth), seed=prompts.sample_seed(seed, "passkey", i, d_idx),
                                num_digits=DIGITS)
            yield EvalItem(p, length, float(depth), i)


def min_length(builder, needles: Optional[int] = None) -> int:
    """The shortest pass-key prompt (intro, needle and question, no filler) with this builder's tokenizer."""
    pieces = [PASSKEY_NEEDLE.format(key="9" * DIGITS), PASSKEY_QUERY]
    return min_prompt_tokens(builder, PASSKEY_INTRO, pieces)


TASK = RetrievalTask(
    name="passkey", pretty_name="pass-key retrieval", paper="https://arxiv.org/abs/2305.16300",
    metric="pass-key accuracy", calibrates=True,
    help="one 5-digit pass key hidden in filler",
    samples_help="prompts per (length, depth)",
    answer_digits=DIGITS, make_prompts=build_prompts, min_length=min_length, score=score_answer,
)


def evaluate_passkey(builder, generate_fn: GenerateFn, lengths: Sequence[int],
                     depths: Sequence[float] = prompts.DEFAULT_DEPTHS, samples: int = prompts.DEFAULT_SAMPLES,
                     seed: int = 0, batch_size: int = 1, progress: bool = False,
                     details_out: Optional[list] = None) -> list[dict[str, Any]]:
    """Pass-key accuracy per (length, depth) of ``generate_fn`` on prompts from ``builder`` (a PromptBuilder)."""
    return TASK.evaluate_prompts(builder, generate_fn, lengths, depths, samples, seed=seed, batch_size=batch_size,
                                 progress=progress, details_out=details_out)
