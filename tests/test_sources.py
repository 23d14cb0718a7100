"""--model from anywhere: Hub repo ids (over HTTP, against the local stand-in Hub), local directories and cache
snapshots, and GGUF files (written here from a tiny model with the gguf package)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub
from helpers import byte_tokenizer, tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_test_read"
CONVERT = ("--window", "8", "--scale-factors", "2,4")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(hub, *args, home: Path, token=TOKEN, offline=False, timeout=240):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint if hub else "http://127.0.0.1:9", HF_HUB_OFFLINE="1" if offline else "0",
               HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(REPO_ROOT), NO_PROXY="127.0.0.1",
               no_proxy="127.0.0.1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="10")
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "dpe_export", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_error(proc) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def hub_repo(tiny_dirs):
    """A FakeHub with a public, a gated and a pickles-only repo, seeded from the tiny llama checkpoint."""
    src = tiny_dirs("llama")
    files = {p.name: p.read_bytes() for p in sorted(src.iterdir()) if p.is_file()}
    files["README.md"] = b"---\nlicense: apache-2.0\n---\n# tiny\n"
    files["pytorch_model.bin"] = b"not a pickle, and never read"
    files["notes.txt"] = b"not needed by an export"
    with FakeHub(tokens=["hf_test_write"], read_only_tokens=[TOKEN], max_requests=5000, time_limit=600) as hub:
        hub.add_repo("org/tiny", files)
        hub.add_repo("org/tiny", dict(files, **{"config.json": files["config.json"]}), branch="v2")
        hub.add_repo("org/gated", files, gated=True)
        hub.add_repo("org/pickles", {"config.json": files["config.json"], "pytorch_model.bin": b"x"})
        yield hub, src


def test_convert_model_hub_id_downloads_what_it_needs_and_nothing_twice(hub_repo, tmp_path):
    hub, src = hub_repo
    home, out = tmp_path / "home", tmp_path / "out"
    proc = run(hub, "convert", "--model", "org/tiny", "-o", out, *CONVERT, home=home)
    assert proc.returncode == 0, proc.stderr
    assert sha(out / "model.safetensors") == sha(src / "model.safetensors")
    served = [p for _, p in hub.downloads]
    assert "pytorch_model.bin" not in served and "notes.txt" not in served
    card = (out / "README.md").read_text()
    assert 'base_model: "org/tiny"' in card and 'license: "apache-2.0"' in card
    before = len(hub.downloads)
    proc = run(hub, "convert", "--model", "org/tiny", "-o", tmp_path / "again", *CONVERT, home=home)
    assert proc.returncode == 0, proc.stderr
    assert len(hub.downloads) == before  # served from the cache
    # Offline, the cache alone is enough; a revision is honoured.
    proc = run(None, "convert", "--model", "org/tiny", "-o", tmp_path / "offline", *CONVERT, home=home, offline=True)
    assert proc.returncode == 0, proc.stderr
    proc = run(hub, "convert", "org/tiny", "--model-revision", "v2", "-o", tmp_path / "v2", *CONVERT, home=home)
    assert proc.returncode == 0, proc.stderr


def test_an_interrupted_download_resumes(hub_repo, tmp_path):
    """The connection drops after 11 MB of a 25 MB weights file: huggingface_hub resumes from the bytes it has
    (a Range request), and the export's weights are the source's, byte for byte."""
    from helpers import save_tiny_model

    hub, _ = hub_repo
    big = save_tiny_model(tmp_path / "big", "llama", vocab_size=48000, tokenizer=False)
    hub.add_repo("org/big", {p.name: p.read_bytes() for p in big.iterdir() if p.is_file()})
    hub.cut_downloads["model.safetensors"] = 11 << 20
    proc = run(hub, "convert", "--model", "org/big", "-o", tmp_path / "out", *CONVERT, home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert any(path == "model.safetensors" and start >= 10 << 20 for path, start in hub.range_requests), \
        [h for h in hub.range_headers if h[1] == "model.safetensors"]
    assert sha(tmp_path / "out" / "model.safetensors") == sha(big / "model.safetensors")


@pytest.mark.parametrize("args, token, needle", [
    (("--model", "org/missing"), TOKEN, "was not found on the Hub"),
    (("--model", "org/gated"), None, "is gated"),
    (("--model", "org/tiny", "--model-revision", "nope"), TOKEN, "revision 'nope' was not found"),
    (("--model", "org/pickles"), TOKEN, "only pickled weights"),
    (("--model", "./no/such/dir"), TOKEN, "neither a local directory, a .gguf file nor a Hub repo id"),
])
def test_bad_hub_sources_are_one_line_with_nothing_written(hub_repo, tmp_path, args, token, needle):
    hub, _ = hub_repo
    out = tmp_path / "out"
    err = one_error(run(hub, "convert", *args, "-o", out, *CONVERT, home=tmp_path / "home", token=token))
    assert needle in err
    assert not out.exists()


def test_no_network_and_offline_cache_miss_say_what_to_do(tmp_path):
    err = one_error(run(None, "convert", "--model", "org/tiny", "-o", tmp_path / "o", *CONVERT, home=tmp_path / "h"))
    assert "cannot" in err and "HF_HUB_OFFLINE=1" in err
    err = one_error(run(None, "convert", "--model", "org/tiny", "-o", tmp_path / "o", *CONVERT, home=tmp_path / "h",
                        offline=True))
    assert "not in the local Hugging Face cache" in err


# ---- GGUF ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    pytest.importorskip("gguf")
    from gguf_writer import write_llama_gguf

    tmp = tmp_path_factory.mktemp("gguf")
    model = tiny_model("llama", vocab_size=len(byte_tokenizer()), max_position_embeddings=64)
    return write_llama_gguf(model, byte_tokenizer(), tmp / "tiny-Q8_0.gguf", quantize="Q8_0")


def test_a_gguf_converts_and_matches_transformers_own_gguf_load_below_the_window(gguf_file, tmp_path, run_cli):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    r = run_cli("convert", "--model", gguf_file, "-o", out, "--window", "32", "--scale-factors", "2,4")
    assert r.exit_code == 0, r.stderr
    assert not any(".dpe-export-src-" in p.name for p in tmp_path.iterdir())  # the temporary checkpoint is gone
    card = (out / "README.md").read_text()
    assert "dequantized to bfloat16 from the GGUF file tiny-Q8" in card and "Q8\\_0" in card
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                  dtype=torch.bfloat16).eval()
    export = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16).eval()
    ids = torch.randint(4, 200, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(export(ids).logits, direct(ids).logits)
    # the same through --model DIR --gguf-file NAME
    r = run_cli("convert", "--model", gguf_file.parent, "--gguf-file", gguf_file.name, "-o", tmp_path / "o2",
                "--window", "32", "--scale-factors", "2,4", "--dtype", "float32")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "o2" / "config.json").read_text())["dtype"] == "float32"


def test_a_truncated_or_foreign_gguf_is_one_line(gguf_file, tmp_path, run_cli):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_file.read_bytes()[:4096])
    r = run_cli("convert", "--model", cut, "-o", tmp_path / "o", *CONVERT)
    assert r.exit_code == 1 and "truncated or corrupt" in r.stderr
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all")
    r = run_cli("convert", "--model", fake, "-o", tmp_path / "o", *CONVERT)
    assert r.exit_code == 1 and "is not a GGUF file" in r.stderr
    assert not (tmp_path / "o").exists()


def test_eval_and_calibrate_take_model_too(hub_repo, tmp_path):
    hub, _ = hub_repo
    home = tmp_path / "home"
    proc = run(hub, "eval", "--model", "org/tiny", "--task", "ppl", "--lengths", "32", "--samples", "1",
               "--no-progress", home=home)
    assert proc.returncode == 0, proc.stderr
    proc = run(hub, "calibrate", "--help", home=home)
    assert "--model SOURCE" in proc.stdout and "--model-revision" in proc.stdout


def test_a_gguf_of_a_family_dpe_cannot_run_is_one_line(tmp_path, run_cli):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_layer_norm_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c"])
    w.add_token_types([1, 1, 1])
    w.add_token_merges([])
    w.add_tensor("token_embd.weight", np.zeros((3, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = run_cli("convert", "--model", path, "-o", tmp_path / "out", *CONVERT)
    assert r.exit_code == 1 and "has no rotary position embeddings" in r.stderr
    assert not (tmp_path / "out").exists() and not any(".dpe-export-src-" in p.name for p in tmp_path.iterdir())


def test_convert_model_hub_id_push_in_one_command(hub_repo, tmp_path):
    """The command the product is known by: `dpe-export convert --model ORG/NAME ... --push`."""
    hub, src = hub_repo
    proc = run(hub, "convert", "--model", "org/tiny", "-o", tmp_path / "tiny-dpe", *CONVERT, "--push",
               "--repo-id", "me/tiny-dpe", home=tmp_path / "home", token="hf_test_write")
    assert proc.returncode == 0, proc.stderr
    files = hub.files("me/tiny-dpe")
    assert files["model.safetensors"] == (src / "model.safetensors").read_bytes()
    assert b'base_model: "org/tiny"' in files["README.md"] and "modeling_dpe.py" in files


def _nested(pairs):
    return {k: (_nested(v) if isinstance(v, tuple) and v and isinstance(v[0], tuple) else
                list(v) if isinstance(v, tuple) else v) for k, v in pairs}


@pytest.mark.parametrize("model_type", sorted(__import__("dpe_export.architectures").architectures.WRAPPERS))
def test_a_multimodal_checkpoint_converts_to_its_text_model(model_type, tmp_path, run_cli):
    """Gemma 3 4B-27B and Mistral Small 3.x ship as image-text models: convert takes the language model, which
    below the window answers as the multimodal model does on text; the vision tower stays out of the export."""
    from safetensors import safe_open
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
    )

    from dpe_export.architectures import ARCHITECTURES, WRAPPERS

    wrap = WRAPPERS[model_type]
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    text.update(_nested(ARCHITECTURES[wrap.text_model_type].test_config))
    config = AutoConfig.for_model(model_type, text_config=text, image_token_index=127, **_nested(wrap.test_config))
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    src = tmp_path / "mm"
    model.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    out = tmp_path / "out"
    r = run_cli("convert", "--model", src, "-o", out, "--window", "6", "--scale-factors", "2,4", "--target-length", "256")
    assert r.exit_code == 0, r.stderr
    assert f"text model of the {model_type} checkpoint" in r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary text checkpoint is gone
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all(n.startswith(("model.", "lm_head.")) for n in names)
    assert not any("vision" in n or "projector" in n for n in names)
    export = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert export.config.model_type == "dpe_" + wrap.text_model_type
    assert export.config.dpe_base_model_type == wrap.text_model_type
    ids = torch.randint(4, 120, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, export(ids).logits
    assert (got - want).abs().max().item() <= 1e-5
