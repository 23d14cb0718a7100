"""Multi-needle NIAH: every context hides ``needles`` 6-digit needles (key-value pairs, default 4) at different depths
and is asked about each of them in turn, one prompt per needle over the same context.

Needle k of context c sits at depth ``depths[(c * needles + k) % len(depths)]``, so every depth of the grid gets
exactly ``samples`` queried needles; a (length, depth) cell is the fraction of them retrieved (the needles of one
context are not independent samples, so the records count contexts too). The needle and question wording is
RULER's multi-key NIAH; its text and exact-length assembly are in :mod:`dpe_export.evaluation.tasks.builder`.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

from dpe_export.evaluation import prompts
from dpe_export.evaluation.generation import GenerateFn
from dpe_export.evaluation.tasks.builder import NIAH_INTRO, NIAH_KEYS, NIAH_NEEDLE, NIAH_QUERY, score_answer
from dpe_export.evaluation.tasks.retrieval import EvalItem, RetrievalTask, min_prompt_tokens

DIGITS = prompts.NIAH_DIGITS


def needle_depths(depths: Sequence[float], samples: int, needles: int) -> list[tuple[list[float], list[int]]]:
    """Per context: the depth of each of its ``needles`` needles and which needles are queried, so that every
    depth gets exactly ``samples`` queried needles (contexts take consecutive depths of the grid in turn)."""
    m = len(depths)
    total = m * samples
    out = []
    for c in range(-(-total // needles)):
        slots = [c * needles + k for k in range(needles)]
        out.append(([float(depths[j % m]) for j in slots], [k for k, j in enumerate(slots) if j < total]))
    return out


def build_prompts(builder, length: int, depths: Sequence[float], samples: int, seed: int,
                  needles: int = prompts.DEFAULT_NEEDLES) -> Iterator[EvalItem]:
    """One prompt per queried needle, context after context (see :func:`needle_depths`)."""
    for c, (depths_c, queried) in enumerate(needle_depths(depths, samples, needles)):
        queries = builder.niah_queries(length, num_needles=needles, seed=prompts.sample_seed(seed, "niah", needles, c),
                                       depths=depths_c, num_digits=DIGITS, query_indices=queried)
        for k, p in zip(queried, queries):
            yield EvalItem(p, length, depths_c[k], c)


def min_length(builder, needles: int = prompts.DEFAULT_NEEDLES) -> int:
    """An upper bound of the shortest NIAH prompt: the key that tokenizes longest in every needle and the question."""
    key = max(NIAH_KEYS, key=lambda k: len(builder.encode_piece(NIAH_QUERY.format(key=k))))
    pieces = [NIAH_NEEDLE.format(key=key, value="9" * DIGITS)] * needles + [NIAH_QUERY.format(key=key)]
    return min_prompt_tokens(builder, NIAH_INTRO, pieces)


TASK = RetrievalTask(
    name="niah", pretty_name="multi-needle NIAH", paper="https://arxiv.org/abs/2404.06654",
    metric="{needles}-needle NIAH accuracy", calibrates=True,
    help="several 6-digit needles per context, each asked for in turn (score: fraction retrieved)",
    samples_help="needles asked per (length, depth)",
    answer_digits=DIGITS, uses_needles=True, count_contexts=True, max_needles=len(NIAH_KEYS),
    make_prompts=build_prompts, min_length=min_length, score=score_answer,
)


def evaluate_niah(builder, generate_fn: GenerateFn, lengths: Sequence[int],
                  depths: Sequence[float] = prompts.DEFAULT_DEPTHS, samples: int = prompts.DEFAULT_SAMPLES,
                  needles: int = prompts.DEFAULT_NEEDLES, seed: int = 0, batch_size: int = 1, progress: bool = False,
                  details_out: Optional[list] = None) -> list[dict[str, Any]]:
    """NIAH with ``needles`` needles per context: accuracy per (length, depth) of ``generate_fn``."""
    return TASK.evaluate_prompts(builder, generate_fn, lengths, depths, samples, needles, seed, batch_size, progress,
                                 details_out)
