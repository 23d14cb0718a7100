"""Retrieval prompts of an exact token length: pass-key retrieval and multi-needle NIAH.

Every prompt is assembled from token-id lists of separately tokenized pieces (intro, filler sentences,
needles, question), never by re-tokenizing the whole text, so its length is exact and does not depend on
how a tokenizer would merge pieces at their joins. Pieces after the first are encoded as they would be
mid-text (with their leading space, see :meth:`PromptBuilder.encode_piece`). The filler is cut at
sentence boundaries except for the last filler sentence, which is trimmed token-wise to hit the length.

Quick use::

    from dpe_export.evaluation.tasks import PromptBuilder, score_answer
    b = PromptBuilder(tokenizer)                     # generated haystack; or haystack_path="book.txt"
    p = b.passkey(4096, depth=0.3, seed=1)           # p.input_ids: exactly 4096 ids; p.answer: "71432"
    ok = score_answer(generated_text, p.answer)
    qs = b.niah_queries(4096, num_needles=4, seed=1) # one prompt per needle, same context
    acc = score_niah([gen(q.input_ids) for q in qs], [q.answer for q in qs])
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from dpe_export.evaluation.haystack import haystack_sentences

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")


PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."


PASSKEY_QUERY = "What is the pass key? The pass key is"


NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.")


NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."


NIAH_QUERY = "What is the special magic number for {key}? The special magic number for {key} is:"


_KEY_ADJ = ["amber", "crimson", "silent", "frozen", "hollow", "velvet", "rusty", "wicked", "lucky", "brave",
            "purple", "hidden", "noble", "tiny", "ancient", "electric", "fuzzy", "royal", "sour", "cosmic"]


_KEY_NOUN = ["falcon", "teapot", "glacier", "violin", "cactus", "comet", "dragon", "pebble", "rocket",
             "walrus", "lemon", "pyramid", "tulip", "canyon", "banjo", "panther", "meteor", "kettle",
             "jaguar", "saturn"]


NIAH_KEYS = [f"{a}-{n}" for a in _KEY_ADJ for n in _KEY_NOUN]


_ANCHOR = "a."


@dataclass
class TaskPrompt:
    """A prompt of exactly ``len(input_ids)`` tokens and the answer a model should continue it with."""

    input_ids: list[int]
    answer: str
    task: str
    depths: list[float]
    needle_positions: list[int]  # token index where each needle starts, in input_ids
    answer_ids: list[int]  # the answer as the tokenizer encodes it right after the prompt (leading space)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)


class PromptBuilder:
    """Builds exact-length retrieval prompts for one tokenizer and one haystack source.

    tokenizer: any Hugging Face tokenizer (fast or slow). haystack_path: a user text file used as filler
    instead of the generated haystack (cycled with a warning when too short). haystack_seed: seed of the
    generated haystack. add_bos: put the tokenizer's leading special tokens (BOS) first; by default, do so
    exactly when ``tokenizer(text)`` would.
    """

    def __init__(self, tokenizer, haystack_path: Optional[Union[str, Path]] = None, haystack_seed: int = 0,
                 add_bos: Optional[bool] = None):
        self.tokenizer = tokenizer
        self.haystack_path = haystack_path
        self._sentence_iter = haystack_sentences(haystack_path, seed=haystack_seed)
        self._sent_ids: list[list[int]] = []
        self._anchor_ids = self._encode(_ANCHOR)
        self.prefix_ids = self._leading_special_ids() if add_bos in (None, True) else []
        if add_bos and not self.prefix_ids and getattr(tokenizer, "bos_token_id", None) is not None:
            self.prefix_ids = [tokenizer.bos_token_id]
        self._cache: dict[tuple[str, bool], list[int]] = {}

    # -- tokenization -----------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _leading_special_ids(self) -> list[int]:
        probe = "Hello there"
        plain = self._encode(probe)
        full = list(self.tokenizer(probe, add_special_tokens=True)["input_ids"])
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return full[:start]
        return []

    def encode_piece(self, text: str, leading_space: bool = True) -> list[int]:
        """Token ids of ``text`` as it is tokenized in running text after a space (``leading_space``) or
        at the very start of a document (not ``leading_space``)."""
        key = (text, leading_space)
        if key not in self._cache:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = self._encode_many([text], leading_space)[0]
        return self._cache[key]

    def _encode_many(self, texts: Sequence[str], leading_space: bool = True) -> list[list[int]]:
        if not leading_space:
            return [self._encode(t) for t in texts]
        joined = self.tokenizer([f"{_ANCHOR} {t}" for t in texts], add_special_tokens=False)["input_ids"]
        n = len(self._anchor_ids)
        out = []
        for t, ids in zip(texts, joined):
            ids = list(ids)
            if ids[:n] == self._anchor_ids and len(ids) > n:
                out.append(ids[n:])
            else:  # the anchor merged with the text: fall back to encoding with an explicit space
                out.append(self._encode(" " + t))
        return out

    # -- filler ------------------------------------------------------------------------------------------

    def _ensure_sentences(self, count: int) -> None:
        while len(self._sent_ids) < count:
            batch = [next(self._sentence_iter) for _ in range(max(256, count - len(self._sent_ids)))]
            self._sent_ids.extend(self._encode_many(batch))

    def filler(self, num_tokens: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """Exactly ``num_tokens`` filler ids starting at a random sentence, and the sentence boundaries
        (offsets into the filler where a sentence starts, plus ``num_tokens``)."""
        start = rng.randrange(4096)
        ids: list[int] = []
        bounds = [0]
        i = start
        while len(ids) < num_tokens:
            self._ensure_sentences(i + 1)
            ids.extend(self._sent_ids[i])
            bounds.append(min(len(ids), num_tokens))
            i += 1
        return ids[:num_tokens], sorted(set(bounds))

    # -- assembly ----------------------------------------------------------------------------------------

    def _assemble(self, length: int, intro: str, needles: list[str], depths: list[float], query: str,
                  rng: random.Random, longest_query: Optional[int] = None) -> tuple[list[int], list[int]]:
        """Prefix, intro, filler with the needles at their depths, query. With ``longest_query`` (tokens),
        needles are placed as if the query were that long and the spare filler goes right before the
        query, so that prompts with different queries share their needle positions."""
        intro_ids = self.encode_piece(intro, leading_space=False)
        needle_ids = [self.encode_piece(n) for n in needles]
        query_ids = self.encode_piece(query)
        fixed = len(self.prefix_ids) + len(intro_ids) + sum(map(len, needle_ids)) + len(query_ids)
        n_fill = length - fixed
        if n_fill < 0:
            raise ValueError(f"length {length} is too short: the prompt without filler has {fixed} tokens")
        fill, bounds = self.filler(n_fill, rng)
        span = n_fill if longest_query is None else max(0, n_fill - (longest_query - len(query_ids)))
        bounds = [b for b in bounds if b <= span] + [span]
        # Each needle goes to the sentence boundary nearest to depth * span, in depth order.
        order = sorted(range(len(needles)), key=lambda k: depths[k])
        cuts = {k: min(bounds, key=lambda b: (abs(b - depths[k] * span), b)) for k in order}
        ids = list(self.prefix_ids) + list(intro_ids)
        positions = [0] * len(needles)
        prev = 0
        for k in order:
            c = max(cuts[k], prev)
            ids.extend(fill[prev:c])
            positions[k] = len(ids)
            ids.extend(needle_ids[k])
            prev = c
        ids.extend(fill[prev:])
        ids.extend(query_ids)
        assert len(ids) == length, (len(ids), length)
        return ids, positions

    def passkey(self, length: int, depth: float = 0.5, seed: int = 0, passkey: Optional[str] = None,
                num_digits: int = 5) -> TaskPrompt:
        """Pass-key retrieval prompt of exactly ``length`` tokens; the needle at relative ``depth`` (0: right
        after the intro, 1: right before the question)."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError("depth must be in [0, 1]")
        rng = random.Random(f"passkey-{seed}")
        if passkey is None:
            passkey = str(rng.randint(10 ** (num_digits - 1), 10 ** num_digits - 1))
        ids, pos = self._assemble(length, PASSKEY_INTRO, [PASSKEY_NEEDLE.format(key=passkey)], [depth],
                                  PASSKEY_QUERY, rng)
        return TaskPrompt(ids, passkey, "passkey", [depth], pos, self.encode_piece(passkey),
                          {"seed": seed})

    @staticmethod
    def niah_spec(num_needles: int = 4, seed: int = 0, depths: Optional[Sequence[float]] = None,
                  num_digits: int = 6) -> dict[str, Any]:
        """The needles of NIAH sample ``seed``: distinct keys and values, depths, and the filler seed."""
        rng = random.Random(f"niah-{seed}")
        if num_needles <= min(len(_KEY_ADJ), len(_KEY_NOUN)):
            # Keys of one sample share neither word, so a needle is identified by either word of its key.
            keys = [f"{a}-{n}" for a, n in zip(rng.sample(_KEY_ADJ, num_needles), rng.sample(_KEY_NOUN, num_needles))]
        else:
            keys = rng.sample(NIAH_KEYS, num_needles)
        values: list[str] = []
        while len(values) < num_needles:
            v = str(rng.randint(10 ** (num_digits - 1), 10 ** num_digits - 1))
            if v not in values:
                values.append(v)
        if depths is None:  # one random depth inside each of num_needles equal segments
            depths = [(k + 0.1 + 0.8 * rng.random()) / num_needles for k in range(num_needles)]
        depths = [float(d) for d in depths]
        if len(depths) != num_needles or not all(0.0 <= d <= 1.0 for d in depths):
            raise ValueError("depths must be num_needles values in [0, 1]")
        return {"keys": keys, "values": values, "depths": depths, "filler_seed": rng.random()}

    def niah_queries(self, length: int, num_needles: int = 4, seed: int = 0,
                     depths: Optional[Sequence[float]] = None, num_digits: int = 6,
                     query_indices: Optional[Sequence[int]] = None) -> list[TaskPrompt]:
        """Multi-needle NIAH: ``num_needles`` (key, number) needles spread over the context; one prompt per
        queried needle (all of them by default), each exactly ``length`` tokens with the same needles at
        the same token positions (the filler is extended right before a shorter question). Score with :func:`score_niah` (fraction of needles retrieved)."""
        spec = self.niah_spec(num_needles, seed, depths, num_digits)
        keys, values, depths = spec["keys"], spec["values"], spec["depths"]
        needles = [NIAH_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        longest = max(len(self.encode_piece(NIAH_QUERY.format(key=k))) for k in keys)
        out = []
        for q in (range(num_needles) if query_indices is None else query_indices):
            ids, pos = self._assemble(length, NIAH_INTRO, needles, depths, NIAH_QUERY.format(key=keys[q]),
                                      random.Random(spec["filler_seed"]), longest_query=longest)
            out.append(TaskPrompt(ids, values[q], "niah", depths, pos, self.encode_piece(values[q]),
                                  {"seed": seed, "key": keys[q], "query_index": q, "keys": keys,
                                   "values": values}))
        return out

    def niah(self, length: int, num_needles: int = 4, seed: int = 0, query_index: int = 0,
             **kw) -> TaskPrompt:
        """One NIAH prompt asking for needle ``query_index``."""
        return self.niah_queries(length, num_needles, seed, query_indices=[query_index], **kw)[0]


@lru_cache(maxsize=8)
def _builder_for(tokenizer) -> PromptBuilder:
    return PromptBuilder(tokenizer)


def build_passkey_prompt(tokenizer, length: int, depth: float = 0.5, seed: int = 0, **kw) -> TaskPrompt:
    """Shortcut for ``PromptBuilder(tokenizer).passkey(...)`` with the generated haystack (cached builder)."""
    return _builder_for(tokenizer).passkey(length, depth=depth, seed=seed, **kw)


def build_niah_prompts(tokenizer, length: int, num_needles: int = 4, seed: int = 0, **kw) -> list[TaskPrompt]:
    """Shortcut for ``PromptBuilder(tokenizer).niah_queries(...)`` with the generated haystack."""
    return _builder_for(tokenizer).niah_queries(length, num_needles=num_needles, seed=seed, **kw)


_DIGIT_GAP = re.compile(r"(?<=\d)[ \t]+(?=\d)")


_NUMBER = re.compile(r"\d+")


def extract_number(generated: str) -> Optional[str]:
    """The first run of digits in a generation (digits separated only by spaces are joined, for tokenizers
    that decode single-digit tokens with spaces), or None."""
    m = _NUMBER.search(_DIGIT_GAP.sub("", generated))
    return m.group(0) if m else None


def score_answer(generated: str, answer: str) -> bool:
    """True when the first number in the generated continuation is exactly the answer."""
    return extract_number(generated) == answer


def score_niah(generations: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of needles retrieved (one generation per queried needle)."""
    if len(generations) != len(answers):
        raise ValueError("need one generation per answer")
    if not answers:
        return 0.0
    return sum(score_answer(g, a) for g, a in zip(generations, answers)) / len(answers)

