"""The Checkpoint: one model directory's facts, read once (issue 36). Tested directly on a base model, an export,
a GGUF-converted directory and broken configs; and config.json is read once per command."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import byte_tokenizer, save_tiny_model, tiny_model

from dpe_export.errors import DPEExportError
from dpe_export.sources import checkpoint
from dpe_export.sources.checkpoint import Checkpoint
from dpe_export.modeling_templates import dpe_family



@pytest.fixture(scope="module")
def base_and_export(tmp_path_factory):
    from dpe_export.export import convert as export_convert

    tmp = tmp_path_factory.mktemp("ckpt")
    base = save_tiny_model(tmp / "base", "llama", max_position_embeddings=64)
    (base / "LICENSE").write_text("terms\n", encoding="utf-8")
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n", encoding="utf-8")
    info = checkpoint.inspect_model(base)
    params = export_convert.build_params(info, local_window_size=8, scale_factors=[2, 4], target_length=256)
    export = export_convert.convert(info, tmp / "export", params)
    return base, export


def test_a_base_model(base_and_export):
    base, _ = base_and_export
    ckpt = Checkpoint(base).check()
    assert not ckpt.is_export and ckpt.dpe == {} and ckpt.written_by is None
    assert ckpt.model_type == "llama" and ckpt.pretraining_length == 64 == ckpt.require_pretraining_length()
    config = json.loads((base / "config.json").read_text())
    assert ckpt.head_dim == config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    assert ckpt.rotary_dim == dpe_family.rotary_dim_of(ckpt.config) == ckpt.head_dim  # llama rotates every head dim
    assert ckpt.weight_files == ["model.safetensors"]
    assert "tokenizer.json" in ckpt.tokenizer_files and ckpt.has_tokenizer
    assert ckpt.license_files == ["LICENSE"] and ckpt.license == {"license": "apache-2.0"}
    assert ckpt.hub_id is None and str(ckpt) == str(base) and Checkpoint.of(ckpt) is ckpt
    info = checkpoint.inspect_model(ckpt)
    assert info.checkpoint is ckpt and info.model_dir == base and info.max_position_embeddings == 64
    assert info.default_target_length == 256 and info.num_freqs == ckpt.rotary_dim // 2


def test_an_export(base_and_export):
    _, export = base_and_export
    ckpt = Checkpoint(export).check()
    assert ckpt.is_export and ckpt.model_type == "dpe_llama"
    assert ckpt.dpe["local_window_size"] == 8 and ckpt.dpe["scale_factors"] == [2, 4]
    assert ckpt.pretraining_length == 64  # the export's recorded pretrain length, not its target length
    assert ckpt.raw["max_position_embeddings"] == 256
    assert ckpt.written_by is not None and ckpt.weight_files == ["model.safetensors"]
    assert ckpt.license_files == ["LICENSE"] and ckpt.license == {"license": "apache-2.0"}
    with pytest.raises(DPEExportError, match="is already a DPE export"):
        checkpoint.inspect_model(ckpt)


def test_a_gguf_converted_directory(tmp_path):
    pytest.importorskip("gguf")
    from gguf_writer import write_llama_gguf

    from dpe_export.sources import resolve_model

    model = tiny_model("llama", vocab_size=len(byte_tokenizer()), max_position_embeddings=64)
    gguf = write_llama_gguf(model, byte_tokenizer(), tmp_path / "tiny-Q8_0.gguf", quantize="Q8_0")
    with resolve_model(str(gguf), workdir=tmp_path / "out") as source:
        ckpt = source.checkpoint
        assert source.kind == "gguf" and ckpt.path == source.path and ckpt is source.checkpoint
        ckpt.check()
        assert not ckpt.is_export and ckpt.pretraining_length == 64 and ckpt.has_tokenizer
        assert ckpt.weight_files == ["model.safetensors"] and ckpt.rotary_dim == ckpt.head_dim
        assert checkpoint.inspect_model(ckpt).checkpoint is ckpt


@pytest.mark.parametrize("text, needle", [
    ("{not json", "cannot read"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"model_type": "llama", "num_hidden_layers": 100000000}', "is not a size any model has"),
])
def test_a_broken_config_is_one_line(llama_dir, tmp_path, text, needle):
    model = tmp_path / "m"
    shutil.copytree(llama_dir, model)
    (model / "config.json").write_text(text, encoding="utf-8")
    ckpt = Checkpoint(model).check()  # the directory itself is fine
    with pytest.raises(DPEExportError, match=needle) as e:
        ckpt.raw
    assert "\n" not in str(e.value)


def test_facts_that_need_no_config_and_links_out(llama_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(llama_dir, model)
    (model / "config.json").unlink()
    with pytest.raises(DPEExportError, match="has no config.json"):
        Checkpoint(model).check()
    assert not Checkpoint(model).has_config
    secret = tmp_path / "secret.json"
    secret.write_text("{}", encoding="utf-8")
    os.symlink(secret, model / "config.json")
    with pytest.raises(DPEExportError, match="outside the model directory"):
        Checkpoint(model).raw
    ckpt = Checkpoint(tmp_path / "exp-dpe")  # no such directory: nothing is read until asked
    assert not ckpt.has_config


def test_a_pretraining_length_must_be_stated(llama_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = "long"
    (model / "config.json").write_text(json.dumps(config))
    ckpt = Checkpoint(model)
    assert ckpt.pretraining_length is None
    with pytest.raises(DPEExportError, match="has no valid max_position_embeddings"):
        ckpt.require_pretraining_length()


@pytest.fixture
def config_reads(monkeypatch):
    """How often each directory's config.json was read (through the one safe reader)."""
    reads: dict = {}
    real = checkpoint.read_config_json

    def counting(model_dir):
        key = Path(model_dir).resolve()
        reads[key] = reads.get(key, 0) + 1
        return real(model_dir)

    monkeypatch.setattr(checkpoint, "read_config_json", counting)
    return reads


def test_eval_reads_config_json_once(base_and_export, run_cli, config_reads):
    base, export = base_and_export
    for model in (base, export):
        r = run_cli("eval", model, "--task", "passkey", "--lengths", "1x", "--samples", "1", "--depths", "0.5",
                    "--no-progress")
        assert r.exit_code == 0, r.stderr
        assert config_reads.pop(model.resolve()) == 1  # before the Checkpoint: several times
    assert not config_reads


def test_convert_reads_the_base_config_json_once(base_and_export, run_cli, config_reads, tmp_path):
    base, _ = base_and_export
    r = run_cli("convert", base, "-o", tmp_path / "out", "--window", "8", "--scale-factors", "2,4")
    assert r.exit_code == 0, r.stderr
    assert config_reads == {base.resolve(): 1}  # before the Checkpoint: several times


def test_analyze_reads_config_json_once(base_and_export, run_cli, config_reads):
    _, export = base_and_export
    r = run_cli("analyze", export, "--lengths", "1x", "--samples", "1", "--pairs", "16", "--no-progress")
    assert r.exit_code == 0, r.stderr
    assert config_reads == {export.resolve(): 1}  # before the Checkpoint: several times
