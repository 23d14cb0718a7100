"""Greedy decoding for the retrieval tasks: prompts prefilled in chunks (no n x n mask, logits for the last
position only), a shared prefix prefilled once, and dynamic-RoPE models held at one rotation across prompt and answer.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Callable, Optional, Sequence

from dpe_export.sources.loading import input_device
from dpe_export import dpe_ops

logger = logging.getLogger("dpe_export")


PREFILL_CHUNK = 1024  # prompt tokens per forward in greedy_generate (see there)
# ... and in model.generate() under lm-eval (set_generate_prefill_chunk): the fastest of 1024/2048/4096 for the
# Gemma-3-270M DPE export on 2 CPU cores, at 8K (24/19/- s) and at 16K (-/44/63 s)
GENERATE_PREFILL_CHUNK = 2048


GenerateFn = Callable[[list[list[int]]], list[str]]


def _model_device(model):
    try:

        return input_device(model)
    except (StopIteration, AttributeError):  # scripted test models without input embeddings
        import torch

        return torch.device("cpu")


def reset_rope_state(model) -> None:
    """Undo what dynamic RoPE scaling kept from earlier, longer sequences, so that every prompt is scored
    with the frequencies its own length gives (transformers only resets below the base length)."""
    if not uses_dynamic_rope(model):
        return
    rotary = model.get_decoder().rotary_emb
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


def uses_dynamic_rope(model) -> bool:
    """Whether ``model``'s rotary frequencies follow the sequence length (dynamic NTK scaling)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return "dynamic" in str(getattr(getattr(decoder, "rotary_emb", None), "rope_type", ""))


def set_generate_prefill_chunk(model, chunk: Optional[int] = GENERATE_PREFILL_CHUNK) -> Optional[int]:
    """Make ``model.generate()`` prefill a prompt ``chunk`` tokens at a time, each chunk on the cache of the ones
    before (transformers' ``prefill_chunk_size``), as :func:`prefill` does; returns the chunk set (None: whole).

    The same tokens up to float error, with no n x n mask and sliding-window layers attending to their window
    only: on Gemma-3-270M at 8K tokens on 2 CPU cores, 16 s instead of 39 s (base) and 20 s instead of 53 s (DPE
    export, 2,048-token chunks). Dynamic-RoPE models keep whole-prompt prefill: their frequencies follow the
    length seen so far, so chunks would be rotated differently from each other."""
    chunk = int(chunk) if chunk and not uses_dynamic_rope(model) else None  # 0 or None: whole, as in prefill()
    config = getattr(model, "generation_config", None)
    if config is None:
        return None
    config.prefill_chunk_size = chunk
    return chunk


def reset_rope_state_on_every_call(model) -> bool:
    """For a dynamic-RoPE model: undo, before each top-level forward, what earlier calls left in its rotary
    frequencies (transformers keeps those of the longest sequence seen, so an lm-eval score would depend on the
    order of the samples). Within one generate() the frequencies then follow the length as transformers'
    own do. Returns whether a hook was added (once per model)."""
    if not uses_dynamic_rope(model) or getattr(model, "_dpe_rope_reset_hook", None) is not None:
        return False
    model._dpe_rope_reset_hook = model.register_forward_pre_hook(lambda module, args: reset_rope_state(module))
    return True


def prefill(model, ids, chunk: Optional[int] = PREFILL_CHUNK):
    """Run prompt ids [B, n] (no padding) through `model` `chunk` tokens at a time (None: at once), each chunk on
    the cache of the ones before, with logits for its last position only. Returns the last output (its cache holds
    the whole prompt). Call it under torch.inference_mode()."""
    import torch

    cache_name = dpe_ops.cache_argument(model)  # "past_key_values" before transformers 5.24, "cache" from it on
    n = ids.shape[1]
    step = n if not chunk else max(1, int(chunk))
    mask = torch.ones_like(ids)
    out = None
    for a in range(0, n, step):
        b = min(a + step, n)
        past = {} if out is None else {cache_name: dpe_ops.output_cache(out)}
        out = model(input_ids=ids[:, a:b], attention_mask=mask[:, :b], use_cache=True, logits_to_keep=1, **past)
    return out


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
    cache_name = dpe_ops.cache_argument(model)  # "past_key_values" before transformers 5.24, "cache" from it on
    with fixed_rope_for_length(model, ids.shape[1] + max_new_tokens), torch.inference_mode():
        out = prefill(model, ids, prefill_chunk)
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            new.append(nxt)
            if eos:
                done |= torch.isin(nxt, eos_t)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(input_ids=nxt[:, None], attention_mask=mask, use_cache=True,
                        **{cache_name: dpe_ops.output_cache(out)})
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
    shared = shared_prefix_length(prompts)
    if len(prompts) == 1 or shared < 2:
        return [greedy_generate(model, [p], max_new_tokens, eos_token_id, prefill_chunk)[0] for p in prompts]
    device = _model_device(model)
    cache_name = dpe_ops.cache_argument(model)
    ids = torch.tensor([prompts[0][:shared]], dtype=torch.long, device=device)
    with fixed_rope_for_length(model, max(len(p) for p in prompts) + max_new_tokens), torch.inference_mode():
        prefix_cache = dpe_ops.output_cache(prefill(model, ids, prefill_chunk))
        results = []
        for p in prompts:
            results.append(_continue_greedy(model, copy.deepcopy(prefix_cache), p[shared:], shared, max_new_tokens,
                                            eos_token_id, cache_name))
    return results


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all prompts share, leaving each at least one token of its own."""
    shared = 0
    shortest = min(len(p) for p in prompts)
    while shared < shortest - 1 and all(p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    return shared


def answer_likelihoods(model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                       prefill_chunk: Optional[int] = PREFILL_CHUNK,
                       around_prefill: Optional[Callable[[], Any]] = None) -> list[tuple[float, bool]]:
    """Teacher-forced scores of each answer after its prompt: (mean log-probability per answer token, whether
    every answer token is the most likely one). The prefix the prompts share is prefilled once and its cache
    copied for each prompt (NIAH asks one context about each of its needles), so a context costs one prefill
    however many needles it holds; no tokens are generated. ``around_prefill``: a context manager factory
    entered around the shared prefix's prefill only (calibration's prefix reuse)."""
    import torch

    prompts = [list(p) for p in prompts]
    answers = [list(a) for a in answers]
    if len(prompts) != len(answers) or not prompts or any(not a for a in answers):
        raise ValueError("need one non-empty answer per prompt")
    device = _model_device(model)
    cache_name = dpe_ops.cache_argument(model)
    shared = shared_prefix_length(prompts) if len(prompts) > 1 else 0
    longest = max(len(p) + len(a) for p, a in zip(prompts, answers))
    results = []
    with fixed_rope_for_length(model, longest), torch.inference_mode():
        prefix_cache = None
        if shared >= 2:
            ids = torch.tensor([prompts[0][:shared]], dtype=torch.long, device=device)
            with (around_prefill() if around_prefill is not None else contextlib.nullcontext()):
                prefix_cache = dpe_ops.output_cache(prefill(model, ids, prefill_chunk))
        for p, a in zip(prompts, answers):
            start = shared if prefix_cache is not None else 0
            rest = torch.tensor([p[start:] + a[:-1]], dtype=torch.long, device=device)
            past = {cache_name: copy.deepcopy(prefix_cache)} if prefix_cache is not None else {}
            if prefix_cache is None and rest.shape[1] > (prefill_chunk or rest.shape[1]):
                # a long prompt alone: chunked prefill of all but its last token, then the answer positions
                head = prefill(model, rest[:, :len(p) - 1], prefill_chunk)
                past = {cache_name: dpe_ops.output_cache(head)}
                start, rest = len(p) - 1, rest[:, len(p) - 1:]
            n = start + rest.shape[1]
            out = model(input_ids=rest, attention_mask=torch.ones(1, n, dtype=torch.long, device=device),
                        use_cache=True, logits_to_keep=len(a), **past)
            logp = torch.log_softmax(out.logits[0, -len(a):].float(), dim=-1)
            target = torch.tensor(a, dtype=torch.long, device=logp.device)
            chosen = logp.gather(-1, target[:, None])[:, 0]
            results.append((float(chosen.mean()), bool((logp.argmax(-1) == target).all())))
    return results


def _continue_greedy(model, cache, rest: Sequence[int], past: int, max_new_tokens: int, eos_token_id,
                     cache_name: str) -> list[int]:
    """Greedy decoding of one prompt whose first ``past`` tokens are in ``cache``."""
    import torch

    device = _model_device(model)
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
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
                    **{cache_name: dpe_ops.output_cache(out)})
    return new


def eos_ids(model, tokenizer) -> list[int]:
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
    eos = eos_ids(model, tokenizer)

    def generate(batch: list[list[int]]) -> list[str]:
        rows = greedy_generate(model, batch, max_new_tokens, eos or None)
        return [tokenizer.decode(r, skip_special_tokens=True) for r in rows]

    return generate

