"""calibrate --ray: the units run on a local Ray cluster (two CPU actors, a trained testbed); one actor is killed
mid-run, Ray restarts it and retries its unit, and the result is the single-process calibration."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from dpe_export.calibration import procedures
from dpe_export.errors import DPEExportError

TESTBED = Path(__file__).parent / "fixtures" / "testbed-llama"
# 14 units of 512 tokens with 4 needles: enough left after the kill (two results in) for the restarted actor to take
# one; 4x cheaper than 1024 tokens with the procedure's 16 needles, which checked nothing more.
SETTINGS = dict(target_length=512, window=32, num_groups=2, needles=4, progress=False)


def test_a_ray_run_survives_a_killed_actor_and_equals_the_single_process_run(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from dpe_export.calibration.ray_executor import ACTOR_NAME, NAMESPACE

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "ray"
    killed = []

    def kill_one_actor_after_two_results():
        path = out / "cells.jsonl"
        deadline = time.time() + 600
        while time.time() < deadline:
            if path.is_file() and len(path.read_text().splitlines()) >= 2:
                actor = ray.get_actor(ACTOR_NAME.format(0), namespace=NAMESPACE)
                ray.kill(actor, no_restart=False)  # as a node or process loss would: Ray restarts it
                killed.append(len(path.read_text().splitlines()))
                return
            time.sleep(0.05)

    ray.init(num_cpus=2, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    try:
        killer = threading.Thread(target=kill_one_actor_after_two_results, daemon=True)
        killer.start()
        got = procedures.calibrate(TESTBED, out, ray_address="local", ray_actors=2, **SETTINGS)
        killer.join(timeout=5)
    finally:
        ray.shutdown()
    assert killed, "the actor was not killed before the run ended"
    assert got["timings"]["ray_actors"] == 2
    want = procedures.calibrate(TESTBED, tmp_path / "local", **SETTINGS)
    assert got["chosen"] == want["chosen"] and got["contexts"] == want["contexts"]
    for a, b in zip(got["grid"], want["grid"]):
        assert a == pytest.approx(b, abs=1e-4)
    # every unit once in the results file (a retried unit is recorded once), none lost
    lines = [json.loads(x) for x in (out / "cells.jsonl").read_text().splitlines()]
    keys = [(tuple(r["factors"]), r["context"]) for r in lines]
    assert len(keys) == len(set(keys)) == got["prefills"]


def test_ray_refuses_what_it_places_itself(tmp_path):
    with pytest.raises(DPEExportError, match="--ray places the model copies itself"):
        procedures.calibrate(TESTBED, tmp_path / "x", ray_address="local", shard=(0, 2), **SETTINGS)


def test_gpus_per_actor_follows_the_model_size():
    from dpe_export.calibration.ray_executor import gpus_per_actor

    gib = 1 << 30
    assert gpus_per_actor(10 * gib, None) == 0  # a CPU cluster
    assert gpus_per_actor(10 * gib, 80 * gib) == 1
    assert gpus_per_actor(100 * gib, 80 * gib) == 2  # device_map="auto" inside the actor
    assert gpus_per_actor(150 * gib, 80 * gib) == 3
