"""Hostile and faulty inputs (issue: no leaks, no surprise deletions, no code run without consent). Each test
reproduces the attack or the fault first, then checks the one-line refusal and that nothing was written."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import copy_model, one_error

REPO_ROOT = Path(__file__).resolve().parents[1]
CONVERT = ("--window", "8", "--scale-factors", "2,4")


@pytest.mark.parametrize("name", ["LICENSE", "tokenizer.json", "model.safetensors", "README.md"])
def test_a_link_to_a_secret_outside_the_model_dir_is_refused(run_cli, llama_dir, tmp_path, name):
    secret = tmp_path / "secret_env"
    secret.write_text("HF_TOKEN=hf_very_secret\n")
    model = copy_model(llama_dir, tmp_path / "model")
    if (model / name).exists():
        (model / name).unlink()
    (model / name).symlink_to(secret)
    out = tmp_path / "out"
    err = one_error(run_cli("convert", model, "-o", out, *CONVERT))
    assert "outside the model directory" in err and name in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model", "secret_env"]


def test_a_hugging_face_cache_snapshot_of_links_into_its_blobs_converts(run_cli, llama_dir, tmp_path):
    entry = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = entry / "snapshots" / "abc123", entry / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(llama_dir.iterdir())):
        shutil.copyfile(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    r = run_cli("convert", snap, "-o", tmp_path / "out", *CONVERT)
    assert r.exit_code == 0, r.stderr
    assert not any(p.is_symlink() for p in (tmp_path / "out").iterdir())


def test_push_refuses_an_export_holding_a_link(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli("convert", llama_dir, "-o", out, *CONVERT).exit_code == 0
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    (out / "notes.md").symlink_to(secret)
    err = one_error(run_cli("push", out, "--repo-id", "me/x", "--dry-run"))
    assert "symbolic link" in err and "notes.md" in err


def test_a_tokenizer_auto_map_is_dropped_with_a_warning(run_cli, llama_dir, tmp_path):
    model = copy_model(llama_dir, tmp_path / "model")
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["evil/repo--tokenization_evil.EvilTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = run_cli("convert", model, "-o", tmp_path / "out", *CONVERT)
    assert r.exit_code == 0, r.stderr
    assert "dropping the auto_map" in r.stderr
    assert "auto_map" not in json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())


def test_an_export_is_refused_as_a_base_model(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli("convert", llama_dir, "-o", out, *CONVERT).exit_code == 0
    err = one_error(run_cli("convert", out, "-o", tmp_path / "again", *CONVERT))
    assert "already a DPE export" in err and "convert its base model" in err
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.pop("hidden_size"), "lacks hidden_size"),
    (lambda c: c.update(num_attention_heads=2, head_dim=32), "does not match the weights"),
    (lambda c: c.update(num_hidden_layers=3), "the weights have 2 layers"),
])
def test_a_config_that_does_not_describe_the_weights_is_refused(run_cli, llama_dir, tmp_path, edit, needle):
    model = copy_model(llama_dir, tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    edit(cfg)
    (model / "config.json").write_text(json.dumps(cfg))
    err = one_error(run_cli("convert", model, "-o", tmp_path / "out", *CONVERT))
    assert needle in err
    assert not (tmp_path / "out").exists()


SLOW_CONVERT = """
import sys, time
sys.path.insert(0, {repo!r})
from dpe_export.calibration import result as calib_result
from dpe_export.calibration import scales
from dpe_export.calibration import result as calib_result
from dpe_export.export import copying
real = copying.copy_file_with_progress
def slow(src, dst, update):
    real(src, dst, update)
    print("COPYING", flush=True)
    time.sleep(60)
copying.copy_file_with_progress = slow
from dpe_export.cli import main
main(["convert", {model!r}, "-o", {out!r}, "--window", "8", "--scale-factors", "2,4"])
"""


def _start_slow_convert(model: Path, out: Path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    code = SLOW_CONVERT.format(repo=str(REPO_ROOT), model=str(model), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO_ROOT)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if "COPYING" in line:
            return proc
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the convert did not start copying: {proc.stderr.read()}")


def _staging(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".dpe-export-" in p.name)


def test_sigterm_mid_copy_leaves_nothing(llama_dir, tmp_path):
    out = tmp_path / "out"
    proc = _start_slow_convert(llama_dir, out)
    assert _staging(tmp_path)  # the partial export exists while it copies
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 130, proc.stderr.read()
    assert _staging(tmp_path) == [] and not out.exists()


def test_sigkill_mid_copy_is_cleaned_by_the_next_run(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    proc = _start_slow_convert(llama_dir, out)
    proc.kill()
    proc.wait(timeout=60)
    left = _staging(tmp_path)
    # SIGKILL cannot be handled: the staging directory (and the lock file beside it, no longer held) stays ...
    assert len(left) == 2 and left[1] == left[0] + ".lock"
    r = run_cli("convert", llama_dir, "-o", out, *CONVERT)
    assert r.exit_code == 0, r.stderr
    assert "left by an interrupted convert" in r.stderr  # ... until the next run removes it, and says so
    assert _staging(tmp_path) == [] and (out / "config.json").is_file()


def test_a_live_processs_staging_directory_is_left_alone(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    mine = tmp_path / f".out.dpe-export-tmp-{os.getpid()}-0123abcd"
    mine.mkdir()
    assert run_cli("convert", llama_dir, "-o", out, *CONVERT).exit_code == 0
    assert mine.is_dir()


HOSTILE = '''
import pathlib
pathlib.Path({marker!r}).write_text("hostile code ran")
from .dpe_rule import *  # noqa
'''


def test_eval_does_not_run_an_exports_foreign_code_without_consent(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli("convert", llama_dir, "-o", out, *CONVERT).exit_code == 0
    marker = tmp_path / "pwned"
    (out / "modeling_dpe.py").write_text(HOSTILE.format(marker=str(marker)) + (out / "modeling_dpe.py").read_text())
    args = ("eval", out, "--task", "passkey", "--lengths", "64", "--samples", "1", "--depths", "0.5", "--no-progress")
    err = one_error(run_cli(*args))
    assert "carries code dpe-export did not write" in err and "--trust-remote-code" in err
    assert not marker.exists()
    # An auto_map pointing at another module is refused the same way.
    cfg = json.loads((out / "config.json").read_text())
    for name in ("modeling_dpe.py", "dpe_core.py"):
        shutil.copyfile(REPO_ROOT / "tests" / "fixtures" / "dpe-export-0.1.0" / name, out / name)
    # (an export as 0.1.0 wrote it: the family's model_type, only the causal LM in auto_map)
    cfg["model_type"] = "llama"
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_dpe.DPELlamaForCausalLM", "AutoConfig": "evil.EvilConfig"}
    (out / "config.json").write_text(json.dumps(cfg))
    assert "auto_map" in one_error(run_cli(*args))
    del cfg["auto_map"]["AutoConfig"]
    (out / "config.json").write_text(json.dumps(cfg))
    # With consent it runs (here: the 0.1.0 code, an older export's).
    r = run_cli(*args, "--trust-remote-code")
    assert r.exit_code == 0, r.stderr
    # And an export exactly as dpe-export writes it needs no flag.
    assert run_cli("upgrade", out).exit_code == 0
    assert run_cli(*args).exit_code == 0


def test_unbounded_and_malformed_values_get_one_line_each(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    err = one_error(run_cli("convert", llama_dir, "-o", out, "--window", "8", "--scale-factors", "10000000000000000000,4"))
    assert "scale factors must be integers from 1 to" in err
    model = copy_model(llama_dir, tmp_path / "neg")
    cfg = json.loads((model / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": -10000.0}
    (model / "config.json").write_text(json.dumps(cfg))
    assert "rope_theta must be a positive number" in one_error(run_cli("convert", model, "-o", out, *CONVERT))
    err = one_error(run_cli("eval", llama_dir, "--task", "passkey", "--lengths", "1000000000", "--samples", "1"))
    assert "beyond what dpe-export evaluates" in err
    err = one_error(run_cli("eval", llama_dir, "--task", "ppl", "--lengths", "16000000", "--samples", "1",
                            "--batch-size", "64"))
    assert "GiB is available" in err
    r = run_cli("convert", llama_dir, "-o", out, *CONVERT, "--base-model", "not a repo id")
    assert r.exit_code == 2 and "--base-model must be a Hub repo id" in r.stderr
    r = run_cli("convert", llama_dir, "-o", out, *CONVERT, "--push", "--repo-id", "me/x", "--revision", "a..b")
    assert "--revision must be a branch name" in one_error(r)
    assert not out.exists()


def test_a_calibration_file_that_is_not_ours_is_refused(tmp_path, llama_dir):
    from dpe_export.calibration import result as calib_result
    from dpe_export.errors import DPEExportError

    good = {"schema_version": 1, "chosen": [2, 4], "dimension_groups_range": [0, 4, 8], "window": 8,
            "target_length": 256, "pretrain_length": 64, "top_k": 3, "dim_scores": "dim_scores.safetensors",
            "base_model": {"config_sha256": calib_result.config_hash(llama_dir)}}
    calib_result.check_calibration_for(good, llama_dir)
    for key, value in (("chosen", None), ("dim_scores", "../../home/me/.ssh/id_rsa"), ("window", -1)):
        bad = dict(good)
        if value is None:
            bad.pop(key)
        else:
            bad[key] = value
        with pytest.raises(DPEExportError, match=repr(key)):
            calib_result.check_calibration_for(bad, llama_dir)
    with pytest.raises(DPEExportError, match="must be a file name beside it"):
        calib_result.selection_from(dict(good, dim_scores="../scores.safetensors"), tmp_path)


def test_an_auth_failure_does_not_suggest_running_the_same_command_again(tmp_path):
    from dpe_export.hub import _failed

    msg = _failed("the Hub at x rejected the token (HTTP 401); check HF_TOKEN or log in again", tmp_path)
    assert "fix that first, then run the same command again" in msg


def test_eval_refuses_a_tokenizer_linked_out_of_the_model_dir(run_cli, llama_dir, tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    model = copy_model(llama_dir, tmp_path / "model")
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(secret)
    err = one_error(run_cli("eval", model, "--task", "passkey", "--lengths", "64", "--samples", "1"))
    assert "outside the model directory" in err


def test_a_transformers_config_error_keeps_its_reason(llama_dir, monkeypatch):
    import transformers

    from dpe_export.errors import DPEExportError
    from dpe_export.sources import checkpoint

    def refuse(*args, **kwargs):
        raise ValueError("`rope_parameters` is invalid:\n  the reason is on the second line: factor must be > 1")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    with pytest.raises(DPEExportError, match="the reason is on the second line: factor must be > 1"):
        checkpoint.load_base_config(llama_dir)
