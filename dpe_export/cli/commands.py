"""The dpe-export commands. Each parses its options, calls one library function (dpe_export.workflows, or a
stage's own entry point) and prints what it returns; shared options come from options.py."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional

import click

from dpe_export import workflows
from dpe_export.analysis import DEFAULT_PAIRS as DEFAULT_ANALYZE_PAIRS
from dpe_export.analysis import DEFAULT_SAMPLES as DEFAULT_ANALYZE_SAMPLES
from dpe_export.architectures import WRAPPERS, supported_families
from dpe_export.calibration import procedures, scales
from dpe_export.cli import options as opt
from dpe_export.cli.app import main, quiet_transformers, setup_logging
from dpe_export.errors import UsageError
from dpe_export.evaluation import plots, prompts, registry, results
from dpe_export.export.presets import list_presets, load_preset
from dpe_export.export.settings import ConvertFlags
from dpe_export.sources.loading import ATTN_CHOICES
from dpe_export.sources.methods import parse_method

CONVERT_EPILOG = """\b
Examples:
  # the DPE authors' settings for a model (see: dpe-export presets)
  dpe-export convert ./Meta-Llama-3-8B-Instruct -o ./llama3-dpe --preset meta-llama-3-8b-instruct
  # your own settings: 4 groups of rotary frequencies (boundaries default to an even split)
  dpe-export convert ./my-llama -o ./my-llama-dpe --window 512 --scale-factors 2,4,8,16 --target-length 65536
  # explicit group boundaries over head_dim/2 = 64 frequencies
  dpe-export convert ./my-llama -o ./out --window 1024 --scale-factors 2,8,32 --dimension-groups 0,16,40,64
  # apply DPE only to the 48 highest-scoring frequencies of each (layer, head)
  dpe-export convert ./my-llama -o ./out --preset meta-llama-3-8b-instruct --dim-scores scores.safetensors --topk 48
  # a preset with one value changed; hard-link the weights instead of copying them
  dpe-export convert ./Qwen2.5-7B-Instruct -o ./qwen-dpe --preset qwen2.5-7b-instruct --window 2048 --link
  # calibration grid (and eval*.json beside it) in the model card, then publish to the Hub
  dpe-export convert ./my-llama -o ./out --preset meta-llama-3-8b-instruct --calibration runs/calibration.json \\
      --push --repo-id my-org/my-llama-dpe

MODEL is a Hub repo id (downloaded into the Hugging Face cache), a local checkpoint directory, or a .gguf
file (dequantized to safetensors):
  dpe-export convert --model meta-llama/Llama-3.1-8B-Instruct -o llama31-dpe --preset meta-llama-3.1-8b-instruct
  dpe-export convert --model ./model-Q4_K_M.gguf -o ./model-dpe --window 1024 --scale-factors 2,8,2,8

The weights must be safetensors (model.safetensors or a sharded index); pickled checkpoints are refused,
never loaded. Supported families (and multimodal checkpoints whose text model is one of them):
"""

EVAL_EXAMPLES = """\b
Examples:
  # pass-key retrieval of a base model at and beyond its training length, 10 prompts per depth
  dpe-export eval ./my-llama --task passkey --lengths 4096,8192,16384 --json base.json --plot base.png
  # the same prompts with baselines applied on the fly (nothing is written)
  dpe-export eval ./my-llama --task passkey --lengths 4096,8192,16384 --method yarn:4
  dpe-export eval ./my-llama --task passkey --lengths 4096,8192,16384 --method self-extend:1024,8
  # a DPE export (its own settings; no --method)
  dpe-export eval ./my-llama-dpe --task niah --lengths 16k,32k --needles 4 --batch-size 4 --device cuda
  # perplexity of held-out text at several lengths
  dpe-export eval ./my-llama-dpe --task ppl --lengths 2048,8192 --samples 4
  # RULER through lm-evaluation-harness (pip install 'dpe-export[eval]'): its offline subtasks, or some
  dpe-export eval ./my-llama-dpe --task ruler --lengths 4k,8k,16k --samples 10 --json ruler.json
  dpe-export eval ./my-llama --task ruler:niah_single_1,vt --lengths 4k,8k --method self-extend:1024,8
  # any lm-eval task; max_length = its longest request, the same for base and export
  dpe-export eval ./my-llama-dpe --harness lm-eval --tasks my_task --include-path ./tasks --limit 20
"""

EVAL_METHODS = """\b
Methods (--method, base models only):
  none               the model as it is (default)
  linear:F           position interpolation: positions divided by F
  dynamic:F          dynamic NTK scaling with factor F (theta for prompt + answer length)
  yarn:F             YaRN with factor F (original length = the model's max_position_embeddings)
  self-extend:W,G    SelfExtend: plain RoPE within W tokens, positions grouped by G beyond
  dpe:W,S1,...,SG    DPE, window W, one integer scale per group (an even split of head_dim/2)
"""


CALIBRATE_EPILOG = """\b
Examples:
  # calibrate a model trained at 8K for 128K: 8 groups x scales 1..128, paired needle likelihoods at 128K
  dpe-export calibrate ./Meta-Llama-3-8B-Instruct --target-length 131072 --window 1024 -d runs/llama3
  # the DPE authors' procedure: every cell, exact-match 4-needle NIAH over 8 contexts
  dpe-export calibrate ./my-llama --target-length 32768 --window 1024 --procedure grid -d runs/llama-grid
  # with the top-48 key frequencies per head (2-norm attention contribution), as the final model will use
  dpe-export calibrate ./my-llama --target-length 32768 --window 1024 --topk 48 -d runs/llama
  # split the work over 4 processes or machines (e.g. a Slurm array), then join the shards
  dpe-export calibrate ./my-llama --target-length 32768 --window 1024 -d runs/llama --shard $I/4
  dpe-export calibrate --merge -d runs/llama
  # then export with the chosen factors (the card shows the grid)
  dpe-export convert ./my-llama -o ./my-llama-dpe --calibration runs/llama/calibration.json

A killed run resumes where it stopped: every finished result is already on disk (cells*.jsonl).
"""


CONVERT_EPILOG += "  " + supported_families() + "; multimodal: " + ", ".join(WRAPPERS) + "\n"


# ----------------------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------------------


def _convert_options(f):
    """convert's own options (the shared ones are declared in options.py)."""
    for option in reversed([
        click.option("--dtype", type=click.Choice(opt.DTYPE_CHOICES), default="auto", show_default=True,
                     help="With a .gguf source: the float type the dequantized weights are written in. auto: "
                          "bfloat16 for quantized weights, else the GGUF's own float type. Other sources keep "
                          "their weights as they are."),
        click.option("-o", "--output", required=True, type=click.Path(path_type=Path), metavar="OUT",
                     help="Directory to write the DPE checkpoint to. Must not exist or be empty, unless "
                          "--overwrite is given."),
        click.option("--preset", metavar="NAME",
                     help="Start from the DPE authors' settings for a model (list them with: dpe-export presets). "
                          "Options given explicitly override the preset's values."),
        opt.window("Local window size in tokens: keys closer than W keep plain RoPE positions. Required unless "
                   "the preset or calibration sets it. Example: --window 1024"),
        click.option("--scale-factors", callback=opt.int_list, metavar="S1,...,SG",
                     help="One integer scale factor >= 1 per dimension group: beyond the window, the positions "
                          "seen by a group's rotary frequencies are divided by its factor. Required unless the "
                          "preset or calibration sets them. Example: --scale-factors 2,8,2,8,32,32,32,4"),
        opt.dimension_groups(
            "Group boundaries over the head_dim/2 rotary frequencies: strictly increasing, from 0 to head_dim/2, "
            "one more than the scale factors. Default: the calibration's or preset's, else an even split into one "
            "group per scale factor. Example for head_dim 128: --dimension-groups 0,8,16,24,32,40,48,56,64"),
        click.option("--dim-scores", type=click.Path(path_type=Path), metavar="FILE",
                     help="safetensors file with a tensor 'scores' [layers, attention heads, head_dim/2] rating "
                          "each rotary frequency of each head; with --topk, DPE applies only to the top-K "
                          "frequencies per (layer, head). Default: DPE applies to every frequency."),
        opt.topk("How many frequencies per (layer, head) to select from --dim-scores, 1 <= K <= head_dim/2. "
                 "Requires --dim-scores."),
        opt.target_length("Context length the export is meant for; written as max_position_embeddings. Default: "
                          "the calibration's or preset's, else 4 x the base model's max_position_embeddings."),
        opt.pretrain_length("The base model's pretraining context length, recorded in the dpe config section. "
                            "Default: the base model's max_position_embeddings."),
        click.option("--base-model", metavar="REPO_ID",
                     help="Hugging Face id of the base model, for the model card (README.md). Default: taken from "
                          "a Hugging Face cache path, else the preset's."),
        click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty."),
        click.option("--link", is_flag=True,
                     help="Hard-link the weight files instead of copying them (same file system only; falls back "
                          "to copying with a warning). Saves disk space and time; the export then shares the "
                          "files with MODEL_DIR."),
        click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False, path_type=Path),
                     metavar="FILE",
                     help="calibration.json from `dpe-export calibrate`: its chosen scale factors, groups, window, "
                          "target length and top-K selection are used unless given explicitly (it must come from "
                          "this model), and its grid goes into the model card. eval*.json files beside it are "
                          "shown too."),
        click.option("--calibration-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
                     help="Without --scale-factors, --preset or --calibration, convert calibrates first (give "
                          "--target-length); its results go here. Default: OUT.calibration beside OUT (a re-run "
                          "resumes from it)."),
        click.option(
            "--calibration-samples", type=click.IntRange(min=1), default=None, metavar="N",
            help="When convert calibrates: NIAH contexts per setting (see dpe-export calibrate --samples). Default: "
                 "the calibration procedure's."),
        opt.device_map("--calibration-device-map", "calibration_device_map",
                       help="When convert calibrates a model larger than one GPU: spread its layers with "
                            "accelerate (as calibrate --device-map)."),
        click.option("--eval-json", "eval_json", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
                     metavar="FILE",
                     help="Results of dpe-export eval --json (base model and DPE) for the model card's evaluation "
                          "table; repeat for several runs."),
        click.option("--push", is_flag=True,
                     help="After exporting, publish OUT to the Hub repo --repo-id (as dpe-export push)."),
        opt.push_target(after_convert=True),
    ]):
        f = option(f)
    return opt.model_source(f)


def _push_request(push: bool, repo_id, private, revision, commit_message, dry_run) -> Optional[workflows.PushRequest]:
    given = [name for name, on in (("--private", private), ("--revision", revision is not None),
             ("--commit-message", commit_message is not None), ("--dry-run", dry_run)) if on]
    if given and not push:
        raise UsageError(f"{given[0]} needs --push")
    if push and not repo_id:
        raise UsageError("--push needs --repo-id ORG/NAME")
    return workflows.PushRequest(repo_id, private, revision, commit_message, dry_run) if push else None


@main.command("convert", epilog=CONVERT_EPILOG)
@_convert_options
def convert_command(model_dir, model_source, output, window, scale_factors, dimension_groups, dim_scores, topk,
                    target_length, pretrain_length, push, repo_id, private, revision, commit_message, dry_run,
                    **rest) -> None:
    """Convert the checkpoint MODEL into a DPE checkpoint at OUT.

    MODEL is a local Hugging Face checkpoint directory, a Hub repo id or a .gguf file. OUT gets config.json (with
    a `dpe` section, auto_map and the target length as max_position_embeddings), the unchanged weights, the
    tokenizer files, modeling_dpe.py and the dpe_*.py runtime files, the selected-frequency file when --topk is given, and a
    README.md model card. Nothing is written unless every check passes, and a failed or interrupted export
    leaves nothing behind.
    """
    flags = ConvertFlags(window=window, scale_factors=scale_factors, dimension_groups=dimension_groups,
                         target_length=target_length, pretrain_length=pretrain_length, topk=topk,
                         dim_scores=dim_scores)
    request = workflows.ConvertRequest(
        model=opt.model_spec(model_dir, model_source), output=Path(output), flags=flags, repo_id=repo_id,
        push=_push_request(push, repo_id, private, revision, commit_message, dry_run), **rest)
    setup_logging()
    quiet_transformers()
    workflows.convert_model(request, echo=click.echo)


# ----------------------------------------------------------------------------------------------------------
# push, upgrade, presets
# ----------------------------------------------------------------------------------------------------------


@main.command("push")
@click.argument("out", metavar="OUT", type=click.Path(path_type=Path))
@opt.push_target(after_convert=False)
@click.option("--include", "include", multiple=True, metavar="FILE",
              help="Publish this file of OUT too (a path inside OUT; repeat for several). By default only the "
                   "files dpe-export writes are published, and an export holding anything else is refused.")
def push_command(out: Path, repo_id: str, private: bool, revision, commit_message, dry_run: bool,
                 include: tuple) -> None:
    """Publish the DPE export in OUT to the Hugging Face Hub repo ORG/NAME.

    huggingface_hub does the upload: the token comes from HF_TOKEN or the stored login (hf auth login), the
    repo is created if it does not exist, and the new and changed files go up in one commit; files the repo
    already has are not uploaded again, so re-running a push that failed finishes it. OUT is only read.

    \b
    Examples:
      dpe-export push ./llama3-dpe --repo-id my-org/Llama-3-8B-Instruct-DPE --dry-run
      dpe-export push ./llama3-dpe --repo-id my-org/Llama-3-8B-Instruct-DPE --private
    """
    setup_logging()
    workflows.push_export(out, workflows.PushRequest(repo_id, private, revision, commit_message, dry_run,
                                                     tuple(include)),
                          click.echo)


@main.command("upgrade")
@click.argument("export_dir", metavar="EXPORT_DIR", type=click.Path(path_type=Path))
def upgrade_command(export_dir: Path) -> None:
    """Bring a DPE export written by an earlier dpe-export up to date, in place.

    Rewrites the generated files (modeling_dpe.py, the dpe_*.py runtime files, and in config.json the auto_map,
    architectures and the dpe-export version) with this version's runtime, and removes dpe_core.py (the runtime
    in one file, as releases before 0.3.0 wrote it) when dpe-export wrote it. Weights, tokenizer, selection file and model card
    are left untouched and checked unchanged by hash; a following `dpe-export push` uploads only the changed
    files. Exports written before 0.2.0 are silently wrong on transformers 5.24 until upgraded.

    \b
    Examples:
      dpe-export upgrade ./my-llama-dpe
      dpe-export upgrade ./my-llama-dpe && dpe-export push ./my-llama-dpe --repo-id my-org/my-llama-dpe
    """
    setup_logging()
    workflows.upgrade(workflows.UpgradeRequest(export_dir=export_dir), echo=click.echo)


@main.command("presets")
@click.argument("name", required=False)
def presets_command(name: Optional[str]) -> None:
    """List the shipped presets, or show the settings of preset NAME.

    \b
    Examples:
      dpe-export presets
      dpe-export presets meta-llama-3-8b-instruct
    """
    for p in [load_preset(name)] if name else list_presets():
        click.echo(f"{p.name}  ({p.base_model})")
        click.echo(f"    {p.description}")
        if name:
            click.echo(f"    local window:     {p.local_window_size}")
            click.echo(f"    scale factors:    {', '.join(map(str, p.scale_factors))}")
            click.echo(f"    dimension groups: {', '.join(map(str, p.dimension_groups_range))}")
            click.echo(f"    target length:    {p.target_length}")


# ----------------------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------------------


def _tasks_help() -> str:
    """`eval --help`'s list of the registered tasks: name, pretty name, paper, what it measures."""
    lines = ["\b", "Tasks (--task):"]
    for t in registry.registered_tasks():
        text = f"{t.name:<8} {t.pretty_name}" + (f" ({t.paper})" if t.paper else "") + f": {t.help}."
        if t.description:
            text += " " + t.description
        lines += textwrap.wrap(text, 106, initial_indent="  ", subsequent_indent=" " * 11)
    return "\n".join(lines) + "\n"


def _tasks_with(flag: str) -> list[str]:
    return [t.name for t in registry.registered_tasks() if getattr(t, flag)]


def _eval_options(f):
    for option in reversed([
        opt.task,
        opt.lengths(help="Prompt lengths (exact; RULER: its prompts' maximum). Required but with --harness."),
        opt.samples(prompts.DEFAULT_SAMPLES, "; ".join(f"{t.name}: {t.samples_help}"
                                                       for t in registry.registered_tasks()) + "."),
        click.option("--depths", callback=opt.depth_list, metavar="D1,D2,...",
                     help="Needle depths, 0 = right after the instructions, 1 = right before the question "
                          f"[default: {','.join(f'{d:g}' for d in prompts.DEFAULT_DEPTHS)}]. "
                          f"{', '.join(_tasks_with('uses_needles'))}: each context puts its needles at different "
                          "depths of this grid, in turn, so every depth gets --samples needles. Used by "
                          f"{results.and_list(_tasks_with('uses_depths'))} only."),
        opt.needles(f"{results.and_list(_tasks_with('uses_needles'))} only: needles per context (each queried once)  "
                    f"[default: {prompts.DEFAULT_NEEDLES}]"),
        click.option("--method", default="none", show_default=True, metavar="SPEC",
                     help="Baseline applied to a base model when it is loaded, without writing anything: none, "
                          "linear:F, dynamic:F, yarn:F, self-extend:W,G or dpe:W,S1,...,SG (see below)."),
        opt.haystack("Text file to use instead of the generated haystack (the filler of retrieval prompts, the "
                     f"text of perplexity; {results.and_list(_tasks_with('uses_haystack'))}); repeated if too "
                     "short."),
        click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.json",
                     help="Write the results: one record per (length, depth) with accuracy and sample count."),
        click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.png",
                     help="Save a depth x length accuracy heatmap (perplexity: a curve by length). Needs matplotlib."),
        opt.seed(0, "Fixes prompts, needles and text; the same command gives the same numbers."),
        opt.batch_size("Prompts run together (all prompts of a length have the same length: no padding)."),
        opt.device("auto: cuda when available."),
        opt.dtype("auto: float32 on CPU, bfloat16 on CUDA."),
        click.option("--attn", type=click.Choice(ATTN_CHOICES), default="sdpa", show_default=True,
                     help="Attention implementation."),
        opt.device_map(),
        click.option("--trust-remote-code", is_flag=True,
                     help="Run a DPE export's own modeling code even when it is not exactly what this dpe-export "
                          "writes (an export edited by hand, or from another tool). Never needed for base models."),
        opt.no_progress,
        click.option("--harness", type=click.Choice(["lm-eval"]),
                     help="Run lm-evaluation-harness tasks (--tasks) instead of --task, on this model loaded the "
                          "dpe-export way. Needs dpe-export[eval]."),
        click.option("--tasks", "harness_tasks", metavar="NAME1,NAME2", help="With --harness: lm-eval task names."),
        click.option("--limit", type=click.IntRange(min=1), metavar="N", help="With --harness: samples per task."),
        click.option("--max-length", type=click.IntRange(min=2), metavar="N",
                     help="With --harness: lm-eval's max_length. Default: the tasks' longest request, so no "
                          "prompt is cut (give the same value to every model you compare)."),
        click.option("--include-path", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
                     help="With --harness: a directory of local lm-eval task YAML files."),
        click.option("--num-fewshot", type=click.IntRange(min=0), metavar="N", help="With --harness: few-shot examples."),
        click.option("--data-file", "data_files", multiple=True, metavar="KEY=PATH", callback=opt.key_paths,
                     help="; ".join(f"--task {t.name}: local data for what it would download ({t.data_files_help})"
                                    for t in registry.registered_tasks() if t.takes_data_files) + "."),
    ]):
        f = option(f)
    return opt.model_source(f)


def _check_eval_options(task_def, harness, harness_options, depths, needles, data_files, plot_out, rest) -> None:
    """Usage errors of `eval`: options that belong to another task, or to --harness."""
    flags = {"tasks": "--tasks", "limit": "--limit", "max_length": "--max-length", "include_path": "--include-path",
             "num_fewshot": "--num-fewshot"}
    if harness is None:
        given = [flags[k] for k, v in harness_options.items() if v is not None]
        if given:
            raise click.UsageError(f"{given[0]} needs --harness lm-eval")
        if rest["lengths"] is None:
            raise click.UsageError("give --lengths")
    elif not harness_options["tasks"]:
        raise click.UsageError("--harness lm-eval needs --tasks NAME1,NAME2")
    if depths is not None and not task_def.uses_depths:
        raise click.UsageError(f"--depths applies to {', '.join(_tasks_with('uses_depths'))}, not to {task_def.name}")
    if needles is not None and not task_def.uses_needles:
        raise click.UsageError(f"--needles applies to --task {' / '.join(_tasks_with('uses_needles'))} only")
    if data_files and not task_def.takes_data_files:
        raise click.UsageError(f"--data-file applies to --task {' / '.join(_tasks_with('takes_data_files'))} only")
    if plot_out is not None and (harness is not None or not task_def.plots):
        raise click.UsageError(plots.plot_refusal())
    if rest.get("haystack") is not None and (harness is not None or not task_def.uses_haystack):
        raise click.UsageError(f"--haystack applies to {results.and_list(_tasks_with('uses_haystack'))}")


@main.command("eval", epilog=EVAL_EXAMPLES + "\n" + _tasks_help() + "\n" + EVAL_METHODS)
@_eval_options
def eval_command(model_dir, model_source, model_revision, gguf_file, task, depths, needles, method, json_out,
                 plot_out, dtype, no_progress, harness, harness_tasks, limit, max_length, include_path, num_fewshot,
                 data_files, **rest) -> None:
    """Evaluate MODEL on a task (--task, listed below) at the given lengths (or on any lm-evaluation-harness task
    with --harness lm-eval).

    MODEL is a base checkpoint directory or a DPE export. An export's code (modeling_dpe.py, dpe_*.py) runs
    only when it is byte for byte what this dpe-export writes (`dpe-export upgrade` makes an older export so),
    or with --trust-remote-code; a base model's own code never runs. Prompts are
    exactly the requested number of tokens. Prints a table (per length and depth: accuracy and sample count,
    plus an `all` row per length; per length: perplexity; per subtask and length: accuracy, and the average);
    --json and --plot save the results. Generation is greedy.
    """
    harness_options = {"tasks": harness_tasks.split(",") if harness_tasks else None, "limit": limit,
                       "max_length": max_length, "include_path": include_path, "num_fewshot": num_fewshot}
    _check_eval_options(registry.get_task(task), harness, harness_options, depths, needles, data_files, plot_out,
                        rest)
    request = workflows.EvalRequest(
        model=opt.model_spec(model_dir, model_source), task=task, depths=None if depths is None else tuple(depths),
        needles=needles, method=parse_method(method), json_out=json_out, plot_out=plot_out, dtype=dtype,
        progress=not no_progress, harness=harness, data_files=dict(data_files or {}),
        harness_options=workflows.HarnessOptions(**{**harness_options, "tasks": tuple(harness_options["tasks"] or ())
                                                    or None}),
        model_revision=model_revision, gguf_file=gguf_file,
        **{**rest, "lengths": None if rest["lengths"] is None else tuple(rest["lengths"])})
    setup_logging()
    quiet_transformers()
    workflows.evaluate_model(request, echo=click.echo)


# ----------------------------------------------------------------------------------------------------------
# calibrate
# ----------------------------------------------------------------------------------------------------------


def _calibrate_options(f):
    for option in reversed([
        click.option("-d", "--output-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
                     metavar="DIR", help="Where the plan, the per-cell results (cells*.jsonl), dim_scores.safetensors "
                                         "and calibration.json go. Re-running with the same settings resumes."),
        opt.target_length("The context length to calibrate for (NIAH prompts are this long)."),
        opt.window("Local window size in tokens. Default: the pretraining length / 8."),
        click.option("--groups", "num_groups", type=click.IntRange(min=1), metavar="G",
                     help="Split the head_dim/2 rotary frequencies evenly into G groups. Default: 8 (or fewer when "
                          "there are fewer frequencies)."),
        opt.dimension_groups("Explicit group boundaries, from 0 to head_dim/2 (instead of --groups)."),
        opt.topk("Scale only the top-K frequencies per (layer, head) by 2-norm attention contribution (computed "
                 "first, saved as dim_scores.safetensors). Default: all frequencies."),
        opt.pretrain_length("The base model's pretraining length. Default: its max_position_embeddings."),
        opt.dim_statistic,
        click.option("--procedure", type=click.Choice(list(procedures.PROCEDURES)),
                     default=procedures.DEFAULT_PROCEDURE, show_default=True,
                     help="How the scales are searched. " + " ".join(
                         f"{p.name}: {p.summary}{f' ({p.reference})' if p.reference else ''}."
                         for p in procedures.PROCEDURES.values())),
        opt.samples(None, "NIAH contexts per setting (each asked about every needle). Default: " + ", ".join(
            f"{p.samples} ({p.name})" for p in procedures.PROCEDURES.values()) + "."),
        opt.needles("Needles per NIAH context. Default: " + ", ".join(
            f"{p.needles} ({p.name})" for p in procedures.PROCEDURES.values()) + "."),
        click.option("--context-lengths", callback=opt.int_list, metavar="L1,L2,...",
                     help="paired: the length of each context in tokens, one per --samples, so the race also "
                          "sees the shorter lengths the export serves. Default: half the target length, then the "
                          "target length."),
        opt.metric,
        opt.seed(scales.DEFAULT_SEED, "Seed of the calibration prompts (eval defaults to seed 0, so its samples are "
                                      "held out)."),
        click.option("--shard", metavar="I/N", help="Run only part of the work, I of N (0 <= I < N): every N-th "
                                                    "cell of a grid, every N-th group of a paired run."),
        click.option("--merge", is_flag=True, help="Join the shards' results in --output-dir into calibration.json."),
        click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                     help="Run the work on a Ray cluster: one model copy per actor (GPUs per actor from the model's "
                          "size), each taking units from a queue; this process only records results. ADDRESS: a "
                          "cluster's address (ray://HOST:10001, or auto); alone, the cluster RAY_ADDRESS names (as "
                          "under `ray job submit`) or a new one on this machine. Needs pip install "
                          "'dpe-export[ray]'; every node must read MODEL at the same path."),
        click.option("--ray-actors", type=click.IntRange(min=1), metavar="N",
                     help="With --ray: how many model copies. Default: as many as the cluster fits."),
        opt.haystack("Filler text for the prompts instead of the generated haystack."),
        opt.batch_size(),
        opt.device(),
        opt.dtype(),
        opt.device_map(),
    ]):
        f = option(f)
    return opt.model_source(f)


@main.command("calibrate", epilog=CALIBRATE_EPILOG)
@_calibrate_options
def calibrate_command(model_dir, model_source, model_revision, gguf_file, output_dir, target_length, shard, merge,
                      dtype, topk, **rest):
    """Find each frequency group's scale factor on the model itself.

    Stage 1 (with --topk): score every (layer, head, frequency) by its 2-norm attention contribution on
    haystack text at lengths doubling from max(W, L/4) to L. Stage 2: at the target length T, each group in
    turn tries the scales 1, 2, 4, ..., T/W while the others use the scale nearest 2T/L (the reference), scored
    by needle retrieval; each group gets its best scale (ties: the one nearest the reference, then the smaller).
    The default procedure (paired) prefills each context once for all its needles, scores the log-likelihood
    of each needle's value on the same contexts for every scale, and halves the scales after each context;
    --procedure grid runs the DPE authors' full grid of exact-match NIAH. Writes calibration.json, which
    `dpe-export convert --calibration` uses.
    """
    request = workflows.CalibrateRequest(
        model=None if merge else opt.model_spec(model_dir, model_source, required=False), output_dir=Path(output_dir),
        target_length=target_length, merge=merge, shard=shard, top_k=topk, dtype=dtype, model_revision=model_revision,
        gguf_file=gguf_file, **{**rest, "dimension_groups": None if rest["dimension_groups"] is None
                                else tuple(rest["dimension_groups"]),
                                "context_lengths": None if rest["context_lengths"] is None
                                else tuple(rest["context_lengths"])})
    setup_logging()
    if not merge:
        quiet_transformers()
    click.echo(workflows.calibrate(request, echo=click.echo))


# ----------------------------------------------------------------------------------------------------------
# analyze
# ----------------------------------------------------------------------------------------------------------

ANALYZE_EPILOG = """\b
Examples:
  # the positional heads of a base model at and beyond its training length, with plots
  dpe-export analyze ./my-llama --lengths 1x,2x --json base-heads.json --plot-dir base-heads
  # the export, drawn against the base model's run
  dpe-export analyze ./my-llama-dpe --lengths 1x,2x,4x --json dpe-heads.json --plot-dir dpe-heads \\
      --compare base-heads.json
"""


@main.command("analyze", epilog=ANALYZE_EPILOG)
@opt.model_source
@opt.lengths(default="1x", help="Prompt lengths.")
@opt.samples(DEFAULT_ANALYZE_SAMPLES, "Haystack prompts per length; their sampled pairs are pooled.")
@click.option("--pairs", type=click.IntRange(min=2), default=DEFAULT_ANALYZE_PAIRS, show_default=True, metavar="P",
              help="(query, key) pairs sampled per prompt and layer: queries uniform, distances log-uniform.")
@opt.seed(0, "Fixes the text and the sampled pairs.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.json",
              help="Write one record per (length, layer, head): rho, pairs, and D per distance bin.")
@click.option("--plot-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Draw the rho heatmap (layer x head) and D against distance of the top heads. Needs matplotlib.")
@click.option("--compare", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="RUN.json",
              help="An earlier --json (e.g. of the base model) drawn dashed beside this run's curves.")
@click.option("--top", type=click.IntRange(min=1), default=4, show_default=True, metavar="K",
              help="Heads drawn in the D-against-distance plot (highest rho at the first length).")
@click.option("--ablate", metavar="top:K|random:K",
              help="Then zero heads and measure retrieval at --ablate-length: the top-K heads by rho (top:K; "
                   "with random:K the same K) against K random heads per draw, and no head zeroed.")
@click.option("--card", is_flag=True,
              help="MODEL is a DPE export: add (or replace) a Positional heads section in its model card.")
@click.option("--draws", type=click.IntRange(min=1), default=5, show_default=True, metavar="N",
              help="With --ablate: random draws of K heads.")
@click.option("--ablate-task", type=click.Choice(opt.retrieval_tasks()), default=opt.retrieval_tasks()[0],
              show_default=True, help="With --ablate: the task measured.")
@click.option("--ablate-samples", type=click.IntRange(min=1), default=2, show_default=True, metavar="N",
              help="With --ablate: prompts per depth (5 depths) for each measurement.")
@click.option("--ablate-length", default="1x", show_default=True, callback=opt.length_list, metavar="N",
              help="With --ablate: the prompt length, in tokens (8192, 8k) or a multiple of the pretraining length "
                   "(1x).")
@opt.device()
@opt.dtype()
@click.option("--trust-remote-code", is_flag=True,
              help="Run a DPE export's own modeling code even when it is not exactly what this dpe-export writes.")
@opt.no_progress
def analyze_command(model_dir, model_source, model_revision, gguf_file, no_progress, **rest):
    """Find the positional heads of MODEL (arXiv 2410.08703): heads whose dominant rotary dimension tracks distance.

    For sampled (query, key) pairs of real forward passes over haystack text, the dominant dimension is
    D = sum_f softmax_f(c_f) f over the per-frequency contributions c_f to the attention logit, and a head's
    positional score rho is the Spearman correlation of D with the distance. For a DPE export, pairs beyond the
    window take the angle the export applies. Prints how many heads have rho > 0.5 and the top heads.
    """
    setup_logging()
    quiet_transformers()
    request = workflows.AnalyzeRequest(model=opt.model_spec(model_dir, model_source), model_revision=model_revision,
                                       gguf_file=gguf_file, progress=not no_progress, **rest)
    workflows.analyze_model(request, echo=click.echo)
