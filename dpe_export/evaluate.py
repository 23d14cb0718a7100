"""Run the evaluation tasks (pass-key retrieval, multi-needle NIAH, perplexity) and aggregate the scores.

The retrieval tasks talk to the model through one seam, ``generate_fn(list_of_input_id_lists) -> list[str]``
(the decoded continuation of each prompt), so scripted "models" can be plugged in for testing;
:func:`make_generate_fn` builds the real one (a greedy loop with a KV cache, :func:`greedy_generate`).

Depths and samples:

* passkey: for every (length, depth), ``samples`` prompts with one 5-digit pass key at that depth;
* niah: every context hides ``needles`` 6-digit needles (default 4) at different depths of the ``depths``
  grid (needle k of context c sits at depth ``depths[(c * needles + k) % len(depths)]``) and is asked about
  each of them in turn, one prompt per needle over the same context; a (length, depth) cell is the fraction
  of the ``samples`` needles at that depth that were retrieved;
* ppl: ``samples`` consecutive windows of exactly ``length`` tokens of held-out text (generated haystack with
  its own seed, or ``--haystack``); no depths. Logits are computed a chunk of positions at a time.

All seeds derive from one ``seed``; prompts and needles are the same for every model and method.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import logging
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from dpe_export.errors import DPEExportError
from dpe_export.resources import load_dpe_core

logger = logging.getLogger("dpe_export")

__all__ = [
    "TASKS",
    "DEFAULT_DEPTHS",
    "DEFAULT_SAMPLES",
    "DEFAULT_NEEDLES",
    "PASSKEY_DIGITS",
    "NIAH_DIGITS",
    "GenerateFn",
    "EvalResult",
    "sample_seed",
    "task_haystack_seed",
    "ppl_haystack_seed",
    "passkey_prompts",
    "niah_prompts",
    "niah_needle_depths",
    "evaluate_passkey",
    "evaluate_niah",
    "aggregate",
    "reset_rope_state",
    "fixed_rope_for_length",
    "greedy_generate",
    "make_generate_fn",
    "max_new_tokens_for",
    "ppl_token_stream",
    "ppl_windows",
    "sequence_nll",
    "evaluate_ppl",
    "minimum_prompt_length",
    "run_eval",
]

TASKS = ("passkey", "niah", "ppl")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_SAMPLES = 10
DEFAULT_NEEDLES = 4
PASSKEY_DIGITS = 5
NIAH_DIGITS = 6
ANSWER_SLACK = 3  # tokens generated beyond one per answer digit (a leading space, punctuation)
PREFILL_CHUNK = 1024  # prompt tokens per forward in greedy_generate (see there)
LOGITS_BUDGET = 1 << 24  # elements of the float32 logits chunk in ppl (64 MiB)

GenerateFn = Callable[[list[list[int]]], list[str]]


# ----------------------------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------


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


def minimum_prompt_length(builder, task: str, needles: int = DEFAULT_NEEDLES) -> int:
    """The shortest length a prompt of ``task`` can have (its intro, needles and question, no filler)."""
    from dpe_export.tasks import NIAH_INTRO, NIAH_NEEDLE, NIAH_QUERY, PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUERY

    if task == "passkey":
        pieces = [PASSKEY_NEEDLE.format(key="9" * PASSKEY_DIGITS), PASSKEY_QUERY]
        intro = PASSKEY_INTRO
    else:  # the key that tokenizes longest, in every needle and the question: an upper bound
        from dpe_export.tasks import NIAH_KEYS

        key = max(NIAH_KEYS, key=lambda k: len(builder.encode_piece(NIAH_QUERY.format(key=k))))
        pieces = [NIAH_NEEDLE.format(key=key, value="9" * NIAH_DIGITS)] * needles
        pieces.append(NIAH_QUERY.format(key=key))
        intro = NIAH_INTRO
    n = len(builder.prefix_ids) + len(builder.encode_piece(intro, leading_space=False))
    return n + sum(len(builder.encode_piece(p)) for p in pieces)


def _batches(items: Iterable[_Item], size: int) -> Iterator[list[_Item]]:
    it = iter(items)
    while True:
        batch = list(itertools.islice(it, size))
        if not batch:
            return
        yield batch


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                leave=True)


# ----------------------------------------------------------------------------------------------------------
# Retrieval tasks
# ----------------------------------------------------------------------------------------------------------


def _checked(items: Iterable[_Item], task: str, length: int) -> Iterator[_Item]:
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


def _run_retrieval(task: str, items_for: Callable[[int], Iterable[_Item]], generate_fn: GenerateFn,
                   lengths: Sequence[int], total: int, batch_size: int, progress: bool) -> list[dict[str, Any]]:
    from dpe_export.tasks import score_answer

    if batch_size < 1:
        raise DPEExportError("the batch size must be >= 1")
    details: list[dict[str, Any]] = []
    with _progress(total, task, progress) as bar:
        for length in lengths:
            bar.set_postfix(length=length)
            for batch in _batches(_checked(items_for(length), task, length), batch_size):
                ids = [list(item.prompt.input_ids) for item in batch]
                bad = [len(x) for x in ids if len(x) != length]
                if bad:  # pragma: no cover - the prompt builder guarantees exact lengths
                    raise DPEExportError(f"a {task} prompt has {bad[0]} tokens instead of {length}")
                texts = generate_fn(ids)
                if len(texts) != len(batch):
                    raise DPEExportError(f"generate_fn returned {len(texts)} texts for {len(batch)} prompts")
                for item, text in zip(batch, texts):
                    details.append({
                        "length": length, "depth": item.depth, "sample": item.sample,
                        "answer": item.prompt.answer, "generated": text,
                        "correct": bool(score_answer(text, item.prompt.answer)),
                    })
                bar.update(len(batch))
    return details


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


def evaluate_passkey(builder, generate_fn: GenerateFn, lengths: Sequence[int],
                     depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = DEFAULT_SAMPLES, seed: int = 0,
                     batch_size: int = 1, progress: bool = False,
                     details_out: Optional[list] = None) -> list[dict[str, Any]]:
    """Pass-key accuracy per (length, depth). ``builder``: a tasks.PromptBuilder; ``generate_fn`` as above.

    ``details_out``: a list that receives one dict per prompt (answer, generated text, correct).
    """
    total = len(lengths) * len(depths) * samples
    details = _run_retrieval("passkey", lambda n: passkey_prompts(builder, n, depths, samples, seed),
                             generate_fn, lengths, total, batch_size, progress)
    if details_out is not None:
        details_out.extend(details)
    return aggregate(details)


def evaluate_niah(builder, generate_fn: GenerateFn, lengths: Sequence[int],
                  depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = DEFAULT_SAMPLES,
                  needles: int = DEFAULT_NEEDLES, seed: int = 0, batch_size: int = 1, progress: bool = False,
                  details_out: Optional[list] = None) -> list[dict[str, Any]]:
    """NIAH with ``needles`` needles per context: per (length, depth) the fraction of needles retrieved."""
    total = len(lengths) * len(depths) * samples
    details = _run_retrieval("niah", lambda n: niah_prompts(builder, n, depths, samples, needles, seed),
                             generate_fn, lengths, total, batch_size, progress)
    if details_out is not None:
        details_out.extend(details)
    return aggregate(details, {"needles": needles}, count_contexts=True)


# ----------------------------------------------------------------------------------------------------------
# Greedy generation
# ----------------------------------------------------------------------------------------------------------


def _model_device(model):
    try:
        from dpe_export.methods import input_device

        return input_device(model)
    except (StopIteration, AttributeError):  # scripted test models without input embeddings
        import torch

        return torch.device("cpu")


def reset_rope_state(model) -> None:
    """Undo what dynamic RoPE scaling kept from earlier, longer sequences, so that every prompt is scored
    with the frequencies its own length gives (transformers only resets below the base length)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None or "dynamic" not in str(getattr(rotary, "rope_type", "")):
        return
    original = getattr(rotary, "original_inv_freq", None)
    base_len = getattr(rotary, "original_max_seq_len", None)
    if original is not None and base_len is not None and rotary.max_seq_len_cached != base_len:
        rotary.register_buffer("inv_freq", original.clone(), persistent=False)
        rotary.max_seq_len_cached = base_len


@contextlib.contextmanager
def fixed_rope_for_length(model, total_length: int):
    """Inside, a dynamic-RoPE model uses the frequencies of a ``total_length``-token sequence for every
    position and does not update them: a prompt and the tokens generated after it (through the KV cache)
    then share one rotation, as a full recompute at the final length would. Other models are untouched."""
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    rotary = getattr(decoder, "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", None)
    if rotary is None or "dynamic" not in str(rope_type):
        yield
        return
    reset_rope_state(model)
    x = torch.zeros(1, 1, dtype=torch.float32, device=rotary.inv_freq.device)
    rotary(x, torch.tensor([[total_length - 1]], device=x.device))  # transformers' own dynamic update
    rotary.rope_type = "default"  # the decorator only updates rotary types named dynamic
    try:
        yield
    finally:
        rotary.rope_type = rope_type
        reset_rope_state(model)


def greedy_generate(model, batch: Sequence[Sequence[int]], max_new_tokens: int,
                    eos_token_id: Optional[Any] = None, prefill_chunk: Optional[int] = PREFILL_CHUNK) -> list[list[int]]:
    """Greedy continuation of equal-length prompts (no padding: an attention mask of ones) with a KV cache.

    The prompt goes in ``prefill_chunk`` tokens at a time (None: at once), each chunk on the cache of the ones
    before and with logits for its last position only, so no forward builds an n x n mask (sliding-window
    layers would) or n x vocab logits. Returns up to ``max_new_tokens`` new ids per prompt, cut before the first
    end-of-sequence token; stops early once every row has ended.
    """
    import torch

    if len({len(x) for x in batch}) > 1:
        raise ValueError("greedy_generate needs prompts of equal length")
    device = _model_device(model)
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    ids = torch.tensor([list(x) for x in batch], dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    new: list[torch.Tensor] = []
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    core = load_dpe_core()
    cache_name = core.cache_argument(model)  # "past_key_values" before transformers 5.24, "cache" from it on
    with fixed_rope_for_length(model, ids.shape[1] + max_new_tokens), torch.inference_mode():
        step_len = ids.shape[1] if not prefill_chunk else max(1, int(prefill_chunk))
        out = None
        for a in range(0, ids.shape[1], step_len):
            b = min(a + step_len, ids.shape[1])
            past = {} if out is None else {cache_name: core.output_cache(out)}
            out = model(input_ids=ids[:, a:b], attention_mask=mask[:, :b], use_cache=True, logits_to_keep=1, **past)
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            new.append(nxt)
            if eos:
                done |= torch.isin(nxt, eos_t)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(input_ids=nxt[:, None], attention_mask=mask, use_cache=True,
                        **{cache_name: core.output_cache(out)})
    rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in batch]
    result = []
    for row in rows:
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        result.append(row[:cut])
    return result


def greedy_generate_shared(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                           eos_token_id: Optional[Any] = None,
                           prefill_chunk: Optional[int] = PREFILL_CHUNK) -> list[list[int]]:
    """:func:`greedy_generate` of each prompt alone, with the prefix they share prefilled once (NIAH asks one
    context about each of its needles: only the question differs). The prefix's cache is copied for each
    prompt. Equal to generating each prompt alone up to float error (chunked prefill)."""
    import torch

    prompts = [list(p) for p in prompts]
    if not prompts:
        return []
    shared = 0
    shortest = min(len(p) for p in prompts)
    while shared < shortest - 1 and all(p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    if len(prompts) == 1 or shared < 2:
        return [greedy_generate(model, [p], max_new_tokens, eos_token_id, prefill_chunk)[0] for p in prompts]
    device = _model_device(model)
    core = load_dpe_core()
    cache_name = core.cache_argument(model)
    ids = torch.tensor([prompts[0][:shared]], dtype=torch.long, device=device)
    step_len = shared if not prefill_chunk else max(1, int(prefill_chunk))
    out = None
    with fixed_rope_for_length(model, max(len(p) for p in prompts) + max_new_tokens), torch.inference_mode():
        for a in range(0, shared, step_len):
            b = min(a + step_len, shared)
            past = {} if out is None else {cache_name: core.output_cache(out)}
            out = model(input_ids=ids[:, a:b], attention_mask=torch.ones(1, b, dtype=torch.long, device=device),
                        use_cache=True, logits_to_keep=1, **past)
        prefix_cache = core.output_cache(out)
        results = []
        for p in prompts:
            results.append(_continue_greedy(model, copy.deepcopy(prefix_cache), p[shared:], shared, max_new_tokens,
                                            eos_token_id, cache_name))
    return results


def _continue_greedy(model, cache, rest: Sequence[int], past: int, max_new_tokens: int, eos_token_id,
                     cache_name: str) -> list[int]:
    """Greedy decoding of one prompt whose first ``past`` tokens are in ``cache``."""
    import torch

    device = _model_device(model)
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    core = load_dpe_core()
    ids = torch.tensor([list(rest)], dtype=torch.long, device=device)
    n = past + ids.shape[1]
    out = model(input_ids=ids, attention_mask=torch.ones(1, n, dtype=torch.long, device=device), use_cache=True,
                logits_to_keep=1, **{cache_name: cache})
    new: list[int] = []
    for step in range(max_new_tokens):
        nxt = int(out.logits[0, -1].argmax(-1))
        if nxt in eos:
            break
        new.append(nxt)
        if step == max_new_tokens - 1:
            break
        n += 1
        out = model(input_ids=torch.tensor([[nxt]], device=device), use_cache=True,
                    attention_mask=torch.ones(1, n, dtype=torch.long, device=device),
                    **{cache_name: core.output_cache(out)})
    return new


def max_new_tokens_for(task: str) -> int:
    """Enough new tokens for the answer: one per digit (tokens never span less than a digit) plus slack."""
    return (PASSKEY_DIGITS if task == "passkey" else NIAH_DIGITS) + ANSWER_SLACK


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   getattr(tokenizer, "eos_token_id", None)):
        if source is None:
            continue
        for t in [source] if isinstance(source, int) else source:
            if t not in ids:
                ids.append(int(t))
    return ids


def make_generate_fn(model, tokenizer, max_new_tokens: int) -> GenerateFn:
    """The real ``generate_fn``: greedy decoding of ``max_new_tokens`` tokens, decoded without special tokens."""
    eos = _eos_ids(model, tokenizer)

    def generate(batch: list[list[int]]) -> list[str]:
        rows = greedy_generate(model, batch, max_new_tokens, eos or None)
        return [tokenizer.decode(r, skip_special_tokens=True) for r in rows]

    return generate


# ----------------------------------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def ppl_token_stream(tokenizer, num_tokens: int, seed: int = 0, haystack: Optional[Path] = None) -> list[int]:
    """At least ``num_tokens`` token ids of held-out text: generated haystack (seed ``ppl_haystack_seed(seed)``)
    or the ``haystack`` file (repeated, with a warning, when too short)."""
    if haystack is not None:
        from dpe_export.haystack import load_haystack

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
    from dpe_export.haystack import generate_haystack

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
        from dpe_export.tasks import PromptBuilder

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
    with _progress(len(lengths) * samples, "ppl", progress) as bar:
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


# ----------------------------------------------------------------------------------------------------------
# A whole run
# ----------------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """One evaluation run: settings and one record per (length, depth)."""

    task: str
    model: str
    method: str
    seed: int
    records: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    details: list[dict[str, Any]] = field(default_factory=list)

    def full_records(self) -> list[dict[str, Any]]:
        """The records with task, model, method and seed in each."""
        head = {"task": self.task, "model": self.model, "method": self.method, "seed": self.seed}
        return [{**head, **r} for r in self.records]

    def overall(self) -> list[dict[str, Any]]:
        """Per length: accuracy over all its samples (retrieval) or the perplexity (ppl)."""
        out: dict[int, dict[str, Any]] = {}
        for r in self.records:
            o = out.setdefault(r["length"], {"length": r["length"], "samples": 0, "_correct": 0.0})
            o["samples"] += r["samples"]
            if r.get("accuracy") is not None:
                o["_correct"] += r["accuracy"] * r["samples"]
            if "perplexity" in r:
                o["perplexity"], o["tokens"] = r["perplexity"], r["tokens"]
        rows = []
        for o in out.values():
            correct = o.pop("_correct")
            o["accuracy"] = None if self.task == "ppl" else correct / o["samples"]
            rows.append(o)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "model": self.model, "method": self.method, "seed": self.seed,
                "settings": self.settings, "records": self.full_records(), "overall": self.overall(),
                "details": self.details}


class _WarningsToLog(warnings.catch_warnings):
    """Python warnings raised by dpe_export code inside (e.g. a haystack file being repeated) become one-line
    dpe_export log warnings (shown once each); other warnings go their usual way."""

    def __enter__(self):
        super().__enter__()
        original = warnings.showwarning
        package = str(Path(__file__).resolve().parent)
        seen: set[str] = set()

        def show(message, category, filename, lineno, file=None, line=None):
            if not str(Path(filename).resolve()).startswith(package):
                return original(message, category, filename, lineno, file, line)
            text = str(message)
            if text not in seen:
                seen.add(text)
                logger.warning("%s", text)

        warnings.showwarning = show
        return self


@contextlib.contextmanager
def _hf_progress_bars(enabled: bool):
    """transformers' own progress bars (loading weights) only when ours are shown."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


MAX_EVAL_LENGTH = 1 << 24


def estimate_memory(raw: dict, task: str, length: int, batch_size: int, bytes_per_value: int) -> int:
    """Bytes an evaluation at `length` tokens holds at its peak, roughly: the KV cache of every layer, a few
    hidden-state sized activations, and (perplexity) the logits of every position; weights not included."""
    cfg = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    layers = int(cfg.get("num_hidden_layers") or 1)
    heads = int(cfg.get("num_attention_heads") or 1)
    hidden = int(cfg.get("hidden_size") or 1)
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    vocab = int(cfg.get("vocab_size") or 1)
    tokens = length * batch_size
    kv_bytes = 2 * layers * kv * head_dim * tokens * bytes_per_value
    activations = 8 * hidden * tokens * 4 + 2 * heads * head_dim * tokens * 4
    logits = vocab * tokens * 4 if task == "ppl" else vocab * batch_size * 4
    return kv_bytes + activations + logits


def _available_memory(device: Optional[str], device_map: Optional[str]) -> Optional[int]:
    import torch

    if device_map is None and device in (None, "auto", "cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(raw: dict, task: str, length: int, batch_size: int, device=None, dtype=None, device_map=None) -> None:
    """Refuse, before loading anything, an evaluation that cannot fit in memory; warn when it will be tight."""
    if length > MAX_EVAL_LENGTH:
        raise DPEExportError(f"length {length} is beyond what dpe-export evaluates ({MAX_EVAL_LENGTH} tokens)")
    bpv = 4 if dtype in (None, "auto", "float32") and device in (None, "auto", "cpu") else 2
    need = estimate_memory(raw, task, length, batch_size, 2 if dtype in ("bfloat16", "float16") else bpv)
    have = _available_memory(device, device_map)
    if have is None:
        return
    gib = 1 << 30
    if need > have:
        raise DPEExportError(
            f"{task} at {length} tokens x batch {batch_size} needs about {need / gib:.1f} GiB beyond the weights "
            f"(KV cache and activations), and {have / gib:.1f} GiB is available; use shorter lengths or a smaller batch")
    if need > have / 2:
        logger.warning("%s at %d tokens needs about %.1f GiB of the %.1f GiB available", task, length, need / gib,
                       have / gib)


def run_eval(model_dir, task: str, lengths: Sequence[int], *, samples: int = DEFAULT_SAMPLES,
             depths: Optional[Sequence[float]] = None, needles: int = DEFAULT_NEEDLES, method: Any = None,
             haystack: Optional[Path] = None, seed: int = 0, batch_size: int = 1, device: Optional[str] = None,
             dtype: Optional[str] = None, attn: str = "sdpa", progress: bool = False,
             chunk_size: Optional[int] = None, device_map: Optional[str] = None,
             trust_remote_code: bool = False) -> EvalResult:
    """Load ``model_dir`` (with ``method`` applied), run ``task`` at ``lengths`` and return the scores.

    A DPE export is loaded with its own code only when that code is exactly what this dpe-export writes, or
    with ``trust_remote_code``.

    Fast checks (directory, weights, method, prompt lengths) run before the weights are loaded.
    """
    from dpe_export import methods

    if task not in TASKS:
        raise DPEExportError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    lengths = [int(n) for n in lengths]
    if not lengths or any(n < 1 for n in lengths):
        raise DPEExportError("give one or more positive lengths")
    if samples < 1:
        raise DPEExportError("the number of samples must be >= 1")
    spec = method if isinstance(method, methods.MethodSpec) else methods.parse_method(method)
    depths = list(DEFAULT_DEPTHS if depths is None else depths)
    if task != "ppl":
        if not depths or any(not 0.0 <= float(d) <= 1.0 for d in depths):
            raise DPEExportError("depths must be numbers between 0 and 1")
        if task == "niah":
            from dpe_export.tasks import NIAH_KEYS

            if not 1 <= needles <= len(NIAH_KEYS):
                raise DPEExportError(f"the number of needles must be between 1 and {len(NIAH_KEYS)}")
    if haystack is not None and not Path(haystack).is_file():
        raise DPEExportError(f"haystack file not found: {haystack}")

    raw, _ = methods.check_eval_model(model_dir, spec, trust_remote_code)
    methods.check_device_map(device_map, device)
    check_memory(raw, task, max(lengths), batch_size, device, dtype, device_map)
    import random

    import torch

    tokenizer = methods.load_tokenizer(model_dir)
    random.seed(seed)
    torch.manual_seed(seed)
    with _WarningsToLog():
        builder = None
        if task != "ppl":
            from dpe_export.tasks import PromptBuilder

            builder = PromptBuilder(tokenizer, haystack_path=haystack, haystack_seed=task_haystack_seed(seed))
            shortest = minimum_prompt_length(builder, task, needles)
            if min(lengths) < shortest:
                raise DPEExportError(
                    f"length {min(lengths)} is too short for a {task} prompt with this tokenizer "
                    f"(needs at least {shortest} tokens)")
        with _hf_progress_bars(progress):
            loaded = methods.load_model(model_dir, spec, device=device, dtype=dtype, attn=attn,
                                        target_length=max(lengths), tokenizer=tokenizer, device_map=device_map,
                                        trust_remote_code=trust_remote_code)
        settings = {
            "lengths": lengths, "samples": samples, "depths": None if task == "ppl" else [float(d) for d in depths],
            "needles": needles if task == "niah" else None, "haystack": str(haystack) if haystack else None,
            "batch_size": batch_size, "device": str(loaded.device), "device_map": device_map, "dtype": str(loaded.dtype).replace("torch.", ""),
            "attn": attn, "model_kind": loaded.describe(), "pretrain_length": loaded.pretrain_length,
        }
        details: list[dict[str, Any]] = []
        if task == "ppl":
            records = evaluate_ppl(loaded.model, tokenizer, lengths, samples, seed, haystack, batch_size,
                                   chunk_size, progress)
        else:
            generate_fn = make_generate_fn(loaded.model, tokenizer, max_new_tokens_for(task))
            evaluate = evaluate_passkey if task == "passkey" else evaluate_niah
            kwargs = {"needles": needles} if task == "niah" else {}
            records = evaluate(builder, generate_fn, lengths, depths, samples, seed=seed, batch_size=batch_size,
                               progress=progress, details_out=details, **kwargs)
    return EvalResult(task, str(model_dir), str(spec), seed, records, settings, details)
