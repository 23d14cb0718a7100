"""End to end on the shipped testbed (trained at 256 tokens): the DPE export retrieves pass keys at 4x the
training length, where the base model fails, through nothing but transformers' trust_remote_code loading."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpe_export.evaluate import evaluate_passkey, make_generate_fn
from dpe_export.export import convert
from dpe_export.resources import load_dpe_core
from dpe_export.tasks import PromptBuilder

TESTBED = Path(__file__).resolve().parent / "fixtures" / "testbed-llama"
pytestmark = pytest.mark.skipif(not TESTBED.is_dir(), reason="tests/fixtures/testbed-llama is not there")


def passkey_accuracy(model, tokenizer, length: int, samples: int = 2) -> float:
    builder = PromptBuilder(tokenizer, haystack_seed=77)
    records = evaluate_passkey(builder, make_generate_fn(model, tokenizer, 8), [length],
                               depths=(0.1, 0.3, 0.5, 0.7, 0.9), samples=samples, seed=77)
    return sum(r["accuracy"] * r["samples"] for r in records) / sum(r["samples"] for r in records)


def test_dpe_export_retrieves_where_the_base_model_fails(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    dpe_core = load_dpe_core()
    params = dpe_core.DPEParams(32, [4, 8, 16, 32], [0, 4, 8, 12, 16], target_length=4096)
    out = convert(TESTBED, tmp_path / "dpe", params)
    tokenizer = AutoTokenizer.from_pretrained(TESTBED)
    base = AutoModelForCausalLM.from_pretrained(TESTBED).eval()
    dpe = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert passkey_accuracy(base, tokenizer, 256) >= 0.9  # it was trained for this length
        assert passkey_accuracy(base, tokenizer, 1024) <= 0.2
        assert passkey_accuracy(dpe, tokenizer, 1024) >= 0.8
