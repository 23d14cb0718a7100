"""`dpe-export upgrade`: an export written by dpe-export 0.1.0 (silently wrong on transformers 5.24) gets the
current runtime; weights, tokenizer and the rest stay byte for byte, and a following push sends only the
changed files."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub
from helpers import RUNTIME_FILES

from dpe_export import __version__

REPO_ROOT = Path(__file__).resolve().parents[1]
OLD = Path(__file__).resolve().parent / "fixtures" / "dpe-export-0.1.0"
TOKEN = "hf_test_write"


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _old_export(tiny_dirs, out: Path) -> Path:
    """A current export made to look exactly like one written by 0.1.0."""
    from dpe_export.export import convert as export_convert
    from dpe_export.sources import checkpoint

    info = checkpoint.inspect_model(tiny_dirs("llama"))
    params = export_convert.build_params(info, local_window_size=5, scale_factors=[2, 4, 8, 16], target_length=256)
    export_convert.convert(info, out, params)
    for name in RUNTIME_FILES:  # 0.1.0 shipped its runtime as one file, dpe_core.py
        (out / name).unlink()
    for name in ("modeling_dpe.py", "dpe_core.py"):
        shutil.copyfile(OLD / name, out / name)
    config = json.loads((out / "config.json").read_text())
    config.pop("dpe_export_version")
    # 0.1.0 kept the family's model_type and named the causal LM only
    config["model_type"] = "llama"
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_dpe.DPELlamaForCausalLM"}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _cached_equals_uncached(path: Path) -> bool:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    prompt = torch.randint(4, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=30, do_sample=False)
        uncached = model.generate(prompt, max_new_tokens=30, do_sample=False, use_cache=False)
    return cached.tolist() == uncached.tolist()


def test_upgrade_rewrites_only_the_generated_files_and_fixes_the_export(tiny_dirs, tmp_path, run_cli):
    import transformers
    from packaging import version

    out = _old_export(tiny_dirs, tmp_path / "old-dpe")
    before = _digests(out)
    if version.parse(transformers.__version__) >= version.parse("5.24"):
        assert not _cached_equals_uncached(out)  # the bug this command exists for
    r = run_cli("upgrade", out)
    assert r.exit_code == 0, r.stderr
    assert "written by dpe-export 0.1.0 or earlier" in r.stdout and "modeling_dpe.py" in r.stdout
    after = _digests(out)
    assert {n for n in after if after.get(n) != before.get(n)} == {"modeling_dpe.py", *RUNTIME_FILES, "config.json"}
    assert set(after) == set(before) - {"dpe_core.py"} | set(RUNTIME_FILES)  # the one-file runtime is gone
    assert "removed dpe_core.py" in r.stdout
    for name in RUNTIME_FILES:
        assert (out / name).read_bytes() == (REPO_ROOT / "modeling_templates" / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["dpe_export_version"] == __version__
    assert config["model_type"] == "dpe_llama" and config["auto_map"]["AutoConfig"] == "modeling_dpe.DPELlamaConfig"
    assert _cached_equals_uncached(out)
    # A fresh export of the same model computes the same logits.
    from transformers import AutoModelForCausalLM

    from dpe_export.export import convert as export_convert
    from dpe_export.sources import checkpoint

    info = checkpoint.inspect_model(tiny_dirs("llama"))
    fresh = export_convert.convert(info, tmp_path / "fresh", export_convert.build_params(info, local_window_size=5,
                                                                         scale_factors=[2, 4, 8, 16], target_length=256))
    ids = torch.randint(4, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(fresh, trust_remote_code=True)(ids).logits
    assert torch.equal(a, b)
    # Upgrading again changes nothing.
    r = run_cli("upgrade", out)
    assert r.exit_code == 0 and "up to date" in r.stdout and _digests(out) == after


def test_upgrade_refuses_what_is_not_an_export(tiny_dirs, tmp_path, run_cli_subprocess):
    base = tiny_dirs("llama")
    r = run_cli_subprocess("upgrade", base)
    assert r.exit_code == 1 and "is not a DPE export" in r.stderr and "Traceback" not in r.stderr
    out = _old_export(tiny_dirs, tmp_path / "linked")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not follow me")
    (out / "notes.txt").symlink_to(secret)
    before = _digests(out)
    r = run_cli_subprocess("upgrade", out)
    assert r.exit_code == 1 and "symbolic link" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert _digests(out) == before  # nothing was written


def test_push_after_upgrade_uploads_only_the_changed_files(tiny_dirs, tmp_path):
    out = _old_export(tiny_dirs, tmp_path / "tiny-dpe")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    with FakeHub(tokens=[TOKEN], max_requests=400, time_limit=240) as hub:
        env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "home"),
                   HF_TOKEN=TOKEN, HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(REPO_ROOT),
                   NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")

        def cli(*args, code=0):
            proc = subprocess.run([sys.executable, "-m", "dpe_export", *map(str, args)], cwd=REPO_ROOT, env=env,
                                  capture_output=True, text=True, timeout=180)
            assert proc.returncode == code, proc.stderr[-2000:]
            return proc

        # This dpe-export refuses to publish the old export's code, and says what to do ...
        assert "dpe-export upgrade" in cli("push", out, "--repo-id", "my-org/tiny-dpe", code=1).stderr
        # ... which the dpe-export that wrote it published (here: huggingface_hub's own upload, as it did)
        upload = ("from huggingface_hub import HfApi; api = HfApi(); api.create_repo('my-org/tiny-dpe', exist_ok=True); "
                  f"api.upload_folder(folder_path={str(out)!r}, repo_id='my-org/tiny-dpe')")
        proc = subprocess.run([sys.executable, "-c", upload], env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-2000:]
        puts = len(hub.lfs_puts)
        cli("upgrade", out)
        cli("push", out, "--repo-id", "my-org/tiny-dpe")
        repo = hub.repos["my-org/tiny-dpe"]
        assert len(repo.commits) == 2
        # the new runtime files go up, and the old one-file runtime (which dpe-export had published) is removed
        assert sorted(repo.commits[-1]["paths"]) == sorted(["config.json", "dpe_core.py", "modeling_dpe.py",
                                                            *RUNTIME_FILES])
        assert len(hub.lfs_puts) == puts  # the weights did not go up again
        remote = hub.files("my-org/tiny-dpe")
        assert "dpe_core.py" not in remote
        assert all(remote[name] == (out / name).read_bytes() for name in RUNTIME_FILES)


@pytest.mark.parametrize("recorded", [False, True])
def test_upgrade_removes_the_old_runtime_file_only_when_dpe_export_wrote_it(tiny_dirs, tmp_path, run_cli_subprocess,
                                                                            recorded):
    """An edited dpe_core.py is not one dpe-export wrote: upgrade refuses in one line and writes nothing, unless
    the export's manifest records that very file (then convert wrote it, and it goes)."""
    from dpe_export.export.files import write_manifest

    out = _old_export(tiny_dirs, tmp_path / "edited")
    (out / "dpe_core.py").write_text((out / "dpe_core.py").read_text() + "\n# my notes\n")
    if recorded:
        write_manifest(out)
    before = _digests(out)
    r = run_cli_subprocess("upgrade", out)
    if recorded:
        assert r.exit_code == 0, r.stderr
        assert not (out / "dpe_core.py").exists() and "removed dpe_core.py" in r.stdout
    else:
        assert r.exit_code == 1 and "not a file any dpe-export release wrote" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert _digests(out) == before
