"""A differential fuzzer of the export runtime against the independent float64 reference.

Each seed draws one case: a family from the registry, head dim, GQA ratio, window, groups and scale factors
(scale 1 and scales that do not divide the window included), a top-K selection (none, folded per KV group, or
mixed within a group), a batch with left padding, prompt lengths around the window and its multiples, prefill
in one pass or in chunks, then decoding; a cache kind (fresh dynamic, user-built dynamic, static; sliding layers
where the family has them); sdpa or eager; torch.compile off, on, or on after an eager prefill (dynamic shapes
on, off or automatic); float32, or bfloat16 against a float32 run; beam search and assisted decoding (cache
reorder and crop). The case's export is written by dpe-export's own convert and loaded with plain transformers
(trust_remote_code), as a user loads it. Checked:

- uncached logits of the whole batch against the dense float64 reference of each row (tests/family_reference.py,
  which shares no code with the runtime), at every real position;
- cached logits (chunks, then one token at a time) against the same reference and against the uncached ones;
- bfloat16 logits against the float32 export's: within 4x the base model's own bfloat16 error plus 0.05;
- beam search with the cache equals beam search without it; assisted decoding (the base model assisting) equals
  greedy decoding (up to a tie: two candidates within 1e-3 of each other).

    python tests/fuzz_runtime.py --seed 17                  # one case, verbose: how every failure is reproduced
    python tests/fuzz_runtime.py --minutes 60 --start 10000 --jsonl benchmarks/results/fuzz.jsonl

tests/test_fuzz.py runs a fixed set of seeds in CI.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from family_reference import reference_logits, tiny_family_model  # noqa: E402
from helpers import tiny_tokenizer  # noqa: E402

from dpe_export.architectures import ARCHITECTURES  # noqa: E402
from dpe_export.modeling_templates import dpe_family, dpe_params
from dpe_export import dpe_ops


TOL = 2e-5  # float32 export against the float64 reference, relative to the largest logit (or 1)
MAX_WINDOWS = 12  # prompts reach up to this many windows
SLIDING = ("gemma3_text", "gemma2")  # families whose tiny configs have sliding-window layers


@dataclass
class Case:
    seed: int
    family: str
    head_dim: int
    heads: int
    kv_heads: int
    window: int
    groups: list
    scales: list
    selection: str  # none | folded | mixed
    attn: str  # sdpa | eager
    lengths: list  # prompt length of each row (left padded to the longest)
    chunks: list  # prefill chunk ends over the padded prompt (the last is its width)
    decode: int  # tokens fed one at a time after the prefill
    cache: str  # fresh | dynamic | static
    compile: str  # off | all | decode
    dynamic: Optional[bool]  # torch.compile(dynamic=...)
    dtype: str  # float32 | bfloat16
    generate: str  # none | beam | assisted
    layers: int = 2
    sliding_window: Optional[int] = None
    inputs: str = "mask+positions"  # ids | mask | mask+positions: what each forward is given beside the ids

    def command(self) -> str:
        return f"python tests/fuzz_runtime.py --seed {self.seed}"


def draw(seed: int) -> Case:
    """The case of a seed: the same seed gives the same case on every machine."""
    rng = random.Random(seed)
    family = rng.choice(sorted(ARCHITECTURES))
    kv_heads = rng.choice([1, 2, 4])
    heads = kv_heads * rng.choice([1, 2, 4] if kv_heads < 4 else [1, 2])
    head_dim = rng.choice([8, 16, 32])
    rotary_half = head_dim // 4 if family in ("gpt_neox", "stablelm") else head_dim // 2  # partial rotary 0.5
    window = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 16])
    n_groups = rng.randint(1, min(4, rotary_half))
    cuts = sorted(rng.sample(range(1, rotary_half), n_groups - 1))
    groups = [0, *cuts, rotary_half]
    scales = [rng.choice([1, 2, 3, 4, 5, 7, 8, 9, 16, 33]) for _ in range(n_groups)]
    selection = rng.choices(["none", "folded", "mixed"], [2, 1, 1])[0]
    attn = rng.choice(["sdpa", "eager"]) if ARCHITECTURES[family].sdpa else "eager"  # Gemma 2: eager only
    compile_mode = rng.choices(["off", "all", "decode"], [6, 1, 1])[0]
    dtype = rng.choices(["float32", "bfloat16"], [9, 1])[0]
    generate = rng.choices(["none", "beam", "assisted"], [8, 1, 1])[0]
    batch = 1 if generate == "assisted" else rng.choices([1, 2, 3], [3, 2, 1])[0]
    if compile_mode != "off":
        batch = min(batch, 2)

    def length() -> int:
        k = rng.randint(0, MAX_WINDOWS)
        n = k * window + rng.choice([-1, 0, 0, 1, rng.randint(0, max(0, window - 1))])
        return max(1, min(n, MAX_WINDOWS * window + 1, 160))

    lengths = [length() for _ in range(batch)]
    width = max(lengths)
    n_chunks = 1 if compile_mode != "off" and rng.random() < 0.5 else rng.choice([1, 1, 2, 3, 4])
    ends = sorted(set(rng.sample(range(1, width), min(n_chunks - 1, width - 1)))) if width > 1 else []
    chunks = [*ends, width]
    decode = rng.randint(0, 2 if compile_mode != "off" else 5)
    cache = rng.choice(["fresh", "dynamic", "static"])
    dynamic = rng.choice([None, True, False])
    layers = rng.choice([2, 3, 4] if family == "gemma2" else [1, 2, 3, 4])  # Gemma 2: layer 0 slides
    sliding = rng.randint(2, 12) if family in SLIDING else None
    # without padding a user passes the ids alone (positions then come from the cache length)
    inputs = rng.choice(["ids", "mask", "mask+positions"]) if len(set(lengths)) == 1 else "mask+positions"
    return Case(seed, family, head_dim, heads, kv_heads, window, groups, scales, selection, attn, lengths, chunks,
                decode, cache, compile_mode, dynamic, dtype, generate, layers, sliding, inputs)


# ----------------------------------------------------------------------------------------------------------
# Running a case
# ----------------------------------------------------------------------------------------------------------

class Mismatch(AssertionError):
    pass


def _base_model(case: Case):
    arch = ARCHITECTURES[case.family]
    overrides = dict(head_dim=case.head_dim, num_attention_heads=case.heads, num_key_value_heads=case.kv_heads,
                     hidden_size=max(32, case.heads * case.head_dim), max_position_embeddings=64,
                     num_hidden_layers=case.layers)
    if case.family in ("gpt_neox", "stablelm"):
        overrides["hidden_size"] = case.heads * case.head_dim  # head_dim = hidden / heads there
    if case.sliding_window is not None:
        overrides["sliding_window"] = case.sliding_window
    if case.family == "gemma3_text":  # sliding and full layers alternating, the last one full
        overrides["layer_types"] = ["sliding_attention" if i % 2 == 0 and i < case.layers - 1 else "full_attention"
                                    for i in range(case.layers)]
    if case.family == "gemma3_text" or case.family == "gemma2":
        overrides["query_pre_attn_scalar"] = case.head_dim
    model = tiny_family_model(arch, seed=case.seed % 1000, **overrides)
    with torch.no_grad():  # sharper still (tiny_family_model already triples q and k), so positions show
        for name, p in model.named_parameters():
            if any(t in name for t in ("q_proj.weight", "k_proj.weight", "query_key_value.weight")):
                p.mul_(2.0)
            if name.endswith("lm_head.weight") or name.endswith("embed_out.weight"):
                p.mul_(4.0)
    return model


def _selection(case: Case, config, num_freqs: int) -> Optional[torch.Tensor]:
    if case.selection == "none":
        return None
    g = torch.Generator().manual_seed(case.seed)
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    k = max(1, num_freqs // 2)
    if case.selection == "folded":  # the query heads of each KV group agree
        kv = config.num_key_value_heads
        idx = torch.rand(layers, kv, num_freqs, generator=g).topk(k, dim=-1).indices
        sel = torch.zeros(layers, kv, num_freqs, dtype=torch.bool).scatter_(-1, idx, True)
        return sel.repeat_interleave(heads // kv, dim=1)
    idx = torch.rand(layers, heads, num_freqs, generator=g).topk(k, dim=-1).indices
    return torch.zeros(layers, heads, num_freqs, dtype=torch.bool).scatter_(-1, idx, True)


def _batch(case: Case, vocab: int):
    """ids / mask / positions [B, width + decode], left padded; each row's real tokens."""
    g = torch.Generator().manual_seed(case.seed + 1)
    width = max(case.lengths)
    total = width + case.decode
    ids = torch.zeros(len(case.lengths), total, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows = []
    for r, n in enumerate(case.lengths):
        tokens = torch.randint(4, vocab, (n + case.decode,), generator=g)
        ids[r, width - n :], mask[r, width - n :] = tokens, 1
        rows.append(tokens)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, rows


def _compare(got: torch.Tensor, want: torch.Tensor, what: str, tol: Optional[float] = None) -> float:
    """Max |got - want|; above tol (default: TOL relative to the largest |want|, at least TOL) is a Mismatch."""
    err = (got.double() - want.double()).abs().max().item()
    if tol is None:
        tol = TOL * max(1.0, want.abs().max().item())
    if not err <= tol:  # also catches nan
        raise Mismatch(f"{what}: max |diff| = {err:.3g} > {tol:.3g}")
    return err


def _inputs(case: Case, mask, positions, start: int, end: int) -> dict:
    """The keyword arguments beside the ids for the forward of positions start..end-1."""
    kw = {}
    if case.inputs != "ids":
        kw["attention_mask"] = mask[:, :end]
    if case.inputs == "mask+positions":
        kw["position_ids"] = positions[:, start:end]
    return kw


def _real(logits: torch.Tensor, case: Case, row: int) -> torch.Tensor:
    width = max(case.lengths)
    return logits[row, width - case.lengths[row] :]


class Runner:
    def __init__(self, case: Case, root: Path, verbose: bool = False):
        self.case, self.root, self.verbose = case, root, verbose
        self.notes: dict = {}

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"  {msg}", flush=True)

    def load(self, dtype=torch.float32):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.export, trust_remote_code=True,
                                                    attn_implementation=self.case.attn, dtype=dtype).eval()

    def run(self) -> dict:
        from transformers import AutoModelForCausalLM

        from dpe_export.export.convert import convert

        case = self.case
        base = _base_model(case)
        base_dir = self.root / "base"
        base.save_pretrained(base_dir)
        tiny_tokenizer().save_pretrained(base_dir)
        self.base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
        if hasattr(self.base, "set_experts_implementation") and getattr(self.base.config, "num_experts", None):
            self.base.set_experts_implementation("eager")
        num_freqs = dpe_family.rotary_dim_of(self.base.config) // 2
        if case.groups[-1] != num_freqs:
            raise RuntimeError(f"case drawn for {case.groups[-1]} frequencies, the model has {num_freqs}")
        self.selected = _selection(case, self.base.config, num_freqs)
        params = dpe_params.DPEParams(case.window, case.scales, case.groups, target_length=4096)
        self.export = convert(base_dir, self.root / "dpe", params, self.selected)
        vocab = self.base.config.vocab_size
        ids, mask, positions, rows = _batch(case, vocab)

        want = []  # the reference, row by row on its real tokens
        for r, tokens in enumerate(rows):
            want.append(reference_logits(self.base, tokens[None], case.window, case.scales, case.groups,
                                         self.selected)[0])
        plain = self.base.float()
        model = self.load()
        compiled = None
        if case.compile != "off":
            torch._dynamo.reset()
            # every call compiled, none left to eager mode behind the user's back
            torch._dynamo.config.recompile_limit = 64
            torch._dynamo.config.fail_on_recompile_limit_hit = True
            compiled = torch.compile(model, dynamic=case.dynamic)
        with torch.no_grad():
            fwd = compiled if case.compile == "all" else model
            uncached = fwd(ids, use_cache=False, **_inputs(case, mask, positions, 0, ids.shape[1])).logits
            for r in range(len(rows)):
                self.notes["uncached"] = _compare(_real(uncached, case, r), want[r], f"uncached row {r} vs reference")
            self.log(f"uncached vs reference {self.notes['uncached']:.2e}")
            cached = self.cached(model, compiled, ids, mask, positions)
            for r in range(len(rows)):
                self.notes["cached"] = _compare(_real(cached, case, r), want[r], f"cached row {r} vs reference")
                _compare(_real(cached, case, r), _real(uncached, case, r), f"cached row {r} vs uncached")
            self.log(f"cached vs reference {self.notes['cached']:.2e}")
            # the check has teeth: past the window the plain model differs
            if any(n + case.decode > case.window + 1 for n in case.lengths) and case.scales != [1] * len(case.scales):
                base_logits = plain(rows[0][None], use_cache=False).logits[0]
                self.notes["plain_vs_dpe"] = (base_logits.double() - want[0]).abs().max().item()
            if case.dtype == "bfloat16":
                self.bfloat16(ids, mask, positions, uncached, plain, rows)
        if case.generate == "beam":
            self.beam(model, rows[0])
        elif case.generate == "assisted":
            self.assisted(model, plain, rows[0])
        return self.notes

    def cached(self, model, compiled, ids, mask, positions) -> torch.Tensor:
        from transformers import DynamicCache, StaticCache

        case = self.case
        name = dpe_ops.cache_argument(model)
        width = max(case.lengths)
        total = width + case.decode
        cache = None
        if case.cache == "dynamic":
            cache = DynamicCache(config=model.config)
        elif case.cache == "static":
            cache = StaticCache(config=model.config, max_cache_len=total + 3)
        steps = [*case.chunks, *range(width + 1, total + 1)]
        logits, start = [], 0
        for i, end in enumerate(steps):
            fwd = model
            if case.compile == "all" or (case.compile == "decode" and i > 0):
                fwd = compiled
            kw = {} if cache is None else {name: cache}
            out = fwd(ids[:, start:end], use_cache=True, **kw, **_inputs(case, mask, positions, start, end))
            logits.append(out.logits)
            cache = dpe_ops.output_cache(out)
            start = end
        return torch.cat(logits, dim=1)

    def bfloat16(self, ids, mask, positions, uncached32, plain, rows) -> None:
        case = self.case
        model16 = self.load(torch.bfloat16)
        base16 = type(plain).from_pretrained(self.root / "base", dtype=torch.bfloat16,
                                             attn_implementation="eager").eval()
        with torch.no_grad():
            got = model16(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits.float()
            base_err = max((base16(t[None], use_cache=False).logits.float()[0]
                            - plain(t[None], use_cache=False).logits[0]).abs().max().item() for t in rows)
        tol = 4 * base_err + 0.05
        for r in range(len(rows)):
            self.notes["bfloat16"] = _compare(_real(got, case, r), _real(uncached32, case, r),
                                              f"bfloat16 row {r} vs float32", tol)
        self.log(f"bfloat16 vs float32 {self.notes['bfloat16']:.3g} (base model's own bfloat16 error {base_err:.3g})")

    def _tie_or_fail(self, model, a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        """a and b differ: fine only where greedy/beam faced a tie (scores within 1e-3)."""
        if a.tolist() == b.tolist():
            return
        with torch.no_grad():
            def logprob(seq):
                lp = torch.log_softmax(model(seq[None], use_cache=False).logits[0].double(), -1)
                return lp[:-1].gather(-1, seq[1:, None]).squeeze(-1)

            la, lb = logprob(a), logprob(b)
        prompt = self.prompt_len
        diff = abs(la[prompt - 1 :].sum().item() - lb[prompt - 1 :].sum().item())
        if diff > 1e-3:
            raise Mismatch(f"{what}: {a.tolist()[prompt:]} vs {b.tolist()[prompt:]} (log-prob gap {diff:.3g})")
        self.notes[f"{what} tie"] = diff

    def beam(self, model, tokens) -> None:
        self.prompt_len = len(tokens) - self.case.decode
        p = tokens[: self.prompt_len][None]
        kw = dict(num_beams=3, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            with_cache = model.generate(p, **kw)[0]
            without = model.generate(p, use_cache=False, **kw)[0]
        self._tie_or_fail(model, with_cache, without, "beam search with vs without cache")
        self.log("beam search: equal")

    def assisted(self, model, assistant, tokens) -> None:
        self.prompt_len = len(tokens) - self.case.decode
        p = tokens[: self.prompt_len][None]
        kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            greedy = model.generate(p, **kw)[0]
            helped = model.generate(p, assistant_model=assistant, **kw)[0]
        self._tie_or_fail(model, helped, greedy, "assisted vs greedy decoding")
        self.log("assisted decoding: equal to greedy")


def run_case(seed: int, verbose: bool = False, case: Optional[Case] = None) -> dict:
    """Run one seed (or a case built by hand); return a record (ok, error, seconds, the case). Never raises for a
    failing case."""
    case = case or draw(seed)
    t0 = time.time()
    cpu0 = time.process_time()
    record = {"seed": seed, "case": asdict(case)}
    with tempfile.TemporaryDirectory(prefix="dpe-fuzz-") as tmp, quiet():
        try:
            record["notes"] = Runner(case, Path(tmp), verbose).run()
            record["ok"] = True
        except Mismatch as e:
            record.update(ok=False, error=str(e))
        except Exception as e:  # a crash is a failure too: exports must run or refuse loudly
            record.update(ok=False, error=f"{type(e).__name__}: {e}".splitlines()[0][:500],
                          traceback=traceback.format_exc()[-3000:])
    record["seconds"] = round(time.time() - t0, 2)
    record["cpu_seconds"] = round(time.process_time() - cpu0, 2)
    record["threads"] = torch.get_num_threads()
    return record


def describe(case: Case) -> str:
    return (f"{case.family} hd{case.head_dim} H{case.heads}/{case.kv_heads} w{case.window} groups{case.groups} "
            f"scales{case.scales} sel={case.selection} {case.attn} rows{case.lengths} chunks{case.chunks} "
            f"+{case.decode} cache={case.cache} compile={case.compile}(dynamic={case.dynamic}) {case.dtype} "
            f"gen={case.generate} layers={case.layers} inputs={case.inputs}" + (f" sliding={case.sliding_window}" if case.sliding_window else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, action="append", help="run this seed (verbose); may repeat")
    ap.add_argument("--start", type=int, default=0, help="first seed of a run of seeds")
    ap.add_argument("--count", type=int, default=None, help="how many seeds from --start")
    ap.add_argument("--minutes", type=float, default=None, help="keep drawing seeds for this long")
    ap.add_argument("--jsonl", type=Path, help="append one record per case to this file (skips seeds in it)")
    args = ap.parse_args(argv)
    if args.seed:
        seeds, verbose = list(args.seed), True
    else:
        count = args.count if args.count is not None else (None if args.minutes else 20)
        seeds = range(args.start, args.start + count) if count is not None else _forever(args.start)
        verbose = False
    done = set()
    if args.jsonl and args.jsonl.exists():
        done = {json.loads(line)["seed"] for line in args.jsonl.read_text().splitlines() if line.strip()}
    deadline = None if args.minutes is None else time.time() + 60 * args.minutes
    failures = ran = 0
    for seed in seeds:
        if deadline is not None and time.time() > deadline:
            break
        if seed in done:
            continue
        case = draw(seed)
        if verbose:
            print(f"seed {seed}: {describe(case)}", flush=True)
        record = run_case(seed, verbose)
        ran += 1
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")
        if not record["ok"]:
            failures += 1
            print(f"FAIL seed {seed} ({describe(case)}): {record['error']}\n  reproduce: {case.command()}",
                  flush=True)
            if verbose and record.get("traceback"):
                print(record["traceback"])
        elif verbose:
            print(f"ok ({record['seconds']} s)")
    print(f"{ran} cases, {failures} failed")
    return 1 if failures else 0


def _forever(start: int):
    seed = start
    while True:
        yield seed
        seed += 1


@contextlib.contextmanager
def quiet():
    """Warnings, progress bars and library logging off for the duration (a case prints only what it finds), then
    as they were: inside pytest the next test's warnings are its own."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    loggers = {name: logging.getLogger(name).level for name in ("dpe_export", "torch._dynamo")}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        for name in loggers:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in loggers.items():
                logging.getLogger(name).setLevel(level)
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
