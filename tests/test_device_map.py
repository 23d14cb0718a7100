"""Models larger than one GPU: loading with an accelerate device map (here: layers offloaded to disk on CPU,
which goes through the same dispatch hooks as a split over several GPUs) computes exactly what a plain load
computes, for DPE applied to a base model and for an export with a top-K selection."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import VOCAB

from dpe_export.errors import DPEExportError
from dpe_export.sources import loading, methods
from dpe_export.modeling_templates import dpe_params
from dpe_export import dpe_ops

pytest.importorskip("accelerate")
OFFLOAD = {"max_memory": {"cpu": "20KB"}}  # too little for any decoder layer: they all go to disk


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.to(loading.input_device(model))).logits.cpu()


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, len(VOCAB), (2, n), generator=g)


def test_dpe_method_on_a_dispatched_base_model_equals_a_plain_load(llama_dir, tmp_path):
    spec = methods.parse_method("dpe:4,2,8,2,8")
    plain = loading.load_model(llama_dir, spec, device="cpu", target_length=256)
    mapped = loading.load_model(llama_dir, spec, device_map="auto", target_length=256,
                                offload_folder=str(tmp_path / "offload"), **OFFLOAD)
    assert "disk" in set(mapped.model.hf_device_map.values())  # the hooks really are in the way
    ids = _ids(96)  # far past the window of 4
    torch.testing.assert_close(_logits(mapped.model, ids), _logits(plain.model, ids), rtol=0, atol=1e-5)
    # and DPE is really on: the base model differs there
    base = loading.load_model(llama_dir, None, device="cpu")
    assert (_logits(base.model, ids) - _logits(plain.model, ids)).abs().max() > 1e-3


def test_dispatched_export_with_topk_equals_a_plain_load(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from dpe_export.export.convert import convert

    selected = torch.zeros(2, 4, 8, dtype=torch.bool)
    selected[..., ::3] = True
    params = dpe_params.DPEParams(6, [2, 3, 4, 16], dpe_ops.even_group_boundaries(8, 4), target_length=512)
    out = convert(llama_dir, tmp_path / "dpe", params, selected)
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    mapped = loading.load_model(out, None, device_map="auto", offload_folder=str(tmp_path / "offload"),
                                **OFFLOAD).model
    assert "disk" in set(mapped.hf_device_map.values())
    ids = _ids(80, seed=1)
    torch.testing.assert_close(_logits(mapped, ids), _logits(plain, ids), rtol=0, atol=1e-5)
    with torch.no_grad():  # cached greedy decoding through the hooks, far past the window
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(mapped.generate(ids[:1], **kw), plain.generate(ids[:1], **kw))


def test_cli_eval_with_a_device_map(run_cli, llama_dir, tmp_path):
    out = tmp_path / "r.json"
    r = run_cli("eval", llama_dir, "--task", "passkey", "--lengths", "64", "--samples", "1", "--depths", "0.5",
                "--method", "self-extend:8,4", "--device-map", "auto", "--json", out, "--no-progress")
    assert r.exit_code == 0, r.stderr
    settings = json.loads(out.read_text())["settings"]
    assert settings["device_map"] == "auto" and settings["device"] == "cpu"


def test_device_map_errors(run_cli, llama_dir, tmp_path, monkeypatch):
    r = run_cli("eval", llama_dir, "--task", "passkey", "--lengths", "64", "--device", "cpu", "--device-map", "auto")
    assert r.exit_code != 0 and "not both" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("calibrate", llama_dir, "-d", tmp_path / "cal", "--target-length", "256", "--device", "cpu",
                "--device-map", "auto")
    assert r.exit_code != 0 and "not both" in r.stderr
    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if it were not installed
    with pytest.raises(DPEExportError, match="pip install accelerate"):
        loading.load_model(llama_dir, None, device_map="auto")


def test_convert_calibration_device_map_only_when_convert_calibrates(run_cli, llama_dir, tmp_path):
    r = run_cli("convert", llama_dir, "-o", tmp_path / "out", "--window", "8", "--scale-factors", "2,4",
                "--calibration-device-map", "auto")
    assert r.exit_code != 0 and "only when convert calibrates" in r.stderr
    assert not (tmp_path / "out").exists()
