"""Stage 2: measuring retrieval and perplexity (the public API; the modules say how).

tasks        one module per task (passkey, niah, ppl, ruler) and what they share: base (the Task type and its
             hooks), retrieval (prompts with one answer each), builder (exact-length prompts, scoring)
registry     registers the tasks; everything else looks a task up here
prompts      what every evaluation shares (default samples, depths and needles, seeds, lengths)
harness      lm-evaluation-harness on a loaded model (RULER, any lm-eval task); lm_eval_patches: every global
             of another library replaced while lm-eval runs
generation   greedy decoding with chunked prefill and a shared prefix
ppl          perplexity of held-out text; haystack: the filler
run          run_eval() and run_harness(): one evaluation end to end, with memory and progress
results      EvalResult and the one results API: aggregation, tables (CLI and card), JSON; plots: --plot
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
    bootstrap_interval,
    format_accuracy,
    format_p,
    format_ppl,
    paired_sign_test,
    sign_test,
    wilson_interval,
)
from dpe_export.evaluation.run import evaluate_task, run_eval, run_harness
from dpe_export.evaluation.tasks.builder import PromptBuilder, score_answer, score_niah
from dpe_export.evaluation.tasks.niah import evaluate_niah
from dpe_export.evaluation.tasks.passkey import evaluate_passkey
from dpe_export.evaluation.tasks.retrieval import aggregate

__all__ = [
    "NIAH_DIGITS", "PASSKEY_DIGITS", "TASKS", "EvalResult", "Task", "evaluate_task", "get_task", "register_task", "PromptBuilder", "aggregate", "bootstrap_interval",
    "eos_ids", "evaluate_niah", "evaluate_passkey", "evaluate_ppl", "format_accuracy", "format_p", "format_ppl",
    "greedy_generate", "greedy_generate_shared", "make_generate_fn", "max_new_tokens_for", "paired_sign_test", "run_eval", "run_harness",
    "sample_seed", "score_answer", "score_niah", "sign_test", "task_haystack_seed", "wilson_interval",
]
