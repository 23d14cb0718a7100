"""The evaluation tasks, one module each, and the prompt builder the retrieval tasks share.

builder      exact-length retrieval prompts (pass-key, multi-needle NIAH) and scoring a generated number;
             its names are importable from this package too (``from dpe_export.evaluation.tasks import
             PromptBuilder``), as they were before the tasks became a package

Importing this package loads the builder only. The tasks themselves are registered by
:mod:`dpe_export.evaluation.registry`, which imports the built-in task modules; a task module imports neither the
registry nor anything that reads it (results, run), so that those can ask the registry about any task.
"""
from dpe_export.evaluation.tasks.builder import (
    NIAH_INTRO,
    NIAH_KEYS,
    NIAH_NEEDLE,
    NIAH_QUERY,
    PASSKEY_INTRO,
    PASSKEY_NEEDLE,
    PASSKEY_QUERY,
    PromptBuilder,
    TaskPrompt,
    build_niah_prompts,
    build_passkey_prompt,
    extract_number,
    score_answer,
    score_niah,
)

__all__ = [
    "NIAH_INTRO", "NIAH_KEYS", "NIAH_NEEDLE", "NIAH_QUERY", "PASSKEY_INTRO", "PASSKEY_NEEDLE", "PASSKEY_QUERY",
    "PromptBuilder", "TaskPrompt", "build_niah_prompts", "build_passkey_prompt", "extract_number", "score_answer",
    "score_niah",
]
