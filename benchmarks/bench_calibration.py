"""The calibration cost model: what one unit of work costs, measured, and what a whole calibration costs by
procedure.

Per (model, target length) it times, with the reference setting applied (every group at the reference scale):
* one query of the grid procedure (the DPE authors'): a NIAH prompt of T tokens prefilled (chunked, as eval does)
  and its answer decoded greedily; a grid cell is samples x needles such queries (8 x 4 by default);
* one context of the paired procedure: a 16-needle context prefilled once and every needle's value scored
  teacher-forced from a copy of its cache.
It then writes both procedures' planned work (queries or prefills) for the default grid of that model, and the
seconds they imply. One JSON line per measurement is appended to --jsonl.

    python benchmarks/bench_calibration.py --model tests/fixtures/testbed-llama --lengths 4096 --window 32 \\
        --dimension-groups 0,4,8,12,16 --jsonl benchmarks/results/calibration-cost.jsonl
    python benchmarks/bench_calibration.py --model runs/gemma3-270m-base --lengths 8192,16384,32768 \\
        --window 4096 --dimension-groups 0,40,79,128 --dtype float32 --jsonl benchmarks/results/calibration-cost.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def busy_processes() -> int:
    """Other processes using more than a fifth of a core when asked (a 'cores shared' flag)."""
    out = subprocess.run(["ps", "-eo", "pid,pcpu"], capture_output=True, text=True).stdout.split("\n")[1:]
    return sum(1 for line in out if line.split() and float(line.split()[1]) > 20 and int(line.split()[0]) != os.getpid())


def main() -> int:
    import torch

    from dpe_export.calibration import paired, scales
    from dpe_export.evaluation import generation, registry
    from dpe_export.runtime import load_dpe_core
    from dpe_export.sources import loading, methods
    from dpe_export.sources.checkpoint import load_base_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--lengths", required=True)
    ap.add_argument("--window", type=int, required=True)
    ap.add_argument("--dimension-groups", required=True)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--repeats", type=int, default=1, help="time each unit this many times (the median is kept)")
    ap.add_argument("--jsonl", type=Path, required=True)
    args = ap.parse_args()

    config = load_base_config(args.model)
    num_freqs = load_dpe_core().rotary_dim_of(config) // 2
    bounds = [int(x) for x in args.dimension_groups.split(",")]
    tokenizer = loading.load_tokenizer(args.model)
    t0 = time.perf_counter()
    model = loading.load_model(args.model, methods.MethodSpec("none"), dtype=args.dtype, tokenizer=tokenizer,
                               target_length=max(int(x) for x in args.lengths.split(","))).model
    load_seconds = time.perf_counter() - t0
    task = registry.get_task("niah")
    for T in (int(x) for x in args.lengths.split(",")):
        common = dict(target_length=T, window=args.window, num_freqs=num_freqs,
                      pretrain_length=config.max_position_embeddings, dimension_groups=bounds)
        grid = scales.make_plan(args.model, **common)
        fast = scales.make_plan(args.model, procedure="paired", samples=paired.DEFAULT_CONTEXTS,
                                needles=paired.DEFAULT_NEEDLES, **common)
        calibrator = scales.Calibrator(model, tokenizer, fast)
        params = fast.params_for_factors([fast.reference_scale] * fast.num_groups)
        query = calibrator.context_prompts(0)[0]
        load_dpe_core().apply_dpe(model, params, None)
        eos = generation.eos_ids(model, tokenizer) or None
        # warm-up on a short prompt (first-call costs are not per-unit costs)
        generation.greedy_generate(model, [query.input_ids[-256:]], task.max_new_tokens, eos)
        generation.answer_likelihoods(model, [query.input_ids[-256:]], [query.answer_ids])
        busy = busy_processes()

        def timed(fn):
            times, out = [], None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t0)
            return sorted(times)[len(times) // 2], out

        # the grid's unit: one NIAH question, its own prefill, the answer decoded greedily
        query_seconds, _ = timed(lambda: generation.greedy_generate(model, [query.input_ids], task.max_new_tokens,
                                                                    eos))
        # the paired procedure's unit: one context, every needle scored from one prefill
        context_seconds, result = timed(lambda: calibrator.score_context(params, 0))
        grid_queries = len(grid.cells()) * grid.samples * grid.needles
        fast_prefills = paired.planned_units(fast, list(range(fast.num_groups))) - (fast.num_groups - 1)
        record = {
            "model": str(args.model), "target_length": T, "window": args.window, "groups": fast.num_groups,
            "scales": fast.scales, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "grid_query_seconds": round(query_seconds, 2), "paired_context_seconds": round(context_seconds, 2),
            "paired_needles": result["needles"],
            "grid": {"cells": len(grid.cells()), "queries_per_cell": grid.samples * grid.needles,
                     "prefills": grid_queries, "tokens": grid_queries * T,
                     "seconds_per_cell": round(query_seconds * grid.samples * grid.needles, 1),
                     "seconds": round(query_seconds * grid_queries, 1)},
            "paired": {"prefills_at_most": fast_prefills, "tokens": fast_prefills * T,
                       "seconds": round(context_seconds * fast_prefills, 1)},
            "speedup": round(query_seconds * grid_queries / (context_seconds * fast_prefills), 1),
            "load_seconds": round(load_seconds, 1), "threads": torch.get_num_threads(), "repeats": args.repeats,
            "other_busy_processes": max(busy, busy_processes()), "torch": torch.__version__,
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        print(json.dumps(record), flush=True)
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
