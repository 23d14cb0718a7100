"""The way people load an export: by repo id from the Hub. An export with a top-K selection file is pushed to
the local stand-in Hub (tests/fake_hub.py), then a process where dpe_export cannot be imported downloads it with
`AutoModelForCausalLM.from_pretrained("org/name", trust_remote_code=True)` (and with `revision=`) and must
compute the local export's logits."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from fake_hub import FakeHub
from helpers import RUNTIME_FILES

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_test_write"
REPO_ID = "my-org/tiny-dpe"


def _env(hub: FakeHub, home: Path, pythonpath: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_HOME=str(home),
               HF_TOKEN=TOKEN, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               PYTHONPATH=pythonpath, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    return env


def _export(tiny_dirs, out: Path, window: int):
    from dpe_export.export import convert as export_convert
    from dpe_export.sources import checkpoint

    info = checkpoint.inspect_model(tiny_dirs("llama"))
    params = export_convert.build_params(info, local_window_size=window, scale_factors=[2, 4, 8, 16], target_length=256)
    g = torch.Generator().manual_seed(window)
    idx = torch.rand(info.num_layers, info.num_heads, info.num_freqs, generator=g).topk(5, dim=-1).indices
    selected = torch.zeros(info.num_layers, info.num_heads, info.num_freqs, dtype=torch.bool).scatter_(-1, idx, True)
    return export_convert.convert(info, out, params, selected)


def _logits(path: str, ids, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kwargs).eval()
    assert model.dpe_selected_dims is not None
    with torch.no_grad():
        return model(torch.tensor(ids)).logits[0, -6:]


def test_an_export_pushed_to_the_hub_loads_by_repo_id_without_dpe_export(tiny_dirs, tmp_path):
    main_dir = _export(tiny_dirs, tmp_path / "main" / "tiny-dpe", window=4)
    v2_dir = _export(tiny_dirs, tmp_path / "v2" / "tiny-dpe", window=9)
    ids = torch.randint(4, 128, (1, 40), generator=torch.Generator().manual_seed(1)).tolist()
    want_main, want_v2 = _logits(str(main_dir), ids), _logits(str(v2_dir), ids)
    assert (want_main - want_v2).abs().max() > 1e-3  # the two revisions really differ

    with FakeHub(tokens=[TOKEN], max_requests=600, time_limit=240) as hub:
        for folder, extra in ((main_dir, []), (v2_dir, ["--revision", "v2"])):
            proc = subprocess.run([sys.executable, "-m", "dpe_export", "push", str(folder), "--repo-id", REPO_ID, *extra],
                                  cwd=REPO_ROOT, env=_env(hub, tmp_path / "home-push", str(REPO_ROOT)),
                                  capture_output=True, text=True, timeout=180)
            assert proc.returncode == 0, proc.stderr[-2000:]
        script = textwrap.dedent(f"""
            import json, sys
            sys.modules["dpe_export"] = None  # any import of dpe_export now fails
            import torch
            from transformers import AutoModelForCausalLM
            out = {{}}
            for rev in ("main", "v2"):
                kw = {{}} if rev == "main" else {{"revision": "v2"}}
                m = AutoModelForCausalLM.from_pretrained({REPO_ID!r}, trust_remote_code=True, **kw).eval()
                assert m.dpe_selected_dims is not None, "the selection file was not loaded"
                with torch.no_grad():
                    out[rev] = m(torch.tensor({ids})).logits[0, -6:].tolist()
            print(json.dumps(out))
        """)
        proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                              env=_env(hub, tmp_path / "home-load", ""), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        served = {path for _, path in hub.downloads}
    assert {"config.json", "modeling_dpe.py", *RUNTIME_FILES, "model.safetensors", "dpe_selected_dims.safetensors"} <= served
    assert torch.allclose(torch.tensor(got["main"]), want_main, atol=1e-5)
    assert torch.allclose(torch.tensor(got["v2"]), want_v2, atol=1e-5)
