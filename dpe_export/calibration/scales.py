"""Calibration: each frequency group's effective scale, found on the model itself (the DPE authors' procedure).

Two stages, both automated:

1. Key dimensions (only with ``top_k``): the 2-norm attention contribution of every (layer, head, frequency)
   on haystack text at lengths doubling from max(W, L/4) to L (dpe_export.dim_scores); the top K frequencies
   per head are the ones DPE scales, in calibration as in the final model.
2. Effective distance per group (multi-needle detection): at the target length T, with 4-needle NIAH, each
   group g in turn tries s_g in {1, 2, 4, ..., T/W} while every other group uses the reference scale, the
   candidate nearest to 2T/L (it maps T to about half the pretraining length). Each (group, scale) cell is
   scored by the fraction of needles retrieved.

Choice per group: the best score; ties go to the scale nearest the reference (in log2 distance), then to
the smaller scale.

Every finished cell is appended (and flushed) as one JSON line to ``cells.jsonl`` (``cells.shard-I-of-N.jsonl``
with ``--shard I/N``), tagged with the hash of the plan it belongs to: a killed run resumes where it stopped and
recomputes nothing, shards split the grid across processes or machines, and ``merge`` joins them into
``calibration.json``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dpe_export import __version__
from dpe_export.calibration import dim_scores, engine, selection
from dpe_export.calibration.engine import plan_lines
from dpe_export.calibration.prefix_reuse import PrefixReuse
from dpe_export.calibration.dim_scores import STATISTICS
from dpe_export.calibration.result import (
    CALIBRATION_SCHEMA_VERSION,
    DIM_SCORES_FILE,
    config_hash,
    write_json_atomic,
)
from dpe_export.errors import DPEExportError
from dpe_export.evaluation import generation, prompts, registry
from dpe_export.evaluation import run as evalrun
from dpe_export.evaluation.ppl import ppl_token_stream
from dpe_export.evaluation.tasks import PromptBuilder
from dpe_export.modeling_templates import dpe_params
from dpe_export import dpe_ops

METRICS = registry.calibration_metrics()


DEFAULT_SAMPLES = 8  # NIAH contexts per cell (x needles queries)


DEFAULT_NEEDLES = 4


DEFAULT_SEED = 1234  # calibration seeds; `dpe-export eval` defaults to seed 0, so its samples are held out


Scorer = Callable[[Any], dict]  # DPEParams -> {"score": float, "samples": int}


def scale_candidates(target_length: int, window: int) -> list[int]:
    """1, 2, 4, ... up to T/W."""
    if target_length <= window:
        raise DPEExportError(f"the target length ({target_length}) must exceed the local window ({window})")
    top = target_length // window
    return [2**i for i in range(int(math.log2(top)) + 1)]


def reference_distance(plan: "CalibrationPlan", scale: int) -> tuple:
    """The tie-break key of every procedure: nearer the reference scale (log2 distance) first, then smaller."""
    return abs(math.log2(scale) - math.log2(plan.reference_scale)), scale


def dim_scores_metadata(plan: "CalibrationPlan") -> dict:
    """What dim_scores.safetensors records about how stage 1 ran."""
    return {"lengths": dim_scores.scoring_lengths(plan.window, plan.pretrain_length), "samples": plan.samples,
            "statistic": plan.dim_statistic}


def reference_scale(target_length: int, pretrain_length: int, candidates: Sequence[int]) -> int:
    """The candidate nearest 2T/L in log2 distance (the smaller on a tie)."""
    want = math.log2(max(2 * target_length / pretrain_length, 1))
    return min(candidates, key=lambda s: (abs(math.log2(s) - want), s))


@dataclass
class CalibrationPlan:
    """Everything that determines a calibration's results; its hash tags every cell."""

    model: str
    config_sha256: str
    pretrain_length: int
    target_length: int
    window: int
    dimension_groups_range: list[int]
    scales: list[int]
    reference_scale: int
    top_k: Optional[int] = None
    samples: int = DEFAULT_SAMPLES
    needles: int = DEFAULT_NEEDLES
    seed: int = DEFAULT_SEED
    metric: str = "niah"  # or "passkey", for models whose multi-needle retrieval is weak even at L
    dim_statistic: str = "norms"  # the 2-norm score of stage 1 (dpe_export.dim_scores.STATISTICS)
    procedure: str = "grid"  # how stage 2 spends its prefills (dpe_export.calibration.procedures); plans written
    # before procedures existed are grids
    context_lengths: Optional[list] = None  # paired: each context's length in tokens (None: all at the target)
    tie_z: float = 2.0  # paired: finalists within this many standard errors of the best tie with it (0: best mean)
    # paired: the groups whose every frequency turns within the pretraining length (2 pi / theta < L); they take the
    # largest candidate scale whatever the race says (its likelihoods do not rank them consistently across context
    # lengths and seeds). None: the race decides every group (plans made before 0.3.1). Read by the choice only, so
    # it is not part of the key: the race's cells are the same with and without it.
    short_wavelength_groups: Optional[list] = None

    @property
    def num_groups(self) -> int:
        return len(self.dimension_groups_range) - 1

    def key(self) -> str:
        fields = asdict(self)
        fields.pop("model")  # the same model may be calibrated from another path
        fields.pop("short_wavelength_groups")  # the choice's rule, not the race's: the cells do not depend on it
        for name, old_default in (("dim_statistic", "norms"), ("procedure", "grid"), ("context_lengths", None),
                                  ("tie_z", 2.0)):
            if fields[name] == old_default:  # the keys of calibrations made before the field existed stay valid
                fields.pop(name)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def context_length(self, context: int) -> int:
        """How long context ``context``'s prompts are (paired): the target length unless context_lengths says."""
        return self.context_lengths[context] if self.context_lengths else self.target_length

    def cells(self) -> list[tuple[int, int]]:
        """(group, scale) in a fixed order, group-major."""
        return [(g, s) for g in range(self.num_groups) for s in self.scales]

    def factors_for(self, group: int, scale: int) -> list[int]:
        factors = [self.reference_scale] * self.num_groups
        factors[group] = scale
        return factors

    def params_for(self, group: int, scale: int):
        return self.params_for_factors(self.factors_for(group, scale))

    def params_for_factors(self, factors: Sequence[int]):
        return dpe_params.DPEParams(
            local_window_size=self.window, scale_factors=list(factors),
            dimension_groups_range=list(self.dimension_groups_range), target_length=self.target_length,
            pretrain_length=self.pretrain_length,
        )


def make_plan(model_dir, *, target_length: int, window: int, num_freqs: int, pretrain_length: int,
              dimension_groups: Optional[Sequence[int]] = None, num_groups: Optional[int] = None,
              top_k: Optional[int] = None, samples: int = DEFAULT_SAMPLES, needles: int = DEFAULT_NEEDLES,
              seed: int = DEFAULT_SEED, metric: str = "niah", dim_statistic: str = "norms",
              procedure: str = "grid", context_lengths: Optional[Sequence[int]] = None,
              tie_z: float = 2.0, short_wavelength_groups: Optional[Sequence[int]] = None) -> CalibrationPlan:

    if window < 1:
        raise DPEExportError(f"the local window must be >= 1, got {window}")
    candidates = scale_candidates(target_length, window)
    if dimension_groups is None:
        groups = num_groups or min(8, num_freqs)
        dimension_groups = dpe_ops.even_group_boundaries(num_freqs, groups)
    bounds = list(dimension_groups)
    try:
        dpe_params.DPEParams(window, [1] * (len(bounds) - 1), bounds, target_length, pretrain_length).validate(2 * num_freqs)
    except ValueError as e:
        raise DPEExportError(str(e)) from None
    if top_k is not None and not 1 <= top_k <= num_freqs:
        raise DPEExportError(f"top-K must be between 1 and head_dim/2 = {num_freqs}, got {top_k}")
    if samples < 1:
        raise DPEExportError("the number of samples must be >= 1")
    if metric not in METRICS:
        raise DPEExportError(f"unknown calibration metric {metric!r}; use {' or '.join(METRICS)}")

    if context_lengths is not None:
        context_lengths = [int(n) for n in context_lengths]
        if len(context_lengths) != samples or not all(window < n <= target_length for n in context_lengths):
            raise DPEExportError(f"give one context length per context ({samples}), each above the window ({window}) "
                                 f"and at most the target length ({target_length}); got {context_lengths}")
    if dim_statistic not in STATISTICS:
        raise DPEExportError(f"unknown dimension-score statistic {dim_statistic!r}; use {' or '.join(STATISTICS)}")
    return CalibrationPlan(
        model=str(model_dir), config_sha256=config_hash(model_dir), pretrain_length=pretrain_length,
        target_length=target_length, window=window, dimension_groups_range=bounds, scales=candidates,
        reference_scale=reference_scale(target_length, pretrain_length, candidates), top_k=top_k,
        samples=samples, needles=needles, seed=seed, metric=metric, dim_statistic=dim_statistic,
        procedure=procedure, context_lengths=context_lengths, tie_z=float(tie_z),
        short_wavelength_groups=None if short_wavelength_groups is None else [int(g) for g in short_wavelength_groups],
    )


def short_wavelength_groups(config, dimension_groups: Sequence[int], pretrain_length: int) -> Optional[list[int]]:
    """The groups whose slowest frequency turns within the pretraining length (2 pi / theta_f < L for every f of
    the group), from the frequencies the export's runtime gives the full-attention layers (the ones DPE applies
    to). None when the family's rotary embedding cannot be built from the config."""
    inv_freq = dpe_ops.family_inv_freq(config, "full_attention", pretrain_length)
    if inv_freq is None:
        return None
    wavelengths = (2 * math.pi / inv_freq.double()).tolist()
    bounds = list(dimension_groups)
    return [g for g in range(len(bounds) - 1)
            if bounds[g + 1] <= len(wavelengths) and max(wavelengths[bounds[g]:bounds[g + 1]]) < pretrain_length]


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    """'I/N' (0 <= I < N) -> (I, N)."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise DPEExportError(f"--shard takes I/N, e.g. 0/4; got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise DPEExportError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def _valid_cell(cell: dict, path: Path, lineno: int) -> dict:
    """A cell as read back: integer group/scale/samples and a finite score in [0, 1]; one-line error otherwise."""
    try:
        group, scale, samples, score = int(cell["group"]), int(cell["scale"]), int(cell["samples"]), float(cell["score"])
    except (KeyError, TypeError, ValueError) as e:
        raise DPEExportError(f"{path} line {lineno} is not a calibration cell ({type(e).__name__}: {e}); delete that "
                             "line to compute the cell again") from None
    if not math.isfinite(score) or not 0.0 <= score <= 1.0 or samples < 1:
        raise DPEExportError(f"{path} line {lineno} has score {cell['score']!r} from {samples} samples; scores are "
                             "fractions in [0, 1]: delete that line to compute the cell again")
    return dict(cell, group=group, scale=scale, samples=samples, score=score)


def read_cells(out_dir: Path, plan: CalibrationPlan) -> dict[tuple[int, int], dict]:
    """Finished cells of this plan from every results file in out_dir (a cut-off last line is ignored)."""
    done: dict[tuple[int, int], dict] = {}
    seen: dict[tuple[int, int], str] = {}
    for path, lineno, cell in plan_lines(out_dir, plan):
        cell = _valid_cell(cell, path, lineno)
        where = (cell["group"], cell["scale"])
        if where in done:
            raise DPEExportError(
                f"{path} line {lineno} repeats the cell of group {where[0]} and scale {where[1]} (first at "
                f"{seen[where]}); keep one of the two lines")
        done[where], seen[where] = cell, f"{path.name} line {lineno}"
    return done


def _grid_shard_cells(plan: CalibrationPlan, shard: Optional[tuple[int, int]]) -> list[tuple[int, int]]:
    return [c for i, c in enumerate(plan.cells()) if shard is None or i % shard[1] == shard[0]]


GRID_UNITS = engine.UnitKind(
    read=lambda out_dir, plan: read_cells(out_dir, plan),
    pending=lambda plan, done, shard: [c for c in _grid_shard_cells(plan, shard) if c not in done],
    record=lambda plan, unit, result, seconds: {
        "plan": plan.key(), "group": unit[0], "scale": unit[1], "factors": plan.factors_for(*unit),
        "score": float(result["score"]), "samples": int(result["samples"]), "seconds": round(seconds, 3)},
    key=lambda rec: (rec["group"], rec["scale"]),
    planned=lambda plan, shard: len(_grid_shard_cells(plan, shard)),
    counted=lambda plan, done, shard: len(set(_grid_shard_cells(plan, shard)).intersection(done)),
    describe=lambda unit: f"group {unit[0]} scale {unit[1]}",
    unit="cell",
)


def evaluate_cell(calibrator, plan: CalibrationPlan, unit: tuple) -> dict:
    """One cell on a loaded model: its exact-match retrieval score."""
    return calibrator.score(plan.params_for(*unit))


def run_grid(plan: CalibrationPlan, scorer: Scorer, out_dir: Path, shard: Optional[tuple[int, int]] = None,
             progress: bool = True) -> dict[tuple[int, int], dict]:
    """Score the cells of this shard that are not done yet (in this process), appending each as it finishes."""
    return engine.execute(plan, GRID_UNITS, engine.local_executor(lambda unit: scorer(plan.params_for(*unit))),
                          out_dir, shard, progress, desc="calibration grid")


@dataclass
class Calibrator:
    """A loaded base model, its tokenizer and the plan; scores DPE settings on it in place."""

    model: Any
    tokenizer: Any
    plan: CalibrationPlan
    haystack: Optional[Path] = None
    batch_size: int = 1
    selected: Any = None
    _builder: Any = field(default=None, repr=False)
    _reuse: Any = field(default=None, repr=False)  # prefix_reuse.PrefixReuse, made on first use
    _context: Any = field(default=None, repr=False)  # (context, its prompts): the last one built

    def compute_selection(self, out_dir: Path, progress: bool = True):
        """Stage 1: dim scores (reused from out_dir when present) and the top-K mask."""
        from safetensors.torch import load_file


        path = out_dir / DIM_SCORES_FILE
        if path.is_file():
            scores = load_file(str(path))[selection.SCORES_TENSOR]
        else:
            scores = self.dim_scores(progress)
            dim_scores.save_dim_scores(scores, path, dim_scores_metadata(self.plan))
        self.selected = selection.top_k_mask(scores, self.plan.top_k)
        return self.selected

    def dim_scores(self, progress: bool = True):
        """Stage 1's scores tensor [layers, heads, frequencies] on haystack text."""
        import torch
        from tqdm.auto import tqdm

        lengths = dim_scores.scoring_lengths(self.plan.window, self.plan.pretrain_length)
        stream = self._token_stream(sum(lengths) * self.plan.samples + 16)
        batches, pos = [], 0
        for n in lengths:
            for _ in range(self.plan.samples):
                batches.append(torch.tensor([stream[pos:pos + n]]))
                pos += n
        with tqdm(total=len(batches), desc="key dimensions", unit="sample", disable=not progress) as bar:
            return dim_scores.compute_dim_scores(self.model, batches, progress=bar, statistic=self.plan.dim_statistic)

    def _token_stream(self, num_tokens: int) -> list[int]:

        return ppl_token_stream(self.tokenizer, num_tokens, seed=self.plan.seed, haystack=self.haystack)

    def score(self, params) -> dict:
        """NIAH (or pass-key) accuracy at the target length with these DPE parameters applied in place.

        Both use samples x needles queries per cell, spread over the default depth grid."""

        dpe_ops.apply_dpe(self.model, params, self.selected)
        task = registry.get_task(self.plan.metric)
        generate_fn = generation.make_generate_fn(self.model, self.tokenizer, task.max_new_tokens)
        depths = list(prompts.DEFAULT_DEPTHS)
        per_depth = -(-self.plan.samples * self.plan.needles // len(depths))
        records = evalrun.evaluate_task(task, self._prompt_builder(), generate_fn, [self.plan.target_length], depths,
                                        samples=per_depth, needles=self.plan.needles, seed=self.plan.seed,
                                        batch_size=self.batch_size)
        correct = sum(r["accuracy"] * r["samples"] for r in records)
        total = sum(r["samples"] for r in records)
        return {"score": correct / total, "samples": total}

    def _prompt_builder(self) -> PromptBuilder:
        if self._builder is None:
            self._builder = PromptBuilder(self.tokenizer, haystack_path=self.haystack,
                                          haystack_seed=prompts.task_haystack_seed(self.plan.seed))
        return self._builder

    def context_prompts(self, context: int) -> list:
        """Context ``context`` of a paired calibration: ``needles`` needles, one in each 1/needles of its depth,
        and one prompt per needle (the same tokens up to the question). The last context's prompts are kept: the
        race scores every setting of a context in a row."""
        if self._context is None or self._context[0] != context:
            n = self.plan.needles
            depths = [(k + 0.5) / n for k in range(n)]
            self._context = (context, self._prompt_builder().niah_queries(
                self.plan.context_length(context), num_needles=n, depths=depths,
                seed=prompts.sample_seed(self.plan.seed, "calibration", n, context), num_digits=prompts.NIAH_DIGITS))
        return self._context[1]

    def score_context(self, params, context: int) -> dict:
        """Teacher-forced log-likelihood of every needle's value in one context with these DPE parameters applied
        in place: one prefill, then each question from a copy of its cache."""
        dpe_ops.apply_dpe(self.model, params, self.selected)
        queries = self.context_prompts(context)
        if self._reuse is None:
            self._reuse = PrefixReuse(self.model)
        # 1024-token chunks (generation.PREFILL_CHUNK): on Gemma-3-270M here 2048 was 16-23% slower for this
        # (benchmarks/results/calibration-cost.jsonl)
        scores = generation.answer_likelihoods(self.model, [q.input_ids for q in queries],
                                               [q.answer_ids for q in queries],
                                               around_prefill=lambda: self._reuse.prefill(context))
        return {"score": sum(s for s, _ in scores) / len(scores), "needles": len(scores),
                "found": sum(found for _, found in scores), "needle_scores": [s for s, _ in scores]}


PLAN_FILE = "plan.json"


def save_plan(out_dir: Path, plan: CalibrationPlan) -> CalibrationPlan:
    """plan.json in out_dir; every shard must agree with the one already there. Returns the plan to run: this one,
    with the stored plan's choice rule when resuming (a plan.json written before short-wavelength groups existed
    keeps its choice)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PLAN_FILE
    if path.is_file():
        old = load_plan(out_dir)
        if old.key() != plan.key():
            raise DPEExportError(
                f"{out_dir} holds a calibration with other settings (see {path}); use another --output-dir")
        return replace(plan, short_wavelength_groups=old.short_wavelength_groups)
    write_json_atomic(path, asdict(plan))
    return plan


def load_plan(out_dir: Path) -> CalibrationPlan:
    path = Path(out_dir) / PLAN_FILE
    try:
        return CalibrationPlan(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise DPEExportError(f"no calibration in {out_dir} ({PLAN_FILE} is missing)") from None
    except (ValueError, TypeError) as e:
        raise DPEExportError(f"cannot read {path}: {e}") from None


TIE_RULE = "highest score; ties go to the scale nearest the reference scale (log2 distance), then the smaller"


def choose_scales(plan: CalibrationPlan, cells: dict[tuple[int, int], dict]) -> list[int]:
    """Per group the best scale (TIE_RULE)."""
    return [min(plan.scales, key=lambda s: (-cells[(g, s)]["score"], *reference_distance(plan, s)))
            for g in range(plan.num_groups)]


def build_calibration(plan: CalibrationPlan, cells: dict[tuple[int, int], dict],
                      timings: Optional[dict] = None) -> dict:
    """calibration.json of a grid: the plan, the whole grid with sample counts, the chosen factors, timings."""
    missing = [c for c in plan.cells() if c not in cells]
    if missing:
        raise DPEExportError(
            f"{len(missing)} of {len(plan.cells())} calibration cells are not done yet "
            f"(e.g. group {missing[0][0]} scale {missing[0][1]}); run the remaining shards first")
    return calibration_record(
        plan, grid=[[cells[(g, s)]["score"] for s in plan.scales] for g in range(plan.num_groups)],
        chosen=choose_scales(plan, cells), cells=[cells[c] for c in plan.cells()],
        # what ran (queries spread evenly over the depths can round the asked samples x needles up)
        samples_per_cell=max(int(cells[c]["samples"]) for c in plan.cells()),
        metric=registry.get_task(plan.metric).metric_label(plan.needles),
        timings=timings or {"grid_seconds": round(sum(c["seconds"] for c in cells.values()), 1)})


def calibration_record(plan: CalibrationPlan, *, grid: list, chosen: list[int], cells: list, samples_per_cell: int,
                       metric: str, timings: dict, extra: Optional[dict] = None, tie_rule: str = TIE_RULE) -> dict:
    """calibration.json: the plan, the scores per (group, scale), the chosen factors, every result, timings and
    versions. Its ``groups``/``scales``/``grid``/``chosen`` keys are what the model card draws."""
    b = plan.dimension_groups_range
    return {
        "schema_version": CALIBRATION_SCHEMA_VERSION,
        "tool": f"dpe-export {__version__}",
        "base_model": {"path": plan.model, "config_sha256": plan.config_sha256},
        "pretrain_length": plan.pretrain_length,
        "target_length": plan.target_length,
        "length": plan.target_length,
        "window": plan.window,
        "dimension_groups_range": b,
        "groups": [[b[g], b[g + 1]] for g in range(plan.num_groups)],
        "scales": plan.scales,
        "reference_scale": plan.reference_scale,
        "top_k": plan.top_k,
        "dim_scores": DIM_SCORES_FILE if plan.top_k else None,
        "dim_statistic": plan.dim_statistic if plan.top_k else None,
        "procedure": plan.procedure,
        "metric": metric,
        "higher_is_better": True,
        "samples_per_cell": samples_per_cell,
        "seed": plan.seed,
        "tie_rule": tie_rule,
        "grid": grid,
        "cells": cells,
        "chosen": chosen,
        "timings": timings,
        "plan_key": plan.key(),
        **(extra or {}),
    }

