"""The task registry: every evaluation task dpe-export knows, as data.

A task says how its prompts are built at an exact token length from a seed, what its answers look like, how a
generation is scored, how many tokens to generate, the shortest prompt it can have, and how its results are
labelled. The CLI's ``--task`` and ``--metric`` choices, the calibration metric, the evaluation loop, the
results tables and the model card read this registry; adding a task is one :func:`register_task` call.

Kinds:

* ``retrieval``: prompts with one answer each, generated greedily and scored per prompt (pass-key, NIAH);
* ``ppl``: perplexity of held-out text windows (no prompts, no answers);
* ``harness``: run by an external, well-kept implementation (RULER through lm-evaluation-harness, see
  :mod:`dpe_export.evaluation.harness`); subtasks are given as ``name:sub1,sub2``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from dpe_export.errors import DPEExportError
from dpe_export.evaluation import prompts
from dpe_export.evaluation.tasks.builder import score_answer


@dataclass(frozen=True)
class Task:
    """One evaluation task (see the module docstring for the kinds)."""

    name: str
    kind: str
    help: str  # one sentence for --help
    metric: str  # what a score is, for tables and the card; "{needles}" is filled in
    calibrates: bool = False  # usable as the calibration metric
    answer_digits: Optional[int] = None  # retrieval: the answer is a number of this many digits
    uses_depths: bool = False
    uses_needles: bool = False
    count_contexts: bool = False  # samples of one context are not independent (NIAH): count contexts too
    make_prompts: Optional[Callable[..., Iterator[Any]]] = None  # (builder, length, depths, samples, seed, needles)
    min_length: Optional[Callable[..., int]] = None  # (builder, needles) -> tokens
    score: Callable[[str, str], bool] = score_answer
    lower_is_better: bool = False

    @property
    def max_new_tokens(self) -> int:
        """Enough new tokens for the answer: one per digit (no token spans less than a digit) plus slack."""
        return (self.answer_digits or 0) + prompts.ANSWER_SLACK

    def metric_label(self, needles: Optional[int] = None) -> str:
        return self.metric.format(needles=needles or prompts.DEFAULT_NEEDLES)

    def build(self, builder, length: int, depths: Sequence[float], samples: int, seed: int,
              needles: int = prompts.DEFAULT_NEEDLES) -> Iterator[Any]:
        """The prompts of one length (retrieval tasks), lazily, as evaluation items."""
        if self.make_prompts is None:
            raise DPEExportError(f"task {self.name} has no prompts")
        return self.make_prompts(builder, length, depths, samples, seed, needles)


_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add a task to the registry (names are unique)."""
    if task.name in _REGISTRY:
        raise ValueError(f"task {task.name!r} is already registered")
    if task.kind not in ("retrieval", "ppl", "harness"):
        raise ValueError(f"unknown task kind {task.kind!r}")
    _REGISTRY[task.name] = task
    return task


def task_names(kind: Optional[str] = None) -> tuple[str, ...]:
    """Registered task names (of one kind), in registration order."""
    return tuple(n for n, t in _REGISTRY.items() if kind is None or t.kind == kind)


def calibration_metrics() -> tuple[str, ...]:
    """The tasks a calibration can score its cells with."""
    return tuple(n for n, t in _REGISTRY.items() if t.calibrates)


def split_task(spec: str) -> tuple[str, Optional[list[str]]]:
    """'ruler:vt,cwe' -> ('ruler', ['vt', 'cwe']); 'passkey' -> ('passkey', None)."""
    name, sep, rest = str(spec).strip().partition(":")
    subtasks = [s.strip() for s in rest.split(",") if s.strip()] if sep else None
    return name.strip().lower(), subtasks


def get_task(spec: str) -> Task:
    """The registered task named by ``spec`` (a ``name:subtasks`` form names its task); one-line error else."""
    name, subtasks = split_task(spec)
    task = _REGISTRY.get(name)
    if task is None:
        raise DPEExportError(f"unknown task {spec!r}; choose one of {', '.join(_REGISTRY)}")
    if subtasks is not None and task.kind != "harness":
        raise DPEExportError(f"task {name} has no subtasks (only {', '.join(task_names('harness'))} does)")
    return task


def max_new_tokens_for(task: str) -> int:
    """Tokens to generate for one answer of a retrieval task."""
    return get_task(task).max_new_tokens


# ----------------------------------------------------------------------------------------------------------
# The built-in tasks
# ----------------------------------------------------------------------------------------------------------

PASSKEY = register_task(Task(
    name="passkey", kind="retrieval", metric="pass-key accuracy", calibrates=True,
    help="one 5-digit pass key hidden in filler",
    answer_digits=prompts.PASSKEY_DIGITS, uses_depths=True,
    make_prompts=lambda b, n, depths, samples, seed, needles: prompts.passkey_prompts(b, n, depths, samples, seed),
    min_length=lambda b, needles: prompts.passkey_min_length(b),
))

NIAH = register_task(Task(
    name="niah", kind="retrieval", metric="{needles}-needle NIAH accuracy", calibrates=True,
    help="several 6-digit needles per context, each asked for in turn (score: fraction retrieved)",
    answer_digits=prompts.NIAH_DIGITS, uses_depths=True, uses_needles=True, count_contexts=True,
    make_prompts=lambda b, n, depths, samples, seed, needles: prompts.niah_prompts(b, n, depths, samples, needles, seed),
    min_length=lambda b, needles: prompts.niah_min_length(b, needles),
))

PPL = register_task(Task(
    name="ppl", kind="ppl", metric="perplexity (lower is better)", lower_is_better=True,
    help="perplexity of held-out text",
))

RULER = register_task(Task(
    name="ruler", kind="harness", metric="RULER score",
    help="RULER subtasks run by lm-evaluation-harness (ruler:niah_single_1,vt,... for some; needs dpe-export[eval])",
))


TASKS = task_names()
