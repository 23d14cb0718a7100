"""What every evaluation shares: the default samples, depth grid and needles, the answers' lengths, sample seeds,
and the --lengths syntax. Each task's own prompt stream is in its module (dpe_export/evaluation/tasks/).
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any

from dpe_export.errors import DPEExportError

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
