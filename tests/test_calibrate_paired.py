"""The default calibration procedure (paired needle likelihoods, successive halving): the race, its resumable
results, shards, the shared reference setting, hostile result lines, and the teacher-forced score against a
full forward of every prompt."""
from __future__ import annotations

import json
import math

import pytest
from helpers import save_tiny_model

from dpe_export.calibration import paired, procedures, scales
from dpe_export.errors import DPEExportError
from dpe_export.modeling_templates import dpe_params
from dpe_export import dpe_ops

BEST = [2, 8, 1, 4]


@pytest.fixture
def plan(tmp_path):
    base = save_tiny_model(tmp_path / "base", "llama", tokenizer=False)
    return scales.make_plan(base, target_length=512, window=32, num_freqs=8, pretrain_length=64, num_groups=4,
                            samples=3, needles=16, procedure="paired")


def scripted(calls: list, best=BEST, noise=None):
    """An evaluator whose best scale for group g is best[g] (score 0 there, lower the farther in log2), plus
    a per-context offset that is the same for every setting (what pairing cancels)."""
    def evaluate(params, context):
        factors = list(params.scale_factors)
        calls.append((tuple(factors), context))
        score = -0.1 * context - 1.0
        for g, s in enumerate(factors):
            score -= 0.05 * abs(math.log2(s) - math.log2(best[g]))
        if noise:
            score += noise(factors, context)
        return {"score": score, "needles": 16, "found": 3, "needle_scores": [score] * 16}
    return evaluate


def test_the_race_halves_each_groups_scales_and_finds_the_best(plan, tmp_path):
    calls = []
    done = paired.run(plan, scripted(calls), tmp_path / "cal", progress=False)
    assert paired.choose(plan, done) == BEST
    assert len(calls) == len(set(calls))  # nothing scored twice
    S = len(plan.scales)  # 1..16: 5 scales -> 5 + 3 + 2 per group, the reference setting once per context
    per_group = S + math.ceil(S / 2) + math.ceil(math.ceil(S / 2) / 2)
    ref = tuple([plan.reference_scale] * 4)
    assert sum(1 for f, c in calls if c == 0) == 4 * S - 3  # the reference setting is in every group's row
    assert len(calls) <= 4 * per_group - 3
    assert sum(1 for f, c in calls if f == ref) <= 3
    # every scale of every group was scored on context 0; later contexts only the survivors
    assert {f for f, c in calls if c == 0} >= {tuple(plan.factors_for(g, s)) for g in range(4) for s in plan.scales}
    state, todo = paired.race(plan, list(range(4)), done)
    assert not todo and all(plan.reference_scale in alive for alive, _ in state.values())  # always in the race
    record = paired.build(plan, done)
    assert record["chosen"] == BEST and record["procedure"] == "paired"
    assert record["prefills"] == len(calls)
    assert all(len(row) == S for row in record["grid"]) and record["contexts"][0][plan.scales.index(2)] == 3


def test_the_tie_rule_and_pairing(plan, tmp_path):
    # every setting equal: the reference scale wins each group (nearest the reference), then the smaller
    done = paired.run(plan, lambda p, c: {"score": -1.0 - c, "needles": 16, "found": 0}, tmp_path / "cal",
                      progress=False)
    assert paired.choose(plan, done) == [plan.reference_scale] * 4


def needles_evaluator(gap: float, seed: int = 0):
    """16 needles per context; group 0's scale 2 is better than the rest by `gap` nats per needle, with
    needle-to-needle noise of 0.2 nats shared by every setting but for a small setting-specific part."""
    import random

    def evaluate(params, context):
        factors = list(params.scale_factors)
        rng = random.Random(f"{seed}-{context}")
        base = [-1.0 + rng.gauss(0, 0.2) for _ in range(16)]
        own = random.Random(f"{seed}-{context}-{factors}")
        scores = [b - 0.05 * abs(own.gauss(0, 1)) + (gap if factors[0] == 2 else 0.0) for b in base]
        return {"score": sum(scores) / 16, "needles": 16, "found": 0, "needle_scores": scores}
    return evaluate


def test_a_clear_winner_is_chosen_and_a_flat_row_gets_the_reference(plan, tmp_path):
    done = paired.run(plan, needles_evaluator(gap=0.3), tmp_path / "clear", progress=False)
    chosen = paired.choose(plan, done)
    assert chosen[0] == 2  # 0.3 nats over 32+ needles is far outside the noise
    assert chosen[1:] == [plan.reference_scale] * 3  # rows the noise alone orders
    done = paired.run(plan, needles_evaluator(gap=0.0), tmp_path / "flat", progress=False)
    assert paired.choose(plan, done) == [plan.reference_scale] * 4
    record = paired.build(plan, done)
    assert "standard errors" in record["tie_rule"]
    assert all(len(u["needle_scores"]) == 16 for u in record["cells"])


def test_a_killed_run_resumes_without_recomputing(plan, tmp_path):
    out, calls = tmp_path / "cal", []

    def dies(params, context):
        if len(calls) == 11:
            raise KeyboardInterrupt
        return scripted(calls)(params, context)

    with pytest.raises(KeyboardInterrupt):
        paired.run(plan, dies, out, progress=False)
    first = list(calls)
    again = []
    done = paired.run(plan, scripted(again), out, progress=False)
    assert not set(first) & set(again)  # nothing finished before the kill ran again
    assert paired.choose(plan, done) == BEST


def test_shards_split_the_groups_and_merge_joins_them(plan, tmp_path):
    out = tmp_path / "cal"
    scales.save_plan(out, plan)
    for i in range(2):
        paired.run(plan, scripted([]), out, shard=(i, 2), progress=False)
    assert sorted(p.name for p in out.glob("cells*.jsonl")) == ["cells.shard-0-of-2.jsonl",
                                                               "cells.shard-1-of-2.jsonl"]
    merged = procedures.merge(out)
    assert merged["chosen"] == BEST
    single = paired.build(plan, paired.run(plan, scripted([]), tmp_path / "one", progress=False))
    assert single["chosen"] == merged["chosen"] and single["grid"] == merged["grid"]


def test_merge_with_missing_results_says_what_is_left(plan, tmp_path):
    out = tmp_path / "cal"
    scales.save_plan(out, plan)
    paired.run(plan, scripted([]), out, shard=(0, 2), progress=False)
    with pytest.raises(DPEExportError, match="not done yet.*remaining shards"):
        procedures.merge(out)


@pytest.mark.parametrize("edit, needle", [
    (lambda r: r.update(score=0.5), "log-probabilities"),
    (lambda r: r.update(score="nan"), "log-probabilities"),
    (lambda r: r.update(found=99), "log-probabilities"),
    (lambda r: r.pop("context"), "is not a calibration result"),
    (lambda r: r.update(factors="x"), "is not a calibration result"),
    (lambda r: r.update(needle_scores=[0.5] * 16), "log-probabilities"),
    (lambda r: r.update(needle_scores=[-1.0] * 3), "log-probabilities"),
])
def test_a_tampered_result_is_refused_in_one_line(plan, tmp_path, edit, needle):
    out = tmp_path / "cal"
    paired.run(plan, scripted([]), out, progress=False)
    path = out / "cells.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[3])
    edit(rec)
    lines[3] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DPEExportError, match=needle):
        paired.read_units(out, plan)


def test_a_repeated_line_is_refused(plan, tmp_path):
    out = tmp_path / "cal"
    paired.run(plan, scripted([]), out, progress=False)
    path = out / "cells.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [lines[2]]) + "\n")
    with pytest.raises(DPEExportError, match="repeats the result"):
        paired.read_units(out, plan)


def test_grid_plans_keep_their_keys(tmp_path):
    base = save_tiny_model(tmp_path / "base", "llama", tokenizer=False)
    grid = scales.make_plan(base, target_length=512, window=32, num_freqs=8, pretrain_length=64)
    assert grid.procedure == "grid"
    assert "procedure" not in json.dumps(grid.key())  # the hash of a pre-procedure plan.json is unchanged
    other = scales.make_plan(base, target_length=512, window=32, num_freqs=8, pretrain_length=64,
                             procedure="paired")
    assert other.key() != grid.key()


def test_registry_is_what_the_cli_offers(run_cli):
    res = run_cli("calibrate", "--help")
    for name, proc in procedures.PROCEDURES.items():
        assert name in res.stdout
    with pytest.raises(ValueError, match="already registered"):
        procedures.register(procedures.PROCEDURES["paired"])
    with pytest.raises(DPEExportError, match="unknown calibration procedure"):
        procedures.get_procedure("bogus")


# ---- the real score on a tiny model ---------------------------------------------------------------------


def test_answer_likelihoods_equal_a_full_forward_of_each_prompt(tmp_path):
    """One prefill of the shared prefix, its cache copied per question, equals scoring each prompt + answer in
    one uncached forward; with DPE applied (window 8 in a 96-token prompt) and without."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpe_export.evaluation.generation import answer_likelihoods

    base = save_tiny_model(tmp_path / "base", "llama", tokenizer=False, vocab_size=64)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(4, 64, (90,), generator=g).tolist()
    prompts = [prefix + torch.randint(4, 64, (k,), generator=g).tolist() for k in (3, 6, 4)]
    answers = [torch.randint(4, 64, (k,), generator=g).tolist() for k in (2, 1, 3)]
    for params in (None, dpe_params.DPEParams(8, [4, 16], [0, 4, 8], target_length=512)):
        if params is not None:
            dpe_ops.apply_dpe(model, params, None)
        got = answer_likelihoods(model, prompts, answers, prefill_chunk=32)
        for (score, found), p, a in zip(got, prompts, answers):
            with torch.no_grad():
                logits = model(torch.tensor([p + a[:-1]]), use_cache=False).logits[0, -len(a):]
            logp = torch.log_softmax(logits.float(), -1)
            want = float(logp[torch.arange(len(a)), torch.tensor(a)].mean())
            assert abs(score - want) < 1e-4, (params, score, want)
            assert found == bool((logp.argmax(-1) == torch.tensor(a)).all())


def test_calibrate_then_convert_end_to_end(byte_model, tmp_path, run_cli):
    cal = tmp_path / "cal"
    res = run_cli("calibrate", str(byte_model), "-d", str(cal), "--target-length", "1024", "--window", "128",
                  "--groups", "2", "--needles", "4", "--device", "cpu")
    assert res.exit_code == 0, (res.stdout + res.stderr)
    data = json.loads((cal / "calibration.json").read_text())
    assert data["procedure"] == "paired" and data["scales"] == [1, 2, 4, 8]
    assert len(data["chosen"]) == 2 and all(c["needles"] == 4 for c in data["cells"])
    # 4 scales -> 4 + 2 per group over 2 contexts, the reference setting shared
    assert data["prefills"] <= 12 and data["samples_per_cell"] == 8
    assert "procedure paired" in res.stdout and "Chosen scale factors" in res.stdout
    res = run_cli("convert", str(byte_model), "-o", str(tmp_path / "out"), "--calibration",
                  str(cal / "calibration.json"))
    assert res.exit_code == 0, (res.stdout + res.stderr)
    dpe = json.loads((tmp_path / "out" / "config.json").read_text())["dpe"]
    assert dpe["scale_factors"] == data["chosen"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Procedure `paired`, paired needle likelihoods" in card and "successive halving" in card
    # the card names only registered procedures, in their own words
    hostile = dict(data, procedure="<script>x</script>")
    (cal / "calibration.json").write_text(json.dumps(hostile))
    res = run_cli("convert", str(byte_model), "-o", str(tmp_path / "out2"), "--calibration",
                  str(cal / "calibration.json"))
    assert res.exit_code == 0 and "<script>" not in (tmp_path / "out2" / "README.md").read_text()
    (cal / "calibration.json").write_text(json.dumps(data))
    # a re-run resumes: nothing to compute, the same result
    res = run_cli("calibrate", str(byte_model), "-d", str(cal), "--target-length", "1024", "--window", "128",
                  "--groups", "2", "--needles", "4", "--device", "cpu")
    assert res.exit_code == 0 and json.loads((cal / "calibration.json").read_text())["chosen"] == data["chosen"]


def test_a_target_length_too_short_for_the_needles_is_refused_before_loading(byte_model, tmp_path, run_cli):
    res = run_cli("calibrate", str(byte_model), "-d", str(tmp_path / "cal"), "--target-length", "512",
                  "--window", "64")
    assert res.exit_code == 1 and "multi-needle NIAH prompt with 16 needles takes at least" in res.stderr
    assert "fewer --needles" in res.stderr and "Loading weights" not in res.stderr


def test_paired_takes_niah_only(byte_model, tmp_path, run_cli):
    res = run_cli("calibrate", str(byte_model), "-d", str(tmp_path / "cal"), "--target-length", "512",
                  "--window", "256", "--metric", "passkey")
    assert res.exit_code == 1 and "--procedure grid" in res.stderr and "Traceback" not in res.stderr


def test_prefix_reuse_replays_the_layers_before_the_first_dpe_layer_exactly(tmp_path):
    """Gemma 3 with three sliding layers before the first global one: the second setting's prefill of a context
    replays those layers (their output and cache per chunk) and scores what a full computation scores."""
    import torch
    from family_reference import tiny_family_model

    from dpe_export.architectures import ARCHITECTURES
    from dpe_export.calibration.prefix_reuse import PrefixReuse
    from dpe_export.evaluation.generation import answer_likelihoods

    types = ["sliding_attention"] * 3 + ["full_attention", "sliding_attention", "full_attention"]
    model = tiny_family_model(ARCHITECTURES["gemma3_text"], num_hidden_layers=6, layer_types=types,
                              sliding_window=8, max_position_embeddings=512)
    reuse = PrefixReuse(model)
    assert reuse.first == 3
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(4, 128, (150,), generator=g).tolist()
    prompts = [prefix + torch.randint(4, 128, (k,), generator=g).tolist() for k in (3, 5)]
    answers = [torch.randint(4, 128, (k,), generator=g).tolist() for k in (2, 3)]
    calls = []
    original = model.model.layers[0].forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.model.layers[0].forward = counting
    results = {}
    for factors in ([2, 8], [8, 2], [1, 4]):
        dpe_ops.apply_dpe(model, dpe_params.DPEParams(16, factors, [0, 4, 8], target_length=512), None)
        n = len(calls)
        got = answer_likelihoods(model, prompts, answers, prefill_chunk=32,
                                 around_prefill=lambda: reuse.prefill("context 0"))
        results[tuple(factors)] = (got, len(calls) - n)
        want = answer_likelihoods(model, prompts, answers, prefill_chunk=32)
        for (a, fa), (b, fb) in zip(got, want):
            assert abs(a - b) < 1e-5 and fa == fb, (factors, a, b)
    # layer 0 ran on the 5 prefill chunks only the first time; afterwards only for the questions
    assert results[(2, 8)][1] == 5 + 2 and results[(8, 2)][1] == 2 and results[(1, 4)][1] == 2
    assert model.model.layers[0].forward is counting  # the real layers are back


def test_prefix_reuse_is_a_no_op_where_every_layer_is_dpe(tmp_path):
    from dpe_export.calibration.prefix_reuse import PrefixReuse
    from helpers import tiny_model

    reuse = PrefixReuse(tiny_model("llama"))
    assert not reuse.active
    with reuse.prefill(0):
        pass


def test_prefix_reuse_recomputes_where_the_cache_cannot_be_restored(monkeypatch):
    """A release whose decoder layers get the cache under another name: nothing is replayed (a replay without
    restoring those layers' cache would give later chunks wrong lengths)."""
    from family_reference import tiny_family_model

    from dpe_export.architectures import ARCHITECTURES
    from dpe_export.calibration import prefix_reuse
    from dpe_export.evaluation.generation import answer_likelihoods

    monkeypatch.setattr(prefix_reuse, "CACHE_KEYWORDS", ("no_such_keyword",))
    types = ["sliding_attention"] * 2 + ["full_attention"]
    model = tiny_family_model(ARCHITECTURES["gemma3_text"], num_hidden_layers=3, layer_types=types,
                              sliding_window=8, max_position_embeddings=512)
    reuse = prefix_reuse.PrefixReuse(model)
    prompts = [list(range(4, 100)) + [5, 6], list(range(4, 100)) + [7]]
    first = answer_likelihoods(model, prompts, [[9], [10]], prefill_chunk=32,
                               around_prefill=lambda: reuse.prefill(0))
    assert reuse.context is None  # not kept for replay
    again = answer_likelihoods(model, prompts, [[9], [10]], prefill_chunk=32,
                               around_prefill=lambda: reuse.prefill(0))
    assert [round(a, 5) for a, _ in first] == [round(a, 5) for a, _ in again]


def test_context_lengths_set_each_contexts_prompt_length_and_leave_other_plans_keys(byte_model, tmp_path, run_cli):
    base = save_tiny_model(tmp_path / "base", "llama", tokenizer=False)
    plain = scales.make_plan(base, target_length=512, window=32, num_freqs=8, pretrain_length=64,
                             procedure="paired", samples=2)
    assert plain.context_lengths is None and "context_lengths" not in json.dumps(plain.key())
    assert [plain.context_length(c) for c in (0, 1)] == [512, 512]
    mixed = scales.make_plan(base, target_length=512, window=32, num_freqs=8, pretrain_length=64,
                             procedure="paired", samples=2, context_lengths=[256, 512])
    assert mixed.key() != plain.key() and [mixed.context_length(c) for c in (0, 1)] == [256, 512]
    for bad in ([256], [32, 512], [256, 1024]):  # one per context, above the window, at most the target
        with pytest.raises(DPEExportError, match="one context length per context"):
            scales.make_plan(base, target_length=512, window=32, num_freqs=8, pretrain_length=64,
                             procedure="paired", samples=2, context_lengths=bad)
    cal = tmp_path / "cal"
    res = run_cli("calibrate", str(byte_model), "-d", str(cal), "--target-length", "1024", "--window", "128",
                  "--groups", "2", "--needles", "4", "--device", "cpu", "--context-lengths", "512,1024")
    assert res.exit_code == 0, (res.stdout + res.stderr)
    assert json.loads((cal / "plan.json").read_text())["context_lengths"] == [512, 1024]
    from dpe_export.sources.loading import load_tokenizer

    calibrator = scales.Calibrator(model=None, tokenizer=load_tokenizer(byte_model), plan=scales.load_plan(cal))
    assert [len(calibrator.context_prompts(c)[0].input_ids) for c in (0, 1)] == [512, 1024]  # the prompt side only
    res = run_cli("calibrate", str(byte_model), "-d", str(tmp_path / "grid"), "--target-length", "1024",
                  "--window", "128", "--procedure", "grid", "--context-lengths", "512,1024")
    assert res.exit_code == 1 and "--context-lengths applies to the paired procedure" in res.stderr


def test_the_default_plan_races_at_two_lengths_and_takes_the_best_mean(byte_model, plan, tmp_path, run_cli):
    """Since 0.3.0 a paired plan puts its first context at half the target length and has no tie rule; a plan
    written before (tie_z 2) keeps its key, its rule and so its choice."""
    from dataclasses import replace

    best_mean = replace(plan, tie_z=0.0)
    assert plan.key() != best_mean.key() and "tie_z" not in json.dumps(plan.key())
    # group 0's scale 2 better by 0.01 nats per needle: within the noise the old rule allows, so it keeps the
    # reference there; the best mean takes it (the other rows are flat: noise orders them either way)
    done = paired.run(best_mean, needles_evaluator(gap=0.01, seed=2), tmp_path / "small", progress=False)
    assert paired.choose(best_mean, done)[0] == 2
    assert paired.choose(plan, done) == [plan.reference_scale] * 4  # the old rule on the same measurements
    assert "standard errors" not in paired.build(best_mean, done)["tie_rule"]
    cal = tmp_path / "cal"
    res = run_cli("calibrate", str(byte_model), "-d", str(cal), "--target-length", "1024", "--window", "128",
                  "--groups", "2", "--needles", "4", "--device", "cpu")
    assert res.exit_code == 0, (res.stdout + res.stderr)
    written = json.loads((cal / "plan.json").read_text())
    assert written["context_lengths"] == [512, 1024] and written["tie_z"] == 0.0
    assert paired.default_context_lengths(1024, 3) == [512, 1024, 1024]


def test_short_wavelength_groups_take_the_largest_scale_and_keep_the_key(plan, tmp_path):
    """A group whose every frequency turns within the pretraining length takes the largest candidate scale, whatever
    the race found; the field is the choice's, not the race's, so the plan's key (and its cells) stay the same, and
    a plan without it (before 0.3.1) chooses as before."""
    from dataclasses import replace

    done = paired.run(plan, scripted([]), tmp_path / "race", progress=False)
    assert paired.choose(plan, done) == BEST
    short = replace(plan, short_wavelength_groups=[0, 2])
    assert short.key() == plan.key()
    assert paired.choose(short, done) == [max(plan.scales), BEST[1], max(plan.scales), BEST[3]]
    record = paired.build(short, done)
    assert record["chosen"] == paired.choose(short, done) and "turns within the pretraining length" in record["tie_rule"]
    scales.save_plan(tmp_path / "saved", short)
    assert scales.load_plan(tmp_path / "saved").short_wavelength_groups == [0, 2]


def test_short_wavelength_groups_come_from_the_familys_frequencies():
    """2 pi / theta_f against L, from the family's own rotary embedding: on the Llama testbed (theta 10^4, head_dim
    32, L 256) frequency f turns in 2 pi * 10^(f/4) tokens: f = 3 in 35, f = 7 in 353, f = 8 in 628."""
    from pathlib import Path

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(Path(__file__).parent / "fixtures" / "testbed-llama")
    assert scales.short_wavelength_groups(cfg, [0, 4, 8, 12, 16], 256) == [0]
    assert scales.short_wavelength_groups(cfg, [0, 4, 8, 12, 16], 400) == [0, 1]
    assert scales.short_wavelength_groups(cfg, [0, 9, 16], 256) == []
    # grouped in one: the group's slowest frequency decides
    assert scales.short_wavelength_groups(cfg, [0, 16], 10 ** 6) == [0]


def test_calibrate_writes_the_short_wavelength_groups_into_its_plan(byte_model, tmp_path, run_cli):
    """head_dim 16, theta 10^4: group 0 (f = 0..3) turns within 2 pi * 10^1.5 = 199 tokens, under L = 256."""
    cal = tmp_path / "cal"
    res = run_cli("calibrate", str(byte_model), "-d", str(cal), "--target-length", "1024", "--window", "128",
                  "--groups", "2", "--needles", "4", "--device", "cpu", "--pretrain-length", "256")
    assert res.exit_code == 0, (res.stdout + res.stderr)
    from transformers import AutoConfig

    written = json.loads((cal / "plan.json").read_text())
    expected = scales.short_wavelength_groups(AutoConfig.from_pretrained(byte_model), written["dimension_groups_range"],
                                              written["pretrain_length"])
    assert expected and written["short_wavelength_groups"] == expected
    result = json.loads((cal / "calibration.json").read_text())
    assert all(result["chosen"][g] == max(written["scales"]) for g in expected)
    # a plan.json written before 0.3.1 (no such field): the resumed run keeps the race's choice
    del written["short_wavelength_groups"]
    (cal / "plan.json").write_text(json.dumps(written))
    plan = scales.load_plan(cal)
    race_choice = paired.choose(plan, paired.read_units(cal, plan))
    res = run_cli("calibrate", str(byte_model), "-d", str(cal), "--target-length", "1024", "--window", "128",
                  "--groups", "2", "--needles", "4", "--device", "cpu", "--pretrain-length", "256")
    assert res.exit_code == 0, (res.stdout + res.stderr)
    assert json.loads((cal / "calibration.json").read_text())["chosen"] == race_choice
    assert "short_wavelength_groups" not in json.loads((cal / "plan.json").read_text())
