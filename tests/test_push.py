"""Publishing over HTTP: `dpe-export push` and `convert --push` against a local stand-in for the Hub.

The real Hub is not reachable from the test machines. tests/fake_hub.py implements the routes huggingface_hub
uses for create_repo and upload_folder on the non-Xet path (HF_HUB_DISABLE_XET=1): repo creation, README
metadata validation, tree listing, preupload, the LFS batch API with basic PUT uploads, and NDJSON commits. The
CLI runs in a child process with HF_ENDPOINT pointing at it, as a user would run it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub

REPO_ROOT = Path(__file__).resolve().parents[1]
WRITE_TOKEN, READ_TOKEN = "hf_test_write", "hf_test_read"

CALIBRATION = {"groups": [0, 4, 8], "scales": [1, 2, 4], "grid": [[0.1, 0.6, 0.9], [0.2, 0.5, 0.4]], "chosen": [4, 2]}


@pytest.fixture(scope="module")
def export_dir(tiny_dirs, tmp_path_factory) -> Path:
    """A finished export with regular files (config, code, card) and LFS ones (weights, selection, images)."""
    from dpe_export.export import convert as export_convert
    from dpe_export.sources import checkpoint

    info = checkpoint.inspect_model(tiny_dirs("llama"))
    params = export_convert.build_params(info, local_window_size=8, scale_factors=[2, 4], target_length=256)
    selected = torch.zeros(info.num_layers, info.num_heads, info.num_freqs, dtype=torch.bool)
    selected[..., 4:] = True
    out = tmp_path_factory.mktemp("push") / "tiny-llama-dpe"
    return export_convert.convert(info, out, params, selected, calibration=CALIBRATION)


@pytest.fixture
def hub():
    with FakeHub(tokens=[WRITE_TOKEN], read_only_tokens=[READ_TOKEN], max_requests=300, time_limit=240) as h:
        yield h


def run_dpe_export(hub: FakeHub, *args, token=WRITE_TOKEN, tmp_home: Path, timeout: float = 120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_home),
        HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(REPO_ROOT),
        NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "dpe_export", *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True,
        text=True, timeout=timeout,
    )


def local_files(folder: Path) -> dict[str, bytes]:
    """The files a push publishes: every file but hidden ones (the export's own manifest among them)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in local_files(folder).items()}


def assert_one_error_line(proc) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_push_uploads_every_file_and_pushing_again_uploads_nothing(hub, export_dir, tmp_path):
    dry = run_dpe_export(hub, "push", export_dir, "--repo-id", "my-org/tiny-dpe", "--dry-run", tmp_home=tmp_path)
    assert dry.returncode == 0, dry.stderr
    files = local_files(export_dir)
    for name, data in files.items():
        line = next(line for line in dry.stdout.splitlines() if line.split()[:1] == [name])
        assert line.split()[-1] == "new"
    assert f"would upload {len(files)} of {len(files)} file(s)" in dry.stdout
    assert hub.count("POST", r"/commit/|/repos/create") == 0 and hub.content_bytes_received == 0

    first = run_dpe_export(hub, "push", export_dir, "--repo-id", "my-org/tiny-dpe", tmp_home=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "Pushed" in first.stdout
    remote = hub.files("my-org/tiny-dpe")
    assert set(files) <= set(remote)
    for name, data in files.items():
        assert remote[name] == data, name  # byte for byte
    assert {"model.safetensors", "dpe_selected_dims.safetensors"} <= hub.lfs_paths("my-org/tiny-dpe")
    assert "README.md" not in hub.lfs_paths("my-org/tiny-dpe")  # small text files go inline in the commit
    repo = hub.repos["my-org/tiny-dpe"]
    assert len(repo.commits) == 1 and not repo.private
    sent = hub.content_bytes_received
    assert sent == sum(len(d) for d in files.values())

    again = run_dpe_export(hub, "push", export_dir, "--repo-id", "my-org/tiny-dpe", tmp_home=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "Nothing to upload" in again.stdout
    assert hub.content_bytes_received == sent  # no file content sent
    assert len(repo.commits) == 1
    assert hub.count("POST", r"/commit/") == 1 and hub.count("PUT", r"/_lfs/") == len(hub.lfs_puts)

    dry_again = run_dpe_export(hub, "push", export_dir, "--repo-id", "my-org/tiny-dpe", "--dry-run", tmp_home=tmp_path)
    assert f"would upload 0 of {len(files)} file(s)" in dry_again.stdout


def test_push_uploads_only_changed_files_to_a_branch(hub, export_dir, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(export_dir, folder)
    assert run_dpe_export(hub, "push", folder, "--repo-id", "my-org/tiny-dpe", "--private",
                          tmp_home=tmp_path).returncode == 0
    assert hub.repos["my-org/tiny-dpe"].private
    sent = hub.content_bytes_received
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nMore notes.\n")

    proc = run_dpe_export(hub, "push", folder, "--repo-id", "my-org/tiny-dpe", "--revision", "dpe/v2",
                          "--commit-message", "Update the card", tmp_home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    repo = hub.repos["my-org/tiny-dpe"]
    assert repo.commits[-1] == {**repo.commits[-1], "revision": "dpe/v2", "summary": "Update the card",
                                "paths": ["README.md"]}
    assert hub.content_bytes_received - sent == len((folder / "README.md").read_bytes())
    assert hub.files("my-org/tiny-dpe", "dpe/v2")["README.md"] == (folder / "README.md").read_bytes()
    assert hub.files("my-org/tiny-dpe", "main")["README.md"] == (export_dir / "README.md").read_bytes()


def test_failed_push_says_so_keeps_the_export_and_the_retry_completes(hub, export_dir, tmp_path):
    before = digests(export_dir)
    hub.fail_commits = 1  # the connection drops when the commit is sent, after the LFS content arrived
    failed = run_dpe_export(hub, "push", export_dir, "--repo-id", "my-org/tiny-dpe", tmp_home=tmp_path)
    line = assert_one_error_line(failed)
    assert "push failed: network error" in line and "intact" in line and "run the same command again" in line
    assert digests(export_dir) == before
    assert set(hub.files("my-org/tiny-dpe")) == {".gitattributes"}  # nothing committed
    lfs_sent = list(hub.lfs_puts)
    assert lfs_sent  # the LFS files had arrived before the failure

    retry = run_dpe_export(hub, "push", export_dir, "--repo-id", "my-org/tiny-dpe", tmp_home=tmp_path)
    assert retry.returncode == 0, retry.stderr
    remote = hub.files("my-org/tiny-dpe")
    for name, data in local_files(export_dir).items():
        assert remote[name] == data, name
    assert hub.lfs_puts == lfs_sent  # LFS content that had arrived was not sent again
    assert digests(export_dir) == before


def test_push_without_token_fails_before_contacting_the_hub(hub, export_dir, tmp_path):
    proc = run_dpe_export(hub, "push", export_dir, "--repo-id", "my-org/tiny-dpe", token=None, tmp_home=tmp_path)
    line = assert_one_error_line(proc)
    assert "no Hugging Face token" in line and "HF_TOKEN" in line
    assert hub.requests == []


def test_push_without_permission_is_one_line(hub, export_dir, tmp_path):
    proc = run_dpe_export(hub, "push", export_dir, "--repo-id", "other-org/tiny-dpe", token=READ_TOKEN,
                          tmp_home=tmp_path)
    line = assert_one_error_line(proc)
    assert "no permission to write to other-org/tiny-dpe" in line and "intact" in line
    assert hub.repos == {}


def test_push_to_an_unreachable_hub_is_one_line(export_dir, tmp_path):
    with FakeHub() as stopped:
        pass  # its port now refuses connections
    proc = run_dpe_export(stopped, "push", export_dir, "--repo-id", "my-org/tiny-dpe", tmp_home=tmp_path)
    line = assert_one_error_line(proc)
    assert "network error" in line and stopped.endpoint in line and "intact" in line


def test_push_refuses_what_is_not_an_export(hub, tiny_dirs, tmp_path):
    proc = run_dpe_export(hub, "push", tiny_dirs("llama"), "--repo-id", "my-org/x", tmp_home=tmp_path)
    assert "is not a DPE export" in assert_one_error_line(proc)
    proc = run_dpe_export(hub, "push", tmp_path / "missing", "--repo-id", "my-org/x", tmp_home=tmp_path)
    assert "not found" in assert_one_error_line(proc)
    assert hub.requests == []


def test_push_refuses_an_invalid_repo_id(hub, export_dir, tmp_path):
    for bad in ("no-namespace", "a/b/c", "org/bad name"):
        proc = run_dpe_export(hub, "push", export_dir, "--repo-id", bad, tmp_home=tmp_path)
        assert "repo-id" in assert_one_error_line(proc)
    assert hub.requests == []


def test_convert_push_exports_and_publishes_and_says_how_to_finish_a_failed_push(hub, tiny_dirs, tmp_path):
    out = tmp_path / "qwen-dpe"
    hub.fail_commits = 1
    failed = run_dpe_export(
        hub, "convert", tiny_dirs("qwen2"), "-o", out, "--window", "8", "--scale-factors", "2,4",
        "--push", "--repo-id", "my-org/qwen-dpe", "--revision", "v1", tmp_home=tmp_path, timeout=300,
    )
    line = assert_one_error_line(failed)
    assert f"finish the upload with: dpe-export push {out} --repo-id my-org/qwen-dpe --revision v1" in line
    assert (out / "model.safetensors").is_file() and "Exported a DPE Qwen2 checkpoint" in failed.stdout
    before = digests(out)

    proc = run_dpe_export(hub, "push", out, "--repo-id", "my-org/qwen-dpe", "--revision", "v1",
                          "--commit-message", "First DPE export", tmp_home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    remote = hub.files("my-org/qwen-dpe", "v1")
    for name, data in local_files(out).items():
        assert remote[name] == data, name
    assert hub.repos["my-org/qwen-dpe"].commits[0]["summary"] == "First DPE export"
    assert 'repo = "my-org/qwen-dpe"' in remote["README.md"].decode()
    assert digests(out) == before


def test_rerunning_the_same_convert_push_completes_a_failed_push(hub, tiny_dirs, tmp_path):
    out = tmp_path / "llama-dpe"
    command = ("convert", tiny_dirs("llama"), "-o", out, "--window", "8", "--scale-factors", "2,4",
               "--push", "--repo-id", "my-org/llama-dpe")
    hub.fail_commits = 1
    assert_one_error_line(run_dpe_export(hub, *command, tmp_home=tmp_path, timeout=300))
    before = digests(out)
    again = run_dpe_export(hub, *command, tmp_home=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "already holds this export" in again.stdout
    remote = hub.files("my-org/llama-dpe", "main")
    for name, data in local_files(out).items():
        assert remote[name] == data, name
    assert digests(out) == before  # pushed as it was, not exported again
    # Other parameters are a different export: the existing directory is refused as before.
    other = run_dpe_export(hub, *command[:7], "2,8", *command[8:], tmp_home=tmp_path, timeout=300)
    assert str(out) in assert_one_error_line(other)
    assert digests(out) == before


def test_convert_push_over_a_hand_modified_export_refuses_to_push_it(hub, tiny_dirs, tmp_path):
    out = tmp_path / "llama-dpe"
    command = ("convert", tiny_dirs("llama"), "-o", out, "--window", "8", "--scale-factors", "2,4",
               "--push", "--repo-id", "my-org/llama-dpe")
    hub.fail_commits = 1
    assert_one_error_line(run_dpe_export(hub, *command, tmp_home=tmp_path, timeout=300))
    for name, edit in (("modeling_dpe.py", lambda b: b + b"\nprint('edited')\n"),
                       ("tokenizer.json", lambda b: b.replace(b"w1", b"zz", 1))):
        original = (out / name).read_bytes()
        (out / name).write_bytes(edit(original))
        err = assert_one_error_line(run_dpe_export(hub, *command, tmp_home=tmp_path, timeout=300))
        assert "not what this convert writes" in err and name in err and "--overwrite" in err
        assert not hub.repos["my-org/llama-dpe"].commits  # nothing was pushed
        (out / name).write_bytes(original)
    again = run_dpe_export(hub, *command, tmp_home=tmp_path, timeout=300)
    assert again.returncode == 0 and "already holds this export" in again.stdout, again.stderr


def test_convert_push_options_need_push_and_repo_id(run_cli, llama_dir, tmp_path):
    out = tmp_path / "out"
    base = ("convert", llama_dir, "-o", out, "--window", "8", "--scale-factors", "2,4")
    r = run_cli(*base, "--private")
    assert r.exit_code == 2 and "--private needs --push" in r.stderr
    r = run_cli(*base, "--push")
    assert r.exit_code == 2 and "--push needs --repo-id" in r.stderr
    r = run_cli(*base, "--push", "--repo-id", "my-org/x")  # HF_HUB_OFFLINE=1 in the tests
    assert r.exit_code == 1 and "HF_HUB_OFFLINE" in r.stderr
    assert not out.exists()
