"""Calibration: the grid, its resumable results file, shards and merge, the tie rule, and convert with it."""
from __future__ import annotations

import json

import pytest
from helpers import save_tiny_model

from dpe_export.calibration import procedures, scales
from dpe_export.errors import DPEExportError


@pytest.fixture
def plan(tmp_path):
    base = save_tiny_model(tmp_path / "base", "llama", tokenizer=False)
    return scales.make_plan(base, target_length=512, window=32, num_freqs=8, pretrain_length=64, num_groups=4)


def scripted(best: list[int], calls: list):
    """A scorer whose best scale for group g is best[g]: score 1 there, less the farther from it."""
    def score(params):
        calls.append(list(params.scale_factors))
        ref = 16
        g = next((i for i, s in enumerate(params.scale_factors) if s != ref), None)
        if g is None:  # the reference cell of every group
            return {"score": 0.5, "samples": 8}
        s = params.scale_factors[g]
        return {"score": 1.0 / (1 + abs(s.bit_length() - best[g].bit_length())), "samples": 8}
    return score


def killed_after(n: int, calls: list):
    """The scripted scorer of a run that is killed (KeyboardInterrupt) when it starts its n+1-th cell."""
    def score(params):
        if len(calls) == n:
            raise KeyboardInterrupt
        return scripted([2, 8, 1, 4], calls)(params)
    return score


def test_plan_candidates_and_reference(plan):
    assert plan.scales == [1, 2, 4, 8, 16]  # up to T/W = 16
    assert plan.reference_scale == 16  # nearest 2T/L = 16
    assert plan.dimension_groups_range == [0, 2, 4, 6, 8]
    assert len(plan.cells()) == 4 * 5
    assert plan.factors_for(2, 4) == [16, 16, 4, 16]


def test_grid_chooses_each_groups_best_scale(plan, tmp_path):
    calls = []
    cells = scales.run_grid(plan, scripted([2, 8, 1, 4], calls), tmp_path / "cal", progress=False)
    result = scales.build_calibration(plan, cells)
    assert result["chosen"] == [2, 8, 1, 4]
    assert len(calls) == 20 and len(result["cells"]) == 20
    assert all(c["samples"] == 8 for c in result["cells"])
    assert result["samples_per_cell"] == 8  # what ran, read from the cells
    assert result["grid"][1][plan.scales.index(8)] == 1.0
    assert result["schema_version"] == 1 and result["base_model"]["config_sha256"] == plan.config_sha256


def test_ties_go_to_the_scale_nearest_the_reference_then_the_smaller(plan):
    flat = {(g, s): {"score": 0.5, "seconds": 0.0} for g, s in plan.cells()}
    assert scales.choose_scales(plan, flat) == [16] * 4
    flat[(0, 2)]["score"] = flat[(0, 8)]["score"] = 0.9  # 8 is nearer 16 than 2
    flat[(1, 1)]["score"] = flat[(1, 4)]["score"] = 0.9  # 4 is nearer
    assert scales.choose_scales(plan, flat)[:2] == [8, 4]


def test_a_killed_run_resumes_without_recomputing(plan, tmp_path):
    out = tmp_path / "cal"
    calls = []

    dies_after_seven = killed_after(7, calls)
    with pytest.raises(KeyboardInterrupt):
        scales.run_grid(plan, dies_after_seven, out, progress=False)
    with open(out / "cells.jsonl", "a") as f:
        f.write('{"plan": "cut off by the ki')  # a line half-written when the process died
    again = []
    cells = scales.run_grid(plan, scripted([2, 8, 1, 4], again), out, progress=False)
    assert len(again) == 20 - 7 and len(cells) == 20
    seen = {tuple(c) for c in calls} | {tuple(c) for c in again}
    assert len(seen) == len({tuple(plan.factors_for(g, s)) for g, s in plan.cells()})


def test_shards_split_the_grid_and_merge_joins_them(plan, tmp_path):
    out = tmp_path / "cal"
    scales.save_plan(out, plan)
    counts = []
    for i in range(3):
        calls = []
        scales.run_grid(plan, scripted([2, 8, 1, 4], calls), out, shard=(i, 3), progress=False)
        counts.append(len(calls))
    assert sum(counts) == 20 and max(counts) - min(counts) <= 1
    assert len(list(out.glob("cells.shard-*-of-3.jsonl"))) == 3
    merged = procedures.merge(out)
    assert merged["chosen"] == [2, 8, 1, 4]
    assert json.loads((out / "calibration.json").read_text())["chosen"] == [2, 8, 1, 4]


def test_merge_with_missing_cells_says_what_is_left(plan, tmp_path):
    out = tmp_path / "cal"
    scales.save_plan(out, plan)
    scales.run_grid(plan, scripted([2, 8, 1, 4], []), out, shard=(0, 2), progress=False)
    with pytest.raises(DPEExportError, match="10 of 20 calibration cells are not done"):
        procedures.merge(out)


def test_results_of_other_settings_are_refused(plan, tmp_path):
    out = tmp_path / "cal"
    scales.save_plan(out, plan)
    other = scales.CalibrationPlan(**{**plan.__dict__, "samples": 3})
    with pytest.raises(DPEExportError, match="other settings"):
        scales.save_plan(out, other)


def test_bad_input():
    with pytest.raises(DPEExportError, match="must exceed the local window"):
        scales.scale_candidates(512, 512)
    with pytest.raises(DPEExportError, match="I/N"):
        scales.parse_shard("3/2")


# ---- end to end on a tiny model ------------------------------------------------------------------------


def test_calibrate_then_convert_end_to_end(byte_model, tmp_path, run_cli):
    cal = tmp_path / "cal"
    res = run_cli("calibrate", str(byte_model), "-d", str(cal), "--target-length", "512", "--window", "128",
                  "--groups", "2", "--topk", "3", "--samples", "1", "--device", "cpu", "--procedure", "grid")
    assert res.exit_code == 0, (res.stdout + res.stderr)
    data = json.loads((cal / "calibration.json").read_text())
    assert data["scales"] == [1, 2, 4] and len(data["grid"]) == 2 and len(data["chosen"]) == 2
    assert data["top_k"] == 3 and (cal / "dim_scores.safetensors").is_file()
    assert all(c["samples"] >= 4 for c in data["cells"])
    assert "Chosen scale factors" in (res.stdout + res.stderr)

    out = tmp_path / "out"
    res = run_cli("convert", str(byte_model), "-o", str(out), "--calibration", str(cal / "calibration.json"))
    assert res.exit_code == 0, (res.stdout + res.stderr)
    dpe = json.loads((out / "config.json").read_text())["dpe"]
    assert dpe["scale_factors"] == data["chosen"] and dpe["local_window_size"] == 128
    assert dpe["target_length"] == 512 and dpe["selected_dims"]
    from safetensors.torch import load_file

    sel = load_file(str(out / dpe["selected_dims"]))["selected_dims"]
    assert sel.shape == (2, 4, 8) and bool((sel.sum(-1) == 3).all())
    assert "dpe_calibration.png" in {p.name for p in out.iterdir()} or "matplotlib" in (res.stdout + res.stderr)


def test_convert_without_factors_calibrates_first(byte_model, tmp_path, run_cli):
    out = tmp_path / "out"
    res = run_cli("convert", str(byte_model), "-o", str(out), "--target-length", "2048", "--window", "512",
                  "--dimension-groups", "0,4,8", "--calibration-samples", "1")
    assert res.exit_code == 0, (res.stdout + res.stderr)
    assert (tmp_path / "out.calibration" / "calibration.json").is_file()
    data = json.loads((tmp_path / "out.calibration" / "calibration.json").read_text())
    assert json.loads((out / "config.json").read_text())["dpe"]["scale_factors"] == data["chosen"]


def test_a_calibration_from_another_model_is_refused(byte_model, tmp_path, run_cli):
    cal = tmp_path / "cal"
    res = run_cli("calibrate", str(byte_model), "-d", str(cal), "--target-length", "512", "--window", "256",
                  "--groups", "1", "--samples", "1", "--needles", "2", "--device", "cpu")
    assert res.exit_code == 0, (res.stdout + res.stderr)
    other = save_tiny_model(tmp_path / "other", "llama", num_hidden_layers=3)
    res = run_cli("convert", str(other), "-o", str(tmp_path / "out"), "--calibration", str(cal / "calibration.json"))
    assert res.exit_code == 1 and "config sha256 mismatch" in (res.stdout + res.stderr)
    assert not (tmp_path / "out").exists()


def test_a_model_without_tokenizer_is_refused_before_loading(tmp_path, run_cli):
    base = save_tiny_model(tmp_path / "base", "llama", tokenizer=False)
    res = run_cli("calibrate", str(base), "-d", str(tmp_path / "cal"), "--target-length", "512", "--window", "64")
    assert res.exit_code == 1 and "tokenizer" in (res.stdout + res.stderr)


def test_passkey_metric(byte_model, tmp_path, run_cli):
    cal = tmp_path / "cal"
    res = run_cli("calibrate", str(byte_model), "-d", str(cal), "--target-length", "512", "--window", "256",
                  "--groups", "1", "--samples", "1", "--metric", "passkey", "--device", "cpu", "--procedure", "grid")
    assert res.exit_code == 0, res.stdout + res.stderr
    data = json.loads((cal / "calibration.json").read_text())
    assert data["metric"] == "pass-key accuracy" and data["scales"] == [1, 2]
    assert all(c["samples"] == 5 for c in data["cells"])  # samples x needles prompts, over 5 depths
    with pytest.raises(DPEExportError, match="unknown calibration metric"):
        scales.make_plan(byte_model, target_length=512, window=64, num_freqs=8, pretrain_length=64,
                            metric="bogus")


def test_a_torn_last_line_is_repaired_before_appending_and_merge_reads_it(plan, tmp_path):
    out = tmp_path / "cal"
    calls = []

    dies_after_five = killed_after(5, calls)
    with pytest.raises(KeyboardInterrupt):
        scales.run_grid(plan, dies_after_five, out, progress=False)
    with open(out / "cells.jsonl", "a") as f:
        f.write('{"plan": "torn by a full di')  # no newline: the next append would have glued onto it
    cells = scales.run_grid(plan, scripted([2, 8, 1, 4], []), out, progress=False)
    assert len(cells) == 20
    text = (out / "cells.jsonl").read_text()
    assert "torn" not in text and all(json.loads(line) for line in text.splitlines())
    assert scales.build_calibration(plan, scales.read_cells(out, plan))["chosen"] == [2, 8, 1, 4]


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(score=float("nan")), "scores are fractions"),
    (lambda c: c.update(score=7.5), "scores are fractions"),
    (lambda c: c.pop("group"), "is not a calibration cell"),
    (lambda c: c.update(samples="many"), "is not a calibration cell"),
])
def test_a_tampered_or_non_finite_cell_is_refused_in_one_line(plan, tmp_path, edit, needle):
    out = tmp_path / "cal"
    scales.run_grid(plan, scripted([2, 8, 1, 4], []), out, progress=False)
    lines = (out / "cells.jsonl").read_text().splitlines()
    cell = json.loads(lines[3])
    edit(cell)
    lines[3] = json.dumps(cell)
    (out / "cells.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DPEExportError, match=needle) as e:
        scales.read_cells(out, plan)
    assert "line 4" in str(e.value)


def test_a_nan_score_is_never_written(plan, tmp_path):
    with pytest.raises(DPEExportError, match="finite"):
        scales.run_grid(plan, lambda p: {"score": float("nan"), "samples": 8}, tmp_path / "cal", progress=False)


def test_two_calibrations_in_one_directory_are_refused_not_run_twice(plan, tmp_path):
    out = tmp_path / "cal"
    inner = []

    def scorer(params):
        if not inner:  # while the first run holds the grid, a second one starts
            with pytest.raises(DPEExportError, match=r"another calibration \(pid \d+\) is writing"):
                scales.run_grid(plan, scripted([2, 8, 1, 4], inner), out, progress=False)
        inner.append(1)
        return scripted([2, 8, 1, 4], [])(params)

    cells = scales.run_grid(plan, scorer, out, progress=False)
    assert len(cells) == 20 and len(inner) == 20  # the refused run scored nothing
