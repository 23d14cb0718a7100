"""Retrieval tasks: prompts of an exact length with one answer each, generated greedily and scored one by one.

The model is reached through one seam, ``generate_fn(list_of_input_id_lists) -> list[str]`` (the generated
continuation of each prompt, special tokens stripped), so the loop runs on a real model or a scripted one alike.
A retrieval task gives its prompt stream (``make_prompts``), the shortest prompt it can build (``min_length``),
its answer's length in digits (the generation length) and its scorer; the records are one per (length, depth)
with the fraction of prompts answered right.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from dpe_export.errors import DPEExportError
from dpe_export.evaluation import prompts
from dpe_export.evaluation.generation import GenerateFn, make_generate_fn
from dpe_export.evaluation.tasks.base import EvalOptions, Task, TaskRun
from dpe_export.evaluation.tasks.builder import PromptBuilder, score_answer
from dpe_export.progress import progress_bar


@dataclass
class EvalItem:
    """One prompt of a retrieval task, with where it sits in the results."""

    prompt: Any  # builder.TaskPrompt
    length: int
    depth: float
    sample: int  # a sample index within the (length, depth) cell, or (NIAH) the context it belongs to


def aggregate(details: Sequence[dict[str, Any]], extra: Optional[dict[str, Any]] = None,
              count_contexts: bool = False) -> list[dict[str, Any]]:
    """One record per (length, depth), in first-seen order: accuracy (fraction correct) and sample count,
    plus ``extra`` fields and, with ``count_contexts``, how many distinct contexts the samples came from."""
    cells: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for d in details:
        cells.setdefault((d["length"], d["depth"]), []).append(d)
    records = []
    for (length, depth), rows in cells.items():
        rec = {"length": length, "depth": depth, "accuracy": sum(r["correct"] for r in rows) / len(rows),
               "samples": len(rows), **(extra or {})}
        if count_contexts:
            rec["contexts"] = len({r["sample"] for r in rows})
        records.append(rec)
    return records


def min_prompt_tokens(builder, intro: str, pieces: Sequence[str]) -> int:
    """Tokens of a prompt without filler: the leading special tokens, ``intro`` at the start of the text, then
    each of ``pieces`` as it is tokenized mid-text (needles, question)."""
    n = len(builder.prefix_ids) + len(builder.encode_piece(intro, leading_space=False))
    return n + sum(len(builder.encode_piece(p)) for p in pieces)


def _batches(items: Iterable[EvalItem], size: int) -> Iterator[list[EvalItem]]:
    it = iter(items)
    while True:
        batch = list(itertools.islice(it, size))
        if not batch:
            return
        yield batch


def _checked(items: Iterable[EvalItem], task: str, length: int) -> Iterator[EvalItem]:
    """The prompt builder's ValueErrors (a length too short for a prompt) as one-line errors."""
    it = iter(items)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except ValueError as e:
            raise DPEExportError(f"cannot build a {task} prompt of {length} tokens: {e}") from None
        yield item


@dataclass(frozen=True, kw_only=True)
class RetrievalTask(Task):
    """A task of prompts with one answer each (pass-key, NIAH); see the module docstring."""

    kind: str = "retrieval"
    uses_depths: bool = True
    answer_digits: Optional[int] = None  # the answer is a number of this many digits
    count_contexts: bool = False  # samples of one context are not independent (NIAH): count contexts too
    max_needles: Optional[int] = None  # with uses_needles: the most needles a context can hold
    make_prompts: Optional[Callable[..., Iterator[EvalItem]]] = None  # (builder, length, depths, samples, seed, needles)
    min_length: Optional[Callable[..., int]] = None  # (builder, needles) -> tokens
    score: Callable[[str, str], bool] = score_answer  # (generated text, answer) -> right?

    @property
    def max_new_tokens(self) -> int:
        """Enough new tokens for the answer: one per digit (no token spans less than a digit) plus slack."""
        return (self.answer_digits or 0) + prompts.ANSWER_SLACK

    def build(self, builder, length: int, depths: Sequence[float], samples: int, seed: int,
              needles: int = prompts.DEFAULT_NEEDLES) -> Iterator[EvalItem]:
        """The prompts of one length, lazily, as evaluation items."""
        if self.make_prompts is None:
            raise DPEExportError(f"task {self.name} has no prompts")
        return self.make_prompts(builder, length, depths, samples, seed, needles)

    def evaluate_prompts(self, builder, generate_fn: GenerateFn, lengths: Sequence[int],
                         depths: Sequence[float] = prompts.DEFAULT_DEPTHS, samples: int = prompts.DEFAULT_SAMPLES,
                         needles: int = prompts.DEFAULT_NEEDLES, seed: int = 0, batch_size: int = 1,
                         progress: bool = False, details_out: Optional[list] = None) -> list[dict[str, Any]]:
        """Accuracy per (length, depth) of ``generate_fn`` on this task's prompts from ``builder`` (a
        PromptBuilder); ``details_out`` receives one dict per prompt (answer, generated text, correct)."""
        if batch_size < 1:
            raise DPEExportError("the batch size must be >= 1")
        details: list[dict[str, Any]] = []
        with progress_bar(len(lengths) * len(depths) * samples, self.name, progress) as bar:
            for length in lengths:
                bar.set_postfix(length=length)
                items = _checked(self.build(builder, length, depths, samples, seed, needles), self.name, length)
                for batch in _batches(items, batch_size):
                    details.extend(self._score_batch(batch, generate_fn, length))
                    bar.update(len(batch))
        if details_out is not None:
            details_out.extend(details)
        extra = {"needles": needles} if self.uses_needles else None
        return aggregate(details, extra, count_contexts=self.count_contexts)

    def _score_batch(self, batch: list[EvalItem], generate_fn: GenerateFn, length: int) -> list[dict[str, Any]]:
        ids = [list(item.prompt.input_ids) for item in batch]
        bad = [len(x) for x in ids if len(x) != length]
        if bad:  # pragma: no cover - the prompt builder guarantees exact lengths
            raise DPEExportError(f"a {self.name} prompt has {bad[0]} tokens instead of {length}")
        texts = generate_fn(ids)
        if len(texts) != len(batch):
            raise DPEExportError(f"generate_fn returned {len(texts)} texts for {len(batch)} prompts")
        return [{"length": length, "depth": item.depth, "sample": item.sample, "answer": item.prompt.answer,
                 "generated": text, "correct": bool(self.score(text, item.prompt.answer))}
                for item, text in zip(batch, texts)]

    # -- the hooks run_eval calls ------------------------------------------------------------------------

    def check(self, opts: EvalOptions) -> None:
        if self.uses_needles and self.max_needles is not None and not 1 <= opts.needles <= self.max_needles:
            raise DPEExportError(f"the number of needles must be between 1 and {self.max_needles}")

    def prepare(self, tokenizer, opts: EvalOptions) -> PromptBuilder:
        """The prompt builder (filler: --haystack or the generated haystack), once the shortest prompt fits."""
        builder = PromptBuilder(tokenizer, haystack_path=opts.haystack,
                                haystack_seed=prompts.task_haystack_seed(opts.seed))
        shortest = self.min_length(builder, opts.needles)
        if min(opts.lengths) < shortest:
            raise DPEExportError(
                f"length {min(opts.lengths)} is too short for a {self.name} prompt with this tokenizer "
                f"(needs at least {shortest} tokens)")
        return builder

    def evaluate(self, loaded, tokenizer, prepared: PromptBuilder, opts: EvalOptions) -> TaskRun:
        generate_fn = make_generate_fn(loaded.model, tokenizer, self.max_new_tokens)
        details: list[dict[str, Any]] = []
        records = self.evaluate_prompts(prepared, generate_fn, opts.lengths, opts.depths, opts.samples,
                                        opts.needles, seed=opts.seed, batch_size=opts.batch_size,
                                        progress=opts.progress, details_out=details)
        return TaskRun(records, details)
