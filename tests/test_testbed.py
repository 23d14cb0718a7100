"""End to end on the shipped testbeds (trained at 256 tokens): a DPE export of each retrieves pass keys at 4x
the training length, where its base model mostly fails, through nothing but transformers' trust_remote_code
loading."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpe_export.evaluation.generation import make_generate_fn
from dpe_export.evaluation.tasks.passkey import evaluate_passkey
from dpe_export.evaluation.tasks import PromptBuilder
from dpe_export.export.convert import convert
from dpe_export.modeling_templates import dpe_params

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TESTBEDS = sorted(p for p in FIXTURES.glob("testbed-*") if (p / "model.safetensors").is_file())


def passkey_accuracy(model, tokenizer, length: int, samples: int = 2) -> float:
    builder = PromptBuilder(tokenizer, haystack_seed=77)
    records = evaluate_passkey(builder, make_generate_fn(model, tokenizer, 8), [length],
                               depths=(0.1, 0.3, 0.5, 0.7, 0.9), samples=samples, seed=77)
    return sum(r["accuracy"] * r["samples"] for r in records) / sum(r["samples"] for r in records)


@pytest.mark.parametrize("testbed", TESTBEDS, ids=lambda p: p.name)
def test_dpe_export_retrieves_where_the_base_model_fails(tmp_path, testbed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    params = dpe_params.DPEParams(32, [8, 16, 32, 32], [0, 4, 8, 12, 16], target_length=4096)
    out = convert(testbed, tmp_path / "dpe", params)
    tokenizer = AutoTokenizer.from_pretrained(testbed)
    base = AutoModelForCausalLM.from_pretrained(testbed).eval()
    dpe = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert passkey_accuracy(base, tokenizer, 256) >= 0.9  # it was trained for this length
        base_far, dpe_far = passkey_accuracy(base, tokenizer, 1024), passkey_accuracy(dpe, tokenizer, 1024)
    assert base_far <= 0.4 and dpe_far >= 0.8 and dpe_far - base_far >= 0.5, (base_far, dpe_far)
