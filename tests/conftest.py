"""Shared fixtures: tiny checkpoint directories (built once per session) and CLI runners."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# Remote code gets its own module cache per test process, made here and removed at exit. transformers 5.0-5.7
# copy a local export's code to modules/transformers_modules/<directory name>/, so two pytest-xdist workers
# loading different exports that are both called "out" overwrite each other's files and one can import the
# other's model code (a Mistral check failed so under 5.2 and 5.3 in the release matrix; reproduced with two
# processes: the Llama one imported the Mistral export's module and found no DPELlamaConfig). 5.8 added a
# content hash to the path. It also keeps the tests out of the user's own cache.
_MODULES = tempfile.mkdtemp(prefix="dpe-export-tests-modules-")
os.environ["HF_MODULES_CACHE"] = _MODULES
atexit.register(shutil.rmtree, _MODULES, True)

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist (`-n N`) each worker gets its share of the cores for torch, not all of them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Build tiny checkpoints on first use: tiny_dirs("llama"), tiny_dirs("mistral", sliding_window=32), ..."""
    from helpers import save_tiny_model

    cache: dict = {}

    def get(family: str = "llama", tokenizer: bool = True, **overrides) -> Path:
        key = (family, tokenizer, tuple(sorted(overrides.items())))
        if key not in cache:
            name = "-".join([family, "tok" if tokenizer else "notok", *(f"{k}{v}" for k, v in sorted(overrides.items()))])
            cache[key] = save_tiny_model(tmp_path_factory.mktemp(name), family, tokenizer=tokenizer, **overrides)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def llama_dir(tiny_dirs) -> Path:
    return tiny_dirs("llama")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    """A real checkpoint of a model without rotary embeddings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pickled_only_dir(tmp_path_factory, llama_dir) -> Path:
    """A Llama config with only a pytorch_model.bin (random bytes: nothing here is ever unpickled)."""
    path = tmp_path_factory.mktemp("pickled")
    (path / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
    (path / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    return path


@dataclass
class CLIResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli():
    """Run the CLI in-process (click's CliRunner); stdout and stderr are kept apart."""
    from click.testing import CliRunner

    from dpe_export.cli import main

    def run(*args) -> CLIResult:
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        return CLIResult(result.exit_code, result.stdout, result.stderr)

    return run


@pytest.fixture
def run_cli_subprocess():
    """Run `python -m dpe_export` in a child process from the repository root, as a user would."""

    def run(*args, timeout: float = 120) -> CLIResult:
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
        proc = subprocess.run(
            [sys.executable, "-m", "dpe_export", *map(str, args)],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )
        return CLIResult(proc.returncode, proc.stdout, proc.stderr)

    return run


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A tiny Llama with a one-token-per-byte tokenizer (prompts of any length), saved once per test module."""
    from helpers import byte_tokenizer, save_tiny_model

    path = save_tiny_model(tmp_path_factory.mktemp("m") / "base", "llama", tokenizer=False, vocab_size=260)
    byte_tokenizer().save_pretrained(path)
    return path
