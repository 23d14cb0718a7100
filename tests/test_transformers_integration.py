"""An export behaves like any transformers model, or refuses: training (gradients against float64 finite
differences and the dense reference, gradient checkpointing, a PEFT LoRA step, Trainer), torch.compile, every
cache generate() offers on CPU, and loading paths that would drop DPE (no trust_remote_code, other Auto classes,
serving engines)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from helpers import RUNTIME_FILES, save_tiny_model, tiny_model
from reference import reference_model


os.environ["HF_HUB_OFFLINE"] = "1"

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402
from dpe_export.modeling_templates import dpe_family, dpe_hf_model, dpe_params
from dpe_export import dpe_ops

WINDOW, SCALES = 6, [2, 8, 3, 4]
GROUPS = [0, 2, 4, 6, 8]
N = 40  # tokens: far past the window


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from dpe_export.export.convert import convert

    tmp = tmp_path_factory.mktemp("integration")
    base = save_tiny_model(tmp / "base", "llama")
    params = dpe_params.DPEParams(WINDOW, SCALES, GROUPS, target_length=512)
    return convert(base, tmp / "out", params)


def _ids(n=N, seed=5, batch=1):
    return torch.randint(4, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def _load(path, attn="sdpa", dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation=attn,
                                                dtype=dtype).eval()


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

def _objective(model, ids):
    g = torch.Generator().manual_seed(9)
    logits = model(ids, use_cache=False).logits
    weights = torch.randn(logits.shape, generator=g, dtype=logits.dtype)
    return (logits * weights).sum()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gradients_match_the_dense_reference_autograd(export, attn, checkpointing):
    ids = _ids()
    model = _load(export, attn, torch.float64)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()  # dropout is 0 in the config: train mode changes nothing but checkpointing
    params = {"q0": model.model.layers[0].self_attn.q_proj.weight, "k1": model.model.layers[1].self_attn.k_proj.weight}
    _objective(model, ids).backward()
    grads = {k: p.grad.clone() for k, p in params.items()}

    # the independent dense reference (its own float64 attention), same weights, autograd
    ref = reference_model(tiny_model("llama"), WINDOW, SCALES, GROUPS)
    ref_params = {"q0": ref.model.layers[0].self_attn.q_proj.weight, "k1": ref.model.layers[1].self_attn.k_proj.weight}
    _objective(ref, ids).backward()
    for k in grads:  # the family's RoPE forms cos/sin in float32 even in a float64 model; the reference in float64
        torch.testing.assert_close(grads[k], ref_params[k].grad, rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("topk", [False, True], ids=["all-dims", "topk"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dpe_attention_passes_float64_gradcheck(export, attn, topk):
    """Finite differences in float64 through a whole DPE attention layer (projections, RoPE, DPE), past the
    window; at the model level the family's RMSNorm works in float32, too coarse for finite differences."""
    model = _load(export, attn, torch.float64)
    if topk:
        g = torch.Generator().manual_seed(4)
        dpe_hf_model.set_dpe_selection(model, torch.rand(2, 4, 8, generator=g) < 0.5)
    attn_layer = model.model.layers[1].self_attn
    n = 16
    hidden = torch.randn(1, n, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    positions = torch.arange(n)[None]
    cos, sin = model.model.rotary_emb(hidden, positions)

    def layer(h):
        return attn_layer(h, position_embeddings=(cos, sin), attention_mask=None, position_ids=positions)[0]

    assert torch.autograd.gradcheck(layer, (hidden,), eps=1e-6, atol=1e-6, rtol=1e-5)


def _train_steps(model, ids, steps=4, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_a_peft_lora_step_runs_and_lowers_the_loss(export):
    peft = pytest.importorskip("peft")
    model = _load(export)
    # PEFT keys its default target modules on model_type, which an export does not share with its family
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ids = _ids(batch=2)
    losses = _train_steps(lora, ids, steps=5)
    assert losses[-1] < losses[0]
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_trainer_steps_lower_the_loss_and_the_trained_export_reloads(export, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _load(export)
    rows = [{"input_ids": ids, "labels": ids} for ids in _ids(batch=8)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=6,
                             learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 4 and losses[-1] < losses[0]
    trainer.save_model(str(tmp_path / "trained"))
    reloaded = _load(tmp_path / "trained")
    assert reloaded.config.dpe == model.config.dpe  # the DPE rule is fixed; the weights trained
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_ids()).logits, model.eval()(_ids()).logits)


# ----------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------

REPORTED_LENGTHS = (33, 64, 100, 128, 323)  # issue 33: wrong from the window on at all but 100 before the fix


@pytest.fixture(scope="module")
def testbed_export(tmp_path_factory):
    """The README's own export: the shipped Llama testbed, window 32, scale factors 128,128,64,8."""
    from dpe_export.export.convert import convert

    base = Path(__file__).parent / "fixtures" / "testbed-llama"
    params = dpe_params.DPEParams(32, [128, 128, 64, 8], [0, 4, 8, 12, 16], target_length=4096)
    return convert(base, tmp_path_factory.mktemp("testbed") / "out", params)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static-shapes", "dynamic-shapes"])
def test_torch_compile_equals_eager_mode_at_the_reported_lengths(testbed_export, dynamic):
    """The issue's reproduction at its own sizes: the README's export, sdpa, inductor, the cache on (the
    default). Before the fix every length but 100 was wrong past the window (max |diff| 7-16)."""
    torch._dynamo.reset()
    model = _load(testbed_export)
    compiled = torch.compile(model, dynamic=dynamic)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in REPORTED_LENGTHS:
            ids = torch.randint(5, model.config.vocab_size, (1, n), generator=g)
            want = model(ids).logits
            got = compiled(ids).logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"n = {n}: {m}")
    # Dynamo traces the runtime without warnings about it (it warned of "potential silent incorrectness" on the
    # lru_cache the runtime used to have).
    assert not [str(w.message) for w in caught if "modeling_templates" in str(w.message)
            or any(name[:-3] in str(w.message) for name in RUNTIME_FILES)]


def test_compiled_generation_equals_eager_generation(testbed_export):
    """generate() with the forward compiled, on a dynamic cache, and the way transformers compiles generation
    itself: a static cache and a compile config (the prefill eager, every decoding step compiled, fullgraph)."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    eager, model = _load(testbed_export), _load(testbed_export)
    ids = torch.randint(5, model.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    want = eager.generate(ids, **kw)
    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True  # transformers compiles generation on accelerators only unless told
    got = model.generate(ids, cache_implementation="static", compile_config=config, **kw)
    assert torch.equal(got, want)
    model.forward = torch.compile(model.forward)
    assert torch.equal(model.generate(ids, **kw), want)


def test_a_cache_made_in_eager_mode_continues_under_torch_compile(testbed_export):
    """A prompt prefilled eagerly (the DPE cache layers keep scaled keys), then chunks and single tokens through
    the compiled model on that cache."""
    from transformers import DynamicCache

    torch._dynamo.reset()
    model = _load(testbed_export)
    compiled = torch.compile(model)
    ids = torch.randint(5, model.config.vocab_size, (1, 100), generator=torch.Generator().manual_seed(2))
    name = dpe_ops.cache_argument(model)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        cache = DynamicCache()
        logits = [model(ids[:, :50], **{name: cache}).logits]
        for a, b in ((50, 90), (90, 91), (91, 92)):
            logits.append(compiled(ids[:, a:b], **{name: cache}).logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), want[:, :92], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Caches
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("implementation", ["dynamic", "static", "offloaded"])
def test_every_cache_generate_offers_equals_no_cache(export, implementation):
    if implementation == "offloaded" and not torch.cuda.is_available():
        pytest.skip("transformers' offloaded cache needs a CUDA device")
    model = _load(export)
    ids = _ids()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(model.generate(ids, cache_implementation=implementation, **kw), want)


def test_a_cache_the_user_builds_is_exact_fresh_prefilled_or_static(export):
    from transformers import DynamicCache, StaticCache

    model = _load(export)
    ids = _ids()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = model.generate(ids, use_cache=False, **kw)
    name = dpe_ops.cache_argument(model)
    assert torch.equal(model.generate(ids, **{name: DynamicCache()}, **kw), want)
    prefilled = DynamicCache()  # the user prefills a prefix, then generates from the whole prompt
    with torch.no_grad():
        model(ids[:, :20], use_cache=True, **{name: prefilled})
    assert torch.equal(model.generate(ids, **{name: prefilled}, **kw), want)
    try:
        static = StaticCache(config=model.config, max_cache_len=64)
    except TypeError:  # pragma: no cover - older signature
        static = StaticCache(config=model.config, max_batch_size=1, max_cache_len=64)
    assert torch.equal(model.generate(ids, **{name: static}, **kw), want)


def test_sliding_window_layers_keep_a_sliding_cache(tmp_path):
    """Gemma 3: sliding layers stay the base model's; static (sliding-aware) and dynamic caches equal no cache."""
    from family_reference import tiny_family_model

    from dpe_export.architectures import ARCHITECTURES
    from dpe_export.export.convert import convert

    arch = ARCHITECTURES["gemma3_text"]
    tiny_family_model(arch).save_pretrained(tmp_path / "base")
    params = dpe_params.DPEParams(5, [3, 8], dpe_ops.even_group_boundaries(
        dpe_family.rotary_dim_of(AutoConfig.from_pretrained(tmp_path / "base")) // 2, 2), target_length=512)
    out = convert(tmp_path / "base", tmp_path / "dpe", params)
    model = _load(out)
    ids = _ids(n=30)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = model.generate(ids, use_cache=False, **kw)
    for implementation in ("dynamic", "static"):
        assert torch.equal(model.generate(ids, cache_implementation=implementation, **kw), want), implementation


# ----------------------------------------------------------------------------------------------------------
# Loading paths that would drop DPE
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("auto", [AutoModelForCausalLM, AutoModel, AutoConfig])
def test_loading_without_trust_remote_code_fails_instead_of_dropping_dpe(export, auto):
    with pytest.raises(ValueError, match="trust_remote_code"):
        auto.from_pretrained(export, trust_remote_code=False)


def test_auto_classes_the_export_does_not_define_fail_loudly(export):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    for auto in (AutoModelForSequenceClassification, AutoModelForTokenClassification):
        with pytest.raises(ValueError, match="Unrecognized configuration class"):
            auto.from_pretrained(export, trust_remote_code=True)


def test_the_config_is_the_exports_own_and_knows_its_family(export):
    config = AutoConfig.from_pretrained(export, trust_remote_code=True)
    assert config.model_type == "dpe_llama" and dpe_family.base_model_type(config) == "llama"
    assert type(_load(export)).__name__ == "DPELlamaForCausalLM"


def _as_if_called_from(module_name: str, fn, *args, **kwargs):
    """Run fn as code of module `module_name` would (what refuse_serving_engines looks at)."""
    scope = {"__name__": module_name, "fn": fn, "args": args, "kwargs": kwargs}
    exec("def engine_call():\n    return fn(*args, **kwargs)\n", scope)
    return scope["engine_call"]()


@pytest.mark.parametrize("engine", ["vllm.transformers_utils.config", "sglang.srt.configs"])
def test_serving_engines_are_refused_in_one_line(export, engine):
    with pytest.raises(RuntimeError) as err:
        _as_if_called_from(engine, AutoConfig.from_pretrained, str(export), trust_remote_code=True)
    message = str(err.value)
    assert "\n" not in message and "cannot serve it" in message and engine.split(".")[0] in message
    # and the model class refuses vLLM's attention implementation (its Transformers backend sets it)
    config = AutoConfig.from_pretrained(export, trust_remote_code=True)
    config._attn_implementation = "vllm"
    cls = type(_load(export))
    with pytest.raises(RuntimeError, match="vllm cannot serve it"):
        cls(config)


def test_text_generation_pipeline_runs_without_the_not_supported_line(export, caplog):
    import logging

    from transformers import pipeline

    with caplog.at_level(logging.WARNING):
        pipe = pipeline("text-generation", model=str(export), trust_remote_code=True)
        out = pipe("a b c", max_new_tokens=3, do_sample=False)
    assert out and "generated_text" in out[0]
    assert "is not supported for" not in caplog.text
