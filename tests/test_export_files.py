"""What a successful export writes: config, weights, tokenizer, modeling files, selection, model card."""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from helpers import RUNTIME_FILES
from safetensors.torch import save_file

from dpe_export import __version__
from dpe_export.errors import DPEExportError
from dpe_export.modeling_templates import dpe_params
from dpe_export.runtime import resource_dir

REPO_ROOT = Path(__file__).resolve().parents[1]

PREFIX = {"llama": "DPELlama", "mistral": "DPEMistral", "qwen2": "DPEQwen2"}


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def no_staging_left(out: Path) -> bool:
    return not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_convert_writes_a_complete_export(run_cli, tiny_dirs, tmp_path, family):
    model = tiny_dirs(family)
    out = tmp_path / "export"
    r = run_cli("convert", model, "-o", out, "--window", "8", "--scale-factors", "2,4", "--target-length", "256")
    assert r.exit_code == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr

    config = read_json(out / "config.json")
    base = read_json(model / "config.json")
    assert config["dpe"] == {
        "version": dpe_params.DPE_FORMAT_VERSION,
        "local_window_size": 8,
        "scale_factors": [2, 4],
        "dimension_groups_range": [0, 4, 8],  # default: head_dim/2 = 8 split evenly into 2 groups
        "selected_dims": None,
        "target_length": 256,
        "pretrain_length": base["max_position_embeddings"],
    }
    assert dpe_params.DPEParams.from_dict(config["dpe"]).validate(16)
    assert config["auto_map"] == {"AutoModelForCausalLM": f"modeling_dpe.{PREFIX[family]}ForCausalLM",
                                  "AutoModel": f"modeling_dpe.{PREFIX[family]}Model",
                                  "AutoConfig": f"modeling_dpe.{PREFIX[family]}Config"}
    assert config["architectures"] == [f"{PREFIX[family]}ForCausalLM"]
    assert config["max_position_embeddings"] == 256
    assert config["model_type"] == f"dpe_{family}"  # the export's own config class: no plain load without DPE
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rope_parameters"):
        assert config[key] == base[key], key

    assert same_bytes(model / "model.safetensors", out / "model.safetensors")
    assert os.stat(model / "model.safetensors").st_ino != os.stat(out / "model.safetensors").st_ino
    for name in ("tokenizer.json", "generation_config.json"):
        assert same_bytes(model / name, out / name), name
    tok_base, tok_out = (json.loads((d / "tokenizer_config.json").read_text()) for d in (model, out))
    assert tok_out.pop("model_max_length") == read_json(out / "config.json")["dpe"]["target_length"]
    tok_base.pop("model_max_length", None)
    assert tok_out == tok_base  # otherwise the base's, as it was

    assert all(same_bytes(REPO_ROOT / "modeling_templates" / name, out / name) for name in RUNTIME_FILES)
    assert not (out / "dpe_core.py").exists()
    modeling = (out / "modeling_dpe.py").read_text()
    compile(modeling, "modeling_dpe.py", "exec")
    assert f"class {PREFIX[family]}ForCausalLM" in modeling
    assert "{{" not in modeling and "{%" not in modeling

    card = front_matter(out / "README.md")
    assert card["library_name"] == "transformers" and card["pipeline_tag"] == "text-generation"
    assert set(card["tags"]) >= {"dpe", "long-context", "rope", "custom_code"}
    readme = (out / "README.md").read_text()
    assert "2504.18857" in readme and "trust_remote_code=True" in readme and "| 1 | 4–7 |" in readme

    assert not (out / dpe_params.SELECTED_DIMS_FILENAME).exists()
    assert no_staging_left(out)
    assert str(out) in r.stdout and "model.safetensors" in r.stdout and "total" in r.stdout


def test_link_hard_links_weights(run_cli, llama_dir, tmp_path):
    out = tmp_path / "export"
    r = run_cli("convert", llama_dir, "-o", out, "--window", "8", "--scale-factors", "2,4", "--link")
    assert r.exit_code == 0, r.stderr
    src, dst = os.stat(llama_dir / "model.safetensors"), os.stat(out / "model.safetensors")
    assert (src.st_dev, src.st_ino) == (dst.st_dev, dst.st_ino) and dst.st_nlink >= 2
    assert not os.path.samefile(llama_dir / "config.json", out / "config.json")


def test_link_falls_back_to_copy(llama_dir, tmp_path, monkeypatch, caplog):
    from dpe_export.export import convert as export_convert
    from dpe_export.export import copying

    def refuse(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(copying.os, "link", refuse)
    params = dpe_params.DPEParams(local_window_size=8, scale_factors=[2, 4], dimension_groups_range=[0, 4, 8])
    out = export_convert.convert(llama_dir, tmp_path / "export", params, link=True)
    assert same_bytes(llama_dir / "model.safetensors", out / "model.safetensors")
    assert "cannot hard-link" in caplog.text and "copying" in caplog.text


def test_sharded_weights_are_copied_with_their_index(run_cli, tmp_path):
    from helpers import tiny_model

    model = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(model, max_shard_size="100KB")
    shards = sorted(p.name for p in model.glob("*.safetensors"))
    assert len(shards) > 1 and (model / "model.safetensors.index.json").is_file()
    out = tmp_path / "export"
    r = run_cli("convert", model, "-o", out, "--window", "8", "--scale-factors", "2,4")
    assert r.exit_code == 0, r.stderr
    for name in [*shards, "model.safetensors.index.json"]:
        assert same_bytes(model / name, out / name), name
    assert "Warning:" in r.stderr and "no tokenizer" in r.stderr


def test_model_without_tokenizer_converts_with_a_warning(run_cli, tiny_dirs, tmp_path):
    model = tiny_dirs("qwen2", tokenizer=False)
    out = tmp_path / "export"
    r = run_cli("convert", model, "-o", out, "--window", "8", "--scale-factors", "2,4")
    assert r.exit_code == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("Warning:")]
    assert len([w for w in warnings if "no tokenizer" in w]) == 1
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer.json").exists()


def test_convert_warns_when_no_base_model_id_or_license_is_known(run_cli, llama_dir, tmp_path):
    r = run_cli("convert", llama_dir, "-o", tmp_path / "a", "--window", "8", "--scale-factors", "2,4")
    assert r.exit_code == 0, r.stderr
    assert "no Hub id of the base model is known" in r.stderr and "states no license" in r.stderr
    r = run_cli("convert", llama_dir, "-o", tmp_path / "b", "--window", "8", "--scale-factors", "2,4",
                "--base-model", "org/name")
    assert r.exit_code == 0 and "no Hub id" not in r.stderr


def test_selected_dims_from_scores(run_cli, llama_dir, tmp_path):
    scores = torch.rand(2, 4, 8)
    save_file({"scores": scores}, str(tmp_path / "scores.safetensors"))
    out = tmp_path / "export"
    r = run_cli("convert", llama_dir, "-o", out, "--window", "8", "--scale-factors", "2,4",
                "--dim-scores", tmp_path / "scores.safetensors", "--topk", "3")
    assert r.exit_code == 0, r.stderr
    assert read_json(out / "config.json")["dpe"]["selected_dims"] == dpe_params.SELECTED_DIMS_FILENAME
    with safe_open(str(out / dpe_params.SELECTED_DIMS_FILENAME), framework="pt") as f:
        assert list(f.keys()) == ["selected_dims"]
        selected = f.get_tensor("selected_dims")
    assert selected.dtype == torch.bool and selected.shape == (2, 4, 8)
    assert (selected.sum(-1) == 3).all()
    # the selected frequencies are the three highest-scoring ones of each (layer, head)
    lowest_selected = torch.where(selected, scores, torch.inf).amin(-1)
    highest_unselected = torch.where(selected, -torch.inf, scores).amax(-1)
    assert (lowest_selected > highest_unselected).all()
    assert "top 3 of 8 rotary frequencies" in (out / "README.md").read_text()


def test_top_k_mask_and_scores_loader(tmp_path):
    from dpe_export.calibration.selection import load_dim_scores, top_k_mask

    scores = torch.tensor([[[0.1, 0.9, 0.5, 0.3]]])
    assert top_k_mask(scores, 2).tolist() == [[[False, True, True, False]]]
    assert top_k_mask(scores, 4).all()
    save_file({"scores": scores.to(torch.float16)}, str(tmp_path / "s.safetensors"))
    loaded = load_dim_scores(tmp_path / "s.safetensors", 1, 1, 8)
    assert loaded.dtype == torch.float32 and loaded.shape == (1, 1, 4)
    with pytest.raises(DPEExportError, match="between 1 and head_dim/2 = 4"):
        top_k_mask(scores, 5)


def test_defaults_pretrain_and_target_length(llama_dir, tmp_path):
    from dpe_export.export import convert as export_convert
    from dpe_export.sources import checkpoint

    info = checkpoint.inspect_model(llama_dir)
    params = export_convert.build_params(info, local_window_size=4, scale_factors=[2, 2, 4, 8])
    assert params.dimension_groups_range == [0, 2, 4, 6, 8]
    assert params.pretrain_length == 64 and params.target_length == 4 * 64
    out = export_convert.convert(llama_dir, tmp_path / "a" / "b" / "export", params)  # parents are created
    config = read_json(out / "config.json")
    assert config["max_position_embeddings"] == 256 and config["dpe"]["pretrain_length"] == 64


def test_overwrite_replaces_an_earlier_export_and_nothing_else(run_cli, llama_dir, tmp_path):
    out = tmp_path / "export"
    r = run_cli("convert", llama_dir, "-o", out, "--window", "8", "--scale-factors", "2,4")
    assert r.exit_code == 0, r.stderr
    assert read_json(out / "config.json")["dpe"]["local_window_size"] == 8
    r = run_cli("convert", llama_dir, "-o", out, "--window", "4", "--scale-factors", "2,4", "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert read_json(out / "config.json")["dpe"]["local_window_size"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    # A user's directory, or an export they added their own files to, is never deleted.
    projects = tmp_path / "projects"
    (projects / "thesis").mkdir(parents=True)
    (projects / "thesis" / "thesis.tex").write_text("years of work")
    (out / "notes.txt").write_text("mine")
    for target, why in ((projects, "is not a DPE export"), (out, "holds notes.txt")):
        r = run_cli("convert", llama_dir, "-o", target, "--window", "4", "--scale-factors", "2,4", "--overwrite")
        assert r.exit_code == 1 and why in r.stderr, r.stderr
    assert (projects / "thesis" / "thesis.tex").read_text() == "years of work"
    assert (out / "notes.txt").read_text() == "mine"


def test_empty_existing_output_is_used(run_cli, llama_dir, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    r = run_cli("convert", llama_dir, "-o", out, "--window", "8", "--scale-factors", "2,4")
    assert r.exit_code == 0, r.stderr
    assert (out / "config.json").is_file()


def test_interrupted_export_leaves_nothing(llama_dir, tmp_path, monkeypatch):
    from dpe_export.export import convert as export_convert

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_convert, "copy_weights", interrupt)
    params = dpe_params.DPEParams(local_window_size=8, scale_factors=[2, 4], dimension_groups_range=[0, 4, 8])
    with pytest.raises(KeyboardInterrupt):
        export_convert.convert(llama_dir, tmp_path / "new" / "export", params)
    assert list(tmp_path.iterdir()) == []


def test_missing_modeling_template_fails_cleanly(llama_dir, tmp_path, monkeypatch):
    from dpe_export.export import convert as export_convert
    from dpe_export import generated as templates

    monkeypatch.setattr(templates, "modeling_template_path", lambda: tmp_path / "templates" / "modeling_dpe.py.jinja")
    params = dpe_params.DPEParams(local_window_size=8, scale_factors=[2, 4], dimension_groups_range=[0, 4, 8])
    with pytest.raises(DPEExportError, match="template modeling_dpe.py.jinja not found"):
        export_convert.convert(llama_dir, tmp_path / "export", params)
    assert list(tmp_path.iterdir()) == []


def test_stub_template_is_rendered_with_the_architecture_variables(llama_dir, tmp_path, monkeypatch):
    from dpe_export.export import convert as export_convert
    from dpe_export import generated as templates

    stub = tmp_path / "templates" / "modeling_dpe.py.jinja"
    stub.parent.mkdir()
    stub.write_text("# {{ tool_version }} {{ family }}\nfrom {{ transformers_module }} import {{ causal_lm_class }}, "
                    "{{ model_class }}\n\n\nclass {{ dpe_prefix }}ForCausalLM({{ causal_lm_class }}):\n    pass\n")
    monkeypatch.setattr(templates, "modeling_template_path", lambda: stub)
    params = dpe_params.DPEParams(local_window_size=8, scale_factors=[2, 4], dimension_groups_range=[0, 4, 8])
    out = export_convert.convert(llama_dir, tmp_path / "export", params)
    assert (out / "modeling_dpe.py").read_text() == (
        f"# {__version__} llama\nfrom transformers.models.llama.modeling_llama import LlamaForCausalLM, "
        "LlamaModel\n\n\nclass DPELlamaForCausalLM(LlamaForCausalLM):\n    pass\n"
    )


def test_failed_overwrite_keeps_the_old_output(llama_dir, tmp_path, monkeypatch):
    from dpe_export.export import convert as export_convert

    out = tmp_path / "export"
    params = dpe_params.DPEParams(local_window_size=8, scale_factors=[2, 4], dimension_groups_range=[0, 4, 8])
    export_convert.convert(llama_dir, out, params)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_convert, "copy_weights", fail)
    with pytest.raises(OSError):
        export_convert.convert(llama_dir, out, params, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_preset_values_with_explicit_override(run_cli, llama_dir, tmp_path):
    out = tmp_path / "export"
    # the preset's groups are for head_dim 128; the tiny model has head_dim 16, so override them
    r = run_cli("convert", llama_dir, "-o", out, "--preset", "meta-llama-3-8b-instruct",
                "--dimension-groups", "0,1,2,3,4,5,6,7,8", "--window", "16")
    assert r.exit_code == 0, r.stderr
    dpe = read_json(out / "config.json")["dpe"]
    assert dpe["local_window_size"] == 16  # explicit
    assert dpe["scale_factors"] == [2, 8, 2, 8, 32, 32, 32, 4]  # preset
    assert dpe["dimension_groups_range"] == list(range(9))  # explicit
    assert dpe["target_length"] == 131072  # preset
    assert front_matter(out / "README.md")["base_model"] == "meta-llama/Meta-Llama-3-8B-Instruct"


def test_model_card_quotes_odd_base_model_ids(run_cli, llama_dir, tmp_path):
    out = tmp_path / "export"
    odd = 'org/name: "quoted" | #x'
    r = run_cli("convert", llama_dir, "-o", out, "--window", "8", "--scale-factors", "2,4", "--base-model", odd)
    assert r.exit_code == 2 and "--base-model must be a Hub repo id" in r.stderr  # the CLI refuses it ...
    from dpe_export.export import convert as export_convert

    params = dpe_params.DPEParams(local_window_size=8, scale_factors=[2, 4], dimension_groups_range=[0, 4, 8])
    export_convert.convert(llama_dir, out, params, base_model=odd)  # ... and the card quotes it where it gets through
    assert front_matter(out / "README.md")["base_model"] == odd


def test_base_model_guessed_from_hf_cache_path(tmp_path):
    from dpe_export.sources.checkpoint import guess_base_model

    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-7B-Instruct" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert guess_base_model(snapshot) == "Qwen/Qwen2.5-7B-Instruct"
    assert guess_base_model(tmp_path) is None


def test_exported_checkpoint_loads_with_its_selection(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from dpe_export.calibration.selection import top_k_mask
    from dpe_export.export import convert as export_convert

    selected = top_k_mask(torch.rand(2, 4, 8), 5)
    params = dpe_params.DPEParams(local_window_size=4, scale_factors=[2, 4], dimension_groups_range=[0, 4, 8])
    out = export_convert.convert(llama_dir, tmp_path / "export", params, selected)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model).__name__ == "DPELlamaForCausalLM"
    assert torch.equal(model.dpe_selected_dims, selected)
    with torch.no_grad():
        logits = model(torch.arange(1, 13)[None]).logits
    assert logits.shape == (1, 12, 128) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------------
# Presets, architectures, resources
# ---------------------------------------------------------------------------------------------------------


def test_presets_load_and_validate():
    from dpe_export.export.presets import list_presets, load_preset

    presets = {p.name: p for p in list_presets()}
    assert set(presets) == {"meta-llama-3-8b-instruct", "mistral-7b-instruct-v0.2",
                            "meta-llama-3.1-8b-instruct", "qwen2.5-7b-instruct"}
    expected = {
        "meta-llama-3-8b-instruct": [2, 8, 2, 8, 32, 32, 32, 4],
        "mistral-7b-instruct-v0.2": [4, 16, 2, 16, 32, 16, 16, 2],
        "meta-llama-3.1-8b-instruct": [2, 32, 32, 2, 2, 2, 2, 1],
        "qwen2.5-7b-instruct": [2, 16, 8, 8, 32, 8, 2, 4],
    }
    for name, p in presets.items():
        assert list(p.scale_factors) == expected[name]
        assert p.local_window_size == 1024 and p.target_length == 131072
        assert list(p.dimension_groups_range) == list(range(0, 65, 8))
        assert p.description and "/" in p.base_model
        dpe_params.DPEParams(p.local_window_size, list(p.scale_factors), list(p.dimension_groups_range),
                           p.target_length).validate(128)
    assert load_preset("qwen2.5-7b-instruct").model_type == "qwen2"
    with pytest.raises(DPEExportError, match="unknown preset 'x'.*meta-llama-3-8b-instruct"):
        load_preset("x")


def test_presets_command(run_cli):
    r = run_cli("presets")
    assert r.exit_code == 0 and "meta-llama-3-8b-instruct" in r.stdout and "Qwen/Qwen2.5-7B-Instruct" in r.stdout
    r = run_cli("presets", "mistral-7b-instruct-v0.2")
    assert r.exit_code == 0 and "4, 16, 2, 16, 32, 16, 16, 2" in r.stdout


def test_help_and_version(run_cli):
    r = run_cli("--help")
    assert r.exit_code == 0 and "convert" in r.stdout and "Examples" in r.stdout
    r = run_cli("convert", "--help")
    for option in ("--output", "--window", "--scale-factors", "--dimension-groups", "--dim-scores", "--topk",
                   "--target-length", "--pretrain-length", "--preset", "--overwrite", "--link"):
        assert option in r.stdout, option
    r = run_cli("--version")
    assert r.exit_code == 0 and __version__ in r.stdout


def test_architecture_registry_names_real_classes():
    from dpe_export.architectures import ARCHITECTURES

    assert {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt_neox"} <= set(ARCHITECTURES)
    for arch in ARCHITECTURES.values():
        module = importlib.import_module(arch.transformers_module)
        assert hasattr(module, arch.causal_lm_class) and hasattr(module, arch.model_class)
        assert arch.dpe_causal_lm_class == f"{arch.dpe_prefix}ForCausalLM"


def test_the_runtime_dpe_export_imports_is_the_repository_folder():
    from dpe_export.modeling_templates import dpe_rule

    assert Path(dpe_rule.__file__).resolve() == (resource_dir("modeling_templates") / "dpe_rule.py").resolve()
    assert (resource_dir("configs") / "qwen2.5-7b-instruct.yaml").is_file()


def test_the_tokenizer_states_the_target_length_and_a_longer_input_warns_once(llama_dir, tmp_path):
    import warnings

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpe_export.export import convert as export_convert

    params = dpe_params.DPEParams(local_window_size=4, scale_factors=[2, 4], dimension_groups_range=[0, 4, 8],
                                target_length=48)
    out = export_convert.convert(llama_dir, tmp_path / "export", params)
    assert AutoTokenizer.from_pretrained(out).model_max_length == 48
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(torch.randint(4, 128, (1, 40)))
            model(torch.randint(4, 128, (1, 60)))
            model(torch.randint(4, 128, (1, 70)))
    dpe = [w for w in caught if "past the 48 this export was made for" in str(w.message)]
    assert len(dpe) == 1
    assert dpe[0].filename == __file__  # the line that called the model, not torch's module dispatch


def test_modeling_file_imports_every_runtime_file_directly():
    """transformers 5.0 copies only the direct relative imports of a local export's modeling file: the template
    names every runtime file the export ships (and the export ships exactly what it imports)."""
    from dpe_export.architectures import ARCHITECTURES
    from dpe_export.generated import code_files, render_modeling_source
    from dpe_export.runtime import relative_imports

    arch = next(iter(ARCHITECTURES.values()))
    direct = {f"{name}.py" for name in relative_imports(render_modeling_source(arch))}
    shipped = set(code_files(arch)) - {"modeling_dpe.py"}
    assert direct == shipped == set(RUNTIME_FILES)
