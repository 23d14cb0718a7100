"""How the paired procedure's choice among tied scales decides held-out quality, on the trained testbeds.

The race's measurements (cells.jsonl) do not depend on the rule that picks a scale among the finalists whose
likelihoods are within noise of the best, so each (testbed, seed) is calibrated once, its state kept under
--cells, and every rule below picks from the same cells. Each distinct choice is then converted and scored
on the held-out prompts of scripts/calibration_quality.py (pass-key and 4-needle NIAH at 4x, 8x and 16x, 10
samples, seed 0); a choice already scored there (calibration-quality*.jsonl) is not scored again. One JSON line
per (testbed, seed, rule) is appended to --jsonl as it finishes; a re-run skips what is there.

    python scripts/tie_rule_study.py --jsonl benchmarks/results/tie-rule-study.jsonl \
        --cells benchmarks/results/tie-rule-study
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_calibration import busy_processes as other_torch_jobs  # noqa: E402
from calibration_quality import cli, held_out_scores  # noqa: E402

from dpe_export.calibration import paired, scales  # noqa: E402


def _tied(plan, done) -> list[list[int]]:
    """Per group, the finalists within 2 standard errors of the best (the earlier default tie rule), best first."""
    return paired.tied_finalists(replace(plan, tie_z=2.0), done)


def short_wavelength_groups(model: str, plan) -> list[bool]:
    """Per group: does its slowest frequency complete a turn within the pretraining length (2 pi / theta < L)?
    (scales.short_wavelength_groups, the rule the default choice applies since 0.3.1.) Such a group saw every
    angle in training at every distance, and the race's likelihoods do not rank its scales consistently
    (llama's group 0: best at 128 at T/2, behind at T, in 2 of 3 seeds)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(REPO / "tests" / "fixtures" / f"testbed-{model.removeprefix('testbed-')}")
    short = scales.short_wavelength_groups(config, plan.dimension_groups_range, plan.pretrain_length) or []
    return [g in short for g in range(plan.num_groups)]


RULES = {  # (plan, group, its tied finalists best first, short-wavelength groups) -> scale
    "reference": lambda plan, g, tied, short: min(tied, key=lambda s: scales.reference_distance(plan, s)),  # tie_z 2
    "best-mean": lambda plan, g, tied, short: tied[0],  # no tie rule (tie_z 0, the default since 0.3.0)
    "largest": lambda plan, g, tied, short: max(tied),  # ties to the most compressed far positions
    # the best mean, except that a group whose every frequency turns within L takes the largest candidate scale
    "short-wavelength-largest": lambda plan, g, tied, short: max(plan.scales) if short[g] else tied[0],
}


def known_scores() -> dict:
    """Held-out results already measured, by (model, factors)."""
    known = {}
    results = REPO / "benchmarks" / "results"
    for path in [*sorted(results.glob("calibration-quality*.jsonl")), results / "tie-rule-study.jsonl"]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            r = json.loads(line)
            known[(r["model"], tuple(r["chosen"]))] = r["held_out"]
    return known


def score(model: str, factors: list[int], groups: list[int], tmp: Path) -> dict:
    base = REPO / "tests" / "fixtures" / f"testbed-{model}"
    export = tmp / f"dpe-{model}-{'-'.join(map(str, factors))}"
    cli("convert", str(base), "-o", str(export), "--window", "32", "--target-length", "4096", "--overwrite",
        "--scale-factors", ",".join(map(str, factors)), "--dimension-groups", ",".join(map(str, groups)), threads=2)
    return held_out_scores(export, tmp)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jsonl", type=Path, required=True)
    ap.add_argument("--cells", type=Path, required=True, help="where each calibration's state is kept")
    ap.add_argument("--models", default="llama,qwen2,mistral")
    ap.add_argument("--seeds", default="1234,99")
    ap.add_argument("--context-lengths", help="calibrate's --context-lengths (default: every context at 4096)")
    args = ap.parse_args()
    lengths = [] if args.context_lengths is None else ["--context-lengths", args.context_lengths]
    variant = args.context_lengths or "4096,4096"
    done = set()
    if args.jsonl.is_file():
        for line in args.jsonl.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["seed"], r["rule"], r.get("context_lengths", "4096,4096")))
    known = known_scores()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in map(int, args.seeds.split(",")):
            for model in args.models.split(","):
                name = f"testbed-{model}"
                if all((name, seed, rule, variant) in done for rule in RULES):
                    continue
                cal = args.cells / (f"{model}-{seed}" + ("" if args.context_lengths is None
                                                          else f"-lengths-{variant.replace(',', '-')}"))
                shared = other_torch_jobs()
                t0 = time.time()
                if not (cal / "calibration.json").is_file():  # a finished race is reused: no rule changes its cells
                    cli("calibrate", str(REPO / "tests" / "fixtures" / name), "--target-length", "4096", "--window",
                        "32", "--groups", "4", "--seed", str(seed), "-d", str(cal), *lengths, threads=1)
                seconds = time.time() - t0
                plan = scales.load_plan(cal)
                tied = _tied(plan, paired.read_units(cal, plan))
                for rule, pick in RULES.items():
                    if (name, seed, rule, variant) in done:
                        continue
                    short = short_wavelength_groups(name, plan)
                    chosen = [pick(plan, g, t, short) for g, t in enumerate(tied)]
                    held_out = known.get((name, tuple(chosen)))
                    reused = held_out is not None
                    if not reused:
                        held_out = known[(name, tuple(chosen))] = score(model, chosen, plan.dimension_groups_range,
                                                                        Path(tmp))
                    record = {"model": name, "seed": seed, "rule": rule, "context_lengths": variant,
                              "chosen": chosen, "tied": tied,
                              "held_out": held_out, "reused_scores": reused, "calibrate_seconds": round(seconds, 1),
                              "other_jobs_at_start": shared, "other_jobs_at_end": other_torch_jobs(),
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
                    print(json.dumps({k: v for k, v in record.items() if k != "held_out"}), flush=True)
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
