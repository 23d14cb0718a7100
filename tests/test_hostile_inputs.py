"""Hostile and unlucky inputs, round two (issue 34). Each test reproduces what broke first: output paths that are
devices or pipes, GGUFs and checkpoints with tensors missing, a base tokenizer's own code, links and hard links
out of a model directory, sizes that exhaust memory before validation, staging directories of another PID
namespace, pushes of files dpe-export did not write, and the messages those gave. Each ends in one line naming
the file and what is wrong, with nothing half-written and nothing outside dpe-export's own output touched."""
from __future__ import annotations

import json
import os
import select
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import byte_tokenizer, copy_model, one_error, tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
CONVERT = ("--window", "8", "--scale-factors", "2,4")
EVAL = ("--task", "passkey", "--lengths", "64", "--samples", "1", "--depths", "0.5", "--no-progress")


def _device(tmp_path: Path, name: str, major: int, minor: int) -> Path:
    """A character device node like /dev/null (1, 3) or /dev/full (1, 7), made in tmp_path (not the system's)."""
    path = tmp_path / name
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot make a device node here: {e}")
    return path


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    index = path / "model.safetensors.index.json"
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    for name in names:
        out.update(load_file(str(path / name)))
    return out


# ---- 1. output paths that are not regular files -------------------------------------------------------------


def test_json_to_a_null_device_is_written_through_and_the_device_stays(run_cli, llama_dir, tmp_path):
    null = _device(tmp_path, "null", 1, 3)
    r = run_cli("eval", llama_dir, *EVAL, "--json", null)
    assert r.exit_code == 0, r.stderr
    assert stat.S_ISCHR(os.stat(null).st_mode)  # before the fix: replaced by a regular file, "Wrote ..." exit 0


def test_json_to_a_full_device_fails_in_one_line_naming_it(run_cli, llama_dir, tmp_path):
    full = _device(tmp_path, "full", 1, 7)
    err = one_error(run_cli("eval", llama_dir, *EVAL, "--json", full))
    assert str(full) in err and "No space left on device" in err
    assert stat.S_ISCHR(os.stat(full).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no temporary file left beside it


def test_json_to_a_fifo_is_written_through(run_cli, llama_dir, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    r = run_cli("eval", llama_dir, *EVAL, "--json", fifo)
    reader.join(60)
    assert r.exit_code == 0, r.stderr
    assert json.loads(got[0])["records"] and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_json_to_a_directory_or_a_socket_is_refused(run_cli, llama_dir, tmp_path):
    import socket

    folder = tmp_path / "results"
    folder.mkdir()
    r = run_cli("eval", llama_dir, *EVAL, "--json", folder)  # refused by the option itself (a usage error)
    assert r.exit_code == 2 and "is a directory" in r.stderr and "Traceback" not in r.stderr
    assert folder.is_dir() and not any(folder.iterdir())
    sock_path = tmp_path / "s"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(sock_path))
        assert "is a socket" in one_error(run_cli("eval", llama_dir, *EVAL, "--json", sock_path))
        assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
    finally:
        sock.close()


def test_every_writer_of_a_named_file_keeps_devices_and_pipes(tmp_path):
    """calibration.json and the plan, dim_scores.safetensors, analyze's --json and card section all go through
    dpe_export.output_files.write_output: written through a device, never replaced."""
    from dpe_export.calibration import dim_scores
    from dpe_export.calibration.result import write_json_atomic

    null = _device(tmp_path, "null", 1, 3)
    write_json_atomic(null, {"a": 1})
    dim_scores.save_dim_scores(torch.zeros(1, 2, 3), null)
    assert stat.S_ISCHR(os.stat(null).st_mode)
    regular = tmp_path / "sub" / "c.json"
    write_json_atomic(regular, {"a": 1})
    assert json.loads(regular.read_text()) == {"a": 1}


# ---- 2. every tensor from the source ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_model():
    pytest.importorskip("gguf")
    return tiny_model("llama", vocab_size=len(byte_tokenizer()), max_position_embeddings=64)


def test_a_gguf_with_a_tensor_missing_is_refused_not_filled_at_random(gguf_model, tmp_path, run_cli):
    from gguf_writer import write_llama_gguf

    path = write_llama_gguf(gguf_model, byte_tokenizer(), tmp_path / "cut.gguf", skip={"blk.1.ffn_down.weight"})
    err = one_error(run_cli("convert", "--model", path, "-o", tmp_path / "out", *CONVERT))
    assert "lacks 1 tensor" in err and "layers.1.mlp.down_proj.weight" in err and str(path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]  # no output, no staging left


def test_a_gguf_announcing_more_blocks_than_it_holds_is_refused(gguf_model, tmp_path, run_cli):
    from gguf_writer import write_llama_gguf

    path = write_llama_gguf(gguf_model, byte_tokenizer(), tmp_path / "more.gguf", block_count=6)
    err = one_error(run_cli("convert", "--model", path, "-o", tmp_path / "out", *CONVERT))
    assert "says it has 6 blocks" in err and "holds tensors for 2" in err
    big = write_llama_gguf(gguf_model, byte_tokenizer(), tmp_path / "huge.gguf", block_count=20000)
    err = one_error(run_cli("convert", "--model", big, "-o", tmp_path / "out", *CONVERT))
    assert "20000" in err  # refused from the header, before 20000 layers are built


def test_every_tensor_of_a_gguf_export_is_the_sources(gguf_model, tmp_path, run_cli):
    from gguf_writer import write_llama_gguf

    path = write_llama_gguf(gguf_model, byte_tokenizer(), tmp_path / "full.gguf")
    r = run_cli("convert", "--model", path, "-o", tmp_path / "out", *CONVERT, "--dtype", "float32")
    assert r.exit_code == 0, r.stderr
    got, want = _tensors(tmp_path / "out"), gguf_model.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_a_checkpoint_with_a_tensor_missing_is_refused_and_a_whole_one_copied_exactly(run_cli, llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    base = copy_model(llama_dir, tmp_path / "base")
    r = run_cli("convert", base, "-o", tmp_path / "whole", *CONVERT)
    assert r.exit_code == 0, r.stderr
    got, want = _tensors(tmp_path / "whole"), _tensors(base)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    tensors = load_file(str(base / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    err = one_error(run_cli("convert", base, "-o", tmp_path / "out", *CONVERT))
    assert "lack 1 tensor" in err and "model.layers.1.mlp.down_proj.weight" in err
    assert not (tmp_path / "out").exists()


# ---- 3. a base model's tokenizer code never runs ------------------------------------------------------------

HOSTILE_TOKENIZER = '''
import pathlib
pathlib.Path({marker!r}).write_text("the base model's tokenizer code ran")
from transformers import PreTrainedTokenizerFast as HostileTokenizer  # noqa
'''


def _hostile_tokenizer_model(llama_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    base = copy_model(llama_dir, tmp_path / "base")
    marker = tmp_path / "pwned"
    (base / "hostile_tok.py").write_text(HOSTILE_TOKENIZER.format(marker=str(marker)))
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "hostile_tok.HostileTokenizer"]}
    cfg["tokenizer_class"] = "HostileTokenizer"  # no class of transformers' own: only the base's code has it
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    return base, marker


def test_a_base_tokenizers_code_never_runs(run_cli, llama_dir, tmp_path):
    base, marker = _hostile_tokenizer_model(llama_dir, tmp_path)
    assert "cannot load a tokenizer" in one_error(run_cli("eval", base, *EVAL))
    run_cli("calibrate", "--model", base, "-d", tmp_path / "cal", "--target-length", "128", "--window", "16",
            "--groups", "2", "--samples", "1", "--needles", "1", "--device", "cpu", "--no-progress")
    run_cli("analyze", base, "--lengths", "64", "--samples", "1", "--pairs", "16", "--no-progress")
    assert not marker.exists()


def test_a_base_tokenizers_code_never_runs_from_a_terminal_answering_yes(llama_dir, tmp_path):
    """transformers asks "Do you wish to run the custom code? [y/N]" on a terminal; before the fix 'y' ran it."""
    import pty

    base, marker = _hostile_tokenizer_model(llama_dir, tmp_path)
    master, slave = pty.openpty()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT), HF_MODULES_CACHE=str(tmp_path / "mod"))
    proc = subprocess.Popen([sys.executable, "-m", "dpe_export", "eval", str(base), *EVAL], stdin=slave,
                            stdout=slave, stderr=slave, cwd=REPO_ROOT, env=env, close_fds=True)
    os.close(slave)
    output, deadline = b"", time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            output += chunk
            if b"[y/N]" in chunk:
                os.write(master, b"y\n")
    proc.wait(timeout=60)
    os.close(master)
    assert not marker.exists(), output.decode(errors="replace")[-2000:]
    assert b"[y/N]" not in output


# ---- 4. one link rule for every command ---------------------------------------------------------------------


def test_eval_refuses_a_shard_linked_out_of_the_model_dir(run_cli, tmp_path):
    from helpers import tiny_tokenizer

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base, max_shard_size="20KB")  # an index and its shards
    tiny_tokenizer().save_pretrained(base)
    shard = sorted(base.glob("model-*.safetensors"))[-1]
    outside = tmp_path / "outside.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    for args in (("eval", base, *EVAL), ("analyze", base, "--lengths", "64", "--samples", "1", "--no-progress")):
        err = one_error(run_cli(*args))  # before the fix: evaluated with exit 0
        assert "outside the model directory" in err and shard.name in err


def test_eval_refuses_a_chat_template_linked_to_a_secret(run_cli, llama_dir, tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    base = copy_model(llama_dir, tmp_path / "base")
    (base / "additional_chat_templates").mkdir()
    (base / "additional_chat_templates" / "x.jinja").symlink_to(secret)
    err = one_error(run_cli("eval", base, *EVAL))
    assert "x.jinja" in err and "outside the model directory" in err


def test_a_hard_link_to_a_file_outside_is_refused_and_a_device_in_the_dir_too(run_cli, llama_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("a secret")
    base = copy_model(llama_dir, tmp_path / "base")
    os.link(secret, base / "LICENSE")
    for args in (("convert", base, "-o", tmp_path / "out", *CONVERT), ("eval", base, *EVAL)):
        err = one_error(run_cli(*args))
        assert "LICENSE is a hard link" in err
    assert not (tmp_path / "out").exists()
    (base / "LICENSE").unlink()
    os.link(base / "README.md" if (base / "README.md").exists() else base / "config.json", base / "COPY")
    assert run_cli("convert", base, "-o", tmp_path / "out", *CONVERT).exit_code == 0  # both names inside: fine
    os.mkfifo(base / "fifo")
    assert "not a regular file" in one_error(run_cli("eval", base, *EVAL))


# ---- 5. sizes checked before anything is allocated ----------------------------------------------------------


def test_sizes_beyond_any_model_are_refused_from_the_config(run_cli, llama_dir, tmp_path):
    base = copy_model(llama_dir, tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    cfg["num_hidden_layers"] = 200_000_000
    (base / "config.json").write_text(json.dumps(cfg))
    for args in (("convert", base, "-o", tmp_path / "out", *CONVERT), ("eval", base, *EVAL),
                 ("calibrate", "--model", base, "-d", tmp_path / "cal", "--target-length", "256")):
        err = one_error(run_cli(*args))
        assert "num_hidden_layers = 200000000 is not a size any model has" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cal").exists()


def test_calibrate_refuses_a_target_length_that_cannot_fit(run_cli, llama_dir, tmp_path):
    err = one_error(run_cli("calibrate", "--model", llama_dir, "-d", tmp_path / "cal", "--target-length",
                            "100000000", "--window", "16"))
    assert "beyond what dpe-export evaluates" in err or "GiB" in err
    assert not (tmp_path / "cal").exists()


def test_a_config_nested_too_deeply_is_one_line(run_cli, llama_dir, tmp_path):
    base = copy_model(llama_dir, tmp_path / "base")
    (base / "config.json").write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    for args in (("convert", base, "-o", tmp_path / "out", *CONVERT), ("eval", base, *EVAL)):
        assert "nested too deeply" in one_error(run_cli(*args))


# ---- 6. staging directories: an OS lock, not a PID ----------------------------------------------------------

HOLD_LOCK = '''
import fcntl, os, sys, time
from pathlib import Path
entry = Path(sys.argv[1])
lock = open(str(entry) + ".lock", "x")
fcntl.flock(lock, fcntl.LOCK_EX)
entry.mkdir()
print("ready", flush=True)
time.sleep(120)
'''


def test_a_live_staging_directory_of_another_pid_namespace_is_left_alone(run_cli, llama_dir, tmp_path):
    """Its PID (999999) means nothing here, as for a convert in another container; its lock is held."""
    out = tmp_path / "out"
    theirs = tmp_path / ".out.dpe-export-tmp-999999-0123abcd"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(theirs)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        r = run_cli("convert", llama_dir, "-o", out, *CONVERT)
        assert r.exit_code == 0, r.stderr
        assert theirs.is_dir() and "interrupted" not in r.stderr  # before the fix: removed
    finally:
        holder.kill()
        holder.wait()
    r = run_cli("convert", llama_dir, "-o", out, *CONVERT, "--overwrite")  # the lock is free now: cleaned
    assert r.exit_code == 0 and not theirs.exists() and not Path(str(theirs) + ".lock").exists()


def test_a_source_staging_directory_belongs_to_its_own_output(run_cli, llama_dir, tmp_path):
    other = tmp_path / ".model.dpe-export-src-999999-0123abcd"  # another output's dequantized GGUF, owner gone
    other.mkdir()
    assert run_cli("convert", llama_dir, "-o", tmp_path / "out", *CONVERT).exit_code == 0
    assert other.is_dir()  # before the fix: any convert in the same folder removed it


# ---- 7. push publishes only what dpe-export wrote -----------------------------------------------------------


def _push(run_cli, out, *extra):
    return run_cli("push", out, "--repo-id", "me/x", "--dry-run", *extra)


def test_push_refuses_extra_files_edited_code_and_hard_links_to_secrets(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli("convert", llama_dir, "-o", out, *CONVERT).exit_code == 0
    assert _push(run_cli, out).exit_code == 0
    (out / "notes").mkdir()
    (out / "notes" / "private.txt").write_text("private")
    err = one_error(_push(run_cli, out))
    assert "notes/private.txt is not a file dpe-export wrote" in err and "--include notes/private.txt" in err
    r = _push(run_cli, out, "--include", "notes/private.txt")
    assert r.exit_code == 0 and "notes/private.txt" in r.stdout
    shutil.rmtree(out / "notes")
    modeling = (out / "modeling_dpe.py").read_text()
    (out / "modeling_dpe.py").write_text(modeling + "\n# edited\n")
    assert "modeling_dpe.py is not the one" in one_error(_push(run_cli, out))
    (out / "modeling_dpe.py").write_text(modeling)
    secret = tmp_path / "secret.txt"
    secret.write_text("a secret")
    os.link(secret, out / "LICENSE")
    assert "LICENSE is a hard link" in one_error(_push(run_cli, out))


def test_push_of_a_folder_that_is_not_an_export_says_so_first(run_cli, tmp_path):
    folder = tmp_path / "home"
    (folder / "deep" / "er").mkdir(parents=True)
    (folder / "deep" / "er" / "link").symlink_to("/etc/passwd")
    err = one_error(_push(run_cli, folder))
    assert "is not a DPE export" in err and "link" not in err


# ---- 8. messages --------------------------------------------------------------------------------------------


def test_an_export_config_without_its_dpe_section_is_one_line(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli("convert", llama_dir, "-o", out, *CONVERT).exit_code == 0
    cfg = json.loads((out / "config.json").read_text())
    del cfg["dpe"]
    (out / "config.json").write_text(json.dumps(cfg))
    err = one_error(run_cli("eval", out, *EVAL))
    assert "dpe" in err and str(out) in err


def test_a_repeated_calibration_cell_is_refused_not_replaced(tmp_path):
    from dpe_export.calibration import scales
    from dpe_export.errors import DPEExportError

    plan = scales.CalibrationPlan.__new__(scales.CalibrationPlan)
    key = "k"
    plan.key = lambda: key  # the line format is all that matters here
    line = {"plan": key, "group": 0, "scale": 2, "score": 0.5, "samples": 4, "seconds": 1.0}
    (tmp_path / "cells.jsonl").write_text(json.dumps(line) + "\n" + json.dumps(dict(line, score=0.9)) + "\n")
    with pytest.raises(DPEExportError, match="line 2 repeats the cell of group 0 and scale 2"):
        scales.read_cells(tmp_path, plan)


@pytest.mark.parametrize("at", ["first file", "weights"])
def test_a_full_disk_while_converting_is_one_line_naming_the_file(run_cli, llama_dir, tmp_path, monkeypatch, at):
    import errno

    real = os.sendfile

    def full(out_fd, in_fd, offset, count):
        if at == "weights" and os.fstat(in_fd).st_size < 50_000:  # the small files go through; the weights do not
            return real(out_fd, in_fd, offset, count)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "sendfile", full)
    err = one_error(run_cli("convert", llama_dir, "-o", tmp_path / "out", *CONVERT))
    assert "No space left on device" in err and str(tmp_path) in err  # the file it was writing is named
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_a_gguf_whose_header_disagrees_with_its_tensors_names_the_tensor(gguf_model, tmp_path, run_cli):
    """Before: "... look at the above report!", of a report that TRANSFORMERS_VERBOSITY=error hides."""
    from gguf_writer import write_llama_gguf

    big = tiny_model("llama", vocab_size=len(byte_tokenizer()) + 40, max_position_embeddings=64)
    path = write_llama_gguf(big, byte_tokenizer(), tmp_path / "vocab.gguf", vocab_size=len(byte_tokenizer()))
    err = one_error(run_cli("convert", "--model", path, "-o", tmp_path / "out", *CONVERT))
    assert "has shape [300, 64] in the file" in err and "above report" not in err


def test_push_publishes_what_the_manifest_names_with_the_hashes_it_records(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli("convert", llama_dir, "-o", out, *CONVERT).exit_code == 0
    manifest = json.loads((out / ".dpe-export-manifest.json").read_text())["files"]
    published = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert set(manifest) == published and "sha256" in manifest["model.safetensors"]
    (out / "tokenizer.json").write_text((out / "tokenizer.json").read_text().replace("w1", "w9"))
    assert "tokenizer.json changed after convert wrote it" in one_error(_push(run_cli, out))
    assert run_cli("convert", llama_dir, "-o", out, *CONVERT, "--overwrite").exit_code == 0
    with open(out / "README.md", "a") as f:  # the card is the user's to edit (analyze --card does)
        f.write("\nA note of mine.\n")
    assert _push(run_cli, out).exit_code == 0
    (out / "config.json").unlink()
    assert "is not a DPE export" in one_error(_push(run_cli, out))


def test_json_to_dev_stdout_prints_the_results(run_cli_subprocess, llama_dir):
    r = run_cli_subprocess("eval", llama_dir, *EVAL, "--json", "/dev/stdout")
    assert r.exit_code == 0, r.stderr
    start = r.stdout.index("{")
    data, _ = json.JSONDecoder().raw_decode(r.stdout[start:])
    assert data["records"]
