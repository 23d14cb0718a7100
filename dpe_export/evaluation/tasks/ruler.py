"""RULER, run by lm-evaluation-harness's own implementation (``--task ruler`` or ``ruler:sub1,sub2``).

dpe-export does not reimplement RULER: it loads the model as for every other task, hands it to lm-eval's ``HFLM``
(:mod:`dpe_export.evaluation.harness`) with ``max_length`` = the longest requested length for every model
compared, and runs lm-eval's RULER task definitions, one lm-eval run per (subtask, length). What it adds:

* the subtasks, as data (``RulerSubtask``): their lm-eval names, the data some of them download at run time, and
  the checks that refuse, in one line, lengths lm-eval would hang or crash on (``vt`` loops forever and ``cwe``
  divides by zero when their smallest prompt does not fit), and subtasks whose data is neither in the local
  cache nor given as a file;
* RULER's data generators size their prompts with dpe-export's tokenizer object, and get the same prompts for
  every model compared in one process (the patches this needs: :mod:`dpe_export.evaluation.lm_eval_patches`);
* one record per (subtask, length) with accuracy and sample count, one detail per sample with its prompt's hash.

lm-eval is an optional extra: ``pip install 'dpe-export[eval]'``.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from dpe_export.errors import DPEExportError
from dpe_export.evaluation import lm_eval_patches
from dpe_export.evaluation.harness import make_lm, prefill_chunk_of, quiet_lm_eval, require_lm_eval
from dpe_export.evaluation.tasks.base import EvalOptions, Task, TaskRun, split_task
from dpe_export.progress import progress_bar

# ----------------------------------------------------------------------------------------------------------
# The subtasks, as data
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
# Running lm-eval's RULER on a loaded model
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RulerTask(Task):
    """RULER through lm-eval: subtasks given as ``ruler:sub1,sub2`` (default: those that need no download)."""

    kind: str = "harness"
    has_subtasks: bool = True
    takes_data_files: bool = True
    uses_haystack: bool = False
    plots: bool = False

    def check(self, opts: EvalOptions) -> None:
        require_lm_eval()
        resolve_subtasks(opts.spec)

    def prepare(self, tokenizer, opts: EvalOptions) -> list[RulerSubtask]:
        subtasks = resolve_subtasks(opts.spec)
        check_ruler(subtasks, tokenizer, opts.lengths, opts.data_files)
        return subtasks

    def evaluate(self, loaded, tokenizer, prepared: list[RulerSubtask], opts: EvalOptions) -> TaskRun:
        lm = make_lm(loaded.model, tokenizer, max(opts.lengths), opts.batch_size)
        records, details = run_ruler_on(lm, tokenizer, prepared, opts.lengths, opts.samples, opts.data_files,
                                        opts.progress, check=False)
        return TaskRun(records, details)

    def settings(self, loaded, opts: EvalOptions, prepared: list[RulerSubtask]) -> dict[str, Any]:
        return {"lengths": list(opts.lengths), "samples": opts.samples, "subtasks": [s.name for s in prepared],
                "max_length": max(opts.lengths), "harness": f"lm-eval {require_lm_eval().__version__}",
                "batch_size": opts.batch_size, "prefill_chunk": prefill_chunk_of(loaded.model),
                "device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""), "attn": opts.attn,
                "model_kind": loaded.describe(), "pretrain_length": loaded.pretrain_length}

    def harness_refusal(self, lm_eval_task: str) -> Optional[str]:
        if lm_eval_task.startswith(("ruler", "niah_")) or lm_eval_task in RULER_SUBTASKS:
            return "run RULER with --task ruler[:subtasks], which sizes its prompts safely"
        return None


TASK = RulerTask(
    name="ruler", pretty_name="RULER", paper="https://arxiv.org/abs/2404.06654", metric="RULER score",
    help="RULER subtasks run by lm-evaluation-harness (ruler:niah_single_1,vt,... for some; needs dpe-export[eval])",
    samples_help="samples per subtask and length",
    data_files_help="squad=dev-v2.0.json, hotpotqa=hotpot_dev_distractor_v1.json",
    description=("Default: its subtasks that need no download (" + ", ".join(OFFLINE_SUBTASKS) + "); the essay "
                 f"subtasks run when {_ESSAYS} is in the local Hugging Face cache, qa_squad and qa_hotpot with "
                 "--data-file squad=PATH / hotpotqa=PATH. Scores are lm-eval's string match, one lm-eval run per "
                 "subtask and length, --samples samples each, max_length = the longest length for every model."),
)
