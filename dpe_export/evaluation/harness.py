"""RULER and any other lm-evaluation-harness task, run on a base model, a base model with a ``--method``, or a DPE
export, with the settings that make a comparison fair.

dpe-export does not reimplement these benchmarks: it loads the model itself (safetensors only; an export's code
only when it is what this dpe-export writes; a base model's code never), hands the loaded model and tokenizer to
lm-eval's ``HFLM``, and runs lm-eval's own task definitions. What it adds:

* the same ``max_length`` for every model compared (lm-eval otherwise takes it from ``max_position_embeddings``
  and silently cuts a base model's long prompts to their last tokens);
* RULER's synthetic subtasks size their prompts with dpe-export's tokenizer object (lm-eval would otherwise
  load the tokenizer again by name with ``trust_remote_code=True``, running a base model's code);
* one-line refusals instead of lm-eval's known hangs and crashes (``vt`` loops forever and ``cwe`` divides by
  zero when their smallest prompt does not fit; subtasks whose data is downloaded at run time are refused
  unless the data is in the local cache or given as a file);
* one record per (subtask, length) with accuracy and sample count, one detail per sample, a task x length
  table with the average, and a check that every model saw the same prompts.

lm-eval is an optional extra: ``pip install 'dpe-export[eval]'``.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from dpe_export.errors import DPEExportError
from dpe_export.evaluation import lm_eval_patches, prompts
from dpe_export.evaluation.generation import (GENERATE_PREFILL_CHUNK, reset_rope_state_on_every_call,
                                              set_generate_prefill_chunk)
from dpe_export.evaluation.registry import split_task
from dpe_export.evaluation.results import EvalResult
from dpe_export.evaluation.tasks.builder import PromptBuilder
from dpe_export.progress import progress_bar
from dpe_export.sources import loading, methods

logger = logging.getLogger("dpe_export")

LM_EVAL_RANGE = (">=0.4.13", "<0.5")
INSTALL_HINT = "pip install 'dpe-export[eval]'"


def require_lm_eval():
    """lm_eval, or a one-line DPEExportError saying how to install it (or that its version is untested)."""
    try:
        import lm_eval
        from packaging.version import Version
    except ImportError:
        raise DPEExportError(f"this needs lm-evaluation-harness: {INSTALL_HINT}") from None
    version = getattr(lm_eval, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("lm_eval")
    low, high = (Version(s.lstrip("<>=")) for s in LM_EVAL_RANGE)
    if not low <= Version(version) < high:
        raise DPEExportError(f"lm-eval {version} is outside the range dpe-export is tested with "
                             f"({','.join(LM_EVAL_RANGE)}): {INSTALL_HINT}")
    return lm_eval


# ----------------------------------------------------------------------------------------------------------
# RULER subtasks, as data
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RulerSubtask:
    """One RULER subtask of lm-eval: its lm-eval task name, the data it downloads at run time (None: generated
    from the tokenizer alone) and a check that refuses lengths lm-eval cannot build samples for."""

    name: str
    lm_eval_task: str
    data: Optional[str] = None  # "hf-dataset:<repo>" (found in the local HF cache) or "file:<key>" (--data-file)
    fetch: str = ""  # what to run to get the data
    nltk: tuple[str, ...] = ()  # NLTK resources its generator reads (found on nltk.data.path)
    min_length: Optional[Callable[[Any, int], Optional[str]]] = None  # (tokenizer, length) -> refusal or None

    @property
    def offline(self) -> bool:
        return self.data is None


_RULER: dict[str, RulerSubtask] = {}


def register_ruler_subtask(sub: RulerSubtask) -> RulerSubtask:
    _RULER[sub.name] = sub
    return sub


@contextlib.contextmanager
def _private_random() -> Iterator[None]:
    """Leave Python's and numpy's global random state as they were (a pre-check draws samples)."""
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def _vt_check(tokenizer, length: int) -> Optional[str]:
    """lm-eval's variable tracking puts an in-context example (filled to about 500 tokens) before each sample and
    shrinks the sample's noise until it fits, but never below 10 noise lines (5 in the example): when that
    does not fit, it loops forever."""
    import io

    from lm_eval.tasks.ruler import vt_utils

    generate = vt_utils.CONFIG["variable_tracking"]["tokens_to_generate"]
    with _private_random(), contextlib.redirect_stdout(io.StringIO()):
        random.seed(0)
        worst_icl, worst = 0, 0
        for _ in range(8):
            text, answer = vt_utils.generate_input_output(5, 1, 4, is_icl=True)
            worst_icl = max(worst_icl, len(tokenizer(text + " " + " ".join(answer)).input_ids))
            text, _ = vt_utils.generate_input_output(10, 1, 4, is_icl=False)
            worst = max(worst, len(tokenizer(text).input_ids))
        if worst_icl + generate + 16 > 500:
            return f"its in-context example does not fit in 500 tokens with this tokenizer ({worst_icl + generate})"
    need = 500 + worst + generate  # the example is filled up to 500 tokens less the generation, plus its answer
    if need > length:
        return f"needs at least about {need} tokens with this tokenizer (lm-eval would loop forever)"
    return None


def _cwe_check(tokenizer, length: int) -> Optional[str]:
    """lm-eval's common-words extraction drops to zero words (and a ZeroDivisionError in scoring) when even 10
    words and its example do not fit."""
    from lm_eval.tasks.ruler import cwe_utils

    with _private_random():
        random.seed(0)
        worst = 0
        for _ in range(8):
            example, text, answer = cwe_utils.generate_input_output(10, length)
            full = example + "\n" + text + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(answer))
            worst = max(worst, len(tokenizer(full).input_ids))
    if worst + 120 > length:
        return (f"needs more than {worst + 120} tokens with this tokenizer at this length (lm-eval would build "
                "samples with no words to find and fail in scoring)")
    return None


for _name in ("niah_single_1", "niah_multikey_2", "niah_multikey_3"):
    register_ruler_subtask(RulerSubtask(_name, _name))
register_ruler_subtask(RulerSubtask("vt", "ruler_vt", min_length=_vt_check))
register_ruler_subtask(RulerSubtask("cwe", "ruler_cwe", min_length=_cwe_check))
register_ruler_subtask(RulerSubtask("fwe", "ruler_fwe"))
_ESSAYS = "baber/paul_graham_essays"
for _name in ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multiquery", "niah_multivalue"):
    register_ruler_subtask(RulerSubtask(
        _name, _name, data=f"hf-dataset:{_ESSAYS}",
        fetch=f"`huggingface-cli download {_ESSAYS} --repo-type dataset` on a machine with network",
        nltk=("tokenizers/punkt_tab",)))  # sentence splitting, to put needles between sentences
register_ruler_subtask(RulerSubtask(
    "qa_squad", "ruler_qa_squad", data="file:squad",
    fetch="SQuAD 2.0's dev-v2.0.json, then pass --data-file squad=PATH"))
register_ruler_subtask(RulerSubtask(
    "qa_hotpot", "ruler_qa_hotpot", data="file:hotpotqa",
    fetch="HotpotQA's hotpot_dev_distractor_v1.json, then pass --data-file hotpotqa=PATH"))

RULER_SUBTASKS = tuple(_RULER)
OFFLINE_SUBTASKS = tuple(n for n, s in _RULER.items() if s.offline)

# The URLs lm-eval's RULER QA tasks fetch, by the --data-file key that replaces them.
_QA_URLS = {"squad": "dev-v2.0.json", "hotpotqa": "hotpot_dev_distractor_v1.json"}


def resolve_subtasks(spec: str) -> list[RulerSubtask]:
    """'ruler' -> the offline subtasks; 'ruler:vt,cwe' -> those (ruler_ prefixes accepted); one-line errors."""
    _, names = split_task(spec)
    if names is None:
        return [_RULER[n] for n in OFFLINE_SUBTASKS]
    out = []
    for n in names:
        key = n.lower().removeprefix("ruler_")
        if key not in _RULER:
            raise DPEExportError(f"unknown RULER subtask {n!r}; choose from {', '.join(RULER_SUBTASKS)}")
        if _RULER[key] not in out:
            out.append(_RULER[key])
    return out


def _hf_dataset_snapshot(repo: str) -> Optional[str]:
    """The directory of ``repo``'s dataset snapshot in the local Hugging Face cache, or None."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo, repo_type="dataset", local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means: not in the local cache
        return None


def _hf_snapshots(subtasks: Sequence[RulerSubtask]) -> dict[str, str]:
    """The local snapshot directory of each dataset these subtasks read (those found in the cache)."""
    repos = {s.data.partition(":")[2] for s in subtasks if s.data and s.data.startswith("hf-dataset:")}
    return {repo: path for repo in sorted(repos) if (path := _hf_dataset_snapshot(repo)) is not None}


def check_subtask_data(subtasks: Sequence[RulerSubtask], data_files: dict[str, Path]) -> None:
    """Refuse, in one line, a subtask whose data is neither in the local cache nor given as a file."""
    for sub in subtasks:
        if sub.data is None:
            continue
        kind, _, ref = sub.data.partition(":")
        if kind == "file":
            path = data_files.get(ref)
            if path is None or not Path(path).is_file():
                raise DPEExportError(f"RULER {sub.name} downloads its data at run time; fetch {sub.fetch}")
        elif _hf_dataset_snapshot(ref) is None:
            raise DPEExportError(f"RULER {sub.name} needs the dataset {ref} in the local Hugging Face cache; "
                                 f"fetch it with {sub.fetch}")
        for resource in sub.nltk:
            if not _nltk_has(resource):
                name = resource.rsplit("/", 1)[-1]
                raise DPEExportError(f"RULER {sub.name} needs NLTK's {name} data; fetch it with "
                                     f"`python -m nltk.downloader {name}` on a machine with network")


def _nltk_has(resource: str) -> bool:
    try:
        import nltk

        nltk.data.find(resource)
        return True
    except (ImportError, LookupError):
        return False


def check_ruler(subtasks: Sequence[RulerSubtask], tokenizer, lengths: Sequence[int],
                data_files: Optional[dict[str, Path]] = None) -> None:
    """Refuse, in one line and before anything runs, missing data and lengths lm-eval cannot build samples for."""
    check_subtask_data(subtasks, dict(data_files or {}))
    for sub in subtasks:
        for n in lengths:
            why = sub.min_length(tokenizer, n) if sub.min_length else None
            if why:
                raise DPEExportError(f"RULER {sub.name} at {n} tokens: {why}; use a longer length")


# ----------------------------------------------------------------------------------------------------------
# Running lm-eval on a loaded model
# ----------------------------------------------------------------------------------------------------------


def quiet_lm_eval() -> None:
    for name in ("lm-eval", "lm_eval", "lm_eval.evaluator", "lm_eval.models.huggingface", "lm_eval.api.task",
                 "lm_eval.tasks", "lm_eval.tasks.ruler"):
        logging.getLogger(name).setLevel(logging.ERROR)


def make_lm(model, tokenizer, max_length: int, batch_size: int = 1,
            prefill_chunk: Optional[int] = GENERATE_PREFILL_CHUNK):
    """lm-eval's HFLM around an already loaded model, with an explicit ``max_length``; at batch size 1 generation
    prefills prompts ``prefill_chunk`` tokens at a time (None: whole; see
    :func:`generation.set_generate_prefill_chunk`), and a dynamic-RoPE model starts every call from its base
    frequencies."""
    require_lm_eval()
    # One prompt per batch only: a padded batch takes DPE's unfused path, and transformers' chunked prefill once
    # ignored left padding in its positions (transformers issue 43082, in a 5.0 release candidate).
    set_generate_prefill_chunk(model, prefill_chunk if batch_size == 1 else None)
    reset_rope_state_on_every_call(model)  # dynamic RoPE: a sample's score must not depend on the ones before
    quiet_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if getattr(tokenizer, "model_max_length", 0) < max_length:  # no "longer than the maximum" warnings
        tokenizer.model_max_length = int(max_length)

    return HFLM(pretrained=model, tokenizer=tokenizer, max_length=int(max_length), batch_size=batch_size)


def _prefill_chunk(model) -> Optional[int]:
    """The prompt tokens per forward generate() uses on ``model`` (None: the whole prompt)."""
    return getattr(getattr(model, "generation_config", None), "prefill_chunk_size", None)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _ruler_task_manager(length: int, tokenizer_key: str):
    """lm-eval's TaskManager over its RULER folder only, with the metadata simple_evaluate would give its own.

    simple_evaluate without a task manager indexes every task YAML lm-eval ships (lm-eval 0.4.13: about 27,000
    YAML loads and 21 s per call, profiled on 2 busy CPU cores; most of a short RULER run). RULER's YAMLs include
    only each other. Built per cell, after the RULER modules are refreshed (lm_eval_patches), as simple_evaluate
    would build its own.
    """
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(Path(lm_eval.tasks.__file__).parent / "ruler"), include_defaults=False,
                       metadata={"max_seq_lengths": [length], "tokenizer": tokenizer_key})


def run_ruler_on(lm, tokenizer, subtasks: Sequence[RulerSubtask], lengths: Sequence[int], samples: int,
                 data_files: Optional[dict[str, Path]] = None, progress: bool = False,
                 on_cell: Optional[Callable[[dict[str, Any], list[dict[str, Any]]], None]] = None,
                 sample_ids: Optional[Sequence[int]] = None, check: bool = True,
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run RULER ``subtasks`` at each length on an lm-eval LM: (records, details).

    One lm-eval run per (subtask, length), ``limit=samples`` (lm-eval generates its samples from fixed seeds, so
    every model gets the same prompts). ``lm`` is anything lm-eval accepts as a model (an HFLM, or a scripted
    LM in tests). ``on_cell(record, details)`` is called as each cell finishes. ``sample_ids``: run these
    samples of each cell instead of the first ``samples`` (to resume a long measurement). ``check``: run
    :func:`check_ruler` first (off when the caller already did).
    """
    lm_eval = require_lm_eval()
    from lm_eval import simple_evaluate

    data_files = dict(data_files or {})
    if check:
        check_ruler(subtasks, tokenizer, lengths, data_files)
    quiet_lm_eval()
    records: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    local_json = {tail: data_files[key] for key, tail in _QA_URLS.items() if key in data_files}
    with progress_bar(len(subtasks) * len(lengths), "ruler", progress) as bar, \
            lm_eval_patches.patched(ruler_tokenizer=tokenizer, local_json=local_json,
                                    hf_snapshots=_hf_snapshots(subtasks)) as patches:
        for n in lengths:
            for sub in subtasks:
                bar.set_postfix(subtask=sub.name, length=n)
                patches.fresh_ruler_modules()
                which = ({"limit": samples} if sample_ids is None
                         else {"samples": {sub.lm_eval_task: [int(i) for i in sample_ids]}})
                out = simple_evaluate(model=lm, tasks=[sub.lm_eval_task], log_samples=True, **which,
                                      task_manager=_ruler_task_manager(int(n), patches.tokenizer_key),
                                      verbosity="ERROR", bootstrap_iters=0)
                rows = (out or {}).get("samples", {}).get(sub.lm_eval_task, [])
                if not rows:
                    raise DPEExportError(f"lm-eval {lm_eval.__version__} returned no samples for {sub.lm_eval_task}")
                cell = []
                for row in rows:
                    doc = row.get("doc", {})
                    score = float(row.get(str(n), -1.0))
                    if score < 0:
                        raise DPEExportError(f"lm-eval gave no score at length {n} for {sub.lm_eval_task}")
                    resp = row.get("filtered_resps") or row.get("resps") or [""]
                    while isinstance(resp, list):
                        resp = resp[0] if resp else ""
                    cell.append({"subtask": sub.name, "length": int(n), "sample": int(row.get("doc_id", len(cell))),
                                 "answer": list(doc.get("outputs") or []), "generated": str(resp),
                                 "score": score, "correct": score >= 1.0,
                                 "prompt_tokens": doc.get("length"), "prompt_sha": _sha(str(doc.get("input", "")))})
                record = {"subtask": sub.name, "length": int(n), "depth": None,
                          "accuracy": sum(c["score"] for c in cell) / len(cell), "samples": len(cell)}
                records.append(record)
                details.extend(cell)
                if on_cell is not None:
                    on_cell(record, cell)
                bar.update(1)
    return records, details


def run_ruler(model_dir, task: str, lengths: Sequence[int], *, samples: int = 10, method: Any = None,
              seed: int = 0, batch_size: int = 1, device: Optional[str] = None, dtype: Optional[str] = None,
              attn: str = "sdpa", progress: bool = False, device_map: Optional[str] = None,
              trust_remote_code: bool = False, data_files: Optional[dict[str, Path]] = None):
    """``dpe-export eval --task ruler[:subtasks]``: load the model as for every other task, run RULER on it
    through lm-eval with ``max_length`` = the longest requested length, and return an EvalResult."""
    lm_eval = require_lm_eval()
    subtasks = resolve_subtasks(task)
    spec = method if isinstance(method, methods.MethodSpec) else methods.parse_method(method)
    loading.check_eval_model(model_dir, spec, trust_remote_code)
    loading.check_device_map(device_map, device)
    tokenizer = loading.load_tokenizer(model_dir)
    check_ruler(subtasks, tokenizer, lengths, data_files)  # before the weights load
    import torch

    torch.manual_seed(seed)
    loaded = loading.load_model(model_dir, spec, device=device, dtype=dtype, attn=attn, target_length=max(lengths),
                                tokenizer=tokenizer, device_map=device_map, trust_remote_code=trust_remote_code)
    max_length = max(lengths)
    lm = make_lm(loaded.model, tokenizer, max_length, batch_size)
    records, details = run_ruler_on(lm, tokenizer, subtasks, lengths, samples, data_files, progress, check=False)

    settings = {"lengths": list(lengths), "samples": samples, "subtasks": [s.name for s in subtasks],
                "max_length": max_length, "harness": f"lm-eval {lm_eval.__version__}", "batch_size": batch_size,
                "prefill_chunk": _prefill_chunk(loaded.model),
                "device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""), "attn": attn,
                "model_kind": loaded.describe(), "pretrain_length": loaded.pretrain_length}
    return EvalResult("ruler", str(model_dir), str(spec), seed, records, settings, details)


# ----------------------------------------------------------------------------------------------------------
# Any lm-eval task: `dpe-export eval --harness lm-eval --tasks NAMES`
# ----------------------------------------------------------------------------------------------------------


def _leaf_tasks(task_dict) -> Iterator[tuple[str, Any]]:
    from lm_eval.api.task import Task

    for key, value in task_dict.items():
        if isinstance(value, Task):
            yield getattr(key, "group_name", None) or str(key), value
        elif isinstance(value, dict):
            yield from _leaf_tasks(value)


def longest_prompt(task_dict, tokenizer, limit: Optional[int] = None) -> int:
    """Tokens of the longest request of these lm-eval tasks (context and continuation, plus the tokens a
    generation task may generate): the ``max_length`` at which no model compared has its prompts cut."""
    longest = 0
    for _, task in _leaf_tasks(task_dict):
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        for inst in task.instances:
            args = inst.args
            if inst.request_type == "generate_until":
                gen = args[1] if len(args) > 1 and isinstance(args[1], dict) else {}
                n = len(tokenizer(args[0]).input_ids) + int(gen.get("max_gen_toks", 256))
            else:
                n = sum(len(tokenizer(a).input_ids) for a in args if isinstance(a, str))
            longest = max(longest, n)
    if longest == 0:
        raise DPEExportError("the lm-eval tasks built no requests")
    return longest + 1


def _metric_rows(results: dict[str, Any], samples: dict[str, int]) -> list[dict[str, Any]]:
    rows = []
    for name, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or metric in ("alias", "name", "sample_len") or not filt:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                stderr = metrics.get(f"{metric}_stderr,{filt}")
                rows.append({"subtask": name, "metric": metric if filt == "none" else f"{metric} ({filt})",
                             "value": float(value), "stderr": stderr if isinstance(stderr, (int, float)) else None,
                             "samples": samples.get(name)})
    return rows


def _harness_task_manager(names: Sequence[str], include_path: Optional[Path]):
    """lm-eval's TaskManager for ``names``: over ``include_path`` alone when it defines every one of them (indexing
    every task lm-eval ships takes seconds a call, see _ruler_task_manager), else over lm-eval's tasks as well."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    return TaskManager(include_path=str(include_path) if include_path else None)


def run_harness(model_dir, tasks: Sequence[str], *, limit: Optional[int] = None, max_length: Optional[int] = None,
                include_path: Optional[Path] = None, num_fewshot: Optional[int] = None, method: Any = None,
                seed: int = 0, batch_size: int = 1, device: Optional[str] = None, dtype: Optional[str] = None,
                attn: str = "sdpa", progress: bool = False, device_map: Optional[str] = None,
                trust_remote_code: bool = False):
    """Run lm-eval ``tasks`` on one model loaded the dpe-export way. ``max_length`` defaults to the longest
    request of the tasks (measured with the model's tokenizer, so base and export get the same one and
    nothing is cut); returns an EvalResult with one record per (task, metric)."""
    lm_eval = require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import get_task_dict

    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise DPEExportError("give one or more lm-eval task names with --tasks")
    if include_path is not None and not Path(include_path).is_dir():
        raise DPEExportError(f"--include-path is not a directory: {include_path}")
    spec = method if isinstance(method, methods.MethodSpec) else methods.parse_method(method)
    loading.check_eval_model(model_dir, spec, trust_remote_code)
    loading.check_device_map(device_map, device)
    quiet_lm_eval()
    manager = _harness_task_manager(names, include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise DPEExportError(f"lm-eval {lm_eval.__version__} has no task {unknown[0]!r} (see `lm-eval ls tasks`"
                             + (")" if include_path else "; local tasks need --include-path DIR)"))
    tokenizer = loading.load_tokenizer(model_dir)
    if any(n.startswith(("ruler", "niah_")) or n in RULER_SUBTASKS for n in names):
        raise DPEExportError("run RULER with --task ruler[:subtasks], which sizes its prompts safely")
    if max_length is None:
        max_length = longest_prompt(get_task_dict(names, manager), tokenizer, limit)
    import torch

    torch.manual_seed(seed)
    loaded = loading.load_model(model_dir, spec, device=device, dtype=dtype, attn=attn, target_length=max_length,
                                tokenizer=tokenizer, device_map=device_map, trust_remote_code=trust_remote_code)
    lm = make_lm(loaded.model, tokenizer, max_length, batch_size)
    with lm_eval_patches.patched():
        out = simple_evaluate(model=lm, tasks=names, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                              log_samples=False, verbosity="ERROR")
    samples = {k: int(v.get("effective", v.get("original", 0))) for k, v in (out.get("n-samples") or {}).items()}
    records = [{**r, "length": int(max_length), "depth": None} for r in _metric_rows(out["results"], samples)]
    settings = {"tasks": names, "limit": limit, "max_length": int(max_length), "num_fewshot": num_fewshot,
                "harness": f"lm-eval {lm_eval.__version__}", "batch_size": batch_size,
                "prefill_chunk": _prefill_chunk(loaded.model), "device": str(loaded.device),
                "dtype": str(loaded.dtype).replace("torch.", ""), "attn": attn, "model_kind": loaded.describe()}
    return EvalResult("lm-eval", str(model_dir), str(spec), seed, records, settings, [])


PASSKEY_TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{text}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen}
  do_sample: false
filter_list:
  - name: first-number
    filter:
      - function: regex
        regex_pattern: '(\\d+)'
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_passkey_task(out_dir, tokenizer, length: int, samples: int = 10, seed: int = 0,
                       name: str = "dpe_passkey") -> Path:
    """A local lm-eval task of dpe-export's pass-key prompts (``samples`` prompts of ``length`` tokens, needle
    depths spread evenly, as text), scored by exact match of the first number generated: to run the same
    comparison through lm-eval by hand (``lm-eval run --include_path OUT_DIR --tasks NAME``). Returns OUT_DIR."""
    import json
    import re

    if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", name):
        raise DPEExportError("a task name is lower-case letters, digits and underscores")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    builder = PromptBuilder(tokenizer, haystack_seed=prompts.task_haystack_seed(seed))
    depths = [i / max(1, samples - 1) for i in range(samples)]
    lines = []
    for i, depth in enumerate(depths):
        p = builder.passkey(length, depth=depth, seed=prompts.sample_seed(seed, "lm-eval-passkey", i),
                            num_digits=prompts.PASSKEY_DIGITS)
        text = tokenizer.decode(p.input_ids[len(builder.prefix_ids):])
        lines.append(json.dumps({"text": text, "answer": p.answer, "depth": depth}))
    data = out / f"{name}.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / f"{name}.yaml").write_text(PASSKEY_TASK_YAML.format(
        name=name, data=json.dumps(str(data.resolve())), max_gen=prompts.PASSKEY_DIGITS + prompts.ANSWER_SLACK),
        encoding="utf-8")
    return out
