"""The task registry: every evaluation task dpe-export knows, by name.

A task is one module in ``dpe_export/evaluation/tasks/`` (its prompts or how it runs, its scoring, generation
length, whether lower is better, its labels and paper; see :mod:`dpe_export.evaluation.tasks.base`) and one
:func:`register_task` call: the built-in ones are registered below. The CLI's ``--task`` and ``--metric`` choices,
the calibration metric, :func:`dpe_export.evaluation.run.run_eval`, the results tables, the plots and the model
card read the registry; nothing else names a task, so adding one touches no other file (tests/test_harness.py
defines a task inside a test and runs it through ``dpe-export eval``).
"""
from __future__ import annotations

import re
from typing import Optional

from dpe_export.errors import DPEExportError
from dpe_export.evaluation.tasks import niah, passkey, ppl, ruler
from dpe_export.evaluation.tasks.base import Task, split_task
from dpe_export.evaluation.tasks.retrieval import RetrievalTask

__all__ = ["TASKS", "RetrievalTask", "Task", "calibration_metrics", "find_task", "get_task", "max_new_tokens_for",
           "register_task", "registered_tasks", "split_task", "task_names", "unregister_task"]

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add a task to the registry (names are unique, and what ``--task`` takes: lower-case letters, digits, '-'
    and '_')."""
    if not isinstance(task, Task):
        raise TypeError(f"a task is a dpe_export.evaluation.tasks.base.Task, not {type(task).__name__}")
    if not _NAME.match(task.name):
        raise ValueError(f"a task name is lower-case letters, digits, '-' and '_': {task.name!r}")
    if task.name in _REGISTRY:
        raise ValueError(f"task {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    return task


def unregister_task(name: str) -> Task:
    """Remove a registered task (a task a test or a plugin added); returns it."""
    return _REGISTRY.pop(name)


def registered_tasks(kind: Optional[str] = None) -> tuple[Task, ...]:
    """The registered tasks (of one kind), in registration order."""
    return tuple(t for t in _REGISTRY.values() if kind is None or t.kind == kind)


def task_names(kind: Optional[str] = None) -> tuple[str, ...]:
    """Registered task names (of one kind), in registration order."""
    return tuple(t.name for t in registered_tasks(kind))


def default_task() -> str:
    """What eval runs when no --task is given: the first registered task."""
    return next(iter(_REGISTRY))


def retrieval_task_names() -> tuple[str, ...]:
    """The registered tasks that generate answers to prompts (what analyze --ablate-task measures), in order."""
    return tuple(t.name for t in registered_tasks() if isinstance(t, RetrievalTask))


def calibration_metrics() -> tuple[str, ...]:
    """The tasks a calibration can score its cells with."""
    return tuple(t.name for t in registered_tasks() if t.calibrates)


def find_task(name: Optional[str]) -> Optional[Task]:
    """The registered task named ``name``, or None (records of a task this dpe-export does not know)."""
    return _REGISTRY.get(str(name).strip().lower()) if name is not None else None


def get_task(spec: str) -> Task:
    """The registered task named by ``spec`` (a ``name:subtasks`` form names its task); one-line error else."""
    name, subtasks = split_task(spec)
    task = _REGISTRY.get(name)
    if task is None:
        raise DPEExportError(f"unknown task {spec!r}; choose one of {', '.join(_REGISTRY)}")
    if subtasks is not None and not task.has_subtasks:
        with_subtasks = [t.name for t in registered_tasks() if t.has_subtasks]
        raise DPEExportError(f"task {name} has no subtasks (only {', '.join(with_subtasks)} does)")
    return task


def max_new_tokens_for(task: str) -> int:
    """Tokens to generate for one answer of a retrieval task."""
    found = get_task(task)
    if not isinstance(found, RetrievalTask):
        raise DPEExportError(f"task {found.name} generates no answers")
    return found.max_new_tokens


# ----------------------------------------------------------------------------------------------------------
# The built-in tasks, one module each
# ----------------------------------------------------------------------------------------------------------

PASSKEY = register_task(passkey.TASK)
NIAH = register_task(niah.TASK)
PPL = register_task(ppl.TASK)
RULER = register_task(ruler.TASK)

TASKS = task_names()
