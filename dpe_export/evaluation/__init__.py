"""Stage 2: measuring retrieval and perplexity (the public API; the modules say how).

registry     the tasks, as data: prompts, answers, scorer, generation length, labels
prompts      which prompts an evaluation runs (seeds, depth grids, lengths)
harness      RULER and any lm-evaluation-harness task, on base models and exports alike
tasks        the tasks, one module each; tasks.builder: pass-key and NIAH prompts of an exact length, and
             scoring answers; haystack: the filler
generation   greedy decoding with chunked prefill and a shared prefix
ppl          perplexity of held-out text
run          run_eval(): one evaluation end to end, with memory and progress
results      EvalResult and the one results API: aggregation, table, JSON, plot
"""
from dpe_export.evaluation.generation import (
    eos_ids,
    greedy_generate,
    greedy_generate_shared,
    make_generate_fn,
)
from dpe_export.evaluation.ppl import evaluate_ppl
from dpe_export.evaluation.prompts import (
    NIAH_DIGITS,
    PASSKEY_DIGITS,
    sample_seed,
    task_haystack_seed,
)
from dpe_export.evaluation.registry import TASKS, Task, get_task, max_new_tokens_for, register_task
from dpe_export.evaluation.results import (
    EvalResult,
    aggregate,
    bootstrap_interval,
    format_accuracy,
    format_ppl,
    wilson_interval,
)
from dpe_export.evaluation.run import evaluate_niah, evaluate_passkey, evaluate_task, run_eval
from dpe_export.evaluation.tasks.builder import PromptBuilder, score_answer, score_niah

__all__ = [
    "NIAH_DIGITS", "PASSKEY_DIGITS", "TASKS", "EvalResult", "Task", "evaluate_task", "get_task", "register_task", "PromptBuilder", "aggregate", "bootstrap_interval",
    "eos_ids", "evaluate_niah", "evaluate_passkey", "evaluate_ppl", "format_accuracy", "format_ppl",
    "greedy_generate", "greedy_generate_shared", "make_generate_fn", "max_new_tokens_for", "run_eval",
    "sample_seed", "score_answer", "score_niah", "task_haystack_seed", "wilson_interval",
]
