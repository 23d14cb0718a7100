"""Every bad input ends in one `Error: ...` line on stderr, a non-zero exit, no traceback, and nothing written."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

W = ["--window", "8"]
S = ["--scale-factors", "2,4"]  # the tiny models have head_dim 16: 8 rotary frequencies, groups 0,4,8


def assert_clean_failure(result, out: Path, *needles: str, exit_code: int = 1) -> str:
    """One error line, the expected exit status, no traceback, nothing at `out`, no staging dir beside it."""
    lines = result.stderr.splitlines()
    assert result.exit_code == exit_code, (result.exit_code, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() and not out.is_symlink()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers
    return lines[0]


def write_scores(path: Path, shape=(2, 4, 8), name="scores", values=None) -> Path:
    scores = torch.rand(shape) if values is None else values
    save_file({name: scores}, str(path))
    return path


# ---------------------------------------------------------------------------------------------------------
# The model directory
# ---------------------------------------------------------------------------------------------------------


def test_missing_model_dir(run_cli, tmp_path):
    out = tmp_path / "out"
    r = run_cli("convert", tmp_path / "no-such-model", "-o", out, *W, *S)
    assert_clean_failure(r, out, "no such file or directory", "no-such-model")


def test_model_dir_without_config(run_cli, tmp_path):
    (tmp_path / "model").mkdir()
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", tmp_path / "model", "-o", out, *W, *S), out, "no config.json")


def test_model_without_rope(run_cli, gpt2_dir, tmp_path):
    out = tmp_path / "out"
    line = assert_clean_failure(run_cli("convert", gpt2_dir, "-o", out, *W, *S), out, "'gpt2'")
    assert "no rotary position embeddings" in line and "llama" in line and "qwen2" in line


def test_unsupported_rope_family(run_cli, tmp_path):
    model = tmp_path / "gemma"
    model.mkdir()
    config = {"model_type": "gemma", "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
              "head_dim": 16, "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 64}
    (model / "config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, str(model / "model.safetensors"))
    out = tmp_path / "out"
    line = assert_clean_failure(run_cli("convert", model, "-o", out, *W, *S), out, "'gemma'", "not supported yet")
    assert "mistral" in line


def test_mistral_with_sliding_window(run_cli, tiny_dirs, tmp_path):
    out = tmp_path / "out"
    model = tiny_dirs("mistral", sliding_window=32)
    assert_clean_failure(run_cli("convert", model, "-o", out, *W, *S), out, "sliding-window", "Mistral")


def test_pickled_only_checkpoint(run_cli, pickled_only_dir, tmp_path):
    out = tmp_path / "out"
    r = run_cli("convert", pickled_only_dir, "-o", out, *W, *S)
    assert_clean_failure(r, out, "pickled", "pytorch_model.bin", "safetensors")


def test_truncated_weights(run_cli, llama_dir, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for f in llama_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", model, "-o", out, *W, *S), out, "model.safetensors", "not a valid safetensors")


# ---------------------------------------------------------------------------------------------------------
# DPE parameters
# ---------------------------------------------------------------------------------------------------------


def test_scale_factors_do_not_match_groups(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    r = run_cli("convert", llama_dir, "-o", out, *W, "--scale-factors", "2,4,8", "--dimension-groups", "0,4,8")
    assert_clean_failure(r, out, "3 scale factors for 2 dimension groups")


@pytest.mark.parametrize(
    "groups, factors, needle",
    [
        ("1,4,8", "2,4", "start at 0"),  # does not start at 0
        ("0,4,4,8", "2,4,8", "strictly increasing"),  # not increasing
        ("0,6,4,8", "2,4,8", "strictly increasing"),  # decreasing
        ("0,4,6", "2,4", "end at head_dim/2 = 8"),  # does not end at head_dim/2
        ("0,4,16", "2,4", "end at head_dim/2 = 8"),  # runs past head_dim/2
    ],
)
def test_bad_group_boundaries(run_cli, llama_dir, tmp_path, groups, factors, needle):
    out = tmp_path / "out"
    r = run_cli("convert", llama_dir, "-o", out, *W, "--scale-factors", factors, "--dimension-groups", groups)
    assert_clean_failure(r, out, needle)


@pytest.mark.parametrize("window", ["0", "-5"])
def test_window_below_one(run_cli, llama_dir, tmp_path, window):
    out = tmp_path / "out"
    r = run_cli("convert", llama_dir, "-o", out, "--window", window, *S)
    assert_clean_failure(r, out, "local window must be an integer from 1 to")


@pytest.mark.parametrize("factors", ["0,4", "2,-1"])
def test_scale_factor_below_one(run_cli, llama_dir, tmp_path, factors):
    out = tmp_path / "out"
    r = run_cli("convert", llama_dir, "-o", out, *W, "--scale-factors", factors)
    assert_clean_failure(r, out, "scale factors must be integers from 1 to")


def test_target_length_not_beyond_window(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    r = run_cli("convert", llama_dir, "-o", out, *W, *S, "--target-length", "8")
    assert_clean_failure(r, out, "target length")


def test_too_many_groups_for_even_split(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    r = run_cli("convert", llama_dir, "-o", out, *W, "--scale-factors", "2,2,2,2,2,2,2,2,2")
    assert_clean_failure(r, out, "9 groups")


def test_unparseable_scale_factors_is_a_usage_error(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    r = run_cli("convert", llama_dir, "-o", out, *W, "--scale-factors", "2,x")
    assert_clean_failure(r, out, "--scale-factors", "comma-separated integers", exit_code=2)


def test_window_required_without_preset(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", llama_dir, "-o", out, *S), out, "--window", exit_code=2)


def test_missing_output_option(run_cli, llama_dir, tmp_path):
    r = run_cli("convert", llama_dir, *W, *S)
    assert_clean_failure(r, tmp_path / "out", "--output", exit_code=2)


def test_unknown_preset(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    r = run_cli("convert", llama_dir, "-o", out, "--preset", "no-such-preset")
    assert_clean_failure(r, out, "unknown preset 'no-such-preset'", "meta-llama-3-8b-instruct")


def test_preset_groups_do_not_fit_model(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    r = run_cli("convert", llama_dir, "-o", out, "--preset", "meta-llama-3-8b-instruct")
    assert_clean_failure(r, out, "head_dim/2 = 8")


# ---------------------------------------------------------------------------------------------------------
# Frequency selection
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", ["0", "9", "-1"])
def test_topk_out_of_range(run_cli, llama_dir, tmp_path, k):
    out = tmp_path / "out"
    scores = write_scores(tmp_path / "scores.safetensors")
    r = run_cli("convert", llama_dir, "-o", out, *W, *S, "--dim-scores", scores, "--topk", k)
    assert_clean_failure(r, out, "top-K", "between 1 and head_dim/2 = 8")


def test_topk_without_scores(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    r = run_cli("convert", llama_dir, "-o", out, *W, *S, "--topk", "4")
    assert_clean_failure(r, out, "--topk needs --dim-scores", exit_code=2)


def test_scores_without_topk(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    scores = write_scores(tmp_path / "scores.safetensors")
    r = run_cli("convert", llama_dir, "-o", out, *W, *S, "--dim-scores", scores)
    assert_clean_failure(r, out, "--dim-scores needs --topk", exit_code=2)


def test_missing_scores_file(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    r = run_cli("convert", llama_dir, "-o", out, *W, *S, "--dim-scores", tmp_path / "nope.safetensors", "--topk", "4")
    assert_clean_failure(r, out, "dimension scores file not found", "nope.safetensors")


@pytest.mark.parametrize("shape", [(2, 4, 7), (4, 2, 8), (2, 4)])
def test_ill_shaped_scores(run_cli, llama_dir, tmp_path, shape):
    out = tmp_path / "out"
    scores = write_scores(tmp_path / "scores.safetensors", shape=shape)
    r = run_cli("convert", llama_dir, "-o", out, *W, *S, "--dim-scores", scores, "--topk", "4")
    assert_clean_failure(r, out, "wrong shape", "expected [layers, heads, head_dim/2] = [2, 4, 8]", f"got {list(shape)}")


def test_scores_without_scores_tensor(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    scores = write_scores(tmp_path / "scores.safetensors", name="weights")
    r = run_cli("convert", llama_dir, "-o", out, *W, *S, "--dim-scores", scores, "--topk", "4")
    assert_clean_failure(r, out, "no tensor named 'scores'", "'weights'")


def test_non_finite_scores(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    values = torch.rand(2, 4, 8)
    values[1, 2, 3] = float("nan")
    scores = write_scores(tmp_path / "scores.safetensors", values=values)
    r = run_cli("convert", llama_dir, "-o", out, *W, *S, "--dim-scores", scores, "--topk", "4")
    assert_clean_failure(r, out, "non-finite")


def test_truncated_scores_file(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    scores = write_scores(tmp_path / "scores.safetensors")
    data = scores.read_bytes()
    scores.write_bytes(data[: len(data) // 2])
    r = run_cli("convert", llama_dir, "-o", out, *W, *S, "--dim-scores", scores, "--topk", "4")
    assert_clean_failure(r, out, "not a valid safetensors file")


def test_pickled_scores_file_is_refused_unread(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    scores = tmp_path / "scores.pt"
    scores.write_bytes(b"PK\x03\x04 a torch zip container, never opened as one")
    r = run_cli("convert", llama_dir, "-o", out, *W, *S, "--dim-scores", scores, "--topk", "4")
    assert_clean_failure(r, out, "not a valid safetensors file", "never loads pickles")


# ---------------------------------------------------------------------------------------------------------
# The output
# ---------------------------------------------------------------------------------------------------------


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_existing_output_is_left_untouched(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    (out / "sub" / "config.json").write_text("{}")
    before = _tree_digest(out)
    r = run_cli("convert", llama_dir, "-o", out, *W, *S)
    lines = r.stderr.splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: ")
    assert "already exists and is not empty" in lines[0] and "--overwrite" in lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    assert _tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_is_a_file(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    r = run_cli("convert", llama_dir, "-o", out, *W, *S, "--overwrite")
    lines = r.stderr.splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "is not a directory" in lines[0]
    assert out.read_text() == "a file"


def test_output_is_the_model_dir(run_cli, llama_dir, tmp_path):
    before = _tree_digest(llama_dir)
    r = run_cli("convert", llama_dir, "-o", llama_dir, *W, *S, "--overwrite")
    lines = r.stderr.splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "model directory itself" in lines[0]
    assert _tree_digest(llama_dir) == before


# ---------------------------------------------------------------------------------------------------------
# As a user runs it: a separate process, so nothing (transformers logging included) can leak a traceback
# ---------------------------------------------------------------------------------------------------------


def test_subprocess_missing_model_dir(run_cli_subprocess, tmp_path):
    out = tmp_path / "out"
    r = run_cli_subprocess("convert", tmp_path / "missing", "-o", out, *W, *S)
    assert_clean_failure(r, out, "no such file or directory")


def test_subprocess_model_without_rope(run_cli_subprocess, gpt2_dir, tmp_path):
    out = tmp_path / "out"
    r = run_cli_subprocess("convert", gpt2_dir, "-o", out, *W, *S)
    assert_clean_failure(r, out, "no rotary position embeddings")


def test_subprocess_usage_error(run_cli_subprocess, llama_dir, tmp_path):
    out = tmp_path / "out"
    r = run_cli_subprocess("convert", llama_dir, "-o", out, "--window", "many", *S)
    assert_clean_failure(r, out, "--window", exit_code=2)


def test_output_is_a_symlink(run_cli, llama_dir, tmp_path):
    (tmp_path / "real").mkdir()
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "real")
    r = run_cli("convert", llama_dir, "-o", out, *W, *S)
    lines = r.stderr.splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "symbolic link" in lines[0]
    assert out.is_symlink() and list((tmp_path / "real").iterdir()) == []
