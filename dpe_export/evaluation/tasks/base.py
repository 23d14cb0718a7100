"""What a task is: the Task type, the options of one evaluation, and the hooks run_eval calls.

A task is one module in this package that builds one :class:`Task` (or an instance of a subclass: retrieval tasks
use :class:`~dpe_export.evaluation.tasks.retrieval.RetrievalTask`) and one :func:`~dpe_export.evaluation.registry.
register_task` call in ``evaluation/registry.py``. Everything that differs between tasks lives on the task: its
labels (name, pretty name, paper, help, metric), whether a lower score is better, which options apply to it, and
the hooks :func:`dpe_export.evaluation.run.run_eval` calls in this order:

1. :meth:`Task.check` (options only, before anything is loaded): refuse what this task cannot run;
2. :meth:`Task.prepare` (the tokenizer, before the weights load): build what the run needs, refuse lengths too
   short for it; returns whatever :meth:`Task.evaluate` needs;
3. :meth:`Task.evaluate` (the loaded model): the records (one per length, or per length and depth, or per subtask
   and length) and the details (one per sample);
4. :meth:`Task.settings`: what the result's ``settings`` record.

run_eval does what every task shares: the method, the memory check, loading the tokenizer and the weights
(safetensors only; an export's code only when it is what this dpe-export writes; a base model's code never), the
seeds, and the :class:`~dpe_export.evaluation.results.EvalResult`. The results tables, plots and the model card
read the records and ``lower_is_better``; the CLI reads the labels and which options apply.

A task module imports neither the registry nor the modules that read it (run, results, plots): they import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dpe_export.evaluation import prompts


def split_task(spec: str) -> tuple[str, Optional[list[str]]]:
    """'ruler:vt,cwe' -> ('ruler', ['vt', 'cwe']); 'passkey' -> ('passkey', None)."""
    name, sep, rest = str(spec).strip().partition(":")
    subtasks = [s.strip() for s in rest.split(",") if s.strip()] if sep else None
    return name.strip().lower(), subtasks


@dataclass(frozen=True)
class EvalOptions:
    """What one evaluation asks for: run_eval's arguments, checked (``spec`` is the task as given, with subtasks)."""

    spec: str
    lengths: list[int]
    samples: int = prompts.DEFAULT_SAMPLES
    depths: list[float] = field(default_factory=lambda: list(prompts.DEFAULT_DEPTHS))
    needles: int = prompts.DEFAULT_NEEDLES
    haystack: Optional[Path] = None
    seed: int = 0
    batch_size: int = 1
    device: Optional[str] = None
    dtype: Optional[str] = None
    attn: str = "sdpa"
    progress: bool = False
    chunk_size: Optional[int] = None
    device_map: Optional[str] = None
    trust_remote_code: bool = False
    data_files: dict = field(default_factory=dict)


@dataclass
class TaskRun:
    """What :meth:`Task.evaluate` returns: the records (the result's rows) and one detail per sample."""

    records: list[dict[str, Any]]
    details: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Task:
    """One evaluation task (see the module docstring). Subclass it and override :meth:`evaluate` (and the other
    hooks where needed); the flags say which of `dpe-export eval`'s options apply to it."""

    name: str  # what --task takes: lower-case letters, digits, '-' and '_'
    pretty_name: str  # for people: tables, help, error messages
    help: str  # one sentence for --help
    metric: str  # what a score is, for labels; "{needles}" is filled in
    paper: Optional[str] = None  # where the task comes from (a link)
    kind: str = "custom"  # a family, for listings: retrieval, ppl, harness, or the task's own
    lower_is_better: bool = False  # scores are perplexities (or another lower-is-better value), not accuracies
    calibrates: bool = False  # usable as `calibrate --metric`
    uses_depths: bool = False  # --depths applies
    uses_needles: bool = False  # --needles applies
    uses_haystack: bool = True  # --haystack applies
    takes_data_files: bool = False  # --data-file applies
    has_subtasks: bool = False  # named as 'name:sub1,sub2'
    plots: bool = True  # --plot draws its results
    all_logits: bool = False  # holds the logits of every position at once (perplexity), for the memory check
    samples_help: str = "samples per length"  # what --samples counts for this task
    data_files_help: str = ""  # with takes_data_files: the KEY=PATH items --data-file takes
    description: str = ""  # more than the one sentence of help, for `eval --help`'s list of tasks

    def metric_label(self, needles: Optional[int] = None) -> str:
        return self.metric.format(needles=needles or prompts.DEFAULT_NEEDLES)

    # -- the hooks run_eval calls ------------------------------------------------------------------------

    def check(self, opts: EvalOptions) -> None:
        """Refuse, in one line (DPEExportError), options this task cannot run with; nothing is loaded yet."""

    def prepare(self, tokenizer, opts: EvalOptions) -> Any:
        """Work on the tokenizer before the weights load (build prompts, refuse lengths too short); the value
        returned goes to :meth:`evaluate` and :meth:`settings`."""
        return None

    def evaluate(self, loaded, tokenizer, prepared: Any, opts: EvalOptions) -> TaskRun:
        """Run the task on ``loaded`` (a :class:`dpe_export.sources.loading.LoadedModel`)."""
        raise NotImplementedError(f"task {self.name} does not say how it is evaluated")

    def settings(self, loaded, opts: EvalOptions, prepared: Any) -> dict[str, Any]:
        """The result's ``settings``: what was asked and what the model was loaded as."""
        return {
            "lengths": opts.lengths, "samples": opts.samples,
            "depths": [float(d) for d in opts.depths] if self.uses_depths else None,
            "needles": opts.needles if self.uses_needles else None,
            "haystack": str(opts.haystack) if opts.haystack else None,
            "batch_size": opts.batch_size, "device": str(loaded.device), "device_map": opts.device_map,
            "dtype": str(loaded.dtype).replace("torch.", ""),
            "attn": opts.attn, "model_kind": loaded.describe(), "pretrain_length": loaded.pretrain_length,
        }

    def harness_refusal(self, lm_eval_task: str) -> Optional[str]:
        """Why ``--harness lm-eval --tasks NAME`` must not run this lm-eval task (this task runs it, more safely),
        or None."""
        return None
