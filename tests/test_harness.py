"""The task registry, and RULER / any lm-eval task through lm-evaluation-harness (the `[eval]` extra)."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dpe_export.errors import DPEExportError
from dpe_export.evaluation import harness, lm_eval_patches, registry
from dpe_export.evaluation import run as evalrun
from dpe_export.evaluation.prompts import DEFAULT_NEEDLES
from dpe_export.evaluation.results import EvalResult, format_table
from dpe_export.evaluation.run import evaluate_task
from dpe_export.evaluation.ppl import ppl_windows
from dpe_export.evaluation.tasks import PromptBuilder, ruler
from dpe_export.evaluation.tasks.base import EvalOptions, Task, TaskRun
from dpe_export.evaluation.tasks.retrieval import aggregate
from dpe_export.sources import loading
from dpe_export.modeling_templates import dpe_params

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TESTBED = FIXTURES / "testbed-llama"

needs_lm_eval = pytest.mark.skipif(
    __import__("importlib").util.find_spec("lm_eval") is None, reason="lm-eval not installed (pip install '.[eval]')")


@pytest.fixture(scope="module")
def tokenizer():
    return loading.load_tokenizer(TESTBED)


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------


def _subsequence(needle, hay) -> bool:
    n = len(needle)
    return any(hay[i:i + n] == needle for i in range(len(hay) - n + 1))


@pytest.mark.parametrize("name", registry.task_names("retrieval"))
def test_every_retrieval_task_builds_exact_length_prompts_that_contain_their_answers(tokenizer, name):
    task = registry.get_task(name)
    builder = PromptBuilder(tokenizer)
    shortest = task.min_length(builder, DEFAULT_NEEDLES)
    for length in (shortest + 3, 300, 517):
        items = list(task.build(builder, length, [0.0, 0.5, 1.0], 2, 0, DEFAULT_NEEDLES))
        assert items and all(len(it.prompt.input_ids) == length for it in items)
        for it in items:
            assert _subsequence(it.prompt.answer_ids, it.prompt.input_ids)
            assert it.prompt.answer in tokenizer.decode(it.prompt.input_ids).replace(" ", "")
            assert len(it.prompt.answer) == task.answer_digits


@pytest.mark.parametrize("name", registry.task_names("retrieval"))
def test_a_model_answering_from_the_ground_truth_scores_100_and_a_wrong_one_0(tokenizer, name):
    task = registry.get_task(name)
    builder = PromptBuilder(tokenizer)
    depths, samples, length = [0.0, 0.5, 1.0], 3, 400
    truth = {tuple(it.prompt.input_ids): it.prompt.answer
             for it in task.build(builder, length, depths, samples, 0, DEFAULT_NEEDLES)}

    def right(batch):
        return [" " + truth[tuple(ids)] + "." for ids in batch]

    def wrong(batch):
        return [" " + str(int(truth[tuple(ids)]) + 1) for ids in batch]

    for fn, expected in ((right, 1.0), (wrong, 0.0)):
        records = evaluate_task(name, builder, fn, [length], depths, samples, seed=0)
        assert {r["accuracy"] for r in records} == {expected}
        assert sum(r["samples"] for r in records) == len(depths) * samples


def test_the_cli_the_calibration_and_the_card_read_the_registry(run_cli):
    from dpe_export.calibration import scales

    out = run_cli("eval", "--help").stdout
    for name in registry.task_names():
        assert f"{name}:" in out
    assert set(scales.METRICS) == set(registry.calibration_metrics()) == {"passkey", "niah"}
    assert registry.get_task("niah").metric_label(3) == "3-needle NIAH accuracy"
    assert registry.max_new_tokens_for("passkey") == 5 + 3


def test_a_registered_task_runs_through_the_same_loop(tokenizer, run_cli, llama_dir, tmp_path):
    task = registry.RetrievalTask(
        name="passkey-any-number", pretty_name="any number", help="test", metric="any number", answer_digits=5,
        make_prompts=registry.PASSKEY.make_prompts, min_length=registry.PASSKEY.min_length,
        score=lambda generated, answer: any(c.isdigit() for c in generated))
    registry.register_task(task)
    try:
        assert "passkey-any-number" in registry.task_names()
        records = evaluate_task("passkey-any-number", PromptBuilder(tokenizer), lambda b: [" 1"] * len(b), [200],
                                [0.5], 2)
        assert records[0]["accuracy"] == 1.0
        with pytest.raises(ValueError, match="already registered"):
            registry.register_task(task)
        # and through the CLI, a model, its table, JSON and heatmap
        torch.set_num_threads(1)
        plot = ["--plot", tmp_path / "h.png"] if importlib.util.find_spec("matplotlib") else []
        r = run_cli("eval", llama_dir, "--task", "passkey-any-number", "--lengths", "64", "--samples", "1",
                    "--depths", "0,1", "--device", "cpu", "--json", tmp_path / "r.json", "--no-progress", *plot)
        assert r.exit_code == 0, r.stderr
        assert [ln.split()[:2] for ln in r.stdout.splitlines()[3:6]] == [["64", "0.00"], ["64", "1.00"], ["64", "all"]]
        assert json.loads((tmp_path / "r.json").read_text())["task"] == "passkey-any-number"
        assert not plot or (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        registry.unregister_task("passkey-any-number")
    with pytest.raises(ValueError, match="lower-case"):
        registry.register_task(registry.Task(name="Bad:name", pretty_name="x", help="x", metric="x"))
    with pytest.raises(DPEExportError, match="is not a retrieval task"):
        evaluate_task("ppl", PromptBuilder(tokenizer), lambda b: [], [200])


@dataclass(frozen=True, kw_only=True)
class _NextToken(Task):
    """A toy task, defined here and nowhere else: does the model's greedy next token after ``length`` tokens of
    held-out text match the text's next token? One record per length, one detail per window."""

    uses_haystack: bool = False
    plots: bool = False
    samples_help: str = "text windows per length"

    def check(self, opts: EvalOptions) -> None:
        if opts.samples > 3:
            raise DPEExportError("next-token: at most 3 windows")

    def prepare(self, tokenizer, opts: EvalOptions):
        return ppl_windows(tokenizer, [n + 1 for n in opts.lengths], opts.samples, opts.seed)

    def evaluate(self, loaded, tokenizer, prepared, opts: EvalOptions) -> TaskRun:
        details = []
        for n in opts.lengths:
            for i, window in enumerate(prepared[n + 1]):
                with torch.no_grad():
                    logits = loaded.model(input_ids=torch.tensor([window[:-1]], device=loaded.device)).logits
                details.append({"length": n, "depth": None, "sample": i, "answer": window[-1],
                                "correct": int(logits[0, -1].argmax()) == window[-1]})
        return TaskRun(aggregate(details), details)


def test_a_task_defined_in_a_test_runs_end_to_end_through_eval(run_cli, llama_dir, tmp_path):
    """Adding a task is one module and one registration: this one is defined above and registered here, and the
    library function `dpe-export eval` calls, the CLI (options, table, JSON) and the card's tables run it."""
    from dpe_export import workflows
    from dpe_export.evaluation import results

    torch.set_num_threads(1)
    task = registry.register_task(_NextToken(
        name="next-token", pretty_name="next-token accuracy", help="the greedy next token of held-out text",
        metric="next-token accuracy", paper="https://example.org/toy"))
    try:
        result = workflows.evaluate(llama_dir, workflows.EvalRequest(model=str(llama_dir), task="next-token",
                                                                     lengths=(16, 24), samples=2, device="cpu", seed=1))
        assert result.task == "next-token" and [r["length"] for r in result.records] == [16, 24]
        assert all(r["samples"] == 2 and 0.0 <= r["accuracy"] <= 1.0 for r in result.records)
        assert len(result.details) == 4 and result.settings["samples"] == 2 and result.settings["depths"] is None
        again = evalrun.run_eval(llama_dir, "next-token", [16, 24], samples=2, device="cpu", seed=1)
        assert again.details == result.details

        out = tmp_path / "toy.json"
        r = run_cli("eval", llama_dir, "--task", "next-token", "--lengths", "16,24", "--samples", "2", "--seed", "1",
                    "--device", "cpu", "--json", out, "--no-progress")
        assert r.exit_code == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].startswith("task next-token") and lines[1].split() == ["length", "depth", "accuracy", "samples"]
        assert [ln.split()[:2] for ln in lines[3:7]] == [["16", "-"], ["16", "all"], ["24", "-"], ["24", "all"]]
        data = json.loads(out.read_text())
        assert data["task"] == "next-token" and data["records"] == result.full_records()
        assert data["overall"] == result.overall()
        (table,) = results.comparison_tables(results.eval_records(data))
        assert table["task"] == "next-token" and table["metric"] == "accuracy" and len(table["rows"]) == 2

        # the task's own flags and checks, through the CLI
        r = run_cli("eval", llama_dir, "--task", "next-token", "--lengths", "16", "--depths", "0.5")
        assert r.exit_code == 2 and "--depths applies to passkey, niah, not to next-token" in r.stderr
        r = run_cli("eval", llama_dir, "--task", "next-token", "--lengths", "16", "--plot", tmp_path / "x.png")
        assert r.exit_code == 2 and "next-token accuracy and lm-eval print a table" in r.stderr
        r = run_cli("eval", llama_dir, "--task", "next-token", "--lengths", "16", "--samples", "4")
        assert r.exit_code == 1 and "next-token: at most 3 windows" in r.stderr
    finally:
        registry.unregister_task(task.name)
    r = run_cli("eval", llama_dir, "--task", "next-token", "--lengths", "16")
    assert r.exit_code == 2 and "unknown task 'next-token'" in r.stderr


def test_unknown_tasks_and_subtasks_are_one_line_errors(run_cli):
    with pytest.raises(DPEExportError, match="unknown task 'nope'"):
        registry.get_task("nope")
    with pytest.raises(DPEExportError, match="has no subtasks"):
        registry.get_task("passkey:a")
    r = run_cli("eval", str(TESTBED), "--task", "bogus", "--lengths", "300")
    assert r.exit_code == 2 and "unknown task 'bogus'" in r.stderr
    r = run_cli("eval", str(TESTBED), "--task", "passkey", "--lengths", "300", "--tasks", "x")
    assert r.exit_code == 2 and "--tasks needs --harness lm-eval" in r.stderr
    r = run_cli("eval", str(TESTBED), "--harness", "lm-eval")
    assert r.exit_code == 2 and "needs --tasks" in r.stderr
    r = run_cli("eval", str(TESTBED), "--task", "ruler", "--lengths", "2048", "--plot", "x.png")
    assert r.exit_code == 2 and "RULER and lm-eval print a table" in r.stderr
    r = run_cli("eval", str(TESTBED), "--task", "passkey", "--lengths", "300", "--data-file", f"squad={TESTBED / 'config.json'}")
    assert r.exit_code == 2 and "--data-file applies to --task ruler only" in r.stderr
    with pytest.raises(DPEExportError, match="unknown RULER subtask 'bogus'"):
        ruler.resolve_subtasks("ruler:bogus")


def test_without_lm_eval_ruler_says_how_to_install_it(run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(DPEExportError, match=r"pip install 'dpe-export\[eval\]'"):
        harness.require_lm_eval()
    r = run_cli("eval", str(TESTBED), "--task", "ruler", "--lengths", "2048")
    assert r.exit_code == 1 and "pip install 'dpe-export[eval]'" in r.stderr and "Traceback" not in r.stderr


def test_ruler_and_lm_eval_tables():
    result = EvalResult("ruler", "m", "none", 0, [
        {"subtask": "vt", "length": 2048, "depth": None, "accuracy": 0.5, "samples": 4},
        {"subtask": "cwe", "length": 2048, "depth": None, "accuracy": 1.0, "samples": 4},
        {"subtask": "vt", "length": 4096, "depth": None, "accuracy": 0.0, "samples": 4}],
        {"harness": "lm-eval 0.4.13", "max_length": 4096})
    table = format_table(result)
    assert "average" in table and "75.0%" in table and "50.0% (4)" in table and "max_length 4096" in table
    assert {o["length"]: o["accuracy"] for o in result.overall()} == {2048: 0.75, 4096: 0.0}


def test_card_shows_a_ruler_table():
    from dpe_export.export.card import eval_tables

    records = [{"task": "ruler", "model": "./base", "method": "none", "subtask": s, "length": 4096,
                "accuracy": a, "samples": 10} for s, a in (("vt", 0.2), ("cwe", 0.4))]
    records += [{"task": "ruler", "model": "./export-dpe", "method": "none", "subtask": s, "length": 4096,
                 "accuracy": a, "samples": 10} for s, a in (("vt", 0.6), ("cwe", 0.8))]
    (table,) = eval_tables(records, base_dir="./base", export_dir="./export-dpe")
    labels = [row["length"] for row in table["rows"]]
    assert labels == ["vt @ 4,096", "cwe @ 4,096", "average @ 4,096"]
    assert table["rows"][-1]["cells"] == ["30.0%", "70.0%"]


# ----------------------------------------------------------------------------------------------------------
# RULER through lm-eval
# ----------------------------------------------------------------------------------------------------------


class _Scripted:
    """An lm-eval LM answering each RULER request from its document's ground truth (or wrongly)."""

    def __new__(cls, right: bool):
        from lm_eval.api.model import LM

        class Scripted(LM):
            def generate_until(self, requests, disable_tqdm=False):
                return [" ".join(r.doc["outputs"]) if right else "nothing here" for r in requests]

            def loglikelihood(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return Scripted()


@needs_lm_eval
def test_ruler_scripted_models_score_100_and_0_on_every_offline_subtask_with_the_same_prompts(tokenizer):
    from transformers import AutoTokenizer

    subtasks = ruler.resolve_subtasks("ruler")
    assert [s.name for s in subtasks] == list(ruler.OFFLINE_SUBTASKS)
    before = _lm_eval_globals()
    records, details = ruler.run_ruler_on(_Scripted(True), tokenizer, subtasks, [2048], 2)
    _assert_restored(before)
    assert [(r["subtask"], r["accuracy"], r["samples"]) for r in records] == [(s.name, 1.0, 2) for s in subtasks]
    assert all(d["prompt_tokens"] <= 2048 for d in details)
    some = [s for s in subtasks if s.name in ("niah_single_1", "cwe")]  # cwe: a module-level random generator
    wrong, wrong_details = ruler.run_ruler_on(_Scripted(False), tokenizer, some, [2048], 2)
    assert {r["accuracy"] for r in wrong} == {0.0}
    # a second run in the same process got exactly the same prompts (lm-eval's generators are seeded)
    assert [d["prompt_sha"] for d in details if d["subtask"] in ("niah_single_1", "cwe")] == \
        [d["prompt_sha"] for d in wrong_details]
    assert AutoTokenizer.from_pretrained.__func__.__qualname__.startswith("AutoTokenizer")  # restored


@needs_lm_eval
def test_ruler_known_failures_and_missing_data_are_refused_in_one_line(tokenizer, tmp_path):
    one = lambda spec, n: ruler.run_ruler_on(_Scripted(True), tokenizer, ruler.resolve_subtasks(spec), [n], 1)  # noqa: E731
    with pytest.raises(DPEExportError, match="RULER vt at 1024 tokens: needs at least about .* loop forever"):
        one("ruler:vt", 1024)
    for n in (1024, 4096):
        with pytest.raises(DPEExportError, match=f"RULER cwe at {n} tokens: needs more than"):
            one("ruler:cwe", n)
    with pytest.raises(DPEExportError, match="needs the dataset baber/paul_graham_essays in the local"):
        one("ruler:niah_single_2", 2048)
    with pytest.raises(DPEExportError, match="RULER qa_squad downloads its data at run time; fetch SQuAD"):
        one("ruler:qa_squad", 2048)


@needs_lm_eval
def test_ruler_never_loads_a_tokenizer_by_name(tokenizer):
    from transformers import AutoTokenizer

    with lm_eval_patches.patched(ruler_tokenizer=tokenizer) as patches:
        assert AutoTokenizer.from_pretrained(patches.tokenizer_key) is tokenizer
        with pytest.raises(DPEExportError, match="by name"):
            AutoTokenizer.from_pretrained(str(TESTBED), trust_remote_code=True)
    assert AutoTokenizer.from_pretrained(str(TESTBED)).vocab_size == tokenizer.vocab_size


def _lm_eval_globals() -> dict:
    """Every global lm_eval_patches may replace, as it is now (RULER's modules: the entries of sys.modules)."""
    import datasets
    import lm_eval.evaluator
    import nltk
    import requests
    from transformers import AutoTokenizer

    return {"transformers.AutoTokenizer.from_pretrained": vars(AutoTokenizer)["from_pretrained"],
            "requests.get": requests.get, "datasets.load_dataset": datasets.load_dataset,
            "sys.modules[lm_eval.tasks.ruler.*]": {n: m for n, m in sys.modules.items()
                                                   if n.startswith(lm_eval_patches.RULER_MODULES)},
            "nltk.download": nltk.download, "lm_eval.evaluator.add_env_info": lm_eval.evaluator.add_env_info}


def _assert_restored(before: dict) -> None:
    after = _lm_eval_globals()
    modules = after.pop("sys.modules[lm_eval.tasks.ruler.*]")
    for name, module in before.pop("sys.modules[lm_eval.tasks.ruler.*]").items():
        assert modules.get(name) is module, name  # modules first imported during the run may stay imported
    assert all(after[k] is v for k, v in before.items()), [k for k, v in before.items() if after[k] is not v]


@needs_lm_eval
def test_every_lm_eval_patch_is_listed_applied_and_restored_after_a_run_and_after_an_exception(tokenizer, tmp_path):
    import lm_eval.tasks.ruler.vt_utils  # noqa: F401 - a RULER module imported before the run, to be put back

    data = tmp_path / "squad.json"
    data.write_text('{"data": []}', encoding="utf-8")
    options = {"ruler_tokenizer": tokenizer, "local_json": {"dev-v2.0.json": data},
               "hf_snapshots": {"some/dataset": str(tmp_path)}}
    assert set(_lm_eval_globals()) == {p.target for p in lm_eval_patches.PATCHES}
    for fail in (False, True):
        before = _lm_eval_globals()
        with contextlib.ExitStack() as outer:
            if fail:
                outer.enter_context(pytest.raises(RuntimeError, match="inside"))
            with lm_eval_patches.patched(**options) as patches:
                assert sorted(patches.applied) == sorted(p.target for p in lm_eval_patches.PATCHES)
                patches.fresh_ruler_modules()
                inside = _lm_eval_globals()
                assert "lm_eval.tasks.ruler.vt_utils" not in inside["sys.modules[lm_eval.tasks.ruler.*]"]
                changed = [k for k, v in before.items() if k != "sys.modules[lm_eval.tasks.ruler.*]" and inside[k] is v]
                assert not changed, changed
                import requests

                assert requests.get("https://example.invalid/x/dev-v2.0.json").json() == {"data": []}
                if fail:
                    raise RuntimeError("inside the run")
        _assert_restored(before)
    with lm_eval_patches.patched() as patches:  # any lm-eval task: the environment report only
        assert patches.applied == ["lm_eval.evaluator.add_env_info"]
        with pytest.raises(RuntimeError, match="ruler_tokenizer"):
            patches.fresh_ruler_modules()


@needs_lm_eval
def test_ruler_never_downloads_nltk_data(tokenizer, monkeypatch):
    """lm-eval's prepare_niah calls nltk.download at import when punkt_tab is missing; a RULER run keeps it off."""
    import sys

    import nltk

    calls = []
    monkeypatch.setattr(nltk, "download", lambda *a, **k: calls.append(a))
    real_find = nltk.data.find

    def find(resource, *args, **kwargs):
        if "punkt" in resource:
            raise LookupError(resource)
        return real_find(resource, *args, **kwargs)

    monkeypatch.setattr(nltk.data, "find", find)
    monkeypatch.delitem(sys.modules, "lm_eval.tasks.ruler.prepare_niah", raising=False)  # imported afresh below
    records, _ = ruler.run_ruler_on(_Scripted(True), tokenizer, ruler.resolve_subtasks("ruler:niah_single_1"),
                                      [2048], 1)
    assert records[0]["accuracy"] == 1.0 and calls == []
    assert "lm_eval.tasks.ruler.prepare_niah" in sys.modules  # it was imported inside the run
    nltk.download("x")
    assert calls == [("x",)]  # restored


# ----------------------------------------------------------------------------------------------------------
# Any lm-eval task, on a real testbed export
# ----------------------------------------------------------------------------------------------------------


@needs_lm_eval
def test_lm_eval_local_passkey_task_scores_the_export_above_the_base_at_the_same_max_length(tmp_path, tokenizer):
    from dpe_export.export.convert import convert

    torch.set_num_threads(1)
    params = dpe_params.DPEParams(32, [8, 16, 32, 32], [0, 4, 8, 12, 16], target_length=4096)
    export = convert(TESTBED, tmp_path / "dpe", params)
    tasks = harness.write_passkey_task(tmp_path / "tasks", tokenizer, 1024, samples=5)
    lines = (tasks / "dpe_passkey.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(x)["answer"] in json.loads(x)["text"] for x in lines)
    runs = {}
    for name, model in (("base", TESTBED), ("dpe", export)):
        runs[name] = evalrun.run_harness(model, ["dpe_passkey"], include_path=tasks, device="cpu")
    (base,), (dpe,) = runs["base"].records, runs["dpe"].records
    assert base["metric"] == dpe["metric"] == "exact_match (first-number)" and base["samples"] == 5
    # the same max_length for both: the longest request, so the base model's prompts are not cut
    assert runs["base"].settings["max_length"] == runs["dpe"].settings["max_length"] > 1024
    assert runs["base"].settings["prefill_chunk"] == runs["dpe"].settings["prefill_chunk"] == 2048
    assert dpe["value"] >= 0.8 and base["value"] <= 0.4, (base, dpe)


@pytest.mark.parametrize("method", ["dpe-export", "self-extend:32,8", "dynamic:4"])
def test_generate_prefills_in_chunks_with_the_same_tokens_and_never_chunks_dynamic_rope(tmp_path, tokenizer, method):
    from dpe_export.evaluation.generation import reset_rope_state, set_generate_prefill_chunk
    from dpe_export.export.convert import convert
    from dpe_export.sources import methods

    torch.set_num_threads(1)
    if method == "dpe-export":
        params = dpe_params.DPEParams(32, [8, 16, 32, 32], [0, 4, 8, 12, 16], target_length=4096)
        model = loading.load_model(convert(TESTBED, tmp_path / "dpe", params), methods.parse_method("none"),
                                   device="cpu", trust_remote_code=True).model
    else:
        model = loading.load_model(TESTBED, methods.parse_method(method), device="cpu", target_length=1024).model
    ids = torch.randint(5, 200, (1, 700), generator=torch.Generator().manual_seed(0))
    runs = []
    for chunk in (None, 96):
        used = set_generate_prefill_chunk(model, chunk)
        reset_rope_state(model)  # dynamic RoPE keeps the frequencies of the longest sequence seen otherwise
        runs.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False))
    if method.startswith("dynamic"):
        assert used is None and model.generation_config.prefill_chunk_size is None  # frequencies follow the length
    else:
        assert used == 96 == model.generation_config.prefill_chunk_size
    assert torch.equal(runs[0], runs[1])
    if importlib.util.find_spec("lm_eval") is not None:
        harness.make_lm(model, tokenizer, 1024, batch_size=2, prefill_chunk=128)
        assert model.generation_config.prefill_chunk_size is None  # padded batches prefill whole
        harness.make_lm(model, tokenizer, 1024, prefill_chunk=128)
        assert model.generation_config.prefill_chunk_size == (None if method.startswith("dynamic") else 128)
        # a dynamic-RoPE model under lm-eval: the answer to a prompt does not depend on the longer one before it
        longer = torch.randint(5, 200, (1, 1000), generator=torch.Generator().manual_seed(1))
        model.generate(longer, attention_mask=torch.ones_like(longer), max_new_tokens=2, do_sample=False)
        again = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        assert torch.equal(again, runs[0])


@needs_lm_eval
def test_ruler_subtasks_that_download_data_run_from_given_files_and_from_the_local_hub_cache(tokenizer, tmp_path,
                                                                                             monkeypatch):
    import huggingface_hub.constants
    import nltk

    words = "The town by the river has a market, a school and an old stone bridge. "
    squad = {"data": [{"title": f"t{i}", "paragraphs": [{"context": f"Paragraph {i}. " + words * 3, "qas": [
        {"question": f"What does paragraph {i} say?", "answers": [{"text": f"answer {i}"}], "is_impossible": False}]}]}
        for i in range(520)]}  # lm-eval builds 500 samples, one question each
    hotpot = [{"question": f"Which title is {i}?", "answer": f"title {i}",
               "context": [[f"title {i}", [f"Sentence {i}. ", words]], [f"other {i}", [words]]]} for i in range(520)]
    files = {"squad": tmp_path / "dev-v2.0.json", "hotpotqa": tmp_path / "hotpot.json"}
    files["squad"].write_text(json.dumps(squad))
    files["hotpotqa"].write_text(json.dumps(hotpot))
    # an essay dataset as `huggingface-cli download` leaves it in the hub cache; no network (HF_HUB_OFFLINE)
    repo = tmp_path / "hub" / "datasets--baber--paul_graham_essays"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "data").mkdir(parents=True)
    (repo / "snapshots" / commit / "data" / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"Essay {i}. " + words * 60}) + "\n" for i in range(3)))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    essays = ruler.resolve_subtasks("ruler:niah_single_2")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data")])
    with pytest.raises(DPEExportError, match=r"needs NLTK's punkt_tab data; .*python -m nltk.downloader punkt_tab"):
        ruler.run_ruler_on(_Scripted(True), tokenizer, essays, [1024], 1)
    # punkt_tab's four tables, empty: sentences end at full stops (the real data knows abbreviations)
    punkt = tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    punkt.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (punkt / name).write_text("")
    subtasks = ruler.resolve_subtasks("ruler:qa_squad,qa_hotpot,niah_single_2")
    before = _lm_eval_globals()
    records, details = ruler.run_ruler_on(_Scripted(True), tokenizer, subtasks, [1024], 2, data_files=files)
    _assert_restored(before)  # every patch of this run (all six) undone
    assert [(r["subtask"], r["accuracy"], r["samples"]) for r in records] == [
        ("qa_squad", 1.0, 2), ("qa_hotpot", 1.0, 2), ("niah_single_2", 1.0, 2)]
    assert all(d["prompt_tokens"] <= 1024 for d in details)
    # (offline, datasets.load_dataset of the essays by name fails: niah_single_2 read the snapshot's files)
    wrong, _ = ruler.run_ruler_on(_Scripted(False), tokenizer, subtasks[:1], [1024], 1, data_files=files)
    assert {r["accuracy"] for r in wrong} == {0.0}
