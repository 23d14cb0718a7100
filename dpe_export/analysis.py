"""Positional heads (arXiv 2410.08703): which attention heads move their attention to lower rotary frequencies as
token distance grows, and what DPE does to that.

For a query at i and a key at j <= i of head h, the attention logit is a sum over the rotary frequencies f of
c_f(i, j) = q_f . R((i - j) theta_f) k_f, the f-th 2-D pair's contribution (times the attention's own scaling;
non-rotary dims are left out). With q and k as the attention receives them (already rotated at their own
positions) c_f is the plain dot product of the pair. For a DPE export, pairs at distance >= w take the angle the
export applies: the extra DPE rotation of query and key on the frequencies it scales (the runtime's own dpe_rule functions).

The dominant dimension is D(i, j) = sum_f softmax_f(c(i, j)) * f, and a head's positional score is the Spearman
correlation rho between the distance i - j and D(i, j) over sampled pairs. Pairs are sampled with a fixed seed:
query positions uniform over the prompt, distances log-uniform from 1 to the farthest key the layer sees (a
sliding-window layer: its window). The prompts (haystack text) are prefilled in chunks; only each layer's keys
and the sampled queries are kept, so memory stays bounded at long lengths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from dpe_export.attention_capture import capture_attention
from dpe_export.errors import DPEExportError
from dpe_export.evaluation.generation import make_generate_fn, prefill
from dpe_export.evaluation.ppl import ppl_token_stream
from dpe_export.evaluation.prompts import sample_seed
from dpe_export.evaluation.registry import max_new_tokens_for
from dpe_export.evaluation.plots import require_matplotlib
from dpe_export.evaluation.run import evaluate_task
from dpe_export.evaluation.tasks import PromptBuilder
from dpe_export.generated import render_template
from dpe_export.output_files import write_output
from dpe_export.runtime import MODELING_TEMPLATES, resource_dir
from dpe_export.safefiles import safe_file
from dpe_export.sources.loading import input_device
from dpe_export.modeling_templates import dpe_family, dpe_hf_model, dpe_rule

DEFAULT_PAIRS = 2048  # sampled (query, key) pairs per prompt and layer
DEFAULT_SAMPLES = 2  # prompts per length
CHUNK = 1024  # prompt tokens per forward


def spearman(x, y) -> float:
    """Spearman's rank correlation of two 1-D tensors (average ranks for ties); 0 when either is constant."""
    import torch

    def ranks(v):
        v = v.double()
        order = torch.argsort(v, stable=True)
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        _, inverse, counts = torch.unique(v, return_inverse=True, return_counts=True)
        sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, r)
        return (sums / counts)[inverse]

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    return float((rx * ry).sum()) / den if den > 0 else 0.0


def pair_contributions(q, k, num_freqs: int):
    """c_f of rotated queries q [..., D] and keys k [..., D]: q_f k_f + q_{f+F} k_{f+F} -> [..., F] (float32)."""
    q, k = q.float(), k.float()
    return q[..., :num_freqs] * k[..., :num_freqs] + q[..., num_freqs: 2 * num_freqs] * k[..., num_freqs: 2 * num_freqs]


def dominant_dimension(c):
    """D = sum_f softmax_f(c) * f for contributions c [..., F] -> [...]."""
    import torch

    f = torch.arange(c.shape[-1], dtype=torch.float32, device=c.device)
    return (torch.softmax(c.float(), dim=-1) * f).sum(-1)


def distance_bins(d) -> Any:
    """Bin index of each distance: floor(log2 d) (distance 1 -> 0, 2-3 -> 1, 4-7 -> 2, ...)."""
    import torch

    return torch.floor(torch.log2(d.double().clamp(min=1))).long()


@dataclass
class _Layer:
    keys: list = field(default_factory=list)  # [Hkv, m, D] chunks, plain rotation
    queries: list = field(default_factory=list)  # (positions [p], [H, p, D]) of the sampled queries
    scaling: float = 1.0
    module: Any = None


class _Recorder:
    """The capture callback: keeps each layer's keys and its sampled queries, chunk after chunk."""

    def __init__(self, sampled_queries):
        self.sampled = sampled_queries  # 1-D tensor of query positions to keep
        self.layers: dict[int, _Layer] = {}

    def __call__(self, idx, module, query, key, kwargs):
        import torch

        pos = kwargs["position_ids"].reshape(-1)[-query.shape[2]:].to(self.sampled.device)
        m = query.shape[2]
        layer = self.layers.setdefault(idx, _Layer(module=module))
        layer.scaling = float(kwargs.get("scaling") or query.shape[-1] ** -0.5)
        hkv = getattr(module.config, "num_key_value_heads", None) or query.shape[1]
        # the m new keys, still plain (a DPE cache layer with a selection stacks [plain | scaled] heads)
        layer.keys.append(key[0, :hkv, key.shape[2] - m:].detach().float().cpu().clone())  # DPE rotates in place
        keep = torch.isin(pos, self.sampled)
        if bool(keep.any()):
            layer.queries.append((pos[keep].cpu(), query[0, :, keep.to(query.device)].detach().float().cpu().clone()))


def _sample_pairs(n: int, pairs: int, seed: int):
    """Query positions and the uniform draws that place their keys (see _distances), fixed by `seed`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, n, (pairs,), generator=g), torch.rand(pairs, generator=g, dtype=torch.float64)


def _distances(i, u, visible: Optional[int]):
    """Distances log-uniform from 1 to the farthest key query i sees (i itself, or visible - 1)."""
    import torch

    far = i if visible is None else torch.clamp(i, max=max(1, visible - 1))
    return torch.floor(torch.exp(u * torch.log(far.double() + 1))).long().clamp(min=1).minimum(far)


def _dpe_contributions(state, qi, kj, i, j, num_freqs):
    """c_f with the angle a DPE layer applies: far pairs (i - j >= w) get DPE's rotation on scaled frequencies."""
    import torch

    c = pair_contributions(qi, kj, num_freqs)  # plain angle
    far = (i - j) >= state.window
    if not bool(far.any()):
        return c
    scale, inv_freq = state.scale(torch.device("cpu")), state.inv_freq().cpu()
    qs = dpe_rule.rotate_by(qi[:, far].double(), dpe_rule.dpe_delta_positions(i[far][None], scale, state.window, query=True),
                        inv_freq.double(), state.rotary_dim)
    ks = dpe_rule.rotate_by(kj[:, far].double(), dpe_rule.dpe_delta_positions(j[far][None], scale, state.window, query=False),
                        inv_freq.double(), state.rotary_dim)
    scaled = pair_contributions(qs, ks, num_freqs)
    if state.selected is not None:
        sel = state.selected.cpu()[:, None, :num_freqs]  # [H, 1, F]
        scaled = torch.where(sel, scaled, c[:, far])
    c[:, far] = scaled.float()
    return c


def _layer_pairs(layer: _Layer, i, u, num_freqs: int, visible: Optional[int]):
    """(distances [P], D [H, P]) of one layer's sampled pairs."""
    import torch

    keys = torch.cat(layer.keys, dim=1)  # [Hkv, n, D]
    qpos = torch.cat([p for p, _ in layer.queries])
    qs = torch.cat([q for _, q in layer.queries], dim=1)  # [H, p, D]
    d = _distances(i, u, visible)
    j = i - d
    where = {int(p): t for t, p in enumerate(qpos.tolist())}
    qi = qs[:, [where[int(x)] for x in i.tolist()]]  # [H, P, D]
    rep = qs.shape[0] // keys.shape[0]
    kj = keys[:, j].repeat_interleave(rep, dim=0)  # [H, P, D]
    state = layer.module.__dict__.get("dpe")
    if state is not None:
        c = _dpe_contributions(state, qi, kj, i, j, num_freqs)
    else:
        c = pair_contributions(qi, kj, num_freqs)
    return d, dominant_dimension(c * layer.scaling)


def _visible_distance(model, idx: int) -> Optional[int]:
    config = model.config
    types = getattr(config, "layer_types", None)
    if types and idx < len(types) and types[idx] != "full_attention":
        return getattr(config, "sliding_window", None)
    return None


def analyze_prompt(model, input_ids, pairs: int = DEFAULT_PAIRS, seed: int = 0) -> dict[int, tuple]:
    """{layer: (distances [P], D [H, P])} of one prompt (token ids [n])."""
    import torch

    n = len(input_ids)
    i, u = _sample_pairs(n, pairs, seed)
    recorder = _Recorder(torch.unique(i))
    ids = torch.tensor([list(input_ids)], device=input_device(model))
    num_freqs = dpe_family.rotary_dim_of(model.config) // 2
    with capture_attention(model, recorder), torch.inference_mode():
        prefill(model, ids, CHUNK)
    return {idx: _layer_pairs(layer, i, u, num_freqs, _visible_distance(model, idx))
            for idx, layer in sorted(recorder.layers.items())}


@dataclass
class HeadAnalysis:
    """Per (length, layer, head): rho and the mean D per distance bin (bin b: distances 2^b .. 2^(b+1) - 1)."""

    records: list[dict[str, Any]]

    def rho(self, length: int):
        import torch

        rows = [r for r in self.records if r["length"] == length]
        layers = 1 + max(r["layer"] for r in rows)
        heads = 1 + max(r["head"] for r in rows)
        out = torch.full((layers, heads), float("nan"))
        for r in rows:
            out[r["layer"], r["head"]] = r["rho"]
        return out

    def top_heads(self, length: int, k: int) -> list[tuple[int, int]]:
        rows = sorted((r for r in self.records if r["length"] == length), key=lambda r: -r["rho"])
        return [(r["layer"], r["head"]) for r in rows[:k]]

    def to_json(self) -> dict[str, Any]:
        return {"records": self.records}

    @classmethod
    def from_json(cls, data: Any) -> "HeadAnalysis":
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise DPEExportError("not a dpe-export analyze --json file (no records list)")
        return cls(data["records"])


def memory_needed(ckpt, length: int, bytes_per_value: int = 2) -> int:
    """What one prompt holds: every layer's keys kept here (float32) and the model's own KV cache. `ckpt`: the
    model's Checkpoint (config.json as read once)."""
    cfg = ckpt.text_config
    layers = cfg["num_hidden_layers"]
    hkv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return layers * hkv * ckpt.head_dim * length * (4 + 2 * bytes_per_value)


def check_fits(ckpt, lengths: Sequence[int], available: Optional[int]) -> None:
    """Refuse, in one line, lengths whose kept keys and KV cache would not fit in `available` bytes."""
    if available is None:
        return
    for n in lengths:
        need = memory_needed(ckpt, n)
        if need > 0.8 * available:
            raise DPEExportError(f"analyzing {n} tokens needs about {need / 2**30:.1f} GiB for the keys and KV cache, "
                                 f"but {available / 2**30:.1f} GiB is free; give shorter --lengths")


def analyze(model, tokenizer, lengths: Sequence[int], *, samples: int = DEFAULT_SAMPLES, pairs: int = DEFAULT_PAIRS,
            seed: int = 0, progress=None) -> HeadAnalysis:
    """Positional scores of every (layer, head) at each length, pooled over `samples` haystack prompts."""
    import torch

    if samples < 1 or pairs < 2:
        raise DPEExportError("analyze needs at least 1 sample and 2 pairs per prompt")
    records = []
    for n in lengths:
        stream = ppl_token_stream(tokenizer, n * samples, seed=seed)
        pooled: dict[int, list] = {}
        for s in range(samples):
            per_layer = analyze_prompt(model, stream[s * n:(s + 1) * n], pairs, sample_seed(seed, "heads", n, s))
            for idx, (d, dom) in per_layer.items():
                pooled.setdefault(idx, []).append((d, dom))
            if progress is not None:
                progress.update(1)
        for idx, parts in sorted(pooled.items()):
            d = torch.cat([p[0] for p in parts])
            dom = torch.cat([p[1] for p in parts], dim=1)
            bins = distance_bins(d)
            for h in range(dom.shape[0]):
                curve = {int(b): float(dom[h, bins == b].mean()) for b in torch.unique(bins).tolist()}
                records.append({"length": int(n), "layer": idx, "head": h, "rho": spearman(d, dom[h]),
                                "pairs": int(len(d)), "dominant_by_distance_bin": curve})
    return HeadAnalysis(records)


def summary_table(result: HeadAnalysis, top: int = 5) -> str:
    """Per length: how many heads have rho > 0.5, and the top heads."""
    lines = ["length  heads  rho>0.5  top heads (layer.head rho)"]
    for n in sorted({r["length"] for r in result.records}):
        rows = [r for r in result.records if r["length"] == n]
        best = sorted(rows, key=lambda r: -r["rho"])[:top]
        lines.append(f"{n:>6}  {len(rows):>5}  {sum(r['rho'] > 0.5 for r in rows):>7}  "
                     + "  ".join(f"{r['layer']}.{r['head']} {r['rho']:.2f}" for r in best))
    return "\n".join(lines)


def plot_analysis(result: HeadAnalysis, out_dir, top: int = 4, compare: Optional[HeadAnalysis] = None,
                  label: str = "model", compare_label: str = "compare") -> list:
    """rho heatmaps (layer x head, one per length) and D against distance for the top heads of the shortest
    length, with `compare` (another run, e.g. the base model) dashed. Returns the files written."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lengths = sorted({r["length"] for r in result.records})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4 * len(lengths), 3.5), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        im = ax.imshow(result.rho(n).numpy(), vmin=-1, vmax=1, cmap="coolwarm", aspect="auto")
        ax.set(title=f"rho at {n} tokens", xlabel="head", ylabel="layer")
    fig.colorbar(im, ax=axes[0].tolist())
    heat = out_dir / "positional_heads_rho.png"
    fig.savefig(heat, dpi=100, metadata={"Software": None})
    plt.close(fig)
    heads = result.top_heads(lengths[0], top)
    fig, axes = plt.subplots(1, len(heads), figsize=(4 * len(heads), 3.2), squeeze=False)
    for ax, (layer, head) in zip(axes[0], heads):
        for run, style, name in ((result, "-", label), (compare, "--", compare_label)):
            if run is None:
                continue
            for n in lengths:
                rec = next((r for r in run.records if (r["length"], r["layer"], r["head"]) == (n, layer, head)), None)
                if rec:
                    curve = sorted((int(b), v) for b, v in rec["dominant_by_distance_bin"].items())
                    ax.plot([2 ** b for b, _ in curve], [v for _, v in curve], style, label=f"{name} {n}")
        ax.set(xscale="log", title=f"layer {layer} head {head}", xlabel="distance", ylabel="dominant dimension D")
    axes[0][0].legend(fontsize=7)
    curves = out_dir / "positional_heads_D.png"
    fig.savefig(curves, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return [heat, curves]


# ----------------------------------------------------------------------------------------------------------
# Ablation: do the positional heads matter more than any heads?
# ----------------------------------------------------------------------------------------------------------

_OUTPUT_PROJECTIONS = ("o_proj", "dense", "out_proj", "c_proj")


def parse_ablation(spec: str, num_heads: int) -> tuple[str, int]:
    """'top:K' or 'random:K' -> (kind, K), 1 <= K <= the model's number of heads (all layers)."""
    kind, _, k = str(spec).partition(":")
    try:
        k = int(k)
    except ValueError:
        k = 0
    if kind not in ("top", "random") or k < 1:
        raise DPEExportError(f"--ablate takes top:K or random:K (K >= 1 heads), got {spec!r}")
    if k > num_heads:
        raise DPEExportError(f"--ablate {spec}: K is more than the model's {num_heads} attention heads")
    return kind, k


def _output_projection(attn):
    for name in _OUTPUT_PROJECTIONS:
        proj = getattr(attn, name, None)
        if proj is not None and hasattr(proj, "weight"):
            return proj
    raise DPEExportError(f"cannot find the output projection of {type(attn).__name__} to zero heads in")


class zeroed_heads:
    """Inside, the chosen (layer, head) pairs contribute nothing: their slice of the output projection's input is
    zeroed (a forward pre-hook), as if the head's attention output were 0."""

    def __init__(self, model, heads: Sequence[tuple[int, int]]):
        self.model, self.heads, self.hooks = model, list(heads), []

    def __enter__(self):
        head_dim = dpe_family.head_dim_of(self.model.config)
        layers = self.model.get_decoder().layers
        by_layer: dict[int, list[int]] = {}
        for layer, head in self.heads:
            by_layer.setdefault(layer, []).append(head)
        for layer, heads in by_layer.items():
            proj = _output_projection(dpe_hf_model.attention_module(layers[layer]))

            def hook(module, args, heads=tuple(heads)):
                x = args[0].clone()
                for h in heads:
                    x[..., h * head_dim:(h + 1) * head_dim] = 0
                return (x, *args[1:])

            self.hooks.append(proj.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def ablate(model, tokenizer, result: HeadAnalysis, spec: str, *, length: int, task: str, draws: int = 5,
           samples: int = 2, seed: int = 0, progress=None) -> dict[str, Any]:
    """Retrieval accuracy at `length` with no head zeroed, with the top-K heads by rho (at the first analyzed
    length) zeroed, and with K random heads zeroed in each of `draws` draws (seeded)."""
    import random

    config = model.config
    all_heads = [(layer, h) for layer in range(config.num_hidden_layers) for h in range(config.num_attention_heads)]
    _, k = parse_ablation(spec, len(all_heads))
    if draws < 1:
        raise DPEExportError("--draws must be >= 1")
    builder = PromptBuilder(tokenizer)
    generate = make_generate_fn(model, tokenizer, max_new_tokens_for(task))

    def accuracy(heads) -> float:
        with zeroed_heads(model, heads):
            records = evaluate_task(task, builder, generate, [length], samples=samples, seed=seed)
        if progress is not None:
            progress.update(1)
        return sum(r["accuracy"] * r["samples"] for r in records) / sum(r["samples"] for r in records)

    first = min(r["length"] for r in result.records)
    top = result.top_heads(first, k)
    rng = random.Random(seed)
    random_draws = [sorted(rng.sample(all_heads, k)) for _ in range(draws)]
    base = accuracy([])
    top_acc = accuracy(top)
    rand = [accuracy(heads) for heads in random_draws]
    mean = sum(rand) / len(rand)
    spread = (sum((a - mean) ** 2 for a in rand) / max(1, len(rand) - 1)) ** 0.5
    return {"task": task, "length": int(length), "k": k, "prompts": samples * 5, "none": base,
            "top": {"heads": [list(h) for h in top], "accuracy": top_acc},
            "random": {"draws": [{"heads": [list(h) for h in d], "accuracy": a} for d, a in zip(random_draws, rand)],
                       "mean": mean, "std": spread, "min": min(rand), "max": max(rand)}}


def ablation_table(ab: dict[str, Any]) -> str:
    r = ab["random"]
    return (f"ablation ({ab['task']} at {ab['length']} tokens, {ab['prompts']} prompts, K = {ab['k']}): "
            f"no head zeroed {ab['none']:.2f}; top-{ab['k']} positional heads zeroed {ab['top']['accuracy']:.2f}; "
            f"{ab['k']} random heads zeroed {r['mean']:.2f} +- {r['std']:.2f} (min {r['min']:.2f}, max {r['max']:.2f}, "
            f"{len(r['draws'])} draws)")


POSITIONAL_HEADS_TEMPLATE = "positional_heads.md.jinja"
CARD_BEGIN = "<!-- dpe-export analyze: begin -->"
CARD_END = "<!-- dpe-export analyze: end -->"


def card_section(result: HeadAnalysis, ablation: Optional[dict] = None, top: int = 5) -> str:
    """The model card's "Positional heads" section (markdown, from POSITIONAL_HEADS_TEMPLATE beside the model
    card's template), between markers so a later run replaces it."""
    rows = []
    for n in sorted({r["length"] for r in result.records}):
        at_n = [r for r in result.records if r["length"] == n]
        rows.append({"length": n, "heads": len(at_n), "positional": sum(r["rho"] > 0.5 for r in at_n),
                     "top": sorted(at_n, key=lambda r: -r["rho"])[:top]})
    variables = {"begin": CARD_BEGIN, "end": CARD_END, "rows": rows,
                 "ablation": ablation_table(ablation) if ablation else None}
    return render_template(resource_dir(MODELING_TEMPLATES) / POSITIONAL_HEADS_TEMPLATE, variables)


def write_card_section(export_dir, section: str) -> Path:
    """Put `section` into the export's README.md, replacing the one an earlier run wrote (atomically)."""
    path = safe_file(export_dir, "README.md")
    if path is None:
        raise DPEExportError(f"{export_dir} has no README.md model card to add the section to")
    text = path.read_text(encoding="utf-8")
    if CARD_BEGIN in text and CARD_END in text:
        a, b = text.index(CARD_BEGIN), text.index(CARD_END) + len(CARD_END)
        text = text[:a] + section.rstrip("\n") + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    return write_output(path, text)
