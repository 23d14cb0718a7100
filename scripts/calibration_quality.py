"""Decision quality and cost of a calibration procedure on the trained testbeds, against the full grid.

For each testbed and calibration seed: `dpe-export calibrate` (one thread, as the full grid was timed), `convert`
with its result, then held-out `eval` (seed 0: the prompts of the README tables, which calibration never sees)
of pass-key and 4-needle NIAH at 4x, 8x and 16x. One JSON line per (model, procedure, seed) is appended to
--jsonl as it finishes; a re-run skips the lines already there.

    python scripts/calibration_quality.py --jsonl benchmarks/results/calibration-quality.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_calibration import busy_processes as other_torch_jobs  # noqa: E402
LENGTHS = "1024,2048,4096"


def cli(*args, threads: int) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), TRANSFORMERS_VERBOSITY="error",
               TQDM_DISABLE="1")
    subprocess.run([sys.executable, "-m", "dpe_export", *args], check=True, env=env, cwd=REPO,
                   stdout=subprocess.DEVNULL)


def held_out_scores(export: Path, tmp: Path) -> dict:
    """Pass-key and 4-needle NIAH of an export at 4x, 8x and 16x on the held-out prompts (seed 0, 10 samples):
    per task, the overall accuracy per length and every prompt's outcome."""
    held_out = {}
    for task in ("passkey", "niah"):
        out = tmp / f"eval-{export.name}-{task}.json"
        cli("eval", str(export), "--task", task, "--lengths", LENGTHS, "--samples", "10", "--batch-size", "5",
            "--json", str(out), threads=2)
        data = json.loads(out.read_text())
        held_out[task] = {"overall": {str(r["length"]): r["accuracy"] for r in data["overall"]},
                          "correct": [[d["length"], d["depth"], d["sample"], d["correct"]] for d in data["details"]]}
    return held_out


def run_one(model: str, procedure: str, seed: int, tmp: Path) -> dict:
    base = REPO / "tests" / "fixtures" / f"testbed-{model}"
    cal, export = tmp / f"cal-{model}-{procedure}-{seed}", tmp / f"dpe-{model}-{procedure}-{seed}"
    shared_before = other_torch_jobs()
    t0 = time.time()
    cli("calibrate", str(base), "--target-length", "4096", "--window", "32", "--groups", "4", "--procedure",
        procedure, "--seed", str(seed), "-d", str(cal), threads=1)
    seconds = time.time() - t0
    calibration = json.loads((cal / "calibration.json").read_text())
    cli("convert", str(base), "-o", str(export), "--calibration", str(cal / "calibration.json"), threads=2)
    held_out = held_out_scores(export, tmp)
    return {"model": f"testbed-{model}", "procedure": procedure, "seed": seed, "chosen": calibration["chosen"],
            "calibrate_seconds": round(seconds, 1), "grid_seconds": calibration["timings"]["grid_seconds_all_cells"],
            "prefills": calibration.get("prefills"), "grid": calibration["grid"], "held_out": held_out,
            "tie_rule": calibration.get("tie_rule"),
            "threads": 1, "other_jobs_at_start": shared_before, "other_jobs_at_end": other_torch_jobs(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jsonl", type=Path, required=True)
    ap.add_argument("--models", default="llama,qwen2,mistral")
    ap.add_argument("--procedures", default="paired")
    ap.add_argument("--seeds", default="1234,99")
    args = ap.parse_args()
    done = set()
    if args.jsonl.is_file():
        for line in args.jsonl.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["procedure"], r["seed"]))
    with tempfile.TemporaryDirectory() as tmp:
        for seed in map(int, args.seeds.split(",")):
            for model in args.models.split(","):
                for procedure in args.procedures.split(","):
                    if (f"testbed-{model}", procedure, seed) in done:
                        continue
                    record = run_one(model, procedure, seed, Path(tmp))
                    print(json.dumps({k: v for k, v in record.items() if k not in ("held_out", "grid")}), flush=True)
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
