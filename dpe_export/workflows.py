"""What each command does, end to end: the one library function a CLI command calls.

A workflow resolves the model source, runs the stages in order and cleans up what it made; it reports through
an `echo` callable (the CLI passes click.echo) and returns what the command prints. Nothing here parses
arguments or formats tables.
"""
from __future__ import annotations

import json
import logging
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dpe_export import __version__, analysis, hub, sources
from dpe_export.calibration import procedures, scales
from dpe_export.calibration.result import (
    Calibration,
    read_calibration,
)
from dpe_export.calibration.selection import (
    describe_selection,
    load_dim_scores,
    top_k_mask,
)
from dpe_export.errors import DPEExportError, UsageError
from dpe_export.evaluation import plots, prompts, registry, results
from dpe_export.evaluation.plots import require_matplotlib
from dpe_export.evaluation.prompts import resolve_lengths
from dpe_export.evaluation.results import EvalResult
from dpe_export.evaluation.run import available_memory, run_eval, run_harness
from dpe_export.export import card
from dpe_export.export import convert as export_convert
from dpe_export.export.files import check_output_target, human_size, output_summary
from dpe_export.export.presets import Preset, load_preset
from dpe_export.output_files import write_output
from dpe_export.export.settings import ConvertFlags, ConvertSettings, resolve_settings
from dpe_export.export.upgrade import UpgradeResult, upgrade_export
from dpe_export.progress import progress_bar
from dpe_export.sources.checkpoint import Checkpoint, ModelInfo, inspect_model
from dpe_export.sources.loading import load_model
from dpe_export.sources.methods import MethodSpec, parse_method

logger = logging.getLogger("dpe_export")
Echo = Callable[..., None]


def _silent(*args, **kwargs) -> None:
    return None


def open_model(spec: Optional[str], *, revision=None, gguf_file=None, dtype=None, workdir=None,
               echo: Echo = _silent) -> sources.ModelSource:
    """--model SOURCE as a local checkpoint (the caller cleans it up), saying on stderr what was done to it."""
    if spec is None:
        raise UsageError(f"give --model SOURCE ({sources.describe_sources()})")
    source = sources.resolve_model(spec, revision=revision, gguf_file=gguf_file, dtype=dtype, workdir=workdir)
    if source.text_of:
        echo(f"Took the text model of the {source.text_of} checkpoint {spec} (the vision tower is left out)",
             err=True)
    if source.kind == "gguf":
        echo(f"Read {spec} ({source.gguf['architecture']}, {source.gguf['quantization']}): dequantized to "
             f"{source.gguf['dtype']} safetensors", err=True)
    return source


# ----------------------------------------------------------------------------------------------------------
# calibrate
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrateRequest:
    """Everything `dpe-export calibrate` was asked, as typed values."""

    model: Optional[str]  # None only with merge
    output_dir: Path
    target_length: Optional[int] = None
    merge: bool = False  # join the shards' results in output_dir instead
    shard: Optional[str] = None  # I/N
    window: Optional[int] = None  # default: the pretraining length / 8
    context_lengths: Optional[tuple] = None  # paired: each context's length (default: all at target_length)
    num_groups: Optional[int] = None
    dimension_groups: Optional[tuple] = None
    top_k: Optional[int] = None
    pretrain_length: Optional[int] = None
    dim_statistic: str = "norms"
    procedure: str = procedures.DEFAULT_PROCEDURE
    samples: Optional[int] = None  # the procedure's default
    needles: Optional[int] = None  # the procedure's default
    metric: Optional[str] = None  # default: the procedure's first metric
    seed: int = scales.DEFAULT_SEED
    ray_address: Optional[str] = None
    ray_actors: Optional[int] = None
    haystack: Optional[Path] = None
    batch_size: int = 1
    device: Optional[str] = None
    dtype: Optional[str] = None
    device_map: Optional[str] = None
    model_revision: Optional[str] = None
    gguf_file: Optional[str] = None


_CALIBRATE_SETTINGS = ("target_length", "num_groups", "dimension_groups", "top_k", "dim_statistic", "procedure",
                       "samples", "needles", "metric", "seed", "ray_address", "ray_actors", "haystack", "batch_size",
                       "device", "dtype", "device_map", "context_lengths")


def calibrate(req: CalibrateRequest, echo: Echo = _silent) -> str:
    """dpe-export calibrate: calibrate the model (or one shard of the work), or join the shards; returns what the
    command prints."""
    if req.merge:
        return calibration_summary(procedures.merge(req.output_dir), req.output_dir)
    if req.model is None or req.target_length is None:
        raise UsageError("give --model SOURCE and --target-length (or --merge to join shards)")
    with open_model(req.model, revision=req.model_revision, gguf_file=req.gguf_file, dtype=req.dtype,
                    workdir=Path(req.output_dir) / "source", echo=echo) as source:
        settings = {k: getattr(req, k) for k in _CALIBRATE_SETTINGS}
        if settings["context_lengths"] is not None:
            settings["context_lengths"] = list(settings["context_lengths"])
        if settings["dimension_groups"] is not None:
            settings["dimension_groups"] = list(settings["dimension_groups"])
        result = calibrate_model(source.checkpoint, req.output_dir, window=req.window,
                                 pretrain_length=req.pretrain_length, shard=scales.parse_shard(req.shard), **settings)
    if result is None:
        return f"Shard {req.shard} done; join the shards with: dpe-export calibrate --merge -d {req.output_dir}"
    return calibration_summary(result, req.output_dir)


def calibrate_model(model, output_dir: Path, *, window: Optional[int], pretrain_length=None,
                    **kw) -> Optional[dict]:
    """Calibrate a local checkpoint (a directory or its Checkpoint): the window defaults to the pretraining
    length / 8. Returns the calibration record, or None when this was one shard of several."""
    ckpt = Checkpoint.of(model)
    if window is None:
        length = pretrain_length or ckpt.require_pretraining_length()
        window = max(1, length // 8)
    return procedures.calibrate(ckpt, output_dir, window=window, pretrain_length=pretrain_length, **kw)


def calibration_summary(result: dict, output_dir: Path) -> str:
    """What calibrate prints: the grid of scores per (group, scale) and the chosen factors."""
    proc = procedures.get_procedure(result.get("procedure", "grid"))
    per_cell = ("queries per cell" if proc.name == "grid"
                else "needles per setting in the last round; the scores are means over the contexts each setting had")
    lines = [f"\nCalibration at {result['target_length']} tokens, window {result['window']}, procedure {proc.name} "
             f"({proc.title}): {result['metric']} ({result['samples_per_cell']} {per_cell}):",
             "  group   freqs  " + " ".join(f"{'s=' + str(s):>6}" for s in result["scales"]) + "  chosen"]
    for g, (rng, row, pick) in enumerate(zip(result["groups"], result["grid"], result["chosen"])):
        cells = " ".join("     -" if v is None else f"{v:6.2f}" for v in row)
        lines.append(f"  {g:>5}  {rng[0]:>3}-{rng[1] - 1:<3} {cells}  {pick:>6}")
    path = Path(output_dir) / "calibration.json"
    lines.append(f"Chosen scale factors: {','.join(map(str, result['chosen']))}")
    lines.append(f"Wrote {path}; export with: dpe-export convert MODEL -o OUT --calibration {path}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushRequest:
    repo_id: str
    private: bool = False
    revision: Optional[str] = None
    commit_message: Optional[str] = None
    dry_run: bool = False
    include: tuple = ()  # files beside the export's own to publish too


@dataclass(frozen=True)
class ConvertRequest:
    """Everything `dpe-export convert` was asked, as typed values."""

    model: str
    output: Path
    flags: ConvertFlags = field(default_factory=ConvertFlags)
    preset: Optional[str] = None
    calibration_file: Optional[Path] = None
    calibration_dir: Optional[Path] = None
    calibration_samples: Optional[int] = None  # the procedure's default
    calibration_device_map: Optional[str] = None
    eval_json: tuple = ()
    base_model: Optional[str] = None
    repo_id: Optional[str] = None
    overwrite: bool = False
    link: bool = False
    model_revision: Optional[str] = None
    gguf_file: Optional[str] = None
    dtype: Optional[str] = None
    push: Optional[PushRequest] = None


@dataclass
class ConvertOutcome:
    output: Path
    info: ModelInfo
    params: Any  # dpe_params.DPEParams
    selected: Any  # bool tensor or None
    calibration: Optional[dict] = None  # when convert calibrated first
    calibration_dir: Optional[Path] = None
    resumed_push: bool = False  # the output already held this export


def check_convert_request(req: ConvertRequest) -> None:
    """Everything that can be refused before any model file is read."""
    if req.push is not None:
        hub.check_repo_id(req.push.repo_id)
        hub.check_revision(req.push.revision)
    elif req.repo_id is not None:
        hub.check_repo_id(req.repo_id)
    if req.base_model is not None and card.hub_id_or_none(req.base_model) is None:
        raise UsageError(f"--base-model must be a Hub repo id ORG/NAME, got {req.base_model!r}")
    if req.calibration_device_map and (req.calibration_file is not None or req.flags.scale_factors is not None
                                       or req.preset is not None):
        raise UsageError("--calibration-device-map applies only when convert calibrates (no --scale-factors, "
                             "--preset or --calibration)")
    if req.flags.dim_scores is not None and req.flags.topk is None:
        raise UsageError("--dim-scores needs --topk K")


def _calibration_for(req: ConvertRequest, ckpt: Checkpoint, preset: Optional[Preset],
                     echo: Echo) -> tuple[Optional[Calibration], Optional[Path], Optional[dict]]:
    """The calibration convert uses: the --calibration file, or one it runs now (no factors from anywhere)."""
    if req.calibration_file is not None:
        return read_calibration(req.calibration_file, ckpt.path), req.calibration_file.parent, None
    if req.flags.scale_factors is not None or preset is not None:
        return None, None, None
    if req.flags.target_length is None:
        raise UsageError("give --scale-factors, a --preset or a --calibration file, or --target-length to "
                             "calibrate the model first")
    check_output_target(req.output, ckpt.path, req.overwrite)  # before minutes of calibration
    where = req.calibration_dir or req.output.parent / f"{req.output.name}.calibration"
    f = req.flags
    record = calibrate_model(ckpt, where, target_length=f.target_length, window=f.window, num_groups=None,
                             dimension_groups=f.dimension_groups, top_k=f.topk if f.dim_scores is None else None,
                             pretrain_length=f.pretrain_length, samples=req.calibration_samples, shard=None,
                             device_map=req.calibration_device_map)
    return Calibration.from_json(record), where, record


def _selection(settings: ConvertSettings, req: ConvertRequest, info: ModelInfo, calibration, calibration_dir):
    if settings.selection == "dim_scores":
        scores = load_dim_scores(req.flags.dim_scores, info.num_layers, info.num_heads, 2 * info.num_freqs)
        return top_k_mask(scores, settings.topk)
    if settings.selection == "calibration":
        return calibration.selection(calibration_dir)
    return None


def convert_model(req: ConvertRequest, echo: Echo = _silent) -> ConvertOutcome:
    """dpe-export convert: resolve the source, calibrate when asked, resolve the settings, export, push."""
    check_convert_request(req)
    inputs = card.CardInputs.from_files(req.calibration_file, req.eval_json)
    if req.push is not None:
        hub.check_push_ready(req.push.repo_id, dry_run=req.push.dry_run)
    with open_model(req.model, revision=req.model_revision, gguf_file=req.gguf_file, dtype=req.dtype,
                    workdir=req.output, echo=echo) as source:
        if source.kind == "gguf":
            inputs.gguf = source.gguf
        preset = load_preset(req.preset) if req.preset else None
        calibration, calibration_dir, ran = _calibration_for(req, source.checkpoint, preset, echo)
        if ran is not None:
            echo(calibration_summary(ran, calibration_dir))
            inputs.calibration = ran
        settings = resolve_settings(req.flags, preset, calibration)
        info = inspect_model(source.checkpoint)
        params = export_convert.build_params(
            info, local_window_size=settings.window, scale_factors=settings.scale_factors,
            dimension_groups_range=settings.dimension_groups, target_length=settings.target_length,
            pretrain_length=settings.pretrain_length)
        selected = _selection(settings, req, info, calibration, calibration_dir)
        base_model = _base_model(req, source, info, preset)
        out, resumed = _write(req, info, params, selected, base_model, inputs)
    outcome = ConvertOutcome(out, info, params, selected, ran, calibration_dir, resumed)
    echo(export_summary(outcome))
    if req.push is not None:
        push_export(out, req.push, echo, after_convert=True)
    return outcome


def _base_model(req: ConvertRequest, source, info: ModelInfo, preset: Optional[Preset]) -> Optional[str]:
    if preset is not None and preset.model_type and preset.model_type != info.architecture.model_type:
        logger.warning("preset %s was tuned for %s (%s), but %s is a %s model", preset.name, preset.base_model,
                       preset.model_type, req.model, info.architecture.model_type)
    base = req.base_model or source.hub_id or info.checkpoint.hub_id
    if base is None and preset is not None and preset.model_type == info.architecture.model_type:
        base = preset.base_model
    return base


def _write(req: ConvertRequest, info: ModelInfo, params, selected, base_model, inputs) -> tuple[Path, bool]:
    """Write the export, or with --push find the one an interrupted upload left (then it is pushed as it is)."""
    output = Path(req.output)
    if req.push is not None and not req.overwrite:
        difference = export_convert.export_difference(output, info, params, selected)
        if difference is None:
            return output, True
        if Path(output, "config.json").is_file() and difference != "it is not a DPE export":
            raise DPEExportError(f"{output} holds an export that is not what this convert writes ({difference}); "
                                 "pass --overwrite to export it again, then push")
    repo_id = req.push.repo_id if req.push is not None else req.repo_id
    out = export_convert.convert(info, output, params, selected, overwrite=req.overwrite, link=req.link,
                                 base_model=base_model, repo_id=repo_id, **inputs.to_json())
    return out, False


def export_summary(outcome: ConvertOutcome) -> str:
    """What convert prints: the settings, the files with sizes, and how to load the export."""

    p, out = outcome.params, outcome.output
    lines = []
    if outcome.resumed_push:
        lines.append(f"{out} already holds this export (an earlier run's upload did not finish); pushing it")
    lines.append(f"Exported a DPE {outcome.info.architecture.display_name} checkpoint to {out} "
                 f"(window {p.local_window_size}, scale factors {','.join(map(str, p.scale_factors))}, "
                 f"groups {','.join(map(str, p.dimension_groups_range))}, {describe_selection(outcome.selected)}, "
                 f"target length {p.target_length})")
    files = output_summary(out)
    width = max(len(name) for name, _ in files)
    lines += [f"  {name:<{width}}  {human_size(size):>10}" for name, size in files]
    lines.append(f"  {'total':<{width}}  {human_size(sum(size for _, size in files)):>10}")
    lines.append(f"Load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return "\n".join(lines)


def push_export(out: Path, req: PushRequest, echo: Echo, after_convert: bool = False):
    """dpe-export push (and convert --push): upload OUT; after a convert, a failure says how to finish."""
    hint = None
    if after_convert:  # running convert again would stop at the existing output: say how to finish instead
        hint = "the export is complete; finish the upload with: "
        hint += f"dpe-export push {shlex.quote(str(out))} --repo-id {req.repo_id}"
        hint += f" --revision {shlex.quote(req.revision)}" if req.revision else ""
        hint += " --private" if req.private else ""
    return hub.push(out, req.repo_id, private=req.private, revision=req.revision,
                    commit_message=req.commit_message, dry_run=req.dry_run, echo=echo, retry_hint=hint,
                    include=req.include)


def pretraining_length(ckpt: Checkpoint) -> int:
    """The length 'Nx' multiplies (Checkpoint.pretraining_length); DPEExportError when config.json states none."""
    value = ckpt.pretraining_length
    if value is None:
        raise DPEExportError(f"{ckpt.path}'s config.json states no max_position_embeddings to multiply (use token "
                             "counts in --lengths)")
    return value


# ----------------------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HarnessOptions:
    """`eval --harness lm-eval`'s own options."""

    tasks: Optional[tuple] = None  # lm-eval task names
    limit: Optional[int] = None
    max_length: Optional[int] = None  # default: the tasks' longest request
    include_path: Optional[Path] = None
    num_fewshot: Optional[int] = None


@dataclass(frozen=True)
class EvalRequest:
    """Everything `dpe-export eval` was asked, as typed values."""

    model: str
    task: str = field(default_factory=registry.default_task)  # a registered task (ruler:sub,...); not with harness
    lengths: Optional[tuple] = None  # token counts or "Nx" multiples of the pretraining length
    samples: int = prompts.DEFAULT_SAMPLES
    depths: Optional[tuple] = None  # default: the task's
    needles: Optional[int] = None  # default: prompts.DEFAULT_NEEDLES
    method: MethodSpec = MethodSpec("none")
    haystack: Optional[Path] = None
    seed: int = 0
    batch_size: int = 1
    device: Optional[str] = None
    dtype: Optional[str] = None
    attn: str = "sdpa"
    device_map: Optional[str] = None
    trust_remote_code: bool = False
    progress: bool = True
    data_files: dict = field(default_factory=dict)  # RULER subtask data: key -> path
    harness: Optional[str] = None  # "lm-eval": run harness_options.tasks instead of task
    harness_options: HarnessOptions = HarnessOptions()
    json_out: Optional[Path] = None
    plot_out: Optional[Path] = None
    model_revision: Optional[str] = None
    gguf_file: Optional[str] = None


def evaluate_model(req: EvalRequest, echo: Echo = _silent) -> EvalResult:
    """dpe-export eval: resolve the model, evaluate it, print the table, write the JSON and the plot."""
    if req.plot_out is not None:
        require_matplotlib()
    with open_model(req.model, revision=req.model_revision, gguf_file=req.gguf_file, dtype=req.dtype,
                    workdir=Path(tempfile.gettempdir()) / "dpe-export-source", echo=echo) as source:
        result = evaluate(source.checkpoint, req)
    echo(results.format_table(result))
    if req.json_out is not None:
        echo(f"Wrote {results.write_json(result, req.json_out)}")
    if req.plot_out is not None:
        echo(f"Wrote {plots.plot_result(result, req.plot_out)}")
    return result


def evaluate(model, req: EvalRequest) -> EvalResult:
    """Evaluate a local checkpoint (a directory or its Checkpoint): lm-eval tasks (req.harness) or a registered
    task at req.lengths ('Nx' items resolved against the pretraining length)."""
    ckpt = Checkpoint.of(model)
    shared = dict(method=req.method, dtype=req.dtype, progress=req.progress, seed=req.seed,
                  batch_size=req.batch_size, device=req.device, attn=req.attn, device_map=req.device_map,
                  trust_remote_code=req.trust_remote_code)
    if req.harness is not None:
        h = req.harness_options
        return run_harness(ckpt, list(h.tasks) if h.tasks else None, limit=h.limit, max_length=h.max_length,
                           include_path=h.include_path, num_fewshot=h.num_fewshot, **shared)
    lengths = list(req.lengths)
    lengths = resolve_lengths(lengths, pretraining_length(ckpt) if any(isinstance(x, str) for x in lengths) else 1)
    return run_eval(ckpt, req.task, lengths, samples=req.samples,
                    depths=list(req.depths) if req.depths is not None else None,
                    needles=prompts.DEFAULT_NEEDLES if req.needles is None else req.needles,
                    haystack=req.haystack, data_files=req.data_files, **shared)


# ----------------------------------------------------------------------------------------------------------
# analyze
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalyzeRequest:
    model: str
    lengths: tuple = ("1x",)  # token counts or "Nx" multiples of the pretraining length
    samples: int = analysis.DEFAULT_SAMPLES
    pairs: int = analysis.DEFAULT_PAIRS
    seed: int = 0
    json_out: Optional[Path] = None
    plot_dir: Optional[Path] = None
    compare: Optional[Path] = None  # an earlier --json (e.g. of the base model) drawn beside this run
    top: int = 4
    device: Optional[str] = None
    dtype: Optional[str] = None
    trust_remote_code: bool = False
    progress: bool = True
    model_revision: Optional[str] = None
    gguf_file: Optional[str] = None
    ablate: Optional[str] = None  # top:K or random:K
    draws: int = 5
    ablate_task: str = field(default_factory=lambda: registry.retrieval_task_names()[0])
    ablate_samples: int = 2  # prompts per depth (5 depths)
    ablate_length: Sequence = ("1x",)  # one item of parse_length_items: tokens or a multiple of the pretraining length
    card: bool = False  # add the result to the export's model card


def analyze_model(req: AnalyzeRequest, echo: Echo = _silent) -> analysis.HeadAnalysis:
    """dpe-export analyze: positional scores of every head of a base model or an export, with JSON and plots."""
    compare = None
    if req.compare is not None:
        try:
            compare = analysis.HeadAnalysis.from_json(json.loads(Path(req.compare).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise DPEExportError(f"cannot read --compare {req.compare}: {e}") from None
    if req.plot_dir is not None:
        require_matplotlib()
    with open_model(req.model, revision=req.model_revision, gguf_file=req.gguf_file, dtype=req.dtype,
                    workdir=Path(tempfile.gettempdir()) / "dpe-export-source", echo=echo) as source:
        ckpt = source.checkpoint  # config.json checked before any weight is read
        pretrain = pretraining_length(ckpt)
        lengths = resolve_lengths(req.lengths, pretrain)
        ablate_length = resolve_lengths(req.ablate_length, pretrain)
        if len(ablate_length) != 1:
            raise UsageError("--ablate-length takes one length")
        analysis.check_fits(ckpt, lengths + ablate_length if req.ablate else lengths, available_memory(req.device, None))
        heads = ckpt.text_config["num_hidden_layers"] * ckpt.text_config["num_attention_heads"]
        if req.top > heads:
            raise UsageError(f"--top {req.top} is more than the model's {heads} attention heads")
        if req.ablate is not None:
            analysis.parse_ablation(req.ablate, heads)
        if req.card and (not ckpt.is_export or source.kind != "dir"):
            raise UsageError("--card adds the analysis to the model card of a DPE export in a local directory")
        loaded = load_model(ckpt, parse_method("none"), device=req.device, dtype=req.dtype,
                            trust_remote_code=req.trust_remote_code)
        card_dir = source.path
        with progress_bar(len(lengths) * req.samples, "analyze", req.progress, unit="prompt") as bar:
            result = analysis.analyze(loaded.model, loaded.tokenizer, lengths, samples=req.samples, pairs=req.pairs,
                                      seed=req.seed, progress=bar)
        ablation = None
        if req.ablate is not None:
            with progress_bar(2 + req.draws, "ablation", req.progress, unit="run") as bar:
                ablation = analysis.ablate(loaded.model, loaded.tokenizer, result, req.ablate, length=ablate_length[0],
                                           draws=req.draws, task=req.ablate_task, samples=req.ablate_samples,
                                           seed=req.seed, progress=bar)
    echo(analysis.summary_table(result))
    if ablation is not None:
        echo(analysis.ablation_table(ablation))
    if req.json_out is not None:
        data = {"model": req.model, **result.to_json(), **({"ablation": ablation} if ablation else {})}
        echo(f"Wrote {write_output(req.json_out, json.dumps(data, indent=1) + chr(10))}")
    if req.card:
        echo(f"Wrote {analysis.write_card_section(card_dir, analysis.card_section(result, ablation))}")
    if req.plot_dir is not None:
        for path in analysis.plot_analysis(result, req.plot_dir, req.top, compare, "this model", "compare"):
            echo(f"Wrote {path}")
    return result


# ----------------------------------------------------------------------------------------------------------
# upgrade
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpgradeRequest:
    """What `dpe-export upgrade` was asked."""

    export_dir: Path


def upgrade(req: UpgradeRequest, echo: Echo = _silent) -> UpgradeResult:
    """dpe-export upgrade: rewrite an export's generated files in place and say what changed."""
    result = upgrade_export(req.export_dir)
    if not result.changed:
        echo(f"{req.export_dir} is up to date (dpe-export {__version__}); nothing changed")
        return result
    removed = f", removed {', '.join(result.removed)}" if result.removed else ""
    echo(f"Upgraded {req.export_dir} (written by dpe-export {result.written_by or '0.1.0 or earlier'}) to dpe-export "
         f"{__version__}: rewrote {', '.join(result.changed)}{removed}; {len(result.untouched)} other files unchanged "
         "(checked by hash)")
    return result
