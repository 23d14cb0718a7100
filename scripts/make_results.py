#!/usr/bin/env python
"""Regenerate benchmarks/RESULTS.md: long-context accuracy and perplexity of the testbed models.

For each model (default: the ``tests/fixtures/testbed-*`` directories that exist) with training length
L = ``config.max_position_embeddings``, at lengths L x [1, 2, 4, 8, 16]:

* methods: plain RoPE (``none``); ``linear:16``, ``dynamic:16``, ``yarn:16`` (the factor set to the largest
  extension, 16x, as these are usually configured for a 16x target); ``self-extend:L/8,G`` with the group
  size G picked by a small search; hand-set ``dpe:L/8,s1,..,s4`` (4 groups over head_dim/2 frequencies)
  picked among a few candidates by the same search;
* the search (SelfExtend and DPE candidates) scores pass-key accuracy at 8L and 16L on ``--search-samples``
  prompts each, with a seed (``--search-seed``) that the final numbers do not use; ties go to NIAH at 8L,
  then to the earlier candidate;
* every (model, method) is loaded once and runs pass-key (``--samples`` prompts per length, spread over 5
  depths), 4-needle NIAH (``--samples`` queried needles per length over 5 depths) and perplexity
  (``--ppl-windows`` windows per length);
* raw results go to ``<out>/results/<model>.json`` (written after every method; ``--resume`` skips the
  methods already there with the same settings), a NIAH depth x length heatmap per method for the first
  model to ``<out>/results/<model>-niah-<method>.png``, and the tables to ``<out>/RESULTS.md``.
  ``<out>/results/discussion.md``, ``<out>/results/calibration.md`` (the `dpe-export calibrate` measurements) and
  ``<out>/results/calibration-cost.md`` (scripts/calibration_table.py), when present, are embedded in RESULTS.md.

Usage::

    nice -n 5 python scripts/make_results.py                      # all testbeds, full size
    nice -n 5 python scripts/make_results.py --models runs/llama-v1
    nice -n 5 python scripts/make_results.py --quick --out /tmp/r  # smoke test: 2 samples, 2 lengths
    python scripts/make_results.py --render-only                  # rebuild RESULTS.md from the JSON files
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]

from dpe_export import evaluation  # noqa: E402
from dpe_export.evaluation import registry  # noqa: E402

MULTIPLES = (1, 2, 4, 8, 16)
QUICK_MULTIPLES = (1, 2)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NEEDLES = 4
SEED = 0
EXTENSION_FACTOR = 16
SE_GROUPS = (2, 4, 8, 16, 32)
DPE_CANDIDATES = ((2, 4, 8, 16), (4, 8, 16, 32), (2, 8, 32, 32), (8, 16, 32, 64))
TASK_ORDER = registry.task_names("retrieval") + registry.task_names("ppl")


def _is_ppl(task: str) -> bool:
    return registry.get_task(task).kind == "ppl"
METHOD_LABELS = {"none": "plain RoPE", "linear": "linear (PI)", "dynamic": "dynamic NTK", "yarn": "YaRN",
                 "self-extend": "SelfExtend", "dpe": "DPE (hand-set)"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def default_models() -> list[Path]:
    return sorted(p for p in (REPO / "tests" / "fixtures").glob("testbed-*") if (p / "config.json").is_file())


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def slug(method: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-")


def per_depth(total: int) -> int:
    """Samples per depth so that a length gets at least ``total`` samples over the depth grid."""
    return max(1, -(-total // len(DEPTHS)))


# ----------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------


class Bench:
    """One model: its tokenizer and prompt builder, loading methods, running the tasks on a loaded model."""

    def __init__(self, model_dir: Path, seed: int = SEED):
        from dpe_export import evaluation
        from dpe_export.evaluation.tasks import PromptBuilder
        from dpe_export.sources import loading

        self.model_dir = Path(model_dir)
        self.config = json.loads((self.model_dir / "config.json").read_text())
        self.L = int(self.config["max_position_embeddings"])
        self.head_dim = int(self.config.get("head_dim") or self.config["hidden_size"]
                            // self.config["num_attention_heads"])
        self.tokenizer = loading.load_tokenizer(self.model_dir)
        self.seed = seed
        self.builders = {}
        self._builder_cls = PromptBuilder
        self.ev = evaluation

    def builder(self, seed: int):
        if seed not in self.builders:
            self.builders[seed] = self._builder_cls(self.tokenizer, haystack_seed=self.ev.task_haystack_seed(seed))
        return self.builders[seed]

    def load(self, method: str, target_length: int):
        from dpe_export.sources import loading, methods

        spec = methods.parse_method(method)
        return loading.load_model(self.model_dir, spec, device="cpu", dtype="float32",
                                  target_length=target_length, tokenizer=self.tokenizer)

    def retrieval(self, model, task: str, lengths: Sequence[int], samples_per_depth: int, seed: int,
                  depths: Sequence[float] = DEPTHS, batch_size: int = 1):
        ev = self.ev
        gen = ev.make_generate_fn(model, self.tokenizer, ev.max_new_tokens_for(task))
        details: list[dict[str, Any]] = []
        records = ev.evaluate_task(task, self.builder(seed), gen, lengths, depths, samples_per_depth, NEEDLES,
                                   seed=seed, batch_size=batch_size, details_out=details)
        return records, details

    def ppl(self, model, lengths: Sequence[int], windows: int, seed: int):
        return self.ev.evaluate_ppl(model, self.tokenizer, lengths, windows, seed)

    def result(self, task: str, method: str, records, details, settings) -> Any:
        return self.ev.EvalResult(task, str(self.model_dir), method, self.seed, records, settings, details)


def overall_accuracy(records: Sequence[dict[str, Any]], length: int) -> float:
    acc = evaluation.EvalResult("passkey", "", "", 0, list(records)).accuracy_at(length)
    return float("nan") if acc is None else acc


def search(bench: Bench, kind: str, candidates: Sequence[str], lengths: Sequence[int], samples: int,
           seed: int, batch_size: int) -> dict[str, Any]:
    """Score each candidate method by pass-key accuracy averaged over ``lengths`` (NIAH at the first length
    breaks ties); return the scores and the winner."""
    import torch

    spd = per_depth(samples)
    rows = []
    for method in candidates:
        t0 = time.perf_counter()
        loaded = bench.load(method, max(lengths))
        pk, _ = bench.retrieval(loaded.model, "passkey", lengths, spd, seed, batch_size=batch_size)
        nh, _ = bench.retrieval(loaded.model, "niah", lengths[:1], spd, seed, batch_size=batch_size)
        row = {"method": method, "passkey": {str(n): overall_accuracy(pk, n) for n in lengths},
               "niah": {str(lengths[0]): overall_accuracy(nh, lengths[0])},
               "passkey_samples_per_length": spd * len(DEPTHS), "niah_samples": spd * len(DEPTHS),
               "seconds": round(time.perf_counter() - t0, 1)}
        row["score"] = sum(row["passkey"].values()) / len(lengths)
        rows.append(row)
        log(f"  search {method}: passkey {row['passkey']} niah {row['niah']} ({row['seconds']} s)")
        del loaded
        torch.manual_seed(0)
    best = max(rows, key=lambda r: (r["score"], r["niah"][str(lengths[0])], -rows.index(r)))
    return {"kind": kind, "lengths": list(lengths), "seed": seed, "rows": rows, "best": best["method"]}


def run_model(model_dir: Path, args, out_dir: Path, plot: bool) -> dict[str, Any]:
    import torch

    t_start = time.perf_counter()
    bench = Bench(model_dir, SEED)
    L = bench.L
    multiples = QUICK_MULTIPLES if args.quick else MULTIPLES
    lengths = [L * m for m in multiples]
    window = max(1, L // 8)
    name = model_dir.name
    json_path = out_dir / "results" / f"{name}.json"
    settings = {"lengths": lengths, "samples": args.samples, "depths": list(DEPTHS), "needles": NEEDLES,
                "ppl_windows": args.ppl_windows, "seed": SEED, "search_seed": args.search_seed,
                "search_samples": args.search_samples, "quick": bool(args.quick), "batch_size": args.batch_size}
    data: dict[str, Any] = {}
    if args.resume and json_path.is_file():
        old = json.loads(json_path.read_text())
        if old.get("settings") == settings and old.get("model_dir") == str(model_dir):
            data = old
            log(f"{name}: resuming, {len(old.get('methods', {}))} method(s) already measured")
    if not data:
        data = {"model": name, "model_dir": str(model_dir), "pretrain_length": L, "head_dim": bench.head_dim,
                "settings": settings, "machine": machine_info(), "search": {}, "methods": {}}
    data["command"] = args.command
    spent_before = float(data.get("wall_s", 0.0))

    def save():
        data["wall_s"] = round(spent_before + time.perf_counter() - t_start, 1)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_path.with_name(f".{json_path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, json_path)

    # searches: SelfExtend group size, DPE scales (held-out seed, fewer samples)
    search_lengths = [L * m for m in ((2,) if args.quick else (8, 16))]
    if "self-extend" not in data["search"]:
        cands = [f"self-extend:{window},{g}" for g in (SE_GROUPS[:2] if args.quick else SE_GROUPS)]
        log(f"{name}: SelfExtend search over {cands}")
        data["search"]["self-extend"] = search(bench, "self-extend", cands, search_lengths, args.search_samples,
                                               args.search_seed, args.batch_size)
        save()
    if "dpe" not in data["search"]:
        cands = [f"dpe:{window}," + ",".join(map(str, s)) for s in (DPE_CANDIDATES[:2] if args.quick
                                                                      else DPE_CANDIDATES)]
        log(f"{name}: DPE search over {cands}")
        data["search"]["dpe"] = search(bench, "dpe", cands, search_lengths, args.search_samples,
                                       args.search_seed, args.batch_size)
        save()

    method_list = ["none"] + [f"{k}:{EXTENSION_FACTOR}" for k in ("linear", "dynamic", "yarn")] + [
        data["search"]["self-extend"]["best"], data["search"]["dpe"]["best"]]
    spd = per_depth(args.samples)
    for method in method_list:
        if method in data["methods"]:
            continue
        t0 = time.perf_counter()
        loaded = bench.load(method, max(lengths))
        entry: dict[str, Any] = {"method": method, "model_kind": loaded.describe(), "tasks": {}, "seconds": {}}
        for task in TASK_ORDER:
            t1 = time.perf_counter()
            if _is_ppl(task):
                records, details = bench.ppl(loaded.model, lengths, args.ppl_windows, SEED), []
                task_settings = {"lengths": lengths, "samples": args.ppl_windows}
            else:
                records, details = bench.retrieval(loaded.model, task, lengths, spd, SEED,
                                                   batch_size=args.batch_size)
                task_settings = {"lengths": lengths, "samples": spd, "depths": list(DEPTHS),
                                 "needles": NEEDLES if registry.get_task(task).uses_needles else None}
            res = bench.result(task, method, records, details, task_settings)
            entry["tasks"][task] = res.to_dict()
            entry["seconds"][task] = round(time.perf_counter() - t1, 1)
            summary = ", ".join(
                f"{o['length']}: " + (f"{o['perplexity']:.3g}" if _is_ppl(task) else f"{100 * o['accuracy']:.0f}%")
                for o in res.overall())
            log(f"{name} {method} {task}: {summary} ({entry['seconds'][task]} s)")
            if plot and task == "niah":
                from dpe_export.evaluation.plots import plot_result

                plot_result(res, out_dir / "results" / f"{name}-niah-{slug(method)}.png")
        entry["seconds"]["total"] = round(time.perf_counter() - t0, 1)
        data["methods"][method] = entry
        save()
        del loaded
        torch.manual_seed(0)
    save()
    if plot:  # heatmaps of methods measured in an earlier (resumed) run
        from dpe_export.evaluation.plots import plot_result

        for method, entry in data["methods"].items():
            png = out_dir / "results" / f"{name}-niah-{slug(method)}.png"
            if not png.is_file():
                plot_result(_as_result(entry["tasks"]["niah"]), png)
    log(f"{name}: done in {data['wall_s']} s")
    return data


def _as_result(d: dict[str, Any]):
    return evaluation.EvalResult.from_json(d)


# ----------------------------------------------------------------------------------------------------------
# RESULTS.md
# ----------------------------------------------------------------------------------------------------------


def _overall(task_dict: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(o["length"]): o for o in task_dict["overall"]}


def _rel(path: str) -> str:
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return path


def _label(method: str) -> str:
    kind = method.split(":", 1)[0]
    return f"{METHOD_LABELS.get(kind, kind)} `{method}`"


def _fmt_ppl(x: Optional[float]) -> str:
    return "-" if x is None or not math.isfinite(x) else evaluation.format_ppl(x, 5)


def task_table(data: dict[str, Any], task: str) -> list[str]:
    lengths = data["settings"]["lengths"]
    L = data["pretrain_length"]
    head = ["method"] + [f"{n} ({n // L}x)" for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best: dict[int, float] = {}
    cells: dict[str, dict[int, float]] = {}
    for method, entry in data["methods"].items():
        ov = _overall(entry["tasks"][task])
        cells[method] = {n: (ov[n]["perplexity"] if _is_ppl(task) else ov[n]["accuracy"]) for n in lengths if n in ov}
    for n in lengths:
        vals = [c[n] for c in cells.values() if n in c and c[n] is not None and math.isfinite(c[n])]
        if vals:
            best[n] = min(vals) if _is_ppl(task) else max(vals)
    for method, c in cells.items():
        row = [_label(method)]
        for n in lengths:
            v = c.get(n)
            if v is None:
                row.append("-")
                continue
            text = _fmt_ppl(v) if _is_ppl(task) else f"{100 * v:.0f}"
            row.append(f"**{text}**" if n in best and v == best[n] else text)
        lines.append("| " + " | ".join(row) + " |")
    return lines


def samples_note(data: dict[str, Any], task: str) -> str:
    entry = next(iter(data["methods"].values()))
    ov = next(iter(_overall(entry["tasks"][task]).values()))
    if task == "passkey":
        return f"pass-key accuracy %, {ov['samples']} prompts per length ({len(DEPTHS)} depths)"
    if task == "niah":
        return (f"{NEEDLES}-needle NIAH accuracy %, {ov['samples']} queried needles per length "
                f"({len(DEPTHS)} depths, {NEEDLES} needles per context)")
    return f"perplexity (lower is better), {ov['samples']} windows of exactly that many tokens per length"


def dpe_comparison(data: dict[str, Any]) -> list[str]:
    """Facts: per task and length, DPE against plain RoPE and against the best other method."""
    dpe = next((m for m in data["methods"] if m.startswith("dpe:")), None)
    if dpe is None:
        return []
    lengths = data["settings"]["lengths"]
    out = []
    for task in TASK_ORDER:
        wins, losses, ties = [], [], []
        for n in lengths:
            vals = {}
            for m, e in data["methods"].items():
                o = _overall(e["tasks"][task]).get(n)
                if o is not None:
                    vals[m] = o["perplexity"] if _is_ppl(task) else o["accuracy"]
            if dpe not in vals or len(vals) < 2:
                continue
            others = {m: v for m, v in vals.items() if m != dpe}
            if _is_ppl(task):
                bm = min(others, key=others.get)
                d = vals[dpe] - others[bm]
                better, worse = d < -1e-9, d > 1e-9
                desc = f"{n}: DPE {_fmt_ppl(vals[dpe])} vs {bm} {_fmt_ppl(others[bm])}"
            else:
                bm = max(others, key=others.get)
                d = vals[dpe] - others[bm]
                better, worse = d > 1e-9, d < -1e-9
                desc = f"{n}: DPE {100 * vals[dpe]:.0f}% vs {bm} {100 * others[bm]:.0f}%"
            (wins if better else losses if worse else ties).append(desc)
        name = {"passkey": "pass-key", "niah": "NIAH", "ppl": "perplexity"}[task]
        parts = []
        if wins:
            parts.append("ahead of every other method at " + "; ".join(wins))
        if ties:
            parts.append("tied with the best other method at " + "; ".join(ties))
        if losses:
            parts.append("**behind** the best other method at " + "; ".join(losses))
        out.append(f"* {name}: " + " — ".join(parts) + ".")
    return out


def search_table(s: dict[str, Any]) -> list[str]:
    lengths = s["lengths"]
    niah_len = next(iter(s["rows"][0]["niah"]))
    n_pk = s["rows"][0]["passkey_samples_per_length"]
    head = ["candidate"] + [f"passkey @{n}" for n in lengths] + [f"NIAH @{niah_len}", "score", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in s["rows"]:
        mark = " (chosen)" if r["method"] == s["best"] else ""
        row = [f"`{r['method']}`{mark}"] + [f"{100 * r['passkey'][str(n)]:.0f}" for n in lengths] + [
            f"{100 * r['niah'][niah_len]:.0f}", f"{100 * r['score']:.0f}", f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"({n_pk} pass-key prompts per length and {r['niah_samples']} NIAH needles, seed {s['seed']}, "
                 "which the final tables do not use; score = mean pass-key accuracy over the search lengths, "
                 "ties broken by NIAH, then by list order.)")
    return lines


def render(results: Sequence[dict[str, Any]], out_dir: Path, missing: Sequence[str] = (),
           notes: Optional[str] = None, calibration: Optional[str] = None, real_model: Optional[str] = None) -> str:
    lines = ["# Results: long-context retrieval on Gemma-3-270M and on the testbed models", "",
             "Generated by `scripts/make_results.py` from the files in `benchmarks/results/` "
             "(do not edit the tables by hand; rerun the script; the Gemma-3-270M section comes from "
             "`scripts/gemma_table.py --markdown`).", ""]
    if real_model:
        lines += [real_model.rstrip("\n"), ""]
    if results:
        m = results[0]["machine"]
        lines += ["## Setup", "",
                  f"* Machine: {m['machine']} CPU ({m['cpu']}), {m['cpu_count']} cores shared with other jobs, "
                  f"torch threads = {m['torch_threads']}, float32, sdpa attention; Python {m['python']}, "
                  f"torch {m['torch']}, transformers {m['transformers']}.",
                  "* Commands and wall times: " + "; ".join(
                      f"{r['model']}: `{r.get('command', '')}` ({r['wall_s'] / 60:.1f} min)" for r in results) + ".",
                  "* Lengths: 1x, 2x, 4x, 8x, 16x the training length L (= `max_position_embeddings`). "
                  "Greedy decoding, exact-length prompts from `dpe_export.evaluation.tasks` on generated haystack text, "
                  f"seed {results[0]['settings']['seed']} (the same prompts for every method).",
                  f"* `linear`, `dynamic` and `yarn` use factor {EXTENSION_FACTOR}: the largest extension "
                  "measured (16x), the standard way these are configured for a 16x target length. At shorter "
                  "lengths a smaller factor would do better for linear/YaRN; one factor for all lengths is "
                  "what a deployed checkpoint has. Dynamic NTK only changes RoPE once a sequence exceeds L.",
                  "* SelfExtend and DPE use window W = L/8; SelfExtend's group size and DPE's per-group scales "
                  "(4 groups over the head_dim/2 rotary frequencies, the first group = the highest frequencies) were picked "
                  "by the held-out search below (seed 1; a model's note says where that was not blind to the "
                  "reported prompts).", ""]
    for data in results:
        L = data["pretrain_length"]
        title = data["model"]
        lines += [f"## {title}", "",
                  f"`{_rel(data['model_dir'])}`, L = {L}, head_dim {data['head_dim']} "
                  f"({data['head_dim'] // 2} rotary frequencies). Wall time {data['wall_s'] / 60:.1f} min.", ""]
        if data.get("note"):
            lines += [data["note"], ""]
        for task in TASK_ORDER:
            if not data["methods"]:
                break
            lines += [f"### {task} — {samples_note(data, task)}", ""] + task_table(data, task) + [""]
        lines += ["Best value per column in bold. Per-depth numbers and every generated answer are in "
                  f"`benchmarks/results/{data['model']}.json`.", ""]
        comp = dpe_comparison(data)
        if comp:
            n = next(iter(_overall(next(iter(data["methods"].values()))["tasks"]["passkey"]).values()))["samples"]
            half = 100 * 1.96 * math.sqrt(0.25 / n)
            lines += ["### DPE against the other methods (measured)", ""] + comp + [
                "", f"With {n} samples per cell a binomial 95% interval is up to ±{half:.0f} points wide, so "
                "accuracy differences of less than about that are not evidence either way.", ""]
        for kind in ("self-extend", "dpe"):
            s = data["search"].get(kind)
            if s:
                lines += [f"### {'SelfExtend group size' if kind == 'self-extend' else 'DPE scale'} search", ""]
                lines += search_table(s) + [""]
        pngs = [(m, f"results/{data['model']}-niah-{slug(m)}.png") for m in data["methods"]]
        pngs = [(m, p) for m, p in pngs if (out_dir / p).is_file()]
        if pngs:
            lines += ["### NIAH heatmaps (depth x length, % of needles retrieved)", ""]
            for m, p in pngs:
                lines += [f"**{_label(m)}**", "", f"![NIAH {m}]({p})", ""]
    if missing:
        lines += ["## Not yet run", ""] + [f"* {m}" for m in missing] + [""]
    if notes:
        lines += ["## Discussion", "", notes.strip(), ""]
    if calibration:
        lines += [calibration.strip(), ""]
    return "\n".join(lines)


def write_results_md(out_dir: Path, results: Sequence[dict[str, Any]], missing: Sequence[str]) -> Path:
    def embedded(name: str) -> Optional[str]:
        path = out_dir / "results" / name
        return path.read_text() if path.is_file() else None

    path = out_dir / "RESULTS.md"
    real = "\n".join(x for x in (embedded("gemma3-270m.md"), embedded("gemma3-270m-ruler.md"),
                                 embedded("gemma3-270m-ruler-notes.md"), embedded("gemma3-270m-ruler-float32.md"),
                                 embedded("positional-heads.md"), embedded("speed.md"), embedded("serving.md"),
                                 embedded("vllm-cpu.md")) if x)
    calibration = "\n".join(x for x in (embedded("calibration.md"), embedded("calibration-cost.md")) if x)
    path.write_text(render(results, out_dir, missing, embedded("discussion.md"), calibration or None, real))
    return path


def load_results(out_dir: Path) -> list[dict[str, Any]]:
    """The per-model result files in ``out_dir/results`` (the testbed fixtures first)."""
    results = [json.loads(f.read_text()) for f in sorted((out_dir / "results").glob("*.json"))]
    results = [r for r in results if isinstance(r, dict) and "methods" in r and "settings" in r]
    return sorted(results, key=lambda r: (not r["model"].startswith("testbed-"), r["model"]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", type=Path, help="model dirs (default: tests/fixtures/testbed-*)")
    p.add_argument("--samples", type=int, default=50, help="pass-key prompts / NIAH needles per length (>= 50)")
    p.add_argument("--ppl-windows", type=int, default=4, help="perplexity windows per length")
    p.add_argument("--search-samples", type=int, default=20, help="pass-key prompts per length in the searches")
    p.add_argument("--search-seed", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 samples, lengths L and 2L")
    p.add_argument("--resume", action="store_true", help="skip methods already in the JSON with the same settings")
    p.add_argument("--note", action="append", default=[], metavar="MODEL=TEXT",
                   help="a note shown under a model's heading (e.g. why it is not the final testbed)")
    p.add_argument("--render-only", action="store_true", help="only rebuild RESULTS.md from the JSON files")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    args.command = " ".join(["python scripts/make_results.py"] + [shlex.quote(a) for a in given])
    if args.quick:
        args.samples, args.search_samples, args.ppl_windows = 2, 2, 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out_dir = args.out
    (out_dir / "results").mkdir(parents=True, exist_ok=True)
    models = args.models or default_models()
    expected = [REPO / "tests" / "fixtures" / f"testbed-{f}" for f in ("llama", "qwen2", "mistral")]
    missing = [f"`tests/fixtures/{e.name}` (not present when this was generated)" for e in expected
               if not (e / "config.json").is_file()]
    notes = dict(n.split("=", 1) for n in args.note)

    if args.render_only:
        results = load_results(out_dir)
    else:
        if not models:
            p.error("no tests/fixtures/testbed-* model found; give --models DIR ...")
        results = []
        for i, m in enumerate(models):
            data = run_model(Path(m), args, out_dir, plot=(i == 0))
            if m.name in notes:
                data["note"] = notes[m.name]
                (out_dir / "results" / f"{m.name}.json").write_text(json.dumps(data, indent=1) + "\n")
            results.append(data)
        if not args.quick:  # models measured by earlier runs stay in RESULTS.md, after these
            done = {r["model"] for r in results}
            results += [r for r in load_results(out_dir) if r["model"] not in done and not r["settings"]["quick"]]
    path = write_results_md(out_dir, results, missing)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
