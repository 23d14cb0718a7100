"""Run vLLM on a model in a process of its own (vLLM keeps global state) and print what it generated, as JSON.

    python tests/vllm_runner.py SPEC_JSON

SPEC: {"model": dir, "engine": {LLM keyword arguments}, "prompts": [[token ids], ...], "max_tokens": n,
"rounds": r (the same prompts r times, all submitted together each round: round 2 on finds them in the prefix
cache when it is on)}. Prints one line `RESULT {"rounds": [[{"tokens": [...], "cached": n}, ...], ...],
"preemptions": n, "arch": ..., "ttft_s": [...], "seconds": [...]}`. Greedy sampling, float32.
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _counter(metrics, word: str) -> int:
    total = 0
    for m in metrics:
        if word in getattr(m, "name", "") and hasattr(m, "value"):
            total += int(getattr(m, "value") or 0)
    return total


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams

    engine = {"dtype": "float32", "enforce_eager": True, "disable_log_stats": False, "seed": 0, **spec["engine"]}
    llm = LLM(model=spec["model"], **engine)
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
    rounds, seconds, ttft = [], [], []
    for _ in range(spec.get("rounds", 1)):
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params, use_tqdm=False)
        seconds.append(time.perf_counter() - t0)
        rounds.append([{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens or 0} for o in outs])
        for o in outs:
            m = getattr(o, "metrics", None)
            first = getattr(m, "first_token_latency", None) if m is not None else None
            if first is not None:
                ttft.append(float(first))
    arch = llm.llm_engine.model_config.architecture
    print("RESULT " + json.dumps({"rounds": rounds, "preemptions": _counter(llm.get_metrics(), "preempt"),
                                  "arch": arch, "seconds": seconds, "ttft_s": ttft}), flush=True)


if __name__ == "__main__":
    main()
