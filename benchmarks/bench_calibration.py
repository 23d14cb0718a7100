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
import sys
import time
from pathlib import Path
from dpe_export import dpe_ops

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def busy_processes(seconds: float = 1.0) -> int:
    """Other processes that used more than a fifth of a core over the next `seconds` (a 'cores shared' flag;
    ps's %CPU is a lifetime average, which counts a stopped job as busy)."""
    def ticks() -> dict[str, int]:
        out = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit() and int(pid) != os.getpid():
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    out[pid] = int(fields[11]) + int(fields[12])
                except (OSError, IndexError, ValueError):
                    pass
        return out

    before = ticks()
    time.sleep(seconds)
    after = ticks()
    hz = os.sysconf("SC_CLK_TCK")
    return sum(1 for pid, t in after.items() if (t - before.get(pid, t)) / hz > 0.2 * seconds)


def main() -> int:
    import torch

    from dpe_export.calibration import paired, scales
    from dpe_export.evaluation import generation, registry
    from dpe_export.sources import loading, methods
    from dpe_export.sources.checkpoint import Checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--lengths", required=True)
    ap.add_argument("--window", type=int, required=True)
    ap.add_argument("--dimension-groups", required=True)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--repeats", type=int, default=1, help="time each unit this many times (the median is kept)")
    ap.add_argument("--paired-only", action="store_true",
                    help="time only the paired context (the grid query time comes from an earlier record)")
    ap.add_argument("--jsonl", type=Path, required=True)
    args = ap.parse_args()

    ckpt = Checkpoint(args.model)
    num_freqs = ckpt.rotary_dim // 2
    bounds = [int(x) for x in args.dimension_groups.split(",")]
    tokenizer = loading.load_tokenizer(ckpt)
    t0 = time.perf_counter()
    model = loading.load_model(ckpt, methods.MethodSpec("none"), dtype=args.dtype, tokenizer=tokenizer,
                               target_length=max(int(x) for x in args.lengths.split(","))).model
    load_seconds = time.perf_counter() - t0
    task = registry.get_task("niah")
    for T in (int(x) for x in args.lengths.split(",")):
        common = dict(target_length=T, window=args.window, num_freqs=num_freqs,
                      pretrain_length=ckpt.require_pretraining_length(), dimension_groups=bounds)
        grid = scales.make_plan(args.model, **common)
        fast = scales.make_plan(args.model, procedure="paired", samples=paired.DEFAULT_CONTEXTS,
                                needles=paired.DEFAULT_NEEDLES, **common)
        calibrator = scales.Calibrator(model, tokenizer, fast)
        params = fast.params_for_factors([fast.reference_scale] * fast.num_groups)
        query = calibrator.context_prompts(0)[0]
        dpe_ops.apply_dpe(model, params, None)
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
        query_seconds = None
        if not args.paired_only:
            query_seconds, _ = timed(lambda: generation.greedy_generate(model, [query.input_ids],
                                                                        task.max_new_tokens, eos))
        else:
            earlier = [json.loads(x) for x in args.jsonl.read_text().splitlines()] if args.jsonl.is_file() else []
            query_seconds = next((r["grid_query_seconds"] for r in reversed(earlier) if r["model"] == str(args.model)
                                  and r["target_length"] == T and r.get("grid_query_seconds")), None)
            if query_seconds is None:
                raise SystemExit(f"--paired-only: no earlier grid query time for {args.model} at {T}")
        # the paired procedure's unit: one context, every needle scored from one prefill; the first setting of a
        # context records the layers before the first DPE layer, the others replay them (prefix_reuse)
        calibrator._reuse = None
        context_seconds, result = timed(lambda: (setattr(calibrator, "_reuse", None),
                                                 calibrator.score_context(params, 0))[1])
        other = fast.params_for_factors([fast.scales[0]] * fast.num_groups)
        replay_seconds, _ = timed(lambda: calibrator.score_context(other, 0))
        grid_queries = len(grid.cells()) * grid.samples * grid.needles
        fast_prefills = paired.planned_units(fast, list(range(fast.num_groups)))
        fast_seconds = fast.samples * context_seconds + (fast_prefills - fast.samples) * replay_seconds
        record = {
            "model": str(args.model), "target_length": T, "window": args.window, "groups": fast.num_groups,
            "reference_scale": fast.reference_scale,
            "scales": fast.scales, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "grid_query_seconds": round(query_seconds, 2), "paired_context_seconds": round(context_seconds, 2),
            "paired_replay_seconds": round(replay_seconds, 2), "replayed_layers": calibrator._reuse.first,
            "grid_query_measured_here": not args.paired_only,
            "paired_prefill_chunk": generation.PREFILL_CHUNK, "grid_prefill_chunk": generation.PREFILL_CHUNK,
            "paired_needles": result["needles"],
            "grid": {"cells": len(grid.cells()), "queries_per_cell": grid.samples * grid.needles,
                     "prefills": grid_queries, "tokens": grid_queries * T,
                     "seconds_per_cell": round(query_seconds * grid.samples * grid.needles, 1),
                     "seconds": round(query_seconds * grid_queries, 1)},
            "paired": {"prefills_at_most": fast_prefills, "tokens": fast_prefills * T,
                       "seconds": round(fast_seconds, 1)},
            "speedup": round(query_seconds * grid_queries / fast_seconds, 1),
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
