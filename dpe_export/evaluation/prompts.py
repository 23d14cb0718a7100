"""Which prompts an evaluation runs: sample seeds, the depth grid, pass-key and NIAH prompt streams, and the
shortest prompt a task can have.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from dpe_export.errors import DPEExportError
from dpe_export.evaluation.tasks.builder import (
    NIAH_INTRO,
    NIAH_KEYS,
    NIAH_NEEDLE,
    NIAH_QUERY,
    PASSKEY_INTRO,
    PASSKEY_NEEDLE,
    PASSKEY_QUERY,
)

logger = logging.getLogger("dpe_export")


DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


DEFAULT_SAMPLES = 10


DEFAULT_NEEDLES = 4


PASSKEY_DIGITS = 5


NIAH_DIGITS = 6


ANSWER_SLACK = 3  # tokens generated beyond one per answer digit (a leading space, punctuation)


def sample_seed(seed: int, *parts: Any) -> int:
    """A deterministic sample seed from the run seed and the sample's coordinates.

    Always >= 2**32: well away from the seeds the testbed models were trained (< 1e9) and checked
    (1e9 + i) on.
    """
    digest = hashlib.sha256("/".join(map(str, ("dpe-eval", seed, *parts))).encode()).hexdigest()
    return (1 << 32) + int(digest[:12], 16)


def task_haystack_seed(seed: int) -> int:
    """Generated-haystack seed of the passkey and NIAH filler."""
    return sample_seed(seed, "task-haystack")


def ppl_haystack_seed(seed: int) -> int:
    """Generated-haystack seed of the perplexity text (used nowhere else)."""
    return sample_seed(seed, "ppl-haystack")


@dataclass
class _Item:
    prompt: Any  # tasks.TaskPrompt
    length: int
    depth: float
    sample: int  # passkey: sample index within the (length, depth) cell; niah: context index


def passkey_prompts(builder, length: int, depths: Sequence[float], samples: int, seed: int) -> Iterator[_Item]:
    """``samples`` pass-key prompts per depth, built lazily (depth-major)."""
    for d_idx, depth in enumerate(depths):
        for i in range(samples):
            p = builder.passkey(length, depth=float(depth), seed=sample_seed(seed, "passkey", i, d_idx),
                                num_digits=PASSKEY_DIGITS)
            yield _Item(p, length, float(depth), i)


def niah_needle_depths(depths: Sequence[float], samples: int, needles: int) -> list[tuple[list[float], list[int]]]:
    """Per context: the depth of each of its ``needles`` needles and which needles are queried, so that every
    depth gets exactly ``samples`` queried needles (contexts take consecutive depths of the grid in turn)."""
    m = len(depths)
    total = m * samples
    out = []
    for c in range(-(-total // needles)):
        slots = [c * needles + k for k in range(needles)]
        out.append(([float(depths[j % m]) for j in slots], [k for k, j in enumerate(slots) if j < total]))
    return out


def niah_prompts(builder, length: int, depths: Sequence[float], samples: int, needles: int,
                 seed: int) -> Iterator[_Item]:
    """One prompt per queried needle, context after context (see :func:`niah_needle_depths`)."""
    for c, (needle_depths, queried) in enumerate(niah_needle_depths(depths, samples, needles)):
        prompts = builder.niah_queries(length, num_needles=needles, seed=sample_seed(seed, "niah", needles, c),
                                       depths=needle_depths, num_digits=NIAH_DIGITS, query_indices=queried)
        for k, p in zip(queried, prompts):
            yield _Item(p, length, needle_depths[k], c)


def _min_length(builder, intro: str, pieces: Sequence[str]) -> int:
    n = len(builder.prefix_ids) + len(builder.encode_piece(intro, leading_space=False))
    return n + sum(len(builder.encode_piece(p)) for p in pieces)


def passkey_min_length(builder) -> int:
    """The shortest pass-key prompt (intro, needle and question, no filler) with this builder's tokenizer."""
    return _min_length(builder, PASSKEY_INTRO, [PASSKEY_NEEDLE.format(key="9" * PASSKEY_DIGITS), PASSKEY_QUERY])


def niah_min_length(builder, needles: int = DEFAULT_NEEDLES) -> int:
    """An upper bound of the shortest NIAH prompt: the key that tokenizes longest in every needle and the question."""
    key = max(NIAH_KEYS, key=lambda k: len(builder.encode_piece(NIAH_QUERY.format(key=k))))
    pieces = [NIAH_NEEDLE.format(key=key, value="9" * NIAH_DIGITS)] * needles + [NIAH_QUERY.format(key=key)]
    return _min_length(builder, NIAH_INTRO, pieces)


def parse_length_items(spec: str) -> list:
    """'1024,4k,2x' -> [1024, 4096, '2x'] (ValueError when an item is none of these or not positive)."""
    out: list = []
    for item in spec.replace(",", " ").split():
        text = item.lower()
        if text.endswith("x"):
            if not float(text[:-1]) > 0:
                raise ValueError(item)
            out.append(text)
            continue
        n = int(text[:-1]) * 1024 if text.endswith("k") else int(text)
        if n < 1:
            raise ValueError(item)
        out.append(n)
    if not out:
        raise ValueError(spec)
    return out


def resolve_lengths(items, pretrain_length: int) -> list[int]:
    """Token counts from parse_length_items' items, 'Nx' as N x the pretraining length; distinct, in order."""
    out = [int(round(float(x[:-1]) * pretrain_length)) if isinstance(x, str) else int(x) for x in items]
    bad = [n for n in out if n < 2]
    if bad:
        raise DPEExportError(f"a length of {bad[0]} tokens is too short; give at least 2 tokens")
    return list(dict.fromkeys(out))
