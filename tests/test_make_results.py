"""scripts/make_results.py: a --quick run on a tiny random model writes the JSON, heatmaps and RESULTS.md."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from helpers import byte_tokenizer, save_tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_results.py"


@pytest.fixture(scope="module")
def make_results():
    spec = importlib.util.spec_from_file_location("make_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_results"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> Path:
    path = save_tiny_model(tmp_path_factory.mktemp("testbed-bytes"), "llama", tokenizer=False,
                           vocab_size=260, max_position_embeddings=512)
    byte_tokenizer().save_pretrained(path)
    return path


def test_quick_run_writes_json_tables_and_heatmaps(make_results, byte_model, tmp_path):
    pytest.importorskip("matplotlib")
    import torch

    threads = torch.get_num_threads()
    try:
        assert make_results.main(["--quick", "--models", str(byte_model), "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # the script pins 1 thread; leave the other tests theirs
    data = json.loads((tmp_path / "results" / f"{byte_model.name}.json").read_text())
    assert data["settings"]["lengths"] == [512, 1024]
    assert data["search"]["self-extend"]["best"].startswith("self-extend:64,")
    assert data["search"]["dpe"]["best"].startswith("dpe:64,")
    methods = list(data["methods"])
    assert methods[:4] == ["none", "linear:16", "dynamic:16", "yarn:16"] and len(methods) == 6
    for entry in data["methods"].values():
        assert set(entry["tasks"]) == {"passkey", "niah", "ppl"}
        for o in entry["tasks"]["passkey"]["overall"]:
            assert o["samples"] == len(make_results.DEPTHS)  # 1 per depth in --quick
    md = (tmp_path / "RESULTS.md").read_text()
    for task in ("passkey", "niah", "ppl"):
        assert f"### {task}" in md
    for m in methods:
        png = tmp_path / "results" / f"{byte_model.name}-niah-{make_results.slug(m)}.png"
        assert png.is_file() and png.stat().st_size < 200_000
        assert f"]({png.relative_to(tmp_path).as_posix()})" in md
    # the tables can be rebuilt from the JSON alone
    (tmp_path / "RESULTS.md").unlink()
    assert make_results.main(["--render-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "RESULTS.md").read_text().count("| plain RoPE `none` |") == 3
