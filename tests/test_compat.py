"""What the runtime takes from transformers, checked on whatever release is installed (scripts/compat_matrix.py
runs this file under every 5.x release): decoding through each kind of KV cache equals the dense reference
step by step, and what DPE cannot trust (a cache under a name it does not know, positions that disagree with
the keys) raises instead of answering."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import assert_batch_generates_as_alone, save_tiny_model, tiny_model
from reference import reference_model


os.environ["HF_HUB_OFFLINE"] = "1"

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402
from dpe_export.modeling_templates import dpe_guards, dpe_params, dpe_workarounds
from dpe_export import dpe_ops

WINDOW, SCALES = 6, [2, 8, 3, 4]


def _selection(seed=3):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(2, 4, 8, generator=g).topk(3, dim=-1).indices
    return torch.zeros(2, 4, 8, dtype=torch.bool).scatter_(-1, idx, True)


@pytest.fixture(scope="module", params=[False, True], ids=["all-dims", "topk"])
def export(request, tmp_path_factory):
    from dpe_export.export.convert import convert

    tmp = tmp_path_factory.mktemp("compat")
    base = save_tiny_model(tmp / "base", "llama")
    selected = _selection() if request.param else None
    params = dpe_params.DPEParams(WINDOW, SCALES, dpe_ops.even_group_boundaries(8, 4), target_length=512)
    out = convert(base, tmp / "out", params, selected)
    ref = reference_model(tiny_model("llama"), WINDOW, SCALES, dpe_ops.even_group_boundaries(8, 4), selected)
    return out, ref


def _load(path, attn="sdpa"):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation=attn).eval()


def _step_logits(model, ids, cache, prefill=3):
    """Logits of every position, from a prefill of `prefill` tokens and then one token at a time."""
    name = dpe_ops.cache_argument(model)
    out = model(ids[:, :prefill], use_cache=True, **{name: cache})
    logits, cache = [out.logits], dpe_ops.output_cache(out)
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t : t + 1], use_cache=True, **{name: cache})
        logits.append(out.logits)
        cache = dpe_ops.output_cache(out)
    return torch.cat(logits, dim=1), cache


def _static_cache(model, length):
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=length)
    except TypeError:  # pragma: no cover - older signature
        return StaticCache(config=model.config, max_batch_size=1, max_cache_len=length)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["dpe-layers", "plain-dynamic", "static"])
def test_cached_decoding_equals_the_dense_reference_step_by_step(export, attn, kind, monkeypatch):
    out, ref = export
    model = _load(out, attn)
    ids = torch.randint(4, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    if kind == "plain-dynamic":  # a cache DPE does not touch: plain keys, rotated on the fly
        for mod in list(sys_modules_with("dpe_hf_model")):
            monkeypatch.setattr(mod, "prepare_cache", lambda cache, states: None)
    cache = _static_cache(model, 48) if kind == "static" else DynamicCache()
    with torch.no_grad():
        got, cache = _step_logits(model, ids, cache)
        want = ref(ids).logits
    if kind == "dpe-layers":
        assert any(type(layer).__name__.startswith("DPE") for layer in cache.layers)
    elif kind == "plain-dynamic":
        assert not any(type(layer).__name__.startswith("DPE") for layer in cache.layers)
    err = (got.double() - want).abs().max().item()
    assert err < 2e-4, f"{kind}/{attn}: max |cached - reference| = {err}"


def sys_modules_with(name):
    import sys

    return [m for k, m in list(sys.modules.items()) if k.endswith("." + name) and m is not None]


def test_generate_with_a_static_cache_equals_dynamic(export):
    out, _ = export
    model = _load(out)
    prompt = torch.randint(4, 128, (1, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        dynamic = model.generate(prompt, max_new_tokens=30, do_sample=False)
        static = model.generate(prompt, max_new_tokens=30, do_sample=False, cache_implementation="static")
        uncached = model.generate(prompt, max_new_tokens=30, do_sample=False, use_cache=False)
    assert dynamic.tolist() == static.tolist() == uncached.tolist()


def test_beam_search_and_a_cropped_cache_stay_exact(export):
    out, _ = export
    model = _load(out)
    prompt = torch.randint(4, 128, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        beams = model.generate(prompt, max_new_tokens=20, num_beams=3, do_sample=False)
        beams_uncached = model.generate(prompt, max_new_tokens=20, num_beams=3, do_sample=False, use_cache=False)
        assert beams.tolist() == beams_uncached.tolist()
        ids = torch.randint(4, 128, (1, 30), generator=torch.Generator().manual_seed(7))
        full = model(ids).logits
        name = dpe_ops.cache_argument(model)
        cache = dpe_ops.output_cache(model(ids[:, :25], use_cache=True))
        cache.crop(-5)  # drop the last 5, as assisted decoding does: the window's plain keys are rebuilt from the scaled ones
        again = model(ids[:, 20:], use_cache=True, **{name: cache}).logits
    assert torch.allclose(again, full[:, 20:], atol=1e-5, rtol=0)


def _renamed_cache(monkeypatch, new_name, drop=False):
    """Simulate a future transformers that hands the cache to the attention under another name (or not at all)."""
    from transformers.models.llama import modeling_llama

    layer_cls = modeling_llama.LlamaDecoderLayer
    forward = layer_cls.forward

    def renamed(self, *args, **kwargs):
        cache = None
        for old in dpe_workarounds.CACHE_ARGUMENT_NAMES:
            cache = kwargs.pop(old, cache)
        if not drop:
            kwargs[new_name] = cache
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(layer_cls, "forward", renamed)


@pytest.mark.parametrize("drop", [False, True], ids=["renamed", "dropped"])
def test_a_cache_that_does_not_reach_the_attention_raises(export, monkeypatch, drop):
    out, _ = export
    model = _load(out)
    _renamed_cache(monkeypatch, "kv_store", drop=drop)
    prompt = torch.randint(4, 128, (1, 12), generator=torch.Generator().manual_seed(8))
    with pytest.raises(dpe_guards.DPERuntimeError if not isinstance(dpe_guards.DPERuntimeError, type) else Exception,
                       match=rf"transformers {transformers.__version__}") as info:
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert type(info.value).__name__ == "DPERuntimeError"
    assert ("kv_store" in str(info.value)) if not drop else ("did not reach" in str(info.value))


def test_a_cache_under_an_unknown_name_is_refused_by_the_model(export):
    out, _ = export
    model = _load(out)
    with pytest.raises(Exception, match="got a KV cache as 'kv_store'"):
        model.model(torch.tensor([[5, 6, 7]]), kv_store=DynamicCache())


def _expose_old_cache_name(monkeypatch, model_cls, seen):
    """Make model_cls.forward take the cache as `cache` and list `past_key_values` beside it, as transformers'
    deprecate_kwarg(..., expose_in_signature=True) does from 5.25 on (so far on its mask functions only)."""
    import inspect

    forward = model_cls.forward
    sig = inspect.signature(forward)
    real = "cache" if "cache" in sig.parameters else "past_key_values"
    params = [p.replace(name="cache") if p.name == real else p for p in sig.parameters.values()]
    alias = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    params.insert(len(params) - (params[-1].kind is inspect.Parameter.VAR_KEYWORD), alias)

    def exposed(self, *args, cache=None, past_key_values=None, **kwargs):
        cache = past_key_values if cache is None else cache  # what the deprecation wrapper does
        seen.append(cache)
        return forward(self, *args, **{real: cache}, **kwargs)

    exposed.__signature__ = sig.replace(parameters=params)
    monkeypatch.setattr(model_cls, "forward", exposed)


def test_a_forward_that_lists_the_old_cache_name_beside_the_new_one_takes_the_cache_under_either(export, monkeypatch):
    import sys

    from transformers.models.llama.modeling_llama import LlamaModel

    out, _ = export
    model = _load(out)
    mixin = next(k for k in type(model.model).__mro__ if k.__name__ == "DPEModelMixin")
    core = sys.modules[mixin.__module__]  # the export's own copy of dpe_hf_model
    prompt = torch.randint(4, 128, (1, 20), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=12, do_sample=False)
    seen: list = []
    _expose_old_cache_name(monkeypatch, LlamaModel, seen)
    core._forward_parameters.cache_clear()
    try:
        with torch.no_grad():
            assert model.generate(prompt, max_new_tokens=12, do_sample=False).tolist() == expected.tolist()
            for name in ("cache", "past_key_values"):
                model.model(prompt, use_cache=True, **{name: DynamicCache()})
                assert type(seen[-1].layers[0]).__name__.startswith("DPE"), name
            model.model(prompt, use_cache=True, past_key_values=None)  # a caller passing the old name empty
            assert type(seen[-1].layers[0]).__name__.startswith("DPE")
            with pytest.raises(Exception, match="got a KV cache as 'past_key_values'"):
                model.model(prompt, cache=DynamicCache(), past_key_values=DynamicCache())
    finally:
        monkeypatch.undo()
        core._forward_parameters.cache_clear()


def test_positions_that_disagree_with_the_keys_raise(export):
    out, _ = export
    model = _load(out)
    ids = torch.randint(4, 128, (1, 10), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        with pytest.raises(Exception, match="tokens came before"):  # positions imply a missing prefix
            model(ids, position_ids=torch.arange(20, 30)[None])
        name = dpe_ops.cache_argument(model)
        cache = dpe_ops.output_cache(model(ids, use_cache=True))
        with pytest.raises(Exception, match="another sequence"):  # a cache reused without a reset
            model(ids, position_ids=torch.arange(10)[None], use_cache=True, **{name: cache})
        with pytest.raises(Exception, match="start a new cache"):  # and that cache stays refused
            model(ids[:, :2], use_cache=True, **{name: cache})
        # A plain continuation of a fresh cache is fine.
        cache = dpe_ops.output_cache(model(ids, use_cache=True))
        model(ids[:, :2], use_cache=True, **{name: cache})


def test_left_padded_batch_with_a_static_cache_equals_each_prompt_alone(export):
    out, _ = export
    model = _load(out)
    g = torch.Generator().manual_seed(10)
    prompts = [torch.randint(4, 128, (n,), generator=g) for n in (14, 5)]
    for impl in (None, "static"):
        assert_batch_generates_as_alone(model, prompts, 15, impl, cache_implementation=impl)


def test_dpe_cache_layers_hold_about_the_base_models_bytes(export):
    """All-dims exports keep each key once (scaled) plus the window's plain keys: (1 + w/(2n)) x the base."""
    out, _ = export
    model = _load(out)
    n = 200
    ids = torch.randint(4, 128, (1, n), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        cache = dpe_ops.output_cache(model(ids, use_cache=True))
    base_bytes = 2 * 2 * n * 2 * 16 * 4  # layers x (k, v) x n x kv heads x head_dim x fp32
    held = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values, getattr(layer, "_dpe_tail", None)):  # the window buffer counts whole
            held += 0 if t is None else t.numel() * t.element_size()
    ratio = held / base_bytes
    if model.dpe_selected_dims is None:
        assert ratio <= 1 + WINDOW / n, ratio
    else:  # a top-K selection keeps both rotations of every key
        assert ratio <= 1.5 + WINDOW / n, ratio


def test_the_shipped_testbed_export_retrieves_at_8x(tmp_path):
    """The README's main job, in-process: the calibrated export of testbed-llama finds pass keys at 2048 tokens."""
    from transformers import AutoTokenizer

    from dpe_export.evaluation.tasks import PromptBuilder, extract_number
    from dpe_export.export.convert import convert

    testbed = Path(__file__).resolve().parent / "fixtures" / "testbed-llama"
    params = dpe_params.DPEParams(32, [128, 128, 64, 8], [0, 4, 8, 12, 16], target_length=4096)
    out = convert(testbed, tmp_path / "dpe", params)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    builder = PromptBuilder(tokenizer)
    found = 0
    for seed in range(3):
        prompt = builder.passkey(2048, depth=(seed + 0.5) / 3, seed=1000 + seed)
        ids = torch.tensor([prompt.input_ids])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        found += extract_number(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)) == prompt.answer
    assert found == 3


def test_automodel_loads_the_dpe_base_model_not_the_plain_one(export):
    from transformers import AutoModel

    out, _ = export
    causal = _load(out)
    base = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    assert type(base).__name__ == "DPELlamaModel"
    assert (base.dpe_selected_dims is None) == (causal.dpe_selected_dims is None)
    ids = torch.randint(4, 128, (1, 40), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        want = causal(ids, output_hidden_states=True).hidden_states[-1]
        got = base(ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-6)


def test_a_selection_the_kv_groups_agree_on_keeps_each_key_once_and_stays_exact(tmp_path):
    """Query heads sharing a KV head select the same frequencies: the selection folds into per-head scales (1 on
    the frequencies not selected), the cache holds each key once (1 + w/n of the base) and every logit, prefill
    and step by step, equals the dense reference."""
    from dpe_export.export.convert import convert

    g = torch.Generator().manual_seed(8)
    per_kv = torch.rand(2, 2, 8, generator=g) < 0.5  # [layers, KV heads, frequencies]
    selected = per_kv.repeat_interleave(2, dim=1)  # 4 query heads, 2 per KV head
    base = save_tiny_model(tmp_path / "base", "llama")
    params = dpe_params.DPEParams(WINDOW, SCALES, dpe_ops.even_group_boundaries(8, 4), target_length=512)
    model = _load(convert(base, tmp_path / "out", params, selected))
    ref = reference_model(tiny_model("llama"), WINDOW, SCALES, dpe_ops.even_group_boundaries(8, 4), selected)
    states = model.model.__dict__["_dpe_states"]
    assert all(s.folded is not None and s.layout == "scaled" for s in states.values())
    n = 200
    ids = torch.randint(4, 128, (1, n), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        want = ref(ids).logits.float()
    torch.testing.assert_close(out.logits, want, rtol=1e-4, atol=1e-4)
    held = sum(t.numel() * t.element_size() for layer in dpe_ops.output_cache(out).layers
               for t in (layer.keys, layer.values, layer._dpe_tail) if t is not None)
    assert held / (2 * 2 * n * 2 * 16 * 4) <= 1 + WINDOW / n
    with torch.no_grad():
        stepped, _ = _step_logits(model, ids[:, :40], DynamicCache())
    torch.testing.assert_close(stepped, ref(ids[:, :40]).logits.float(), rtol=1e-4, atol=1e-4)


def test_a_tied_output_embedding_left_unloaded_is_tied_to_the_loaded_one(tmp_path, monkeypatch):
    """transformers 5.3.0 dropped a remote-code model's tied weights from its missing keys, then tied nothing: the
    output embedding stayed on the meta device and the logits were garbage. Reproduced here on any release by tying
    nothing during loading; the export ties it itself."""
    from transformers import PreTrainedModel

    from dpe_export.export.convert import convert

    base = save_tiny_model(tmp_path / "base", "llama", tie_word_embeddings=True)
    params = dpe_params.DPEParams(WINDOW, SCALES, dpe_ops.even_group_boundaries(8, 4), target_length=512)
    out = convert(base, tmp_path / "out", params)
    ids = torch.randint(4, 128, (1, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits

    original = PreTrainedModel.tie_weights

    def tie_nothing_while_loading(self, *args, missing_keys=None, **kwargs):  # where 5.3.0 ended up
        if missing_keys is None:
            original(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "tie_weights", tie_nothing_while_loading)
    model = _load(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" in model.all_tied_weights_keys
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, want, atol=1e-5)
