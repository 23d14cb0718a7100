"""Prefill and per-token decode time of a DPE export against its base model (same backend, same weights).

    python benchmarks/bench_speed.py                       # CPU: 2K, 8K, 16K tokens, sdpa
    python benchmarks/bench_speed.py --device cuda --lengths 32768,65536,131072 --dtype bfloat16

The model is a randomly initialised Llama-3-shaped block (head_dim 128, GQA 8 query / 2 KV heads) built from a
config: speed does not depend on the weights' values. Variants: DPE on all frequencies, and DPE on the top-K
frequencies per head (K = half of them, a random selection). Prints a Markdown table; --json writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from dpe_export.export.convert import convert  # noqa: E402
from dpe_export.runtime import load_dpe_core  # noqa: E402

dpe_core = load_dpe_core()


def build_base(path: Path, layers: int) -> None:
    config = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                         max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_prefill(model, ids, repeats, device):
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_decode(model, ids, steps, device):
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        core = dpe_core
        cache_name = core.cache_argument(model)
        past, tok = core.output_cache(out), out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            sync(device)
            t0 = time.perf_counter()
            out = model(tok, use_cache=True, **{cache_name: past})
            sync(device)
            times.append(time.perf_counter() - t0)
            past, tok = core.output_cache(out), out.logits[:, -1:].argmax(-1)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,8192,16384")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    lengths = [int(x) for x in args.lengths.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="dpe-bench-"))
    build_base(tmp / "base", args.layers)
    scales = [2, 8, 2, 8, 32, 32, 32, 4]  # the authors' Llama-3-8B setting, 8 groups of 8 frequencies
    groups = dpe_core.even_group_boundaries(64, 8)
    gen = torch.Generator().manual_seed(0)
    topk = torch.rand(args.layers, 8, 64, generator=gen).argsort(-1) < 32  # 32 of 64 frequencies per head
    variants = {"all-dims": None, "top-32": topk}
    exports = {}
    for name, sel in variants.items():
        params = dpe_core.DPEParams(args.window, scales, groups, target_length=131072)
        exports[name] = convert(tmp / "base", tmp / name, params, sel)

    def load(path, remote):
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote, attn_implementation=args.attn,
                                                    dtype=dtype).to(args.device).eval()

    models = {"base": load(tmp / "base", False), **{k: load(v, True) for k, v in exports.items()}}
    rows = []
    for n in lengths:
        ids = torch.randint(0, 8192, (1, n), generator=gen).to(args.device)
        res = {}
        for name, model in models.items():
            time_prefill(model, ids[:, :256], 1, args.device)  # warm-up
            res[name] = (time_prefill(model, ids, args.repeats, args.device),
                         time_decode(model, ids, args.decode_steps, args.device))
        for name in variants:
            rows.append({"tokens": n, "variant": name,
                         "base_prefill_s": res["base"][0], "dpe_prefill_s": res[name][0],
                         "prefill_ratio": res[name][0] / res["base"][0],
                         "base_decode_ms": 1e3 * res["base"][1], "dpe_decode_ms": 1e3 * res[name][1],
                         "decode_ratio": res[name][1] / res["base"][1]})
            print(json.dumps(rows[-1]), flush=True)

    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
               if args.device == "cpu" else torch.cuda.get_device_name())
    print(f"\n{machine}; {args.layers} layers, head_dim 128, 8 query / 2 KV heads, window {args.window}, "
          f"{args.dtype}, attn={args.attn}\n")
    print("| tokens | variant | base prefill (s) | DPE prefill (s) | ratio | base decode (ms/token) | DPE decode (ms/token) | ratio |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']} | {r['variant']} | {r['base_prefill_s']:.2f} | {r['dpe_prefill_s']:.2f} | "
              f"{r['prefill_ratio']:.2f}x | {r['base_decode_ms']:.1f} | {r['dpe_decode_ms']:.1f} | {r['decode_ratio']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
