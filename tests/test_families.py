"""Every family in the registry, on a tiny random model built from its config class: below the window the export
is the base model; beyond it, the export equals the dense reference computed from the family's own forward
(tests/family_reference.py), on sdpa and eager, with and without a top-K selection; cached decoding equals
uncached; a left-padded batch generates what each prompt generates alone; exports load without dpe_export."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from family_reference import reference_logits, tiny_family_model
from helpers import assert_batch_generates_as_alone, tiny_tokenizer

from dpe_export.architectures import ARCHITECTURES
from dpe_export.modeling_templates import dpe_family, dpe_params
from dpe_export import dpe_ops

os.environ["HF_HUB_OFFLINE"] = "1"
WINDOW, SCALES = 5, [3, 8]
FAMILIES = sorted(ARCHITECTURES)


class Family:
    def __init__(self, arch, root):
        from transformers import AutoModelForCausalLM

        from dpe_export.export.convert import convert

        self.arch = arch
        try:
            model = tiny_family_model(arch)
        except Exception as e:  # e.g. OLMo 2's config class cannot be built at all on transformers 5.4.0
            pytest.skip(f"transformers cannot build a {arch.model_type} model here: {type(e).__name__}")
        self.base_dir = root / "base"
        model.save_pretrained(self.base_dir)
        tiny_tokenizer().save_pretrained(self.base_dir)
        # What was saved, as loaded back (a release may not round-trip every config field, e.g. rotary_pct on 5.4)
        self.base = AutoModelForCausalLM.from_pretrained(self.base_dir).eval()
        if hasattr(self.base, "set_experts_implementation") and getattr(self.base.config, "num_experts", None):
            self.base.set_experts_implementation("eager")
        self.num_freqs = dpe_family.rotary_dim_of(self.base.config) // 2
        self.groups = dpe_ops.even_group_boundaries(self.num_freqs, len(SCALES))
        g = torch.Generator().manual_seed(7)
        cfg = self.base.config
        idx = torch.rand(cfg.num_hidden_layers, cfg.num_attention_heads, self.num_freqs, generator=g).topk(
            max(1, self.num_freqs // 2), dim=-1).indices
        self.selected = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads, self.num_freqs,
                                    dtype=torch.bool).scatter_(-1, idx, True)
        self.exports = {}
        for topk in (False, True):
            params = dpe_params.DPEParams(WINDOW, SCALES, self.groups, target_length=512)
            # A folder name of its own per export: transformers names the remote-code modules after it, and one
            # process loads every family's export (test_every_export_loads_without_dpe_export_...)
            self.exports[topk] = convert(self.base_dir, root / f"{arch.model_type}-dpe-{int(topk)}", params,
                                         self.selected if topk else None)

    def load(self, topk=False, attn="sdpa"):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.exports[topk], trust_remote_code=True,
                                                    attn_implementation=attn).eval()

    def base_model(self, attn):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.base_dir, attn_implementation=attn).eval()

    def attns(self):
        """sdpa and eager, except where sdpa leaves out part of the family's attention (Architecture.sdpa: Gemma 2's
        logit soft-capping)."""
        return ["sdpa", "eager"] if self.arch.sdpa else ["eager"]


_BUILT: dict[str, Family] = {}


def family(model_type: str, tmp_path_factory) -> Family:
    """Each family's models and exports, made once per test process (a test over every family reuses them)."""
    if model_type not in _BUILT:
        _BUILT[model_type] = Family(ARCHITECTURES[model_type], tmp_path_factory.mktemp(model_type))
    return _BUILT[model_type]


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tmp_path_factory):
    return family(request.param, tmp_path_factory)


def test_below_the_window_the_export_is_the_base_model(fam):
    ids = torch.randint(4, 128, (2, WINDOW), generator=torch.Generator().manual_seed(1))
    for attn in fam.attns():
        with torch.no_grad():
            want = fam.base_model(attn)(ids).logits
            for topk in (False, True):
                got = fam.load(topk, attn)(ids).logits
                assert (got - want).abs().max().item() <= 1e-5, (attn, topk)


def test_an_export_uses_sdpa_only_where_it_computes_the_family_s_whole_attention(fam):
    """Gemma 2's attention logit softcapping is left out by transformers' sdpa (without a word before 5.21): its
    export loads with eager by default and refuses sdpa on every release, so its DPE and sliding layers both cap;
    every other family loads with sdpa by default."""
    from transformers import AutoModelForCausalLM

    if fam.arch.sdpa:
        assert fam.load(attn=None).config._attn_implementation == "sdpa"
        return
    assert getattr(fam.base.config, "attn_logit_softcapping", None)
    model = AutoModelForCausalLM.from_pretrained(fam.exports[False], trust_remote_code=True)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        AutoModelForCausalLM.from_pretrained(fam.exports[False], trust_remote_code=True, attn_implementation="sdpa")


@pytest.mark.parametrize("topk", [False, True], ids=["all-dims", "topk"])
def test_beyond_the_window_the_export_is_the_reference(fam, topk):
    ids = torch.randint(4, 128, (1, 36), generator=torch.Generator().manual_seed(2))
    want = reference_logits(fam.base, ids, WINDOW, SCALES, fam.groups, fam.selected if topk else None)
    with torch.no_grad():
        plain = fam.base.double()(ids, use_cache=False).logits
        fam.base.float()
        for attn in fam.attns():
            got = fam.load(topk, attn)(ids).logits.double()
            err = (got - want).abs().max().item()
            assert err <= 1e-4, f"{fam.arch.model_type}/{attn}/topk={topk}: max |export - reference| = {err}"
    assert (plain - want).abs().max().item() > 100 * max(err, 1e-6)  # the check has teeth


def test_cached_decoding_equals_uncached_and_the_reference(fam):
    model = fam.load(True, fam.attns()[0])
    prompt = torch.randint(4, 128, (1, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=24, do_sample=False)
        uncached = model.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=False)
        assert cached.tolist() == uncached.tolist()
        name = dpe_ops.cache_argument(model)
        out = model(cached[:, :3], use_cache=True)
        logits, cache = [out.logits], dpe_ops.output_cache(out)
        for t in range(3, cached.shape[1]):
            out = model(cached[:, t : t + 1], use_cache=True, **{name: cache})
            logits.append(out.logits)
            cache = dpe_ops.output_cache(out)
    want = reference_logits(fam.base, cached, WINDOW, SCALES, fam.groups, fam.selected)
    assert (torch.cat(logits, dim=1).double() - want).abs().max().item() <= 2e-4


@pytest.mark.parametrize("topk", [False, True], ids=["all-dims", "topk"])
def test_a_prompt_fed_in_chunks_on_a_cache_gives_the_reference(fam, topk):
    """How eval prefills long prompts: pieces shorter and longer than the window, each on the cache of the
    ones before (the fused path for several queries on a cache)."""
    ids = torch.randint(4, 128, (1, 36), generator=torch.Generator().manual_seed(5))
    want = reference_logits(fam.base, ids, WINDOW, SCALES, fam.groups, fam.selected if topk else None)
    model = fam.load(topk, fam.attns()[0])
    name = dpe_ops.cache_argument(model)
    logits, cache = [], None
    with torch.no_grad():
        for a, b in ((0, 3), (3, 11), (11, 14), (14, 29), (29, 36)):
            out = model(ids[:, a:b], use_cache=True, **({} if cache is None else {name: cache}))
            logits.append(out.logits)
            cache = dpe_ops.output_cache(out)
    err = (torch.cat(logits, dim=1).double() - want).abs().max().item()
    assert err <= 1e-4, f"{fam.arch.model_type}/topk={topk}: max |chunked - reference| = {err}"


def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(fam):
    model = fam.load(False, fam.attns()[0])
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(4, 128, (n,), generator=g) for n in (17, 6)]
    assert_batch_generates_as_alone(model, prompts, 10)


def test_every_export_loads_without_dpe_export_and_its_card_names_the_dpe_layers(tmp_path_factory, tmp_path):
    """Every family's top-K export in one Python where dpe_export cannot be imported (one process for all: a
    process per family spent ~5 s each importing torch and transformers)."""
    fams = {}
    for model_type in FAMILIES:
        try:
            fams[model_type] = family(model_type, tmp_path_factory)
        except pytest.skip.Exception:  # a family this transformers release cannot build
            continue
    if not fams:
        pytest.skip("transformers cannot build any registered family here")
    ids = torch.randint(4, 128, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = {t: f.load(True, f.attns()[0])(ids).logits[0, -3:] for t, f in fams.items()}
    exports = {t: (str(f.exports[True]), f.attns()[0]) for t, f in fams.items()}
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["dpe_export"] = None
        import torch
        from transformers import AutoModelForCausalLM
        out = {{}}
        for name, (path, attn) in {exports!r}.items():
            m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation=attn).eval()
            with torch.no_grad():
                out[name] = m(torch.tensor({ids.tolist()})).logits[0, -3:].tolist()
        print(json.dumps(out))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(got) == set(fams)
    for t, f in fams.items():
        assert torch.allclose(torch.tensor(got[t]), want[t], atol=1e-5), t
        card = (f.exports[True] / "README.md").read_text()
        full = dpe_family.full_attention_layers(f.base.config)
        assert f"DPE layers: {', '.join(map(str, full))}" in card, t


@pytest.mark.parametrize("model_type", FAMILIES)
def test_calibrate_with_dimension_scores_then_eval_the_export(model_type, tmp_path, run_cli):
    """calibrate (2-norm scores taken after the family's q/k norms, then the grid) and eval run on every family."""
    from helpers import byte_tokenizer

    try:
        base = tiny_family_model(ARCHITECTURES[model_type], vocab_size=260, max_position_embeddings=256)
    except Exception as e:
        pytest.skip(f"transformers cannot build a {model_type} model here: {type(e).__name__}")
    base.save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    r = run_cli("calibrate", "--model", tmp_path / "base", "-d", tmp_path / "cal", "--target-length", "1024",
                "--window", "256", "--groups", "2", "--topk", "2", "--samples", "1", "--needles", "1", "--device", "cpu")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert (tmp_path / "cal" / "dim_scores.safetensors").is_file()
    r = run_cli("convert", "--model", tmp_path / "base", "-o", tmp_path / "dpe", "--calibration",
                tmp_path / "cal" / "calibration.json")
    assert r.exit_code == 0, r.stderr
    r = run_cli("eval", "--model", tmp_path / "dpe", "--task", "passkey", "--lengths", "600", "--samples", "1",
                "--depths", "0.5", "--device", "cpu", "--no-progress",
                *([] if ARCHITECTURES[model_type].sdpa else ["--attn", "eager"]))
    assert r.exit_code == 0, r.stderr
