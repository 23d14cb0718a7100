"""RULER on Gemma-3-270M, inside its 32K context: base vs DPE export vs SelfExtend, through lm-eval.

Every sample's result is appended to a JSONL file as its chunk finishes, so a run that is cut off resumes
where it stopped. Lengths run shortest first, every method at a length before the next length. Each model is
loaded once per run; lm-eval's max_length is the longest length of the plan for every model (so no prompt is
cut and every model gets the same setting), and every model gets the same prompts (checked by hash).

    python scripts/gemma_ruler.py --base /path/gemma3-270m-base --export /path/gemma3-270m-dpe \
        --out benchmarks/results/gemma3-270m-ruler.jsonl
    python scripts/gemma_ruler.py --out benchmarks/results/gemma3-270m-ruler.jsonl --markdown
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

K = 1024
LENGTHS = (4 * K, 8 * K, 16 * K)
METHODS = {"base": ("base", "none"), "dpe": ("export", "none"), "self-extend": ("base", "self-extend:4096,2")}
CHUNK = 5  # samples per lm-eval run (and per JSONL append)
# 8K and 16K before the rest of 4K: below DPE's and SelfExtend's 4096-token window every distance is local, so at
# 4K both equal the base model (checked on their first samples) and the longer lengths are the informative ones.
PLAN = [(length, method) for length in (8 * K, 16 * K, 4 * K) for method in METHODS]


def prefill_chunk(length: int):
    """Prompt tokens per forward in generate: whole at 4K (as the first cells ran), 2,048-token chunks beyond
    (the same tokens up to float error, 2-3x faster: see generation.set_generate_prefill_chunk)."""
    from dpe_export.evaluation.generation import GENERATE_PREFILL_CHUNK

    return None if length <= 4 * K else GENERATE_PREFILL_CHUNK


def samples_wanted(length: int) -> int:
    return 10 if length <= 8 * K else 5


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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dirs = {"base": args.base, "export": args.export}
    subtasks = ruler.resolve_subtasks("ruler")
    tokenizer = load_tokenizer(args.base)
    max_length = max(LENGTHS)
    loaded: dict[str, object] = {}
    for length, method in PLAN:
        which, spec = METHODS[method]
        chunk = prefill_chunk(length)
        for sub in subtasks:
            done = read_done(out)
            missing = [i for i in range(samples_wanted(length)) if (method, sub.name, length, i) not in done]
            while missing:
                ids, missing = missing[:CHUNK], missing[CHUNK:]
                if method not in loaded:
                    loaded.clear()  # one model in memory at a time
                    model = load_model(dirs[which], parse_method(spec), device="cpu", dtype=args.dtype,
                                       target_length=max_length, tokenizer=tokenizer,
                                       trust_remote_code=which == "export").model
                    loaded[method] = harness.make_lm(model, tokenizer, max_length)
                set_generate_prefill_chunk(loaded[method].model, chunk)
                t0 = time.time()
                _, details = ruler.run_ruler_on(loaded[method], tokenizer, [sub], [length], len(ids),
                                                sample_ids=ids)
                wall = (time.time() - t0) / len(details)
                with out.open("a", encoding="utf-8") as f:
                    for d in details:
                        f.write(json.dumps({"method": method, "spec": spec, **d, "wall_s": round(wall, 1),
                                            "max_length": max_length, "prefill_chunk": chunk, "dtype": args.dtype,
                                            "threads": args.threads, "machine": MACHINE}) + "\n")
                print(f"{method} {sub.name} {length}: samples {ids} "
                      f"{sum(d['score'] for d in details) / len(details):.2f} ({wall:.0f} s/sample)", flush=True)


MACHINE = f"{platform.machine()}, {os.cpu_count()} cores"


def section(path: Path) -> str:
    """The RESULTS.md section: what ran, how, the table, and how much of the plan is done."""
    done = read_done(path)
    planned = sum(samples_wanted(n) for n in LENGTHS) * len(METHODS) * 6
    machines = sorted({r.get("machine", "?") for r in done.values()})
    head = [
        "### Gemma-3-270M: RULER through lm-evaluation-harness (inside its 32K context)", "",
        (f"**All {planned} planned samples measured**" if len(done) >= planned else
         f"**In progress: {len(done)} of {planned} planned samples measured**") + " (plan: lm-eval's six offline RULER "
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
    notes: dict[tuple, list[int]] = {}
    for r in done.values():
        if r.get("note"):
            notes.setdefault((r["length"], r["method"], r["subtask"], r["note"]), []).append(r["sample"])
    tail = [""] + [f"* {m}, {s}, {n:,}, samples {', '.join(map(str, sorted(ids)))}: {note}."
                   for (n, m, s, note), ids in sorted(notes.items())] if notes else []
    return ("\n".join(head) + "\n" + markdown(path) + "\n" + "\n".join(tail) + ("\n" if tail else "")
            + "\n" + paired(path) + "\n")


def sign_test(higher: int, lower: int) -> float:
    """Exact two-sided sign test over the prompts whose scores differ (ties dropped)."""
    n, k = higher + lower, min(higher, lower)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired(path: Path) -> str:
    """Each method against the base model prompt by prompt (the same prompts: their hashes are checked)."""
    done = read_done(path)
    lines = ["Prompt by prompt against the base model (a prompt's score is lm-eval's, 0-1; the sign test drops ties):",
             "", "| length | method | prompts | higher | lower | same score | same generated text | sign test p |",
             "|---|---|---|---|---|---|---|---|"]
    for length in LENGTHS:
        for method in METHODS:
            if method == "base":
                continue
            pairs = [(done[("base", s, n, i)], rec) for (m, s, n, i), rec in done.items()
                     if m == method and n == length and ("base", s, n, i) in done]
            if not pairs:
                continue
            if any(b["prompt_sha"] != r["prompt_sha"] for b, r in pairs):
                raise SystemExit(f"{method} at {length} saw other prompts than the base model")
            higher = sum(r["score"] > b["score"] for b, r in pairs)
            lower = sum(r["score"] < b["score"] for b, r in pairs)
            text = sum(r["generated"] == b["generated"] for b, r in pairs)
            lines.append(f"| {length:,} | {method} | {len(pairs)} | {higher} | {lower} | {len(pairs) - higher - lower} "
                         f"| {text} | {sign_test(higher, lower):.2f} |")
    return "\n".join(lines)


def markdown(path: Path) -> str:
    from dpe_export.evaluation.results import bootstrap_interval, format_accuracy

    done = read_done(path)
    rows = {}
    for (method, sub, length, _), rec in done.items():
        rows.setdefault((length, sub), {}).setdefault(method, []).append(rec)
    lines = ["| length | subtask | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for (length, sub) in sorted(rows, key=lambda k: (k[0], k[1])):
        cells = []
        for method in METHODS:
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
                _average(rows, length, method) for method in METHODS) + " |")
    return "\n".join(lines)


def _average(rows: dict, length: int, method: str) -> str:
    """RULER's unweighted mean over the subtasks, once every subtask of the plan has all its samples."""
    from dpe_export.evaluation.results import format_accuracy

    cells = [recs.get(method, []) for (n, _), recs in rows.items() if n == length]
    if len(cells) < 6 or any(len(c) < samples_wanted(length) for c in cells):
        return "–"
    return "**" + format_accuracy(sum(sum(r["score"] for r in c) / len(c) for c in cells) / len(cells)) + "**"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base")
    ap.add_argument("--export")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="bfloat16")
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
    if not (args.base and args.export):
        ap.error("--base and --export are needed to run")
    run(args)


if __name__ == "__main__":
    main()
