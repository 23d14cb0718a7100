"""Calibration procedures: how stage 2 finds each group's scale. One registry entry per procedure (plan defaults,
how it runs and reads its results, how it builds calibration.json); the CLI's choices, calibration.json and the
model card read it. :func:`calibrate` and :func:`merge` run any of them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

from dpe_export.architectures import get_architecture
from dpe_export.calibration import engine, paired, scales
from dpe_export.calibration.ray_executor import RayExecutor
from dpe_export.calibration.result import CALIBRATION_FILE, write_json_atomic
from dpe_export.errors import DPEExportError
from dpe_export.evaluation import run as evalrun
from dpe_export.evaluation import registry
from dpe_export.evaluation.tasks import PromptBuilder
from dpe_export.sources import loading, methods


@dataclass(frozen=True)
class Procedure:
    name: str
    title: str  # for the card and --help
    summary: str  # one sentence: what it spends and how it chooses
    samples: int  # default contexts per setting (--samples)
    needles: int  # default needles per context (--needles)
    metrics: tuple  # the --metric values it takes
    units: engine.UnitKind  # how its work is cut, resumed and sharded
    evaluate: Callable[..., dict]  # (calibrator, plan, unit) -> the unit's result, on a loaded model
    build: Callable[..., dict]  # (plan, results, timings) -> calibration.json
    reference: str = ""  # where the procedure comes from
    plan_defaults: Callable[..., dict] = lambda target_length, samples: {}  # plan settings it adds by default
    # (plan, model config) -> the plan with what the procedure reads from the model (paired: short-wavelength groups)
    plan_for_model: Callable[..., Any] = lambda plan, config: plan


PROCEDURES: dict[str, Procedure] = {}


def register(procedure: Procedure) -> Procedure:
    if procedure.name in PROCEDURES:
        raise ValueError(f"calibration procedure {procedure.name!r} is already registered")
    if procedure.samples < 1 or procedure.needles < 1 or not procedure.metrics:
        raise ValueError(f"calibration procedure {procedure.name!r}: defaults must be >= 1 and metrics non-empty")
    PROCEDURES[procedure.name] = procedure
    return procedure


def get_procedure(name: str) -> Procedure:
    try:
        return PROCEDURES[name]
    except KeyError:
        raise DPEExportError(f"unknown calibration procedure {name!r}; use {' or '.join(PROCEDURES)}") from None


DEFAULT_PROCEDURE = "paired"


register(Procedure(
    name="paired", title="paired needle likelihoods, successive halving",
    summary=(f"each setting prefilled once per context ({paired.DEFAULT_CONTEXTS} contexts of "
             f"{paired.DEFAULT_NEEDLES} needles, the same for every scale), scored by the log-likelihood of each "
             "needle's value, the first context at half the target length; after each context the better half of "
             "each group's scales (and the reference) stays in, and the best mean wins"),
    samples=paired.DEFAULT_CONTEXTS, needles=paired.DEFAULT_NEEDLES, metrics=paired.METRICS, units=paired.UNITS,
    evaluate=paired.evaluate,
    build=paired.build,
    plan_defaults=lambda target_length, samples: {
        "context_lengths": paired.default_context_lengths(target_length, samples), "tie_z": 0.0},
    plan_for_model=lambda plan, config: replace(plan, short_wavelength_groups=scales.short_wavelength_groups(
        config, plan.dimension_groups_range, plan.pretrain_length)),
))

register(Procedure(
    name="grid", title="full grid, exact-match retrieval (the DPE authors')",
    summary=("every (group, scale) cell scored on its own prompts by the fraction of needles (or pass keys) a "
             "greedy answer gets exactly; each question a prefill of its own"),
    samples=scales.DEFAULT_SAMPLES, needles=scales.DEFAULT_NEEDLES, metrics=tuple(scales.METRICS),
    units=scales.GRID_UNITS, evaluate=scales.evaluate_cell,
    build=scales.build_calibration, reference="arXiv 2504.18857",
))


def _check_prompt_fits(plan: scales.CalibrationPlan, tokenizer, haystack) -> None:
    """A prompt with all the plan's needles must fit in the target length; say so before loading the weights."""
    task = registry.get_task(plan.metric)
    need = task.min_length(PromptBuilder(tokenizer, haystack_path=haystack), plan.needles)
    what = f"a {task.pretty_name} prompt" + (f" with {plan.needles} needles" if task.uses_needles else "")
    if min(plan.context_length(c) for c in range(plan.samples)) < need:
        raise DPEExportError(f"{what} takes at least {need} tokens with this tokenizer, more than the target length "
                             f"({plan.target_length}); give a longer --target-length or fewer --needles")


def merge(out_dir) -> dict:
    """Join the shards' results in out_dir into calibration.json (all of them must be done)."""
    out_dir = Path(out_dir)
    plan = scales.load_plan(out_dir)
    procedure = get_procedure(plan.procedure)
    calibration = procedure.build(plan, procedure.units.read(out_dir, plan))
    write_json_atomic(out_dir / CALIBRATION_FILE, calibration)
    return calibration


def _make_plan(proc, ckpt, *, target_length, window, pretrain_length, dimension_groups, num_groups, top_k, samples,
               needles, seed, metric, dim_statistic, context_lengths) -> scales.CalibrationPlan:
    """The plan for this procedure and model, with the procedure's plan defaults and what it reads from the model."""
    plan = scales.make_plan(
        ckpt.path, target_length=target_length, window=window, num_freqs=ckpt.rotary_dim // 2,
        pretrain_length=pretrain_length or ckpt.require_pretraining_length(), dimension_groups=dimension_groups,
        num_groups=num_groups, top_k=top_k, samples=samples, needles=needles, seed=seed, metric=metric,
        dim_statistic=dim_statistic, procedure=proc.name,
        **{**proc.plan_defaults(target_length, samples),
           **({} if context_lengths is None else {"context_lengths": context_lengths})})
    return proc.plan_for_model(plan, ckpt.config)


def calibrate(model_dir, out_dir, *, target_length: int, window: int, dimension_groups=None,
              num_groups: Optional[int] = None, top_k: Optional[int] = None, samples: Optional[int] = None,
              needles: Optional[int] = None, seed: int = scales.DEFAULT_SEED, metric: Optional[str] = None,
              pretrain_length: Optional[int] = None, procedure: str = DEFAULT_PROCEDURE,
              shard: Optional[tuple[int, int]] = None, haystack: Optional[Path] = None, device=None, dtype=None,
              batch_size: int = 1, progress: bool = True, device_map: Optional[str] = None,
              dim_statistic: str = "norms", ray_address: Optional[str] = None,
              ray_actors: Optional[int] = None, context_lengths: Optional[list[int]] = None) -> Optional[dict[str, Any]]:
    """Run (or resume) a calibration into out_dir. Returns calibration.json's content, or None for a shard
    (join the shards with :func:`merge`). ``samples``/``needles`` default to the procedure's. With ``ray_address``
    ("local" for a cluster of this machine alone, or a cluster's address) the units run on Ray actors and this
    process does not load the model."""
    import random

    import torch

    proc = get_procedure(procedure)
    metric = proc.metrics[0] if metric is None else metric  # a registered task that calibrates
    if context_lengths is not None and proc.name != "paired":
        raise DPEExportError("--context-lengths applies to the paired procedure (the grid scores every prompt at the "
                             "target length)")
    if metric not in proc.metrics:
        raise DPEExportError(f"the {proc.name} procedure scores {' or '.join(proc.metrics)}, not {metric!r}; use "
                             f"--procedure {' or '.join(p.name for p in PROCEDURES.values() if metric in p.metrics)}")
    if ray_address is not None and (shard is not None or device_map or device not in (None, "auto")):
        raise DPEExportError("--ray places the model copies itself: leave out --shard, --device and --device-map")
    samples = proc.samples if samples is None else samples
    needles = proc.needles if needles is None else needles
    out_dir = Path(out_dir)
    ckpt = loading.check_eval_model(model_dir)  # a directory or its Checkpoint
    model_dir = ckpt.path
    if ckpt.is_export:
        raise DPEExportError(f"{model_dir} is already a DPE export; calibrate its base model")
    loading.check_device_map(device_map, device)
    if ray_address is None:
        evalrun.check_memory(ckpt, metric, target_length, batch_size, device, dtype, device_map)  # the longest context must fit, as eval checks
    get_architecture(ckpt.config)
    plan = _make_plan(proc, ckpt, target_length=target_length, window=window, pretrain_length=pretrain_length,
                      dimension_groups=dimension_groups, num_groups=num_groups, top_k=top_k, samples=samples,
                      needles=needles, seed=seed, metric=metric, dim_statistic=dim_statistic,
                      context_lengths=context_lengths)
    tokenizer = loading.load_tokenizer(ckpt)  # before the weights: a model without one fails fast
    _check_prompt_fits(plan, tokenizer, haystack)
    plan = scales.save_plan(out_dir, plan)
    t0 = time.perf_counter()
    random.seed(seed)
    torch.manual_seed(seed)
    cleanup = None
    if ray_address is not None:
        executor = RayExecutor(ray_address, model_dir, plan, proc.evaluate, out_dir, haystack=haystack, dtype=dtype,
                               actors=ray_actors, need_bytes=_model_bytes(ckpt, metric, target_length, dtype))
        cleanup = executor.shutdown
    else:
        loaded = loading.load_model(ckpt, methods.MethodSpec("none"), device=device, dtype=dtype,
                                    tokenizer=tokenizer, target_length=target_length, device_map=device_map)
        calibrator = scales.Calibrator(loaded.model, tokenizer, plan, haystack=haystack, batch_size=batch_size)
        if top_k:
            calibrator.compute_selection(out_dir, progress)
        executor = engine.local_executor(lambda unit: proc.evaluate(calibrator, plan, unit))
    t1 = time.perf_counter()
    try:
        results = engine.execute(plan, proc.units, executor, out_dir, shard, progress,
                                 desc=f"calibration ({proc.name})")
    finally:
        if cleanup is not None:
            cleanup()
    if shard is not None and shard[1] > 1:
        return None
    timings = {"load_and_dim_scores_seconds": round(t1 - t0, 1),
               "grid_seconds_this_run": round(time.perf_counter() - t1, 1),
               "grid_seconds_all_cells": round(sum(c["seconds"] for c in results.values()), 1)}
    if ray_address is not None:
        timings["ray_actors"] = executor.count
    calibration = proc.build(plan, results, timings)
    write_json_atomic(out_dir / CALIBRATION_FILE, calibration)
    return calibration


def _model_bytes(ckpt, metric: str, target_length: int, dtype) -> int:
    """Weights (their safetensors size, at the asked dtype's width) plus the longest context's peak."""
    raw = ckpt.raw
    stored = sum(p.stat().st_size for p in ckpt.path.glob("*.safetensors"))
    width = 2 if str(dtype).replace("torch.", "") in ("bfloat16", "float16") else 4
    stored_width = 2 if str(raw.get("torch_dtype") or raw.get("dtype")) in ("bfloat16", "float16") else 4
    return stored * width // stored_width + evalrun.estimate_memory(ckpt, metric, target_length, 1, width)
