"""RULER on Gemma-3-270M, inside its 32K context, through lm-eval. Two plans, each in a results file of its own:
`table` (bfloat16): base vs the hand-set DPE export vs SelfExtend, six subtasks at 4K-16K; `calibration` (float32,
issue 35): the calibrated export vs the hand-set export vs SelfExtend and YaRN at the factors their rules give for
64K, on the four subtasks that discriminate on this model, at 16K (10 samples) and 32K (5).

Every sample's result is appended to a JSONL file as its chunk finishes, so a run that is cut off resumes
where it stopped. Lengths run shortest first, every method at a length before the next length. Each model is
loaded once per run; lm-eval's max_length is the longest length of the plan for every model (so no prompt is
cut and every model gets the same setting), and every model gets the same prompts (checked by hash).

    python scripts/gemma_ruler.py --base /path/gemma3-270m-base --export /path/gemma3-270m-dpe \
        --out benchmarks/results/gemma3-270m-ruler.jsonl
    python scripts/gemma_ruler.py --plan calibration --base BASE --export DPE --calibrated CALIBRATED \
        --out benchmarks/results/gemma3-270m-ruler-float32.jsonl
    python scripts/gemma_ruler.py --out benchmarks/results/gemma3-270m-ruler.jsonl --markdown
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

K = 1024


@dataclass(frozen=True)
class Plan:
    lengths: tuple  # shortest first
    methods: dict  # name -> (directory: base | export | calibrated, --method spec)
    subtasks: str  # for ruler.resolve_subtasks
    samples: dict  # length -> samples per subtask
    dtype: str
    order: tuple  # lengths in the order they run
    reference: str  # the method the others are compared with prompt by prompt


PLANS = {
    "table": Plan(
        lengths=(4 * K, 8 * K, 16 * K),
        methods={"base": ("base", "none"), "dpe": ("export", "none"), "self-extend": ("base", "self-extend:4096,2")},
        subtasks="ruler", samples={4 * K: 10, 8 * K: 10, 16 * K: 5}, dtype="bfloat16",
        # 8K and 16K before the rest of 4K: below DPE's and SelfExtend's 4096-token window every distance is local,
        # so at 4K both equal the base model (checked on their first samples) and the longer lengths tell more.
        order=(8 * K, 16 * K, 4 * K), reference="base"),
    # Issue 35: every method as deployed for 64K (SelfExtend's group and YaRN's factor by their own rules for 64K,
    # as in gemma_table.py --plan calibration); vt and niah_multikey_3 score about 0 for every method here.
    "calibration": Plan(
        lengths=(16 * K, 32 * K),
        methods={"dpe-calibrated": ("calibrated", "none"), "dpe": ("export", "none"),
                 "self-extend-g3": ("base", "self-extend:4096,3"), "yarn": ("base", "yarn:2")},
        subtasks="ruler:niah_single_1,niah_multikey_2,cwe,fwe", samples={16 * K: 10, 32 * K: 5}, dtype="float32",
        order=(16 * K, 32 * K), reference="dpe-calibrated"),
}
CHUNK = 5  # samples per lm-eval run (and per JSONL append)


def prefill_chunk(length: int):
    """Prompt tokens per forward in generate: whole at 4K (as the first cells ran), 2,048-token chunks beyond
    (the same tokens up to float error, 2-3x faster: see generation.set_generate_prefill_chunk)."""
    from dpe_export.evaluation.generation import GENERATE_PREFILL_CHUNK

    return None if length <= 4 * K else GENERATE_PREFILL_CHUNK


def plan_of(path: Path) -> Plan:
    """The plan a results file belongs to, as its records name it (records before plans existed: the table)."""
    names = {r.get("plan", "table") for r in read_done(path).values()} or {"table"}
    if len(names) > 1:
        raise SystemExit(f"{path} mixes the plans {', '.join(sorted(names))}")
    return PLANS[names.pop()]


def read_done(path: Path) -> dict[tuple, dict]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[(rec["method"], rec["subtask"], rec["length"], rec["sample"])] = rec
    return done


def run(args) -> None:
    import torch

    from dpe_export.evaluation import harness
    from dpe_export.evaluation.tasks import ruler
    from dpe_export.evaluation.generation import set_generate_prefill_chunk
    from dpe_export.sources import load_model, parse_method
    from dpe_export.sources.loading import load_tokenizer

    torch.set_num_threads(args.threads)
    plan = PLANS[args.plan]
    dtype = args.dtype or plan.dtype
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    used = {r.get("dtype") for r in read_done(out).values()}
    if used - {dtype}:
        raise SystemExit(f"{out} holds {', '.join(sorted(map(str, used)))} records; this run would add {dtype} ones "
                         "(one dtype per results file)")
    if out.exists() and read_done(out) and plan_of(out) is not plan:
        raise SystemExit(f"{out} holds records of another plan than {args.plan!r} (one plan per results file)")
    dirs = {"base": args.base, "export": args.export, "calibrated": args.calibrated}
    subtasks = ruler.resolve_subtasks(plan.subtasks)
    tokenizer = load_tokenizer(args.base)
    max_length = max(plan.lengths)
    loaded: dict[str, object] = {}
    # Every method on a chunk of a subtask's samples before the next chunk: the methods stay paired prompt by
    # prompt however far a run gets.
    for length in plan.order:
        chunk = prefill_chunk(length)
        for first in range(0, plan.samples[length], CHUNK):
            for sub in subtasks:
                for method, (which, spec) in plan.methods.items():
                    done = read_done(out)
                    ids = [i for i in range(first, min(first + CHUNK, plan.samples[length]))
                           if (method, sub.name, length, i) not in done]
                    if not ids:
                        continue
                    if method not in loaded:
                        loaded.clear()  # one model in memory at a time
                        model = load_model(dirs[which], parse_method(spec), device="cpu", dtype=dtype,
                                           target_length=max_length, tokenizer=tokenizer,
                                           trust_remote_code=which != "base").model
                        loaded[method] = harness.make_lm(model, tokenizer, max_length)
                    set_generate_prefill_chunk(loaded[method].model, chunk)
                    t0, c0 = time.time(), time.process_time()
                    _, details = ruler.run_ruler_on(loaded[method], tokenizer, [sub], [length], len(ids),
                                                    sample_ids=ids)
                    wall = (time.time() - t0) / len(details)
                    cpu = (time.process_time() - c0) / len(details)
                    with out.open("a", encoding="utf-8") as f:
                        for d in details:
                            f.write(json.dumps({"plan": args.plan, "method": method, "spec": spec, **d,
                                                "wall_s": round(wall, 1),
                                                "cpu_s": round(cpu, 1), "max_length": max_length,
                                                "prefill_chunk": chunk, "dtype": dtype, "threads": args.threads,
                                                "machine": MACHINE}) + "\n")
                    print(f"{method} {sub.name} {length}: samples {ids} "
                          f"{sum(d['score'] for d in details) / len(details):.2f} ({wall:.0f} s/sample)", flush=True)


MACHINE = f"{platform.machine()}, {os.cpu_count()} cores"


def section(path: Path) -> str:
    """The RESULTS.md section: what ran, how, the table, and how much of the plan is done."""
    done = read_done(path)
    plan = plan_of(path)
    planned = sum(plan.samples.values()) * len(plan.methods) * len(resolve(plan))
    machines = sorted({r.get("machine", "?") for r in done.values()})
    progress = (f"**All {planned} planned samples measured**" if len(done) >= planned else
                f"**In progress: {len(done)} of {planned} planned samples measured**")
    if plan is PLANS["table"]:
        head = [
            "### Gemma-3-270M: RULER through lm-evaluation-harness (inside its 32K context)", "",
            progress + " (plan: lm-eval's six offline RULER "
            "subtasks at 4K, 8K and 16K; 10 samples per subtask and length up to 8K, 5 at 16K; base model, the DPE "
            "export and SelfExtend (window 4096, group 2) on the base). `scripts/gemma_ruler.py` appends every sample "
            "to `results/gemma3-270m-ruler.jsonl` and resumes from it.", "",
            "Run with lm-eval 0.4.13's own RULER task definitions on the models dpe-export loads (bfloat16, CPU, "
            f"2 threads; {', '.join(machines)}); lm-eval's max_length is 16384 for every model, so no prompt is cut; "
            "every model gets the same prompts (their hashes are in the JSONL). Prompts are "
            "prefilled whole at 4K and in 2,048-token chunks beyond (the same tokens up to float error, 2-3x faster). "
            "A cell: mean of lm-eval's string-match score over its samples [95% bootstrap interval], n samples, wall "
            "time per sample (prefill and up to 128 generated tokens).", "",
        ]
    else:
        head = [
            "### Gemma-3-270M: the calibrated export on RULER, float32 (inside its 32K context)", "",
            progress + " (plan, issue 35: lm-eval's RULER niah_single_1, niah_multikey_2, cwe and fwe, the subtasks "
            "that discriminate on this model, at 16K (10 samples each) and 32K (5); the calibrated export, the "
            "hand-set export, SelfExtend (window 4096, group 3) and YaRN (factor 2), each as set for 64K). "
            "`scripts/gemma_ruler.py --plan calibration` appends every sample to "
            "`results/gemma3-270m-ruler-float32.jsonl` and resumes from it.", "",
            "lm-eval 0.4.13's own RULER task definitions, float32, CPU, 2 threads "
            f"({', '.join(machines)}); lm-eval's max_length is 32768 for every model; every model gets the same "
            "prompts (hashes in the JSONL); prompts prefilled in 2,048-token chunks. A cell: mean string-match score "
            "[95% bootstrap interval], n samples, wall time per sample.", "",
        ]
    notes: dict[tuple, list[int]] = {}
    for r in done.values():
        if r.get("note"):
            notes.setdefault((r["length"], r["method"], r["subtask"], r["note"]), []).append(r["sample"])
    tail = [""] + [f"* {m}, {s}, {n:,}, samples {', '.join(map(str, sorted(ids)))}: {note}."
                   for (n, m, s, note), ids in sorted(notes.items())] if notes else []
    return ("\n".join(head) + "\n" + markdown(path) + "\n" + "\n".join(tail) + ("\n" if tail else "")
            + "\n" + paired(path) + "\n")


def resolve(plan: Plan) -> list:
    from dpe_export.evaluation.tasks import ruler

    return ruler.resolve_subtasks(plan.subtasks)


def paired(path: Path) -> str:
    """Prompt by prompt (the same prompts: their hashes are checked): each method against the base model (table),
    or every pair of methods (calibration)."""
    import itertools

    from dpe_export.evaluation import format_p, paired_sign_test

    done = read_done(path)
    plan = plan_of(path)
    ref = plan.reference
    if plan is PLANS["table"]:
        pairs_of = [(ref, m) for m in plan.methods if m != ref]
        lines = ["Prompt by prompt against the base model (a prompt's score is lm-eval's, 0-1; the sign test drops "
                 "ties):", "", "| length | method | prompts | higher | lower | same score | same generated text | "
                 "sign test p |", "|---|---|---|---|---|---|---|---|"]
    else:
        pairs_of = list(itertools.combinations(plan.methods, 2))
        lines = ["Prompt by prompt, every pair of methods (first against second: prompts where the first scores "
                 "higher, lower; lm-eval's score, 0-1; the sign test drops ties):", "",
                 "| length | methods | prompts | higher | lower | same score | same generated text | sign test p |",
                 "|---|---|---|---|---|---|---|---|"]
    for length in plan.lengths:
        for a, b in pairs_of:
            pairs = [(done[(a, s, n, i)], rec) for (m, s, n, i), rec in done.items()
                     if m == b and n == length and (a, s, n, i) in done]
            if plan is not PLANS["table"]:
                pairs = [(r, o) for o, r in pairs]  # first (a) against second (b)
            if not pairs:
                continue
            if any(x["prompt_sha"] != y["prompt_sha"] for x, y in pairs):
                raise SystemExit(f"{a} and {b} at {length} saw other prompts")
            higher, lower, p = paired_sign_test((r["score"], o["score"]) for o, r in pairs)
            text = sum(r["generated"] == o["generated"] for o, r in pairs)
            name = b if plan is PLANS["table"] else f"{a} vs {b}"
            lines.append(f"| {length:,} | {name} | {len(pairs)} | {higher} | {lower} | {len(pairs) - higher - lower} "
                         f"| {text} | {format_p(p)} |")
    return "\n".join(lines)


def markdown(path: Path) -> str:
    from dpe_export.evaluation.results import bootstrap_interval, format_accuracy

    done = read_done(path)
    plan = plan_of(path)
    methods = list(plan.methods)
    rows = {}
    for (method, sub, length, _), rec in done.items():
        rows.setdefault((length, sub), {}).setdefault(method, []).append(rec)
    lines = ["| length | subtask | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for (length, sub) in sorted(rows, key=lambda k: (k[0], k[1])):
        cells = []
        for method in methods:
            recs = rows[(length, sub)].get(method, [])
            if not recs:
                cells.append("–")
                continue
            scores = [r["score"] for r in recs]
            lo, hi = bootstrap_interval(scores)
            wall = sum(r["wall_s"] for r in recs) / len(recs)
            cells.append(f"{format_accuracy(sum(scores) / len(scores))} [{format_accuracy(lo, 0, False)}-"
                         f"{format_accuracy(hi, 0, False)}] n={len(scores)}, {wall:.0f} s")
        lines.append(f"| {length:,} | {sub} | " + " | ".join(cells) + " |")
        if sub == max(k[1] for k in rows if k[0] == length):  # after a length's last subtask: RULER's average
            lines.append(f"| {length:,} | **average** | " + " | ".join(
                _average(rows, length, method, plan) for method in methods) + " |")
    return "\n".join(lines)


def _average(rows: dict, length: int, method: str, plan: Plan) -> str:
    """RULER's unweighted mean over the subtasks, once every subtask of the plan has all its samples."""
    from dpe_export.evaluation.results import format_accuracy

    cells = [recs.get(method, []) for (n, _), recs in rows.items() if n == length]
    if len(cells) < len(resolve(plan)) or any(len(c) < plan.samples[length] for c in cells):
        return "–"
    return "**" + format_accuracy(sum(sum(r["score"] for r in c) / len(c) for c in cells) / len(cells)) + "**"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base")
    ap.add_argument("--export")
    ap.add_argument("--out", required=True)
    ap.add_argument("--calibrated", help="the export made from `dpe-export calibrate`'s result (--plan calibration)")
    ap.add_argument("--plan", choices=sorted(PLANS), default="table")
    ap.add_argument("--dtype", help="default: the plan's (table bfloat16, calibration float32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true", help="print the table of what the JSONL holds")
    ap.add_argument("--write-section", metavar="MD", help="write the RESULTS.md section (embedded by make_results)")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(Path(args.out)))
        return
    if args.write_section:
        Path(args.write_section).write_text(section(Path(args.out)), encoding="utf-8")
        return
    if not (args.base and args.export) or (args.plan == "calibration" and not args.calibrated):
        ap.error("--base and --export (and --calibrated for --plan calibration) are needed to run")
    run(args)


if __name__ == "__main__":
    main()
