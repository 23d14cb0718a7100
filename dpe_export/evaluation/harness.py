"""lm-evaluation-harness on a model dpe-export loaded: RULER (:mod:`dpe_export.evaluation.tasks.ruler`) and any
other lm-eval task (``dpe-export eval --harness lm-eval --tasks NAMES``, :func:`dpe_export.evaluation.run.
run_harness`), with the settings that make a comparison fair.

dpe-export does not reimplement these benchmarks: it loads the model itself (safetensors only; an export's code
only when it is what this dpe-export writes; a base model's code never), hands the loaded model and tokenizer to
lm-eval's ``HFLM`` (:func:`make_lm`) and runs lm-eval's own task definitions. Here:

* the version check and install hint (:func:`require_lm_eval`);
* the same ``max_length`` for every model compared (lm-eval otherwise takes it from ``max_position_embeddings``
  and silently cuts a base model's long prompts to their last tokens): by default the tasks' longest request
  measured with the model's tokenizer (:func:`longest_prompt`);
* chunked prefill at batch size 1, and dynamic-RoPE models starting every call from their base frequencies;
* one record per (task, metric) of any lm-eval task (:func:`run_lm_eval`), and a local lm-eval task of
  dpe-export's own pass-key prompts (:func:`write_passkey_task`).

The globals of other libraries replaced while lm-eval runs are all in :mod:`dpe_export.evaluation.lm_eval_patches`.
lm-eval is an optional extra: ``pip install 'dpe-export[eval]'``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from dpe_export.errors import DPEExportError
from dpe_export.evaluation import lm_eval_patches, prompts
from dpe_export.evaluation.generation import (GENERATE_PREFILL_CHUNK, reset_rope_state_on_every_call,
                                              set_generate_prefill_chunk)
from dpe_export.evaluation.tasks.builder import PromptBuilder

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


def prefill_chunk_of(model) -> Optional[int]:
    """The prompt tokens per forward generate() uses on ``model`` (None: the whole prompt)."""
    return getattr(getattr(model, "generation_config", None), "prefill_chunk_size", None)


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


def lm_eval_task_manager(names: Sequence[str], include_path: Optional[Path]):
    """lm-eval's TaskManager for ``names`` (one-line errors for unknown names): over ``include_path`` alone when it
    defines every one of them (indexing every task lm-eval ships takes seconds a call, see RULER's task manager),
    else over lm-eval's tasks as well."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    quiet_lm_eval()
    manager = None
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(n in local.all_tasks for n in names):
            manager = local
    if manager is None:
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise DPEExportError(f"lm-eval {lm_eval.__version__} has no task {unknown[0]!r} (see `lm-eval ls tasks`"
                             + (")" if include_path else "; local tasks need --include-path DIR)"))
    return manager


def longest_request(names: Sequence[str], manager, tokenizer, limit: Optional[int] = None) -> int:
    """:func:`longest_prompt` of the lm-eval tasks ``names``."""
    from lm_eval.tasks import get_task_dict

    return longest_prompt(get_task_dict(list(names), manager), tokenizer, limit)


def run_lm_eval(lm, names: Sequence[str], manager, max_length: int, limit: Optional[int] = None,
                num_fewshot: Optional[int] = None) -> list[dict[str, Any]]:
    """Run lm-eval's tasks ``names`` on ``lm``: one record per (task, metric), at length ``max_length``."""
    from lm_eval import simple_evaluate

    with lm_eval_patches.patched():
        out = simple_evaluate(model=lm, tasks=list(names), limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                              log_samples=False, verbosity="ERROR")
    samples = {k: int(v.get("effective", v.get("original", 0))) for k, v in (out.get("n-samples") or {}).items()}
    return [{**r, "length": int(max_length), "depth": None} for r in _metric_rows(out["results"], samples)]


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
