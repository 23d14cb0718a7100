"""Load a DPE export with plain transformers and ask it for a pass key hidden far past its training length.

    python examples/generate.py out/testbed-llama-dpe [--length 2048] [--base tests/fixtures/testbed-llama]

Loading needs only torch and transformers (trust_remote_code); dpe_export is used here only to build the
pass-key prompt at an exact token length. Exits with status 1 when the DPE export misses a pass key (CI runs
this as the README's main job).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from dpe_export.evaluation.tasks import PromptBuilder, extract_number  # noqa: E402


def answer(model, tokenizer, input_ids) -> str:
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", type=Path, help="directory written by dpe-export convert")
    ap.add_argument("--length", type=int, help="prompt length in tokens (default: 8 x the pretraining length)")
    ap.add_argument("--base", type=Path, help="the base model directory, to compare with plain RoPE")
    ap.add_argument("--samples", type=int, default=3)
    args = ap.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.export, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.export, trust_remote_code=True)  # the export has its own model_type
    dpe = model.config.dpe
    length = args.length or 8 * dpe["pretrain_length"]
    print(f"{type(model).__name__}: window {dpe['local_window_size']}, scale factors {dpe['scale_factors']}, "
          f"pretrained at {dpe['pretrain_length']} tokens; pass-key prompts of {length} tokens")
    models = {"DPE export": model}
    if args.base:
        models["base model"] = AutoModelForCausalLM.from_pretrained(args.base).eval()
    builder = PromptBuilder(tokenizer)
    missed = 0
    for seed in range(args.samples):
        prompt = builder.passkey(length, depth=(seed + 0.5) / args.samples, seed=1000 + seed)
        for name, m in models.items():
            t0 = time.perf_counter()
            got = extract_number(answer(m, tokenizer, prompt.input_ids))
            mark = "ok" if got == prompt.answer else "wrong"
            missed += name == "DPE export" and mark == "wrong"
            print(f"  sample {seed}: pass key {prompt.answer} | {name}: {got} ({mark}, {time.perf_counter() - t0:.1f} s)")
    print(f"DPE export found {args.samples - missed} of {args.samples} pass keys")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
