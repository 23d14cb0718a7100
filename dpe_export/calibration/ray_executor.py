"""Calibration units on a Ray cluster (``calibrate --ray [ADDRESS]``; ``pip install 'dpe-export[ray]'``).

Ray does the scheduling: each actor loads the base model once (GPUs per actor from the model's size, spread with
``device_map="auto"`` inside an actor when one GPU does not hold it) and takes units from an ``ActorPool``;
actors are restarted and their unit retried by Ray when one dies (``max_restarts``/``max_task_retries``). The
driver does not load the model: it appends each finished unit to the results file as the single-process run
does (engine.execute), so a killed driver resumes and the result is the same calibration.json.

Every node must read the base model at the same path (shared storage) or hold a copy there. Actors exchange only
plain tuples, numbers and the stage-1 scores array with the driver; weights are read from safetensors by each
actor.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from dpe_export.calibration import dim_scores, engine, scales, selection
from dpe_export.calibration.result import DIM_SCORES_FILE
from dpe_export.errors import DPEExportError
from dpe_export.sources import loading, methods

ACTOR_NAME = "dpe-calibration-{}"
NAMESPACE = "dpe-export"


def require_ray():
    try:
        import ray
    except ImportError:
        raise DPEExportError("--ray needs Ray: pip install 'dpe-export[ray]'") from None
    return ray


def gpus_per_actor(need_bytes: int, gpu_bytes: Optional[int]) -> int:
    """GPUs one model copy needs: weights and the longest context's cache and activations over one GPU's memory
    (with 10% headroom); 0 on a cluster without GPUs."""
    if not gpu_bytes:
        return 0
    return max(1, math.ceil(need_bytes / (0.9 * gpu_bytes)))


class _Worker:
    """One model copy; evaluates units of a procedure."""

    def __init__(self, model_dir: str, plan: dict, evaluate, haystack: Optional[str], dtype: Optional[str],
                 multi_gpu: bool, scores=None):
        import torch

        self.plan = scales.CalibrationPlan(**plan)
        self.evaluate = evaluate  # a module-level function of the procedure (sent by reference)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer = loading.load_tokenizer(model_dir)
        model = loading.load_model(model_dir, methods.MethodSpec("none"), device=None if multi_gpu else device,
                                   dtype=dtype, tokenizer=tokenizer, target_length=self.plan.target_length,
                                   device_map="auto" if multi_gpu else None).model
        self.calibrator = scales.Calibrator(model, tokenizer, self.plan,
                                            haystack=Path(haystack) if haystack else None)
        if scores is not None:
            self.calibrator.selected = selection.top_k_mask(torch.as_tensor(scores), self.plan.top_k)

    def run(self, unit):
        result, seconds = engine.timed(lambda u: self.evaluate(self.calibrator, self.plan, u), tuple(unit))
        return tuple(unit), result, seconds

    def dim_scores(self):
        """Stage 1 (top-K) on this copy; the scores as an array (the driver writes the file)."""
        return self.calibrator.dim_scores(progress=False).cpu().numpy()


def _gpu_memory(ray) -> Optional[int]:
    if not ray.cluster_resources().get("GPU"):
        return None

    @ray.remote(num_gpus=1)
    def probe():
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    return ray.get(probe.remote())


class RayExecutor:
    """Starts the actors on ``ray.init(address)``; call it with a list of units as engine.execute does."""

    def __init__(self, address: Optional[str], model_dir: Path, plan, evaluate, out_dir: Path, *, haystack=None,
                 dtype=None, actors: Optional[int] = None, need_bytes: int = 0, cpus_per_actor: int = 1):
        ray = require_ray()
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=None if address in (None, "", "local") else address, namespace=NAMESPACE,
                     log_to_driver=False, include_dashboard=False)
        gpus = gpus_per_actor(need_bytes, _gpu_memory(ray))
        resources = ray.cluster_resources()
        fit = int(resources.get("GPU", 0) // gpus) if gpus else int(resources.get("CPU", 1) // cpus_per_actor)
        count = actors or max(1, fit)
        if count > max(1, fit):
            raise DPEExportError(f"the Ray cluster fits {fit} model copies ({gpus or cpus_per_actor} "
                                 f"{'GPUs' if gpus else 'CPUs'} each), not {count}")
        self.gpus, self.count = gpus, count
        options = dict(num_cpus=cpus_per_actor, num_gpus=gpus, max_restarts=-1, max_task_retries=-1)
        worker = ray.remote(**options)(_Worker)
        args = (str(model_dir), asdict(plan), evaluate, str(haystack) if haystack else None, dtype, gpus > 1)
        scores = None
        if plan.top_k:
            scores = _stage_one(ray, worker, args, plan, out_dir)
        self.actors = [worker.options(name=ACTOR_NAME.format(i)).remote(*args, scores)
                       for i in range(count)]
        from ray.util import ActorPool

        self.pool = ActorPool(self.actors)

    def __call__(self, units: list):
        yield from self.pool.map_unordered(lambda actor, unit: actor.run.remote(unit), list(units))

    def shutdown(self) -> None:
        for actor in getattr(self, "actors", []):
            self.ray.kill(actor, no_restart=True)


def _stage_one(ray, worker, args, plan, out_dir: Path):
    """The top-K scores: read from out_dir when a run already made them, else computed on one actor."""
    import torch
    from safetensors.torch import load_file

    path = out_dir / DIM_SCORES_FILE
    if not path.is_file():
        first = worker.remote(*args, None)
        scores = ray.get(first.dim_scores.remote())
        ray.kill(first, no_restart=True)
        dim_scores.save_dim_scores(torch.as_tensor(scores), path, scales.dim_scores_metadata(plan))
    return load_file(str(path))[selection.SCORES_TENSOR].numpy()
