"""The calibration cost model and decision-quality tables of benchmarks/RESULTS.md, from
benchmarks/results/calibration-cost.jsonl (benchmarks/bench_calibration.py), calibration-quality.jsonl
(scripts/calibration_quality.py), calibration-cost-notes.md (the findings, by hand) and the full grid's files (calibration-testbed-*-niah.json and the held-out
eval-testbed-*-dpe-calibrated-niah-*.json).

    python scripts/calibration_table.py > benchmarks/results/calibration-cost.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from dpe_export.calibration.paired import planned_units  # noqa: E402
from dpe_export.evaluation import format_p, sign_test  # noqa: E402
from dpe_export.evaluation.generation import PREFILL_CHUNK  # noqa: E402
LENGTHS = (1024, 2048, 4096)


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def read_jsonl(name: str) -> list[dict]:
    path = RESULTS / name
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def human(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def cost_section() -> list[str]:
    rows = []
    latest, other_chunk = {}, []
    for r in read_jsonl("calibration-cost.jsonl"):  # per (model, length) at the shipped chunk: the newest quiet one
        if r.get("paired_prefill_chunk", PREFILL_CHUNK) != PREFILL_CHUNK:
            other_chunk.append(r)
            continue
        where = (r["model"], r["target_length"])
        if where not in latest or not r.get("other_busy_processes") or latest[where].get("other_busy_processes"):
            latest[where] = r
    for r in latest.values():
        g, p = r["grid"], dict(r["paired"])
        # the race's prefills at most (paired.planned_units, recomputed: the records' own count may predate it)
        plan = SimpleNamespace(scales=r["scales"], samples=2)
        p["prefills_at_most"] = planned_units(plan, list(range(r["groups"])))
        p["tokens"] = p["prefills_at_most"] * r["target_length"]
        replay = r.get("paired_replay_seconds") or r["paired_context_seconds"]
        p["seconds"] = 2 * r["paired_context_seconds"] + (p["prefills_at_most"] - 2) * replay
        r = dict(r, speedup=g["seconds"] / p["seconds"])
        rows.append([Path(r["model"]).name, f"{r['target_length']:,}", f"{r['groups']} x {len(r['scales'])}",
                     f"{r['grid_query_seconds']:.1f}",
                     f"{r['paired_context_seconds']:.1f}" + (f" / {r['paired_replay_seconds']:.1f}"
                                                             if r.get("paired_replay_seconds") else ""),
                     f"{g['prefills']:,} ({g['cells']} x {g['queries_per_cell']})", f"{g['tokens'] / 1e6:,.1f}M",
                     human(g["seconds"]), f"<= {p['prefills_at_most']}", f"{p['tokens'] / 1e6:,.1f}M",
                     human(p["seconds"]), f"{r['speedup']:.0f}x",
                     "yes" if r.get("other_busy_processes") else "no"])
    if not rows:
        return []
    return [
        "### Cost model: what one unit costs, and a whole calibration by procedure",
        "",
        "Measured with `benchmarks/bench_calibration.py` (the reference setting applied; a warm-up on a short prompt "
        "first). A grid query is one NIAH prompt prefilled and its answer decoded greedily; a grid cell is 8 "
        "contexts x 4 needles = 32 of them. A paired context is one prefill of a 16-needle context and every "
        "needle's value scored from a copy of its cache; the first setting of a context runs every layer, the "
        "others replay the layers before the first DPE layer (Gemma 3: 5 of 18), the second time shown. Both "
        "procedures prefill in 1024-token chunks. "
        "Whole-calibration seconds are units x the measured unit time (the paired count is an upper bound: with "
        "the reference setting shared by every group, fewer prefills usually run).",
        "",
        *table(["model", "T", "groups x scales", "grid query (s)", "paired context (s): first / replayed",
                "grid prompts",
                "grid tokens", "grid time", "paired prefills", "paired tokens", "paired time", "ratio",
                "cores shared"], rows),
        "",
        *([f"A paired context in {other_chunk[0]['paired_prefill_chunk']}-token chunks took "
           + ", ".join(f"{r['paired_context_seconds']:.1f} s at {r['target_length']:,}" for r in other_chunk)
           + ": slower, so the procedure keeps 1024.", ""] if other_chunk else []),
    ]


def heldout(task_details) -> dict:
    return {(a, b, c): d for a, b, c, d in task_details}


def against_grid(runs: list[dict]) -> list[list]:
    """One row per run: its choice and held-out accuracy against the full grid's export, prompt by prompt."""
    rows = []
    for r in runs:
        m = r["model"].replace("testbed-", "")
        grid = json.loads((RESULTS / f"calibration-testbed-{m}-niah.json").read_text())
        prefills = f" ({r['prefills']} prefills)" if r.get("prefills") else ""
        row = [r["model"], r["seed"], ",".join(map(str, r["chosen"])), ",".join(map(str, grid["chosen"])),
               f"{r['calibrate_seconds']:.0f} s{prefills}" +
               (" *" if r.get("other_jobs_at_start") or r.get("other_jobs_at_end") else "")]
        for task in ("passkey", "niah"):
            g = json.loads((RESULTS / f"eval-testbed-{m}-dpe-calibrated-niah-{task}.json").read_text())
            gd = {(d["length"], d["depth"], d["sample"]): d["correct"] for d in g["details"]}
            pd = heldout(r["held_out"][task]["correct"])
            for length in LENGTHS:
                keys = [k for k in pd if k[0] == length]
                pa = 100 * sum(pd[k] for k in keys) / len(keys)
                ga = 100 * sum(gd[k] for k in keys) / len(keys)
                up = sum(pd[k] and not gd[k] for k in keys)
                down = sum(gd[k] and not pd[k] for k in keys)
                row.append(f"{pa:.0f} / {ga:.0f} (+{up} -{down}, p={format_p(sign_test(up, down))})")
        rows.append(row)
    return rows


TWO_LENGTH_RULES = {  # tie-rule-study.jsonl rule -> (title, what it does)
    "best-mean": ("The default since 0.3.0: contexts at 8x and 16x, the best mean, against the full grid",
                  "the scale of each group the best mean likelihood among the finalists (no tie rule)"),
    "short-wavelength-largest": (
        "A candidate rule: the default, except that short-wavelength groups take the largest scale",
        "as the default, except that a group whose slowest frequency turns within the pretraining length "
        "(2 pi / theta < L: group 0 on all three testbeds) takes the largest candidate scale (128)"),
}


def seed_agreement(runs: list[dict]) -> list[list]:
    """Every pair of calibration seeds of a testbed: groups that agree, and A against B on the held-out prompts."""
    by_model: dict[str, dict[int, dict]] = {}
    for r in runs:
        by_model.setdefault(r["model"], {})[r["seed"]] = r
    rows = []
    for model, seeds in by_model.items():
        ordered = sorted(seeds.items())
        for i, (s1, a) in enumerate(ordered):
            for s2, b in ordered[i + 1:]:
                same = sum(x == y for x, y in zip(a["chosen"], b["chosen"]))
                diffs = []
                for task in ("passkey", "niah"):
                    pa, pb = heldout(a["held_out"][task]["correct"]), heldout(b["held_out"][task]["correct"])
                    up = sum(pa[k] and not pb[k] for k in pa)
                    down = sum(pb[k] and not pa[k] for k in pa)
                    diffs.append(f"{task}: +{up} -{down} (p={format_p(sign_test(up, down))})")
                rows.append([model, f"{s1}: {','.join(map(str, a['chosen']))}",
                             f"{s2}: {','.join(map(str, b['chosen']))}", f"{same} of {len(a['chosen'])}",
                             "; ".join(diffs)])
    return rows


def candidate_section() -> list[str]:
    """The two-length procedure (tie-rule-study.jsonl: contexts at 8x and 16x) under each rule, against the grid,
    and its seeds against each other."""
    lines = []
    study = [r for r in read_jsonl("tie-rule-study.jsonl") if r.get("context_lengths") == "2048,4096"]
    # a rule added later picks from the same race cells (reused, 0 s): show the race's own time
    race = {(r["model"], r["seed"]): r for r in study if r["calibrate_seconds"] > 0}
    for rule, (title, what) in TWO_LENGTH_RULES.items():
        runs = [r if r["calibrate_seconds"] > 0 or (r["model"], r["seed"]) not in race else
                {**r, **{k: race[(r["model"], r["seed"])][k] for k in ("calibrate_seconds", "other_jobs_at_start",
                                                                         "other_jobs_at_end")}}
                for r in study if r["rule"] == rule]
        if not runs:
            continue
        runs.sort(key=lambda r: (r["model"], r["seed"]))
        header = ["model", "seed", "chose", "grid chose", "calibration time"]
        header += [f"{t} {n // 256}x" for t in ("pass-key", "NIAH") for n in LENGTHS]
        lines += [f"### {title}", "",
                  f"`calibrate --context-lengths 2048,4096` on each testbed and seed, {what} "
                  "(scripts/tie_rule_study.py), on the same held-out prompts as above. Cells: this / grid accuracy "
                  "in %, prompts only this export got (+) and only the grid's (-), two-sided sign test p.", "",
                  *table(header, against_grid(runs)), "",
                  "Its calibration seeds against each other (held-out prompts of all three lengths pooled):", "",
                  *table(["model", "seed A", "seed B", "groups that agree", "A against B, held out"],
                         seed_agreement(runs)), ""]
    return lines


def quality_section() -> list[str]:
    runs = read_jsonl("calibration-quality.jsonl")
    if not runs:
        return []
    lines = [
        "### Decision quality: the paired choice against the full grid's, on held-out prompts",
        "",
        "Each testbed calibrated for 16x (T = 4096, W = 32, 4 groups x scales 1-128) with the default `paired` "
        "procedure, once per calibration seed; converted; evaluated on the held-out prompts of the tables above "
        "(seed 0, 50 pass-key prompts and 50 NIAH needles per length), the same prompts the full grid's export "
        "(`--procedure grid`, seed 1234) was evaluated on. Cells: paired / grid accuracy in %, then prompts only "
        "the paired export got (+) and only the grid's export got (-), and the two-sided sign test p. Calibration "
        "time: one thread (the grid: 505 s for testbed-llama on quiet cores, 2026-11-22).",
        "",
    ]
    header = ["model", "seed", "paired chose", "grid chose", "paired time"]
    header += [f"{t} {n // 256}x" for t in ("pass-key", "NIAH") for n in LENGTHS]
    lines += table(header, against_grid(runs))
    lines += ["", "`*`: other jobs shared the two cores during the run (its time is an overestimate).", ""]
    agree = seed_agreement(runs)
    if agree:
        lines += ["Two calibration seeds against each other (held-out prompts of all three lengths pooled):", ""]
        lines += table(["model", "seed A", "seed B", "groups that agree", "A against B, held out"], agree)
        lines.append("")
    return lines


def main() -> int:
    lines = ["## Calibration cost and decision quality", ""]
    lines += cost_section()
    lines += quality_section()
    lines += candidate_section()
    notes = RESULTS / "calibration-cost-notes.md"
    if notes.is_file():
        lines += [notes.read_text().rstrip("\n"), ""]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
