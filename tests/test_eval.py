"""dpe-export eval: scoring through the generate_fn seam, exact prompt lengths, reports, methods, ppl, CLI."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import byte_tokenizer  # noqa: E402

from dpe_export.errors import DPEExportError  # noqa: E402
from dpe_export.evaluation.registry import get_task  # noqa: E402
from dpe_export.evaluation import generation, plots, ppl, results
from dpe_export.evaluation import prompts as eval_prompts
from dpe_export.evaluation import run as evalrun
from dpe_export.evaluation.results import EvalResult  # noqa: E402
from dpe_export.evaluation.tasks import niah as niah_task
from dpe_export.evaluation.tasks import passkey as passkey_task
from dpe_export.evaluation.tasks.niah import evaluate_niah
from dpe_export.evaluation.tasks.passkey import evaluate_passkey
from dpe_export.evaluation.tasks import PromptBuilder  # noqa: E402
from dpe_export.sources.loading import load_model
from dpe_export.sources.methods import MethodSpec, parse_method  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------
# Scripted models: a lossless character-level tokenizer and generate_fns that read the prompt text
# ----------------------------------------------------------------------------------------------------------


char_tokenizer = byte_tokenizer


@pytest.fixture(scope="module")
def chars():
    return char_tokenizer()


@pytest.fixture(scope="module")
def builder(chars):
    return PromptBuilder(chars, haystack_seed=eval_prompts.task_haystack_seed(0))


def needle_answer(text: str) -> str:
    """What a perfect model answers: the number of the needle the prompt asks about."""
    q = re.search(r"What is the special magic number for ([\w-]+)\?", text)
    if q:
        return re.search(rf"special magic numbers for {re.escape(q.group(1))} is: (\d+)", text).group(1)
    return re.search(r"The pass key is (\d+)\.", text).group(1)


def echo_fn(tok, seen=None, only_first_half=False):
    def generate(batch):
        out = []
        for ids in batch:
            if seen is not None:
                seen.append(list(ids))
            text = tok.decode(ids)
            answer = needle_answer(text)
            near = text.index(answer) < len(text) / 2
            out.append(f" {answer}. The" if near or not only_first_half else " 12")
        return out

    return generate


def wrong_fn(batch):
    return [" 1234567, I think" for _ in batch]


# ----------------------------------------------------------------------------------------------------------
# Scoring known answers
# ----------------------------------------------------------------------------------------------------------


def test_passkey_echo_scores_100_and_wrong_scores_0(chars, builder):
    seen = []
    recs = evaluate_passkey(builder, echo_fn(chars, seen), [300, 420], depths=[0, 0.5, 1], samples=2, seed=1,
                            batch_size=3)
    assert [(r["length"], r["depth"]) for r in recs] == [(n, d) for n in (300, 420) for d in (0, 0.5, 1)]
    assert all(r["accuracy"] == 1.0 and r["samples"] == 2 for r in recs)
    assert sorted({len(ids) for ids in seen}) == [300, 420] and len(seen) == 12  # exact lengths
    recs = evaluate_passkey(builder, wrong_fn, [300], depths=[0, 1], samples=2, seed=1)
    assert all(r["accuracy"] == 0.0 for r in recs)


def test_passkey_depth_bookkeeping(chars, builder):
    recs = evaluate_passkey(builder, echo_fn(chars, only_first_half=True), [400], depths=[0.0, 1.0], samples=3)
    assert {r["depth"]: r["accuracy"] for r in recs} == {0.0: 1.0, 1.0: 0.0}
    result = EvalResult("passkey", "m", "none", 0, recs)
    assert result.overall() == [{"length": 400, "samples": 6, "accuracy": 0.5}]


def test_niah_echo_scores_100_and_wrong_scores_0(chars, builder):
    seen, details = [], []
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    recs = evaluate_niah(builder, echo_fn(chars, seen), [560], depths=depths, samples=2, needles=4, seed=3,
                         batch_size=4, details_out=details)
    assert [r["depth"] for r in recs] == sorted(depths) or {r["depth"] for r in recs} == set(depths)
    assert all(r["accuracy"] == 1.0 and r["samples"] == 2 and r["needles"] == 4 for r in recs)
    assert len(seen) == 10 and {len(ids) for ids in seen} == {560}
    # 10 needle queries over 3 contexts of 4 needles; each context's needles sit at different depths
    assert sorted({d["sample"] for d in details}) == [0, 1, 2]
    for c in range(3):
        assert len({d["depth"] for d in details if d["sample"] == c}) == len([d for d in details if d["sample"] == c])
    recs = evaluate_niah(builder, wrong_fn, [560], depths=[0.5], samples=4, needles=4, seed=3)
    assert recs[0]["accuracy"] == 0.0 and recs[0]["samples"] == 4


def test_niah_partial_score_is_fraction_of_needles(chars, builder):
    answers = iter([True, False, True, True])

    def half(batch):
        return [f" {needle_answer(chars.decode(ids))}" if next(answers) else " 0" for ids in batch]

    recs = evaluate_niah(builder, half, [560], depths=[0.5], samples=4, needles=4, seed=0)
    assert recs[0]["accuracy"] == 0.75


def test_minimum_prompt_length_is_buildable_and_shorter_is_a_clear_error(builder):
    for task, items in (("passkey", lambda n: passkey_task.build_prompts(builder, n, [0, 1], 2, 0)),
                        ("niah", lambda n: niah_task.build_prompts(builder, n, [0, 0.5, 1], 4, 0, 4))):
        n = get_task(task).min_length(builder, 4)  # exact for passkey, an upper bound for niah
        assert {len(item.prompt.input_ids) for item in items(n)} == {n}
        short = n - 1 if task == "passkey" else n // 2
        with pytest.raises(DPEExportError, match=f"cannot build a {task} prompt of {short} tokens"):
            evaluate_passkey(builder, wrong_fn, [short]) if task == "passkey" else \
                evaluate_niah(builder, wrong_fn, [short])


def test_niah_needle_depth_plan_balances_depths():
    plan = niah_task.needle_depths([0, 0.5, 1], samples=5, needles=4)
    queried = [d for depths, q in plan for k, d in enumerate(depths) if k in q]
    assert len(plan) == 4 and sorted(queried) == [0.0] * 5 + [0.5] * 5 + [1.0] * 5


def test_same_seed_same_prompts(chars):
    def prompts(seed):
        seen = []
        b = PromptBuilder(chars, haystack_seed=eval_prompts.task_haystack_seed(seed))
        evaluate_passkey(b, echo_fn(chars, seen), [300], depths=[0.5], samples=2, seed=seed)
        return seen

    assert prompts(5) == prompts(5)
    assert prompts(5) != prompts(6)


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def passkey_result(chars, builder):
    recs = evaluate_passkey(builder, echo_fn(chars, only_first_half=True), [400, 600], depths=[0, 1], samples=2)
    return EvalResult("passkey", "some/model", "yarn:4", 7, recs, {"samples": 2})


def test_json_records_have_the_documented_fields(passkey_result, tmp_path):
    path = results.write_json(passkey_result, tmp_path / "sub" / "out.json")
    data = json.loads(path.read_text())
    assert (data["task"], data["model"], data["method"], data["seed"]) == ("passkey", "some/model", "yarn:4", 7)
    assert len(data["records"]) == 4
    for rec in data["records"]:
        assert {"task", "model", "method", "seed", "length", "depth", "accuracy", "samples"} <= set(rec)
        assert rec["task"] == "passkey" and rec["method"] == "yarn:4" and rec["samples"] == 2
    assert [o["accuracy"] for o in data["overall"]] == [0.5, 0.5]


def test_table(passkey_result):
    table = results.format_table(passkey_result)
    lines = table.splitlines()
    assert "yarn:4" in lines[0]
    assert lines[1].split() == ["length", "depth", "accuracy", "samples"]
    rows = [ln.split() for ln in lines[3:]]
    assert rows == [["400", "0.00", "100.0%", "2"], ["400", "1.00", "0.0%", "2"], ["400", "all", "50.0%", "4"],
                    ["600", "0.00", "100.0%", "2"], ["600", "1.00", "0.0%", "2"], ["600", "all", "50.0%", "4"]]
    ppl = EvalResult("ppl", "m", "none", 0, [{"length": 64, "depth": None, "accuracy": None, "samples": 2,
                                              "perplexity": 12.5, "tokens": 126, "nll": 318.2}])
    assert results.format_table(ppl).splitlines()[-1].split() == ["64", "2", "126", "12.5"]


def test_plot_writes_png(passkey_result, tmp_path):
    pytest.importorskip("matplotlib")
    path = plots.plot_result(passkey_result, tmp_path / "heat.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ppl_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    recs = [{"length": n, "depth": None, "accuracy": None, "samples": 1, "perplexity": p, "tokens": n - 1}
            for n, p in ((64, 12.0), (128, 15.0), (256, 900.0))]
    path = plots.plot_result(EvalResult("ppl", "m", "none", 0, recs), tmp_path / "ppl.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(DPEExportError, match=r"pip install"):
        plots.require_matplotlib()


# ----------------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    ("none", MethodSpec("none")),
    (None, MethodSpec("none")),
    ("linear:4", MethodSpec("linear", factor=4.0)),
    ("dynamic:2.5", MethodSpec("dynamic", factor=2.5)),
    ("YaRN:8", MethodSpec("yarn", factor=8.0)),
    ("self-extend:1024,8", MethodSpec("self-extend", window=1024, scales=(8,))),
    ("dpe:512,2,8,32,4", MethodSpec("dpe", window=512, scales=(2, 8, 32, 4))),
])
def test_parse_valid_methods(spec, expected):
    method = parse_method(spec)
    assert method == expected
    assert parse_method(str(method)) == method


@pytest.mark.parametrize("spec", ["foo", "linear", "linear:", "linear:x", "linear:0.5", "yarn:nan", "rope:2",
                                  "self-extend:8", "self-extend:8,2,2", "self-extend:0,2", "dpe:8", "dpe:8,0",
                                  "dpe:8,2.5", "dpe:a,b"])
def test_parse_invalid_methods(spec):
    with pytest.raises(DPEExportError, match="valid forms: none, linear:F, dynamic:F, yarn:F") as info:
        parse_method(spec)
    assert "\n" not in str(info.value)


def _rotary(model):
    return model.get_decoder().rotary_emb


def _logits(model, n=80, seed=0):
    ids = torch.randint(4, 128, (1, n), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_rope_methods_change_the_rotary_embedding(llama_dir):
    plain = load_model(llama_dir, parse_method("none"), device="cpu").model
    base_freq, base_logits = _rotary(plain).inv_freq.clone(), _logits(plain)

    linear = load_model(llama_dir, parse_method("linear:4"), device="cpu").model
    assert linear.config.rope_parameters["rope_type"] == "linear"
    assert torch.allclose(_rotary(linear).inv_freq, base_freq / 4)

    yarn = load_model(llama_dir, parse_method("yarn:4"), device="cpu").model
    params = yarn.config.rope_parameters
    assert params["rope_type"] == "yarn" and params["original_max_position_embeddings"] == 64
    assert not torch.allclose(_rotary(yarn).inv_freq, base_freq)
    assert _rotary(yarn).attention_scaling > 1.0

    dynamic = load_model(llama_dir, parse_method("dynamic:4"), device="cpu").model
    assert torch.equal(_rotary(dynamic).inv_freq, base_freq)  # unchanged within the base length ...
    dyn_logits = _logits(dynamic, 80)
    assert (_rotary(dynamic).inv_freq < base_freq - 1e-9)[1:].all()  # ... theta grows past it
    for logits in (_logits(linear), _logits(yarn), dyn_logits):
        assert not torch.allclose(logits, base_logits, atol=1e-3)
    assert torch.equal(_rotary(plain).inv_freq, base_freq)


@pytest.mark.parametrize("spec", ["self-extend:8,4", "dpe:8,2,4"])
def test_dpe_methods_differ_past_the_window_and_equal_below(llama_dir, spec):
    base = _logits(load_model(llama_dir, parse_method("none"), device="cpu").model, 40)
    loaded = load_model(llama_dir, parse_method(spec), device="cpu", target_length=40)
    params = loaded.model.dpe_params
    assert params.local_window_size == 8
    if spec.startswith("self-extend"):
        assert params.scale_factors == [4] and params.dimension_groups_range == [0, 8]
    else:
        assert params.scale_factors == [2, 4] and params.dimension_groups_range == [0, 4, 8]
    logits = _logits(loaded.model, 40)
    torch.testing.assert_close(logits[:, :8], base[:, :8], atol=1e-5, rtol=1e-5)
    # at i = W the only far key (j = 0) keeps its plain angle (W//s - 0 + W - W//s = W); past that all differ
    assert (logits[0, 9:] - base[0, 9:]).abs().amax(-1).min() > 1e-4


def test_dpe_method_with_too_many_groups_is_an_error(llama_dir):
    with pytest.raises(DPEExportError, match="cannot split 8 rotary frequencies into 9 groups"):
        load_model(llama_dir, parse_method("dpe:8," + ",".join(["2"] * 9)), device="cpu")


def test_greedy_generate_with_cache_equals_full_recompute(llama_dir):
    model = load_model(llama_dir, parse_method("self-extend:8,2"), device="cpu", target_length=64).model
    prompts = torch.randint(4, 128, (2, 30), generator=torch.Generator().manual_seed(1))
    got = generation.greedy_generate(model, prompts.tolist(), 6)
    ids = prompts
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert got == ids[:, 30:].tolist()


def test_chunked_prefill_and_shared_prefix_generation_equal_one_prompt_at_a_time(llama_dir):
    """Long prompts are prefilled a chunk at a time, and NIAH's questions share their context's prefill: both give
    what a single forward over each whole prompt gives."""
    model = load_model(llama_dir, parse_method("self-extend:8,2"), device="cpu", target_length=64).model
    g = torch.Generator().manual_seed(2)
    context = torch.randint(4, 128, (40,), generator=g).tolist()
    prompts = [context + torch.randint(4, 128, (n,), generator=g).tolist() for n in (3, 5, 1)]
    alone = [generation.greedy_generate(model, [p], 6, prefill_chunk=None)[0] for p in prompts]
    assert [generation.greedy_generate(model, [p], 6, prefill_chunk=7)[0] for p in prompts] == alone
    assert generation.greedy_generate_shared(model, prompts, 6, prefill_chunk=9) == alone
    assert generation.greedy_generate_shared(model, prompts[:1], 6) == alone[:1]


def test_dynamic_rope_scores_do_not_depend_on_earlier_longer_prompts(llama_dir):
    model = load_model(llama_dir, parse_method("dynamic:4"), device="cpu").model
    ids = torch.randint(4, 128, (1, 100), generator=torch.Generator().manual_seed(3))
    fresh = ppl.sequence_nll(model, ids[:, :80])
    fresh_gen = generation.greedy_generate(model, ids[:, :80].tolist(), 4)
    ppl.sequence_nll(model, ids)  # grows the cached frequencies to length 100
    torch.testing.assert_close(ppl.sequence_nll(model, ids[:, :80]), fresh, rtol=0, atol=0)
    generation.greedy_generate(model, ids.tolist(), 2)
    assert generation.greedy_generate(model, ids[:, :80].tolist(), 4) == fresh_gen


def test_dynamic_rope_greedy_keeps_one_rotation_across_prompt_and_generation(llama_dir):
    """A prompt just below the base length (64) whose generation crosses it: every forward (prefill and each
    cached step) must rotate with the frequencies of the final length, so cached decoding equals a full
    recompute at that length (transformers alone would switch frequencies mid-generation)."""
    model = load_model(llama_dir, parse_method("dynamic:4"), device="cpu").model
    rotary = model.get_decoder().rotary_emb
    used = []
    hook = rotary.register_forward_hook(lambda module, args, out: used.append(module.inv_freq.clone()))
    prompts = torch.randint(4, 128, (2, 60), generator=torch.Generator().manual_seed(5))
    got = generation.greedy_generate(model, prompts.tolist(), 8)
    hook.remove()
    assert len(used) == 1 + 1 + 7 and all(torch.equal(u, used[0]) for u in used)  # set-up, prefill, 7 steps
    assert not torch.equal(used[0], rotary.original_inv_freq)  # the 68-token frequencies, not the base ones
    ids = prompts
    with generation.fixed_rope_for_length(model, 68), torch.no_grad():
        assert torch.equal(rotary.inv_freq, used[0])
        for _ in range(8):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert got == ids[:, 60:].tolist()
    assert rotary.rope_type == "dynamic" and torch.equal(rotary.inv_freq, rotary.original_inv_freq)


def test_run_eval_is_reproducible_and_batch_invariant(llama_dir):
    def run(batch_size, seed=0):
        r = evalrun.run_eval(llama_dir, "passkey", [64], samples=3, depths=[0.5], seed=seed, batch_size=batch_size,
                              device="cpu")
        return [(d["answer"], d["generated"]) for d in r.details]

    one = run(1)
    assert len(one) == 3 and run(3) == one and run(1) == one
    assert [a for a, _ in run(1, seed=1)] != [a for a, _ in one]


# ----------------------------------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------------------------------


def _direct_nll(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="sum").double()


def test_chunked_nll_equals_full_logits(llama_dir):
    model = load_model(llama_dir, parse_method("none"), device="cpu").model
    ids = torch.randint(0, 128, (2, 50), generator=torch.Generator().manual_seed(2))
    nll = ppl.sequence_nll(model, ids, chunk_size=7)
    torch.testing.assert_close(nll.sum(), _direct_nll(model, ids), rtol=1e-6, atol=1e-6)


def test_ppl_equals_direct_computation(llama_dir):
    loaded = load_model(llama_dir, parse_method("none"), device="cpu")
    recs = ppl.evaluate_ppl(loaded.model, loaded.tokenizer, [24, 40], samples=3, seed=4, batch_size=2,
                                 chunk_size=5)
    windows = ppl.ppl_windows(loaded.tokenizer, [24, 40], 3, seed=4)
    for rec in recs:
        n = rec["length"]
        assert [len(w) for w in windows[n]] == [n] * 3
        nll = sum(float(_direct_nll(loaded.model, torch.tensor([w]))) for w in windows[n])
        assert rec["tokens"] == 3 * (n - 1) and rec["depth"] is None and rec["samples"] == 3
        assert rec["perplexity"] == pytest.approx(torch.exp(torch.tensor(nll / rec["tokens"])).item(), rel=1e-5)


def test_ppl_text_is_held_out_and_seeded(chars):
    a = ppl.ppl_windows(chars, [100], 2, seed=0)[100]
    assert a == ppl.ppl_windows(chars, [100], 2, seed=0)[100] and a[0] != a[1]
    assert a != ppl.ppl_windows(chars, [100], 2, seed=1)[100]
    filler = PromptBuilder(chars, haystack_seed=eval_prompts.task_haystack_seed(0)).passkey(400, 0.5, 0).input_ids
    assert chars.decode(a[0][:40]) not in chars.decode(filler)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def assert_one_line_error(result, *needles, exit_code=None):
    lines = result.stderr.splitlines()
    assert result.exit_code != 0 if exit_code is None else result.exit_code == exit_code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_eval_end_to_end(run_cli, llama_dir, tmp_path):
    out = tmp_path / "r.json"
    plot = ["--plot", tmp_path / "r.png"] if _has_matplotlib() else []
    r = run_cli("eval", llama_dir, "--task", "passkey", "--lengths", "64,72", "--samples", "1", "--depths", "0,1",
                "--batch-size", "2", "--json", out, "--no-progress", *plot)
    assert r.exit_code == 0, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].split() == ["length", "depth", "accuracy", "samples"]
    assert [ln.split()[:2] for ln in lines[3:9]] == [["64", "0.00"], ["64", "1.00"], ["64", "all"],
                                                     ["72", "0.00"], ["72", "1.00"], ["72", "all"]]
    data = json.loads(out.read_text())
    assert [(rec["length"], rec["depth"], rec["samples"]) for rec in data["records"]] == [
        (64, 0.0, 1), (64, 1.0, 1), (72, 0.0, 1), (72, 1.0, 1)]
    assert data["method"] == "none" and data["seed"] == 0 and data["settings"]["pretrain_length"] == 64
    if plot:
        assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_eval_ppl_and_niah_with_method(run_cli, llama_dir, tmp_path):
    r = run_cli("eval", llama_dir, "--task", "ppl", "--lengths", "32,48", "--samples", "2", "--method", "yarn:2",
                "--json", tmp_path / "p.json", "--no-progress")
    assert r.exit_code == 0, r.stderr
    data = json.loads((tmp_path / "p.json").read_text())
    assert [rec["length"] for rec in data["records"]] == [32, 48] and data["method"] == "yarn:2"
    assert all(rec["perplexity"] > 1 and rec["tokens"] == 2 * (rec["length"] - 1) for rec in data["records"])
    r = run_cli("eval", llama_dir, "--task", "niah", "--lengths", "100", "--samples", "1", "--depths", "0.5",
                "--needles", "2", "--method", "self-extend:16,4", "--no-progress")
    assert r.exit_code == 0, r.stderr
    assert "niah (2 needles)" in r.stdout.splitlines()[0]
    assert r.stdout.splitlines()[3].split() == ["100", "0.50", "0.0%", "1"]


def test_cli_eval_with_a_short_haystack_file_warns_once(run_cli, llama_dir, tmp_path):
    hay = tmp_path / "hay.txt"
    hay.write_text("w1 w2 w3. w4 w5 w6 w7! w8 w9?", encoding="utf-8")
    for task, extra in (("passkey", ["--depths", "0,1"]), ("ppl", [])):
        r = run_cli("eval", llama_dir, "--task", task, "--lengths", "64", "--samples", "2", "--haystack", hay,
                    "--no-progress", *extra)
        assert r.exit_code == 0, r.stderr
        warnings = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(warnings) == 1 and warnings[0].startswith("Warning: haystack file"), r.stderr


def test_cli_eval_on_an_export_and_method_refused(run_cli, llama_dir, tmp_path):
    export = tmp_path / "exp"
    r = run_cli("convert", llama_dir, "-o", export, "--window", "16", "--scale-factors", "2,4")
    assert r.exit_code == 0, r.stderr
    r = run_cli("eval", export, "--task", "ppl", "--lengths", "40", "--samples", "1", "--no-progress")
    assert r.exit_code == 0, r.stderr
    assert "none" in r.stdout.splitlines()[0]
    r = run_cli("eval", export, "--lengths", "64", "--samples", "1", "--depths", "0.5", "--batch-size", "2",
                "--json", tmp_path / "e.json", "--no-progress")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "e.json").read_text())["settings"]["model_kind"].startswith("DPE export (window 16")
    assert_one_line_error(run_cli("eval", export, "--lengths", "64", "--method", "linear:2"),
                          "already a DPE export", exit_code=1)


def test_cli_eval_bad_input(run_cli, llama_dir, tmp_path):
    assert_one_line_error(run_cli("eval", tmp_path / "nope", "--lengths", "64"), "no such file or directory",
                          exit_code=1)
    assert_one_line_error(run_cli("eval", llama_dir, "--lengths", "abc"), "--lengths", exit_code=2)
    assert_one_line_error(run_cli("eval", llama_dir, "--lengths", "64,-3"), "--lengths", exit_code=2)
    assert_one_line_error(run_cli("eval", llama_dir, "--lengths", "64", "--method", "rope:2"),
                          "valid forms", "self-extend:W,G", exit_code=1)
    assert_one_line_error(run_cli("eval", llama_dir, "--lengths", "64", "--method", "dpe:8,x"), "valid forms",
                          exit_code=1)
    assert_one_line_error(run_cli("eval", llama_dir, "--lengths", "64", "--depths", "0,1.5"), "--depths",
                          exit_code=2)
    assert_one_line_error(run_cli("eval", llama_dir, "--lengths", "10"), "too short", exit_code=1)
    assert_one_line_error(run_cli("eval", llama_dir, "--task", "ppl", "--lengths", "64", "--depths", "0.5"),
                          "--depths", exit_code=2)
    assert_one_line_error(run_cli("eval", llama_dir, "--lengths", "64", "--needles", "3"), "--needles",
                          exit_code=2)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# The trained testbed
# ----------------------------------------------------------------------------------------------------------


TESTBEDS = sorted(p for p in FIXTURES.glob("testbed-*") if (p / "model.safetensors").is_file())


@pytest.mark.parametrize("testbed", TESTBEDS, ids=lambda p: p.name)
def test_testbed_retrieves_pass_keys_at_its_training_length(testbed):
    length = json.loads((testbed / "config.json").read_text())["max_position_embeddings"]
    result = evalrun.run_eval(testbed, "passkey", [length], samples=2, seed=0, batch_size=5, device="cpu")
    overall = result.overall()[0]
    assert overall["samples"] == 10
    assert overall["accuracy"] >= 0.9, results.format_table(result)


def test_the_interval_and_sign_test_helpers_the_results_tables_use():
    from dpe_export.evaluation import bootstrap_interval, format_p, paired_sign_test, sign_test, wilson_interval

    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(5, 0) == sign_test(0, 5) == 2 / 32  # two-sided exact: 2 * (1/2)^5
    assert abs(sign_test(4, 1) - 2 * 6 / 32) < 1e-12
    assert sign_test(12, 0) < 0.001 < sign_test(8, 2) < 0.2
    assert paired_sign_test([(1, 0), (0.5, 0.25), (0, 1), (1, 1)]) == (2, 1, 1.0)
    assert [format_p(p) for p in (1.0, 0.0625, 0.003, 0.0004)] == ["1.00", "0.06", "0.003", "<0.001"]
    lo, hi = wilson_interval(5, 5)
    assert 0.56 < lo < 0.57 and hi == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = bootstrap_interval([0.0, 0.25, 0.5, 1.0] * 3)
    assert 0.2 < lo < 0.44 < hi < 0.7
