"""Which causal-LM families of the installed transformers run DPE: a tiny model of each, checked.

    python scripts/family_coverage.py [--json benchmarks/results/family-coverage.json] [--only llama,qwen3]

For every model type in transformers' causal-LM mapping whose config has rotary embeddings, a 2-layer random
model is built from its config class, DPE is applied to it in place (dpe_ops.apply_dpe, the runtime every export
carries) and checked: below the window its logits equal the base model's (<= 1e-5, fp32), beyond it they equal
the float64 reference computed from the family's own forward (tests/family_reference.py, <= 1e-4). Families in
dpe_export's registry are exported by `dpe-export convert`; the others would need only a registry line when they
pass here. Prints a Markdown table (family, in registry, result, why).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

from dpe_export.architectures import ARCHITECTURES  # noqa: E402
from dpe_export.modeling_templates import dpe_family, dpe_params
from dpe_export import dpe_ops

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False)
WINDOW = 5
MAX_PARAMS = 3_000_000


def _short(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:160]


def check_family(model_type: str) -> dict:
    try:
        return _check_family(model_type)
    except Exception as e:  # a config class with its own rules (per-layer attributes, ...)
        return {"family": model_type, "registry": model_type in ARCHITECTURES, "result": "skipped",
                "why": f"unusual config: {_short(e)}"}


def _check_family(model_type: str) -> dict:
    from family_reference import reference_logits
    from transformers import AutoConfig, AutoModelForCausalLM

    row = {"family": model_type, "registry": model_type in ARCHITECTURES}
    try:
        overrides = dict(ARCHITECTURES[model_type].test_config) if model_type in ARCHITECTURES else {}
        config = AutoConfig.for_model(model_type, **{**TINY, **{k: (list(v) if isinstance(v, tuple) else v)
                                                                for k, v in overrides.items()}})
    except Exception as e:
        return {**row, "result": "skipped", "why": f"no tiny config: {_short(e)}"}
    if not (getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None)):
        return {**row, "result": "no RoPE", "why": "the config has no rotary embeddings"}
    try:
        dpe_family.check_supported_config(config)
    except ValueError as e:
        return {**row, "result": "refused", "why": str(e)}
    try:
        with torch.device("meta"):  # count first: nested configs can keep full-size defaults
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    except Exception as e:
        return {**row, "result": "skipped", "why": f"cannot build a tiny model: {_short(e)}"}
    if size > MAX_PARAMS:
        return {**row, "result": "skipped", "why": f"the tiny config builds {size / 1e6:.0f}M parameters (nested configs)"}
    try:
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config).eval()
    except Exception as e:
        return {**row, "result": "skipped", "why": f"cannot build a tiny model: {_short(e)}"}
    try:
        import copy

        num_freqs = dpe_family.rotary_dim_of(config) // 2
        scales = [3, 8] if num_freqs >= 2 else [3]
        groups = dpe_ops.even_group_boundaries(num_freqs, len(scales))
        params = dpe_params.DPEParams(WINDOW, scales, groups, target_length=512, pretrain_length=config.max_position_embeddings)
        attn = "sdpa" if getattr(base, "_supports_sdpa", True) and not getattr(config, "attn_logit_softcapping", None) \
            else "eager"
        base.set_attn_implementation(attn)
        if hasattr(base, "set_experts_implementation") and getattr(config, "num_experts", None) or \
                getattr(config, "num_local_experts", None):
            try:
                base.set_experts_implementation("eager")  # grouped matmuls have no float64 kernel (the reference)
            except Exception:
                pass
        try:
            dpe = dpe_ops.apply_dpe(copy.deepcopy(base), params)
        except ValueError as e:
            return {**row, "result": "refused", "why": str(e)}
        short = torch.randint(4, 128, (1, WINDOW), generator=torch.Generator().manual_seed(1))
        long = torch.randint(4, 128, (1, 30), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            same = (dpe(short).logits - base(short).logits).abs().max().item()
            far = (dpe(long).logits.double() - reference_logits(base, long, WINDOW, scales, groups)).abs().max().item()
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return {**row, "result": "fails", "why": f"{_short(e)} ({Path(tb.filename).name}:{tb.lineno})"}
    ok = same <= 1e-5 and far <= 1e-4
    layers = dpe_family.full_attention_layers(config)
    why = f"below window {same:.1e}, beyond {far:.1e}; DPE layers {layers}"
    if dpe_family.rotary_dim_of(config) < dpe_family.head_dim_of(config):
        why += f"; rotary dims {dpe_family.rotary_dim_of(config)} of {dpe_family.head_dim_of(config)}"
    return {**row, "result": "works" if ok else "wrong", "why": why}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", help="comma-separated model types")
    args = ap.parse_args(argv)
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if args.only:
        types = [t for t in types if t in args.only.split(",")]
    torch.set_num_threads(1)
    rows = []
    t0 = time.time()
    for model_type in types:
        row = check_family(model_type)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    counts = {}
    for r in rows:
        counts[r["result"]] = counts.get(r["result"], 0) + 1
    print(f"transformers {transformers.__version__}, {len(rows)} causal-LM families, {time.time() - t0:.0f} s: "
          + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print("\n| family | in registry | result | detail |\n|---|---|---|---|")
    for r in rows:
        if r["result"] in ("works", "refused", "wrong", "fails"):
            print(f"| {r['family']} | {'yes' if r['registry'] else ''} | {r['result']} | {r['why']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"transformers": transformers.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
