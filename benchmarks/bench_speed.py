"""Serving cost of a DPE export against its base model: prefill time, per-token decode time and KV-cache bytes.

    python benchmarks/bench_speed.py                                   # CPU: both blocks, 8K and 16K, sdpa, fp32
    python benchmarks/bench_speed.py --block small --lengths 8192 --repeats 3 --decode-steps 8   # a quick look
    python benchmarks/bench_speed.py --device cuda --dtype bfloat16 --attn flash_attention_2 \
        --lengths 32768,65536,131072 --cache-lengths 32768

Two blocks, randomly initialised from a config (speed does not depend on the weights' values):
- "llama3": a Llama-3-shaped block, hidden 1024, 8 query / 2 KV heads of head_dim 128, 2 layers;
- "small": an attention-heavy block, hidden 256, 4 heads x 64 (no GQA), 2 layers.
Variants: the base model; DPE on every frequency ("all-dims"); DPE on half of the frequencies of each query head
(a random selection, "top-K"). Window 1024, the authors' Llama-3 scale factors (8 groups).

Everything is measured side by side in one process. Prefill: each round times one prefill of every model, in
turn, and the ratio reported is the median over rounds of the per-round ratio (drift on a shared machine hits
both sides of a ratio alike). Decode: every model is prefilled once, then the models take one decode step each
in turn, `--decode-steps` times; the median step per model. KV cache: after a prefill of n tokens through
`generate()`'s kind of cache (a fresh DynamicCache), the bytes of every tensor the cache holds, against the
base model's. --json writes every number; --markdown writes the tables as benchmarks/results/speed.md embeds them.
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
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from dpe_export.export.convert import convert  # noqa: E402
from dpe_export.modeling_templates import dpe_params
from dpe_export import dpe_ops


BLOCKS = {
    "llama3": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=2, head_dim=128),
    "small": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4, head_dim=64),
}
SCALES = [2, 8, 2, 8, 32, 32, 32, 4]  # the authors' Llama-3-8B setting, 8 groups of the rotary frequencies


def build_base(path: Path, block: str, layers: int) -> LlamaConfig:
    config = LlamaConfig(vocab_size=8192, num_hidden_layers=layers, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, **BLOCKS[block])
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return config


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def cache_bytes(cache) -> int:
    """Every tensor a cache holds: keys and values of each layer, and DPE's window buffer where there is one."""
    seen, total = set(), 0
    for layer in cache.layers:
        for t in vars(layer).values():
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def prefill_ratios(models, ids, rounds, device):
    """Median prefill seconds per model, and per variant the median over rounds of its ratio to the base."""
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            with torch.no_grad():
                times[name].append(timed(lambda m=model: m(ids, use_cache=False, logits_to_keep=1), device))
    ratios = {name: statistics.median(t / b for t, b in zip(times[name], times["base"])) for name in models}
    return {name: statistics.median(t) for name, t in times.items()}, ratios, times


def decode_times(models, ids, steps, device):
    """Median seconds of one decode step per model after a prefill of ids; the models step in turn."""
    state = {}
    with torch.no_grad():
        for name, model in models.items():
            cache = DynamicCache()
            out = model(ids, use_cache=True, logits_to_keep=1, **{dpe_ops.cache_argument(model): cache})
            state[name] = (dpe_ops.output_cache(out), out.logits[:, -1:].argmax(-1))
        times = {name: [] for name in models}
        for _ in range(steps):
            for name, model in models.items():
                past, tok = state[name]
                box = {}

                def step(model=model, past=past, tok=tok, box=box):
                    box["out"] = model(tok, use_cache=True, **{dpe_ops.cache_argument(model): past})

                times[name].append(timed(step, device))
                out = box["out"]
                state[name] = (dpe_ops.output_cache(out), out.logits[:, -1:].argmax(-1))
    return {name: statistics.median(t) for name, t in times.items()}, times


def measure_cache(models, ids):
    out = {}
    with torch.no_grad():
        for name, model in models.items():
            cache = DynamicCache()
            model(ids, use_cache=True, logits_to_keep=1, **{dpe_ops.cache_argument(model): cache})
            out[name] = cache_bytes(cache)
            del cache
    return out


def run_block(block, args, tmp, gen):
    config = build_base(tmp / block / "base", block, args.layers)
    heads, rdim = config.num_attention_heads, config.head_dim
    groups = dpe_ops.even_group_boundaries(rdim // 2, 8)
    topk = torch.rand(args.layers, heads, rdim // 2, generator=gen).argsort(-1) < rdim // 4
    variants = {"all-dims": None, f"top-{rdim // 4}": topk}
    dirs = {"base": tmp / block / "base"}
    for name, sel in variants.items():
        params = dpe_params.DPEParams(args.window, SCALES, groups, target_length=131072)
        dirs[name] = convert(dirs["base"], tmp / block / name, params, sel)
    dtype = getattr(torch, args.dtype)
    models = {name: AutoModelForCausalLM.from_pretrained(path, trust_remote_code=name != "base", dtype=dtype,
                                                         attn_implementation=args.attn).to(args.device).eval()
              for name, path in dirs.items()}
    rows = []
    warm = torch.randint(0, 8192, (1, 2 * args.window), generator=gen).to(args.device)
    prefill_ratios(models, warm, 1, args.device)
    for n in args.lengths:
        ids = torch.randint(0, 8192, (1, n), generator=gen).to(args.device)
        pre, pre_ratio, pre_all = prefill_ratios(models, ids, args.repeats, args.device)
        dec, dec_all = decode_times(models, ids, args.decode_steps, args.device)
        for name in variants:
            row = {"block": block, "tokens": n, "variant": name, "base_prefill_s": pre["base"],
                   "dpe_prefill_s": pre[name], "prefill_ratio": pre_ratio[name],
                   "base_decode_ms": 1e3 * dec["base"], "dpe_decode_ms": 1e3 * dec[name],
                   "decode_ratio": dec[name] / dec["base"],
                   "prefill_s_all": {"base": pre_all["base"], "dpe": pre_all[name]},
                   "decode_ms_all": {"base": [1e3 * t for t in dec_all["base"]], "dpe": [1e3 * t for t in dec_all[name]]}}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}), flush=True)
    caches = []
    for n in args.cache_lengths:
        ids = torch.randint(0, 8192, (1, n), generator=gen).to(args.device)
        held = measure_cache(models, ids)
        for name, sel in variants.items():
            caches.append({"block": block, "tokens": n, "variant": name, "base_bytes": held["base"],
                           "dpe_bytes": held[name], "ratio": held[name] / held["base"],
                           "bound": cache_bound(config, args.layers, n, args.window, sel, held["base"]),
                           "needed": selection_need(config, sel, n, args.window)})
            print(json.dumps(caches[-1]), flush=True)
    return rows, caches


def cache_bound(config, layers, n, w, selected, base_bytes):
    """The stated bound, as a ratio to the base: one rotation of each key plus the plain keys of a window buffer
    (2w - 1 slots) per layer, without a selection or with one the query heads of every KV group agree on (it
    folds into per-head scales); both rotations of each key (1.5) where they disagree."""
    if selected is not None:
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        grouped = selected.view(selected.shape[0], kv, heads // kv, -1)
        if not bool((grouped == grouped[:, :, :1]).all()):
            return 1.5
    return 1 + (2 * w - 1) / (2 * n)


def selection_need(config, selected, n, w) -> float:
    """What a top-K selection needs, as a ratio to the base cache: a (KV head, frequency) whose query heads
    disagree needs both rotations of every key; one they agree on needs one (plus the window's plain keys where
    they all take the scaled one)."""
    if selected is None:
        return 1 + (2 * w - 1) / (2 * n)
    layers, heads, freqs = selected.shape
    grouped = selected.view(layers, config.num_key_value_heads, heads // config.num_key_value_heads, freqs)
    mixed = (grouped.any(2) & ~grouped.all(2)).float().mean().item()
    scaled_only = grouped.all(2).float().mean().item()
    return 1 + mixed / 2 + scaled_only * (2 * w - 1) / (2 * n)


def markdown(machine, args, rows, caches) -> str:
    """The tables (args: lengths, repeats, decode_steps, dtype, attn, window, layers)."""
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {machine}; {args.dtype}, attn={args.attn}, window {args.window}, "
             f"{args.layers} layers; `python benchmarks/bench_speed.py "
             f"--lengths {','.join(map(str, args.lengths))} --repeats {args.repeats} "
             f"--decode-steps {args.decode_steps}` (prefill: median over {args.repeats} rounds of the per-round "
             f"ratio; decode: median of {args.decode_steps} steps, the models stepping in turn).", "",
             "| block | tokens | variant | base prefill (s) | DPE prefill (s) | prefill ratio | base decode (ms/token) "
             "| DPE decode (ms/token) | decode ratio |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['block']} | {r['tokens']} | {r['variant']} | {r['base_prefill_s']:.2f} | "
                     f"{r['dpe_prefill_s']:.2f} | {r['prefill_ratio']:.2f}x | {r['base_decode_ms']:.1f} | "
                     f"{r['dpe_decode_ms']:.1f} | {r['decode_ratio']:.2f}x |")
    if caches:
        lines += ["", "KV cache after a prefill of n tokens (every tensor the cache holds, summed):", "",
                  "| block | tokens | variant | base (MiB) | DPE (MiB) | ratio | stated bound | what the selection needs |",
                  "|---|---:|---|---:|---:|---:|---:|---:|"]
        for c in caches:
            lines.append(f"| {c['block']} | {c['tokens']} | {c['variant']} | {c['base_bytes'] / 2**20:.1f} | "
                         f"{c['dpe_bytes'] / 2**20:.1f} | {c['ratio']:.3f} | {c['bound']:.3f} | {c['needed']:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", choices=[*BLOCKS, "both"], default="both")
    ap.add_argument("--lengths", default="8192,16384", help="prefill and decode lengths")
    ap.add_argument("--cache-lengths", default="8192,32768", help="lengths whose KV-cache bytes are measured")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7, help="prefill rounds")
    ap.add_argument("--decode-steps", type=int, default=48)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.cache_lengths = [int(x) for x in args.cache_lengths.split(",") if x]
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}" if args.device == "cpu" else torch.cuda.get_device_name())
    import transformers

    machine += f", transformers {transformers.__version__}"
    tmp = Path(tempfile.mkdtemp(prefix="dpe-bench-"))
    gen = torch.Generator().manual_seed(0)
    rows, caches = [], []
    for block in (BLOCKS if args.block == "both" else [args.block]):
        r, c = run_block(block, args, tmp, gen)
        rows += r
        caches += c
    text = markdown(machine, args, rows, caches)
    print("\n" + text)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                       for k, v in vars(args).items()},
                                         "rows": rows, "cache": caches}, indent=1))
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
