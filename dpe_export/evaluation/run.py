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
import itertools
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from dpe_export.errors import DPEExportError
from dpe_export.evaluation import harness
from dpe_export.evaluation.generation import GenerateFn, make_generate_fn
from dpe_export.evaluation.ppl import evaluate_ppl
from dpe_export.evaluation.prompts import (
    DEFAULT_DEPTHS,
    DEFAULT_NEEDLES,
    DEFAULT_SAMPLES,
    _Item,
    task_haystack_seed,
)
from dpe_export.evaluation.registry import Task, get_task
from dpe_export.evaluation.results import EvalResult, aggregate
from dpe_export.evaluation.tasks.builder import NIAH_KEYS, PromptBuilder
from dpe_export.progress import progress_bar
from dpe_export.sources import loading, methods

logger = logging.getLogger("dpe_export")


def _batches(items: Iterable[_Item], size: int) -> Iterator[list[_Item]]:
    it = iter(items)
    while True:
        batch = list(itertools.islice(it, size))
        if not batch:
            return
        yield batch




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


def _run_retrieval(task: Task, items_for: Callable[[int], Iterable[_Item]], generate_fn: GenerateFn,
                   lengths: Sequence[int], total: int, batch_size: int, progress: bool) -> list[dict[str, Any]]:

    if batch_size < 1:
        raise DPEExportError("the batch size must be >= 1")
    details: list[dict[str, Any]] = []
    with progress_bar(total, task.name, progress) as bar:
        for length in lengths:
            bar.set_postfix(length=length)
            for batch in _batches(_checked(items_for(length), task.name, length), batch_size):
                ids = [list(item.prompt.input_ids) for item in batch]
                bad = [len(x) for x in ids if len(x) != length]
                if bad:  # pragma: no cover - the prompt builder guarantees exact lengths
                    raise DPEExportError(f"a {task.name} prompt has {bad[0]} tokens instead of {length}")
                texts = generate_fn(ids)
                if len(texts) != len(batch):
                    raise DPEExportError(f"generate_fn returned {len(texts)} texts for {len(batch)} prompts")
                for item, text in zip(batch, texts):
                    details.append({
                        "length": length, "depth": item.depth, "sample": item.sample,
                        "answer": item.prompt.answer, "generated": text,
                        "correct": bool(task.score(text, item.prompt.answer)),
                    })
                bar.update(len(batch))
    return details


def evaluate_task(task, builder, generate_fn: GenerateFn, lengths: Sequence[int],
                  depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = DEFAULT_SAMPLES,
                  needles: int = DEFAULT_NEEDLES, seed: int = 0, batch_size: int = 1, progress: bool = False,
                  details_out: Optional[list] = None) -> list[dict[str, Any]]:
    """Accuracy of a registered retrieval task per (length, depth). ``builder``: a tasks.PromptBuilder;
    ``generate_fn`` as above; ``details_out``: a list that receives one dict per prompt (answer, generated text,
    correct). NIAH: per (length, depth) the fraction of needles retrieved."""
    task = get_task(task) if isinstance(task, str) else task
    if task.kind != "retrieval":
        raise DPEExportError(f"task {task.name} is not a retrieval task")
    total = len(lengths) * len(depths) * samples
    details = _run_retrieval(task, lambda n: task.build(builder, n, depths, samples, seed, needles),
                             generate_fn, lengths, total, batch_size, progress)
    if details_out is not None:
        details_out.extend(details)
    extra = {"needles": needles} if task.uses_needles else None
    return aggregate(details, extra, count_contexts=task.count_contexts)


def evaluate_passkey(builder, generate_fn: GenerateFn, lengths: Sequence[int],
                     depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = DEFAULT_SAMPLES, seed: int = 0,
                     batch_size: int = 1, progress: bool = False,
                     details_out: Optional[list] = None) -> list[dict[str, Any]]:
    """Pass-key accuracy per (length, depth): :func:`evaluate_task` for ``passkey``."""
    return evaluate_task("passkey", builder, generate_fn, lengths, depths, samples, seed=seed,
                         batch_size=batch_size, progress=progress, details_out=details_out)


def evaluate_niah(builder, generate_fn: GenerateFn, lengths: Sequence[int],
                  depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = DEFAULT_SAMPLES,
                  needles: int = DEFAULT_NEEDLES, seed: int = 0, batch_size: int = 1, progress: bool = False,
                  details_out: Optional[list] = None) -> list[dict[str, Any]]:
    """NIAH with ``needles`` needles per context: :func:`evaluate_task` for ``niah``."""
    return evaluate_task("niah", builder, generate_fn, lengths, depths, samples, needles, seed, batch_size,
                         progress, details_out)


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


def available_memory(device: Optional[str], device_map: Optional[str]) -> Optional[int]:
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
    have = available_memory(device, device_map)
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
             trust_remote_code: bool = False, data_files: Optional[dict] = None) -> EvalResult:
    """Load ``model_dir`` (with ``method`` applied), run ``task`` (a registered task name; ``ruler:sub,...`` for
    harness subtasks) at ``lengths`` and return the scores.

    A DPE export is loaded with its own code only when that code is exactly what this dpe-export writes, or
    with ``trust_remote_code``.

    Fast checks (directory, weights, method, prompt lengths) run before the weights are loaded.
    """

    spec_name = task
    task_def = get_task(task)
    lengths = [int(n) for n in lengths]
    if not lengths or any(n < 1 for n in lengths):
        raise DPEExportError("give one or more positive lengths")
    if samples < 1:
        raise DPEExportError("the number of samples must be >= 1")
    spec = method if isinstance(method, methods.MethodSpec) else methods.parse_method(method)
    if task_def.kind == "harness":
        return harness.run_ruler(model_dir, spec_name, lengths, samples=samples, method=spec, seed=seed,
                                 batch_size=batch_size, device=device, dtype=dtype, attn=attn, progress=progress,
                                 device_map=device_map, trust_remote_code=trust_remote_code, data_files=data_files)
    if data_files:
        raise DPEExportError("data files apply to RULER only")
    task = task_def.name
    depths = list(DEFAULT_DEPTHS if depths is None else depths)
    if task_def.uses_depths and (not depths or any(not 0.0 <= float(d) <= 1.0 for d in depths)):
        raise DPEExportError("depths must be numbers between 0 and 1")
    if task_def.uses_needles and not 1 <= needles <= len(NIAH_KEYS):
        raise DPEExportError(f"the number of needles must be between 1 and {len(NIAH_KEYS)}")
    if haystack is not None and not Path(haystack).is_file():
        raise DPEExportError(f"haystack file not found: {haystack}")

    raw, _ = loading.check_eval_model(model_dir, spec, trust_remote_code)
    loading.check_device_map(device_map, device)
    check_memory(raw, task, max(lengths), batch_size, device, dtype, device_map)
    import random

    import torch

    tokenizer = loading.load_tokenizer(model_dir)
    random.seed(seed)
    torch.manual_seed(seed)
    with _WarningsToLog():
        builder = None
        if task_def.kind == "retrieval":
            builder = PromptBuilder(tokenizer, haystack_path=haystack, haystack_seed=task_haystack_seed(seed))
            shortest = task_def.min_length(builder, needles)
            if min(lengths) < shortest:
                raise DPEExportError(
                    f"length {min(lengths)} is too short for a {task} prompt with this tokenizer "
                    f"(needs at least {shortest} tokens)")
        with _hf_progress_bars(progress):
            loaded = loading.load_model(model_dir, spec, device=device, dtype=dtype, attn=attn,
                                        target_length=max(lengths), tokenizer=tokenizer, device_map=device_map,
                                        trust_remote_code=trust_remote_code)
        settings = {
            "lengths": lengths, "samples": samples,
            "depths": [float(d) for d in depths] if task_def.uses_depths else None,
            "needles": needles if task_def.uses_needles else None, "haystack": str(haystack) if haystack else None,
            "batch_size": batch_size, "device": str(loaded.device), "device_map": device_map,
            "dtype": str(loaded.dtype).replace("torch.", ""),
            "attn": attn, "model_kind": loaded.describe(), "pretrain_length": loaded.pretrain_length,
        }
        details: list[dict[str, Any]] = []
        if task_def.kind == "ppl":
            records = evaluate_ppl(loaded.model, tokenizer, lengths, samples, seed, haystack, batch_size,
                                   chunk_size, progress)
        else:
            generate_fn = make_generate_fn(loaded.model, tokenizer, task_def.max_new_tokens)
            records = evaluate_task(task_def, builder, generate_fn, lengths, depths, samples, needles, seed=seed,
                                    batch_size=batch_size, progress=progress, details_out=details)
    return EvalResult(task, str(model_dir), str(spec), seed, records, settings, details)
