"""torch.compile against eager mode at every prompt length from 1 to 12 windows + 1, for every registered family
(sdpa and eager) and for the README's testbed export: one compile with dynamic shapes per (model, attention),
then every length through it (or, with --dynamic false, a graph per length); each result appended to a JSONL file
as it finishes.

    python scripts/compile_sweep.py --jsonl benchmarks/results/compile-sweep.jsonl

The fuzzer (tests/fuzz_runtime.py) samples lengths; this walks all of them.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
from family_reference import tiny_family_model  # noqa: E402
from fuzz_runtime import quiet  # noqa: E402
from helpers import tiny_tokenizer  # noqa: E402

from dpe_export.architectures import ARCHITECTURES  # noqa: E402
from dpe_export.export.convert import convert  # noqa: E402
from dpe_export.modeling_templates import dpe_family, dpe_params
from dpe_export import dpe_ops

WINDOW = 4


DYNAMIC = {"true": True, "false": False, "none": None}


def sweep(export: Path, attn: str, window: int, vocab: int, max_len: int, dynamic: bool | None) -> dict:
    from transformers import AutoModelForCausalLM

    torch._dynamo.reset()
    # dynamic=False compiles a graph per length: the limit must let every length have its own (none falls back
    # to eager, which would make the comparison vacuous)
    torch._dynamo.config.recompile_limit = max_len + 8
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, attn_implementation=attn).eval()
    compiled = torch.compile(model, dynamic=dynamic)
    g = torch.Generator().manual_seed(0)
    worst, worst_n = 0.0, None
    t0 = time.time()
    with torch.no_grad():
        for n in range(1, max_len + 1):
            ids = torch.randint(4, vocab, (1, n), generator=g)
            want = model(ids).logits
            err = (compiled(ids).logits - want).abs().max().item()
            scale = max(1.0, want.abs().max().item())
            if not err <= worst:
                worst, worst_n = err, n
            if not err <= 1e-4 * scale:
                return {"ok": False, "first_wrong_length": n, "error": err, "seconds": round(time.time() - t0, 1)}
    return {"ok": True, "lengths": max_len, "max_error": worst, "at_length": worst_n,
            "seconds": round(time.time() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jsonl", type=Path, required=True)
    ap.add_argument("--families", default=",".join(sorted(ARCHITECTURES)))
    ap.add_argument("--dynamic", choices=sorted(DYNAMIC), default="true",
                    help="torch.compile's dynamic: true (one graph for all lengths), false (a graph per length), "
                         "none (automatic: static first, dynamic after a recompile)")
    ap.add_argument("--no-testbed", action="store_true", help="leave out the README's export (12 x 32 lengths)")
    args = ap.parse_args()
    failures = 0
    with tempfile.TemporaryDirectory() as tmp, quiet():
        jobs = []
        if not args.no_testbed:
            testbed = REPO / "tests" / "fixtures" / "testbed-llama"
            params = dpe_params.DPEParams(32, [128, 128, 64, 8], [0, 4, 8, 12, 16], target_length=4096)
            jobs.append(("testbed-llama (README export)", convert(testbed, Path(tmp) / "testbed", params), 32,
                         1698, ["sdpa", "eager"]))
        for family in args.families.split(","):
            arch = ARCHITECTURES[family]
            model = tiny_family_model(arch)
            base = Path(tmp) / family
            model.save_pretrained(base)
            tiny_tokenizer().save_pretrained(base)
            groups = dpe_ops.even_group_boundaries(dpe_family.rotary_dim_of(model.config) // 2, 2)
            export = convert(base, Path(tmp) / f"{family}-dpe", dpe_params.DPEParams(WINDOW, [3, 8], groups,
                                                                                    target_length=512))
            attns = ["eager"] if getattr(model.config, "attn_logit_softcapping", None) else ["sdpa", "eager"]
            jobs.append((family, export, WINDOW, 128, attns))
        for name, export, window, vocab, attns in jobs:
            for attn in attns:
                result = sweep(export, attn, window, vocab, 12 * window + 1, DYNAMIC[args.dynamic])
                record = {"model": name, "attn": attn, "window": window, "dynamic": args.dynamic,
                          "torch": torch.__version__,
                          "threads": torch.get_num_threads(), **result}
                print(json.dumps(record), flush=True)
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(record) + "\n")
                failures += not result["ok"]
    print(f"{'no' if not failures else failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
