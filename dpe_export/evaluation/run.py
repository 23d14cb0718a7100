"""One evaluation end to end: :func:`run_eval` for a registered task (``dpe-export eval --task``) and
:func:`run_harness` for any lm-eval task (``--harness lm-eval --tasks``).

run_eval does what every task shares and asks the task for the rest (the hooks of
:class:`dpe_export.evaluation.tasks.base.Task`, in order): the options (``check``), the method, the memory
estimate, the tokenizer (``prepare``: prompts built and lengths refused before the weights load), the weights
(safetensors only; an export's code only when it is exactly what this dpe-export writes, or with
``trust_remote_code``; a base model's code never), the seeds, the run (``evaluate``), the settings and the
:class:`~dpe_export.evaluation.results.EvalResult`. All seeds derive from one ``seed``: prompts, needles and text
are the same for every model and method.

The retrieval tasks talk to the model through one seam, ``generate_fn(list_of_input_id_lists) -> list[str]``
(the decoded continuation of each prompt), so scripted "models" can be plugged in for testing
(:func:`evaluate_task`); :func:`~dpe_export.evaluation.generation.make_generate_fn` builds the real one.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from dpe_export.errors import DPEExportError
from dpe_export.evaluation import harness
from dpe_export.evaluation.generation import GenerateFn
from dpe_export.evaluation.prompts import DEFAULT_DEPTHS, DEFAULT_NEEDLES, DEFAULT_SAMPLES
from dpe_export.evaluation.registry import get_task, registered_tasks
from dpe_export.evaluation.results import EvalResult, and_list
from dpe_export.evaluation.tasks.base import EvalOptions, Task
from dpe_export.evaluation.tasks.retrieval import RetrievalTask
from dpe_export.sources import loading, methods

logger = logging.getLogger("dpe_export")


def evaluate_task(task: Union[str, Task], builder, generate_fn: GenerateFn, lengths: Sequence[int],
                  depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = DEFAULT_SAMPLES,
                  needles: int = DEFAULT_NEEDLES, seed: int = 0, batch_size: int = 1, progress: bool = False,
                  details_out: Optional[list] = None) -> list[dict[str, Any]]:
    """Accuracy of a registered retrieval task per (length, depth). ``builder``: a tasks.PromptBuilder;
    ``generate_fn`` as above; ``details_out``: a list that receives one dict per prompt (answer, generated text,
    correct). NIAH: per (length, depth) the fraction of needles retrieved."""
    task = get_task(task) if isinstance(task, str) else task
    if not isinstance(task, RetrievalTask):
        raise DPEExportError(f"task {task.name} is not a retrieval task")
    return task.evaluate_prompts(builder, generate_fn, lengths, depths, samples, needles, seed, batch_size, progress,
                                 details_out)


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


def _task(task: Union[str, Task]) -> Task:
    return get_task(task) if isinstance(task, str) else task


def estimate_memory(ckpt, task: Union[str, Task], length: int, batch_size: int, bytes_per_value: int) -> int:
    """Bytes an evaluation at `length` tokens holds at its peak, roughly: the KV cache of every layer, a few
    hidden-state sized activations, and (perplexity) the logits of every position; weights not included.
    `ckpt`: the model's Checkpoint (its config.json as read once)."""
    cfg = ckpt.text_config
    layers = int(cfg.get("num_hidden_layers") or 1)
    heads = int(cfg.get("num_attention_heads") or 1)
    hidden = int(cfg.get("hidden_size") or 1)
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = ckpt.head_dim
    vocab = int(cfg.get("vocab_size") or 1)
    tokens = length * batch_size
    kv_bytes = 2 * layers * kv * head_dim * tokens * bytes_per_value
    activations = 8 * hidden * tokens * 4 + 2 * heads * head_dim * tokens * 4
    logits = vocab * tokens * 4 if _task(task).all_logits else vocab * batch_size * 4
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


def check_memory(ckpt, task: Union[str, Task], length: int, batch_size: int, device=None, dtype=None, device_map=None) -> None:
    """Refuse, before loading anything, an evaluation that cannot fit in memory; warn when it will be tight."""
    name = _task(task).name
    if length > MAX_EVAL_LENGTH:
        raise DPEExportError(f"length {length} is beyond what dpe-export evaluates ({MAX_EVAL_LENGTH} tokens)")
    bpv = 4 if dtype in (None, "auto", "float32") and device in (None, "auto", "cpu") else 2
    need = estimate_memory(ckpt, task, length, batch_size, 2 if dtype in ("bfloat16", "float16") else bpv)
    have = available_memory(device, device_map)
    if have is None:
        return
    gib = 1 << 30
    if need > have:
        raise DPEExportError(
            f"{name} at {length} tokens x batch {batch_size} needs about {need / gib:.1f} GiB beyond the weights "
            f"(KV cache and activations), and {have / gib:.1f} GiB is available; use shorter lengths or a smaller batch")
    if need > have / 2:
        logger.warning("%s at %d tokens needs about %.1f GiB of the %.1f GiB available", name, length, need / gib,
                       have / gib)


def _check_options(task: Task, opts: EvalOptions) -> None:
    """The options every task reads the same way, then the task's own check."""
    if opts.data_files and not task.takes_data_files:
        names = and_list(t.pretty_name for t in registered_tasks() if t.takes_data_files)
        raise DPEExportError(f"data files apply to {names or 'no task'} only")
    if task.uses_depths and (not opts.depths or any(not 0.0 <= float(d) <= 1.0 for d in opts.depths)):
        raise DPEExportError("depths must be numbers between 0 and 1")
    task.check(opts)
    if task.uses_haystack and opts.haystack is not None and not Path(opts.haystack).is_file():
        raise DPEExportError(f"haystack file not found: {opts.haystack}")


def run_eval(model_dir, task: str, lengths: Sequence[int], *, samples: int = DEFAULT_SAMPLES,
             depths: Optional[Sequence[float]] = None, needles: int = DEFAULT_NEEDLES, method: Any = None,
             haystack: Optional[Path] = None, seed: int = 0, batch_size: int = 1, device: Optional[str] = None,
             dtype: Optional[str] = None, attn: str = "sdpa", progress: bool = False,
             chunk_size: Optional[int] = None, device_map: Optional[str] = None,
             trust_remote_code: bool = False, data_files: Optional[dict] = None) -> EvalResult:
    """Load ``model_dir`` (with ``method`` applied), run ``task`` (a registered task name; ``ruler:sub,...`` for
    a task's subtasks) at ``lengths`` and return the scores.

    A DPE export is loaded with its own code only when that code is exactly what this dpe-export writes, or
    with ``trust_remote_code``.

    Fast checks (options, directory, weights, method, memory, prompt lengths) run before the weights are loaded.
    """
    task_def = get_task(task)
    lengths = [int(n) for n in lengths]
    if not lengths or any(n < 1 for n in lengths):
        raise DPEExportError("give one or more positive lengths")
    if samples < 1:
        raise DPEExportError("the number of samples must be >= 1")
    spec = method if isinstance(method, methods.MethodSpec) else methods.parse_method(method)
    opts = EvalOptions(
        spec=str(task), lengths=lengths, samples=samples, depths=list(DEFAULT_DEPTHS if depths is None else depths),
        needles=needles, haystack=haystack, seed=seed, batch_size=batch_size, device=device, dtype=dtype, attn=attn,
        progress=progress, chunk_size=chunk_size, device_map=device_map, trust_remote_code=trust_remote_code,
        data_files=dict(data_files or {}))
    _check_options(task_def, opts)

    ckpt = loading.check_eval_model(model_dir, spec, trust_remote_code)
    loading.check_device_map(device_map, device)
    check_memory(ckpt, task_def, max(lengths), batch_size, device, dtype, device_map)
    import random

    import torch

    tokenizer = loading.load_tokenizer(ckpt)
    random.seed(seed)
    torch.manual_seed(seed)
    with _WarningsToLog():
        prepared = task_def.prepare(tokenizer, opts)
        with _hf_progress_bars(progress):
            loaded = loading.load_model(ckpt, spec, device=device, dtype=dtype, attn=attn,
                                        target_length=max(lengths), tokenizer=tokenizer, device_map=device_map,
                                        trust_remote_code=trust_remote_code)
        outcome = task_def.evaluate(loaded, tokenizer, prepared, opts)
        settings = task_def.settings(loaded, opts, prepared)
    return EvalResult(task_def.name, str(model_dir), str(spec), seed, outcome.records, settings, outcome.details)


def run_harness(model_dir, tasks: Sequence[str], *, limit: Optional[int] = None, max_length: Optional[int] = None,
                include_path: Optional[Path] = None, num_fewshot: Optional[int] = None, method: Any = None,
                seed: int = 0, batch_size: int = 1, device: Optional[str] = None, dtype: Optional[str] = None,
                attn: str = "sdpa", progress: bool = False, device_map: Optional[str] = None,
                trust_remote_code: bool = False) -> EvalResult:
    """Run lm-eval ``tasks`` on one model loaded the dpe-export way. ``max_length`` defaults to the longest
    request of the tasks (measured with the model's tokenizer, so base and export get the same one and
    nothing is cut); returns an EvalResult with one record per (task, metric). lm-eval tasks that a registered
    task runs itself (RULER's) are refused: that task sizes their prompts safely."""
    lm_eval = harness.require_lm_eval()
    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise DPEExportError("give one or more lm-eval task names with --tasks")
    if include_path is not None and not Path(include_path).is_dir():
        raise DPEExportError(f"--include-path is not a directory: {include_path}")
    spec = method if isinstance(method, methods.MethodSpec) else methods.parse_method(method)
    loading.check_eval_model(model_dir, spec, trust_remote_code)
    loading.check_device_map(device_map, device)
    manager = harness.lm_eval_task_manager(names, include_path)
    tokenizer = loading.load_tokenizer(model_dir)
    refusal = next((why for n in names for t in registered_tasks() if (why := t.harness_refusal(n))), None)
    if refusal:
        raise DPEExportError(refusal)
    if max_length is None:
        max_length = harness.longest_request(names, manager, tokenizer, limit)
    import torch

    torch.manual_seed(seed)
    loaded = loading.load_model(model_dir, spec, device=device, dtype=dtype, attn=attn, target_length=max_length,
                                tokenizer=tokenizer, device_map=device_map, trust_remote_code=trust_remote_code)
    lm = harness.make_lm(loaded.model, tokenizer, max_length, batch_size)
    records = harness.run_lm_eval(lm, names, manager, max_length, limit, num_fewshot)
    settings = {"tasks": names, "limit": limit, "max_length": int(max_length), "num_fewshot": num_fewshot,
                "harness": f"lm-eval {lm_eval.__version__}", "batch_size": batch_size,
                "prefill_chunk": harness.prefill_chunk_of(loaded.model), "device": str(loaded.device),
                "dtype": str(loaded.dtype).replace("torch.", ""), "attn": attn, "model_kind": loaded.describe()}
    return EvalResult("lm-eval", str(model_dir), str(spec), seed, records, settings, [])
