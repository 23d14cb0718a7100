"""The dpe-export command line. Commands are thin: the work lives in export, presets, selection, evaluate."""
from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import click

from dpe_export import __version__
from dpe_export.errors import DPEExportError
from dpe_export.methods import DEVICE_MAPS

DEBUG_ENV = "DPE_EXPORT_DEBUG"  # set to 1 to see tracebacks of unexpected errors

MAIN_EPILOG = """\b
Examples:
  dpe-export convert ./Meta-Llama-3-8B-Instruct -o ./llama3-dpe --preset meta-llama-3-8b-instruct
  dpe-export convert ./my-llama -o ./my-llama-dpe --window 1024 --scale-factors 2,8,2,8,32,32,32,4
  dpe-export presets
  dpe-export push ./my-llama-dpe --repo-id my-org/my-llama-dpe
  dpe-export upgrade ./my-llama-dpe   # an export written by an earlier dpe-export
  dpe-export eval ./my-llama-dpe --task passkey --lengths 4096,8192 --json scores.json

The exported directory loads with
AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True) (transformers>=5,<6).
DPE is Dimension-wise Positional Embeddings Manipulation, arXiv 2504.18857.
"""

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

Supported families: llama, mistral (full attention only), qwen2. The weights must be safetensors
(model.safetensors or a sharded index); pickled checkpoints are refused, never loaded.
"""


# ----------------------------------------------------------------------------------------------------------
# One-line errors
# ----------------------------------------------------------------------------------------------------------


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _print_error(message: str) -> None:
    click.echo(f"Error: {_one_line(message)}", err=True)


class _CLIGroup(click.Group):
    """A click group that reports every failure as one `Error: ...` line on stderr, never a traceback.

    Exit status: 0 on success, 1 for errors, 2 for usage errors (as click), 130 when interrupted.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        previous = _terminate_as_interrupt()
        try:
            rv = super().main(
                args=args,
                prog_name=prog_name or "dpe-export",
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
            code = rv if isinstance(rv, int) else 0
        except click.exceptions.Abort:  # click turns KeyboardInterrupt/EOF into Abort
            _print_error("interrupted")
            code = 130
        except KeyboardInterrupt:
            _print_error("interrupted")
            code = 130
        except click.ClickException as e:
            message = e.format_message()
            ctx = getattr(e, "ctx", None)
            if isinstance(e, click.UsageError) and ctx is not None:
                message += f" (see '{ctx.command_path} --help')"
            _print_error(message)
            code = e.exit_code
        except DPEExportError as e:
            _print_error(str(e))
            code = 1
        except OSError as e:
            _print_error(str(e) or type(e).__name__)
            code = 1
        except Exception as e:
            if os.environ.get(DEBUG_ENV):
                raise
            _print_error(f"unexpected {type(e).__name__}: {e} (set {DEBUG_ENV}=1 to see the traceback)")
            code = 1
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if standalone_mode:
            sys.exit(code)
        return code


def _terminate_as_interrupt():
    """SIGTERM (kill, a job scheduler's timeout) unwinds like Ctrl-C, so a convert removes what it had started
    writing. Returns the previous handler (None where it cannot be set: not the main thread)."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


class _WarningsToStderr(logging.Handler):
    """Shows dpe_export warnings as `Warning: ...` lines (through click, so tests can capture them)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(f"Warning: {_one_line(record.getMessage())}", err=True)
        except Exception:  # pragma: no cover
            self.handleError(record)


def _setup_logging() -> None:
    logger = logging.getLogger("dpe_export")
    if not any(isinstance(h, _WarningsToStderr) for h in logger.handlers):
        logger.addHandler(_WarningsToStderr(logging.WARNING))
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


def _quiet_transformers() -> None:
    """Base-model config warnings from transformers are noise here; its errors become our one-line errors.

    Read by transformers when it is first imported (a TRANSFORMERS_VERBOSITY the user set wins); set
    directly when it is already imported, as in tests. Importing it here would slow down quick failures.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


# ----------------------------------------------------------------------------------------------------------
# Option parsing
# ----------------------------------------------------------------------------------------------------------


_device_map_option = click.option(
    "--device-map", type=click.Choice(DEVICE_MAPS), metavar="MAP",
    help="For models larger than one GPU: spread the layers over every visible GPU (then CPU RAM) with "
    f"accelerate ({', '.join(DEVICE_MAPS)}). Replaces --device.",
)


def _int_list(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[list[int]]:
    if value is None:
        return None
    items = [x for x in value.replace(",", " ").split()]
    if not items:
        raise click.BadParameter("give comma-separated integers, e.g. 2,8,2,8")
    try:
        return [int(x) for x in items]
    except ValueError:
        raise click.BadParameter(f"give comma-separated integers, e.g. 2,8,2,8; got {value!r}") from None


def _first_given(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------


@click.group(
    cls=_CLIGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    epilog=MAIN_EPILOG,
)
@click.version_option(__version__, "-V", "--version", prog_name="dpe-export")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Convert a RoPE LLM checkpoint into one that runs DPE attention.

    DPE (Dimension-wise Positional Embeddings Manipulation) extends the usable context of a RoPE model
    without training: attention within a local window is unchanged, and beyond it the relative positions
    of each group of rotary frequencies are scaled by that group's factor. The export keeps the weights
    unchanged and adds generated trust_remote_code modeling files.
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


SOURCE_HELP = ("The base model: a Hub repo id ORG/NAME (its safetensors, config and tokenizer are downloaded into "
               "the Hugging Face cache; HF_TOKEN or `hf auth login` for gated and private repos; HF_HUB_OFFLINE=1 "
               "uses the cache only), a local checkpoint directory (or cache snapshot), or a .gguf file "
               "(dequantized to safetensors). Same as the positional MODEL.")


def _model_source_options(f):
    """MODEL (positional) or --model SOURCE, with --model-revision and --gguf-file: declared once, for every
    command that reads a base model."""
    f = click.option("--gguf-file", metavar="NAME",
                     help="With --model DIR: the .gguf file inside DIR to read.")(f)
    f = click.option("--model-revision", metavar="REV",
                     help="With a Hub repo id: the branch, tag or commit to download. Default: main.")(f)
    f = click.option("--model", "model_source", metavar="SOURCE", help=SOURCE_HELP)(f)
    return click.argument("model_dir", metavar="[MODEL]", required=False)(f)


def _open_model(model_dir, model_source, model_revision, gguf_file, dtype=None, workdir=None, required=True):
    """The resolved base model (a local directory), removed again when the command ends when temporary."""
    from dpe_export import sources

    if model_dir is not None and model_source is not None:
        raise click.UsageError("give the model once: as MODEL or as --model SOURCE")
    spec = model_source if model_source is not None else model_dir
    if spec is None:
        if not required:
            return None
        raise click.UsageError(f"give --model SOURCE ({sources.describe_sources()})")
    source = sources.resolve_model(spec, revision=model_revision, gguf_file=gguf_file, dtype=dtype, workdir=workdir)
    click.get_current_context().call_on_close(source.cleanup)
    if source.text_of:
        click.echo(f"Took the text model of the {source.text_of} checkpoint {spec} (the vision tower is left out)",
                   err=True)
    if source.kind == "gguf":
        click.echo(f"Read {spec} ({source.gguf['architecture']}, {source.gguf['quantization']}): dequantized to "
                   f"{source.gguf['dtype']} safetensors", err=True)
    return source


@main.command("convert", epilog=CONVERT_EPILOG)
@_model_source_options
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True,
              help="With a .gguf source: the float type the dequantized weights are written in. auto: bfloat16 "
                   "for quantized weights, else the GGUF's own float type. Other sources keep their weights as "
                   "they are.")
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), metavar="OUT",
    help="Directory to write the DPE checkpoint to. Must not exist or be empty, unless --overwrite is given.",
)
@click.option(
    "--preset", metavar="NAME",
    help="Start from the DPE authors' settings for a model (list them with: dpe-export presets). "
    "Options given explicitly override the preset's values.",
)
@click.option(
    "--window", type=int, metavar="W",
    help="Local window size in tokens: keys closer than W keep plain RoPE positions. Required unless the "
    "preset sets it. Example: --window 1024",
)
@click.option(
    "--scale-factors", callback=_int_list, metavar="S1,...,SG",
    help="One integer scale factor >= 1 per dimension group: beyond the window, the positions seen by a "
    "group's rotary frequencies are divided by its factor. Required unless the preset sets them. "
    "Example: --scale-factors 2,8,2,8,32,32,32,4",
)
@click.option(
    "--dimension-groups", callback=_int_list, metavar="B0,...,BG",
    help="Group boundaries over the head_dim/2 rotary frequencies: strictly increasing, from 0 to head_dim/2, "
    "one more than the scale factors. Default: the preset's, else an even split into one group per scale "
    "factor. Example for head_dim 128: --dimension-groups 0,8,16,24,32,40,48,56,64",
)
@click.option(
    "--dim-scores", type=click.Path(path_type=Path), metavar="FILE",
    help="safetensors file with a tensor 'scores' [layers, attention heads, head_dim/2] rating each rotary "
    "frequency of each head; with --topk, DPE applies only to the top-K frequencies per (layer, head). "
    "Default: DPE applies to every frequency.",
)
@click.option(
    "--topk", type=int, metavar="K",
    help="How many frequencies per (layer, head) to select from --dim-scores, 1 <= K <= head_dim/2. "
    "Requires --dim-scores.",
)
@click.option(
    "--target-length", type=int, metavar="T",
    help="Context length the export is meant for; written as max_position_embeddings. Default: the "
    "preset's, else 4 x the base model's max_position_embeddings.",
)
@click.option(
    "--pretrain-length", type=int, metavar="L",
    help="The base model's pretraining context length, recorded in the dpe config section. "
    "Default: the base model's max_position_embeddings.",
)
@click.option(
    "--base-model", metavar="REPO_ID",
    help="Hugging Face id of the base model, for the model card (README.md). Default: taken from a Hugging "
    "Face cache path, else the preset's.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option(
    "--link", is_flag=True,
    help="Hard-link the weight files instead of copying them (same file system only; falls back to copying "
    "with a warning). Saves disk space and time; the export then shares the files with MODEL_DIR.",
)
@click.option(
    "--calibration", "calibration_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
    help="calibration.json from `dpe-export calibrate`: its chosen scale factors, groups, window, target "
    "length and top-K selection are used unless given explicitly (it must come from this model), and its grid "
    "goes into the model card. eval*.json files beside it are shown too.",
)
@click.option(
    "--calibration-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
    help="Without --scale-factors, --preset or --calibration, convert calibrates first (give --target-length); "
    "its results go here. Default: OUT.calibration beside OUT (a re-run resumes from it).",
)
@click.option(
    "--calibration-samples", type=click.IntRange(min=1), default=8, show_default=True, metavar="N",
    help="When convert calibrates: NIAH contexts per (group, scale) cell (see dpe-export calibrate --help).",
)
@click.option(
    "--calibration-device-map", "calibration_device_map",
    type=click.Choice(DEVICE_MAPS), metavar="MAP",
    help="When convert calibrates a model larger than one GPU: spread its layers with accelerate "
    "(as calibrate --device-map).",
)
@click.option(
    "--eval-json", "eval_json", multiple=True, type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
    help="Results of dpe-export eval --json (base model and DPE) for the model card's evaluation table; "
    "repeat for several runs.",
)
@click.option(
    "--push", is_flag=True, help="After exporting, publish OUT to the Hub repo --repo-id (as dpe-export push)."
)
@click.option("--repo-id", metavar="ORG/NAME", help="Hub repo to publish to with --push; also named in the model card.")
@click.option(
    "--private", is_flag=True, help="With --push: create the repo private (an existing repo keeps its visibility)."
)
@click.option(
    "--revision", metavar="BRANCH", help="With --push: the branch to commit to (created if needed). Default: main."
)
@click.option("--commit-message", metavar="MSG", help="With --push: the commit message.")
@click.option(
    "--dry-run", is_flag=True, help="With --push: export, then list what would be uploaded, without uploading."
)
def convert_command(
    model_dir: Optional[str],
    model_source: Optional[str],
    model_revision: Optional[str],
    gguf_file: Optional[str],
    dtype: Optional[str],
    output: Path,
    preset: Optional[str],
    window: Optional[int],
    scale_factors: Optional[list[int]],
    dimension_groups: Optional[list[int]],
    dim_scores: Optional[Path],
    topk: Optional[int],
    target_length: Optional[int],
    pretrain_length: Optional[int],
    base_model: Optional[str],
    overwrite: bool,
    link: bool,
    calibration_file: Optional[Path] = None,
    calibration_dir: Optional[Path] = None,
    calibration_samples: int = 8,
    calibration_device_map: Optional[str] = None,
    eval_json: tuple[Path, ...] = (),
    push: bool = False,
    repo_id: Optional[str] = None,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    dry_run: bool = False,
) -> None:
    """Convert the checkpoint in MODEL_DIR into a DPE checkpoint at OUT.

    MODEL_DIR is a local Hugging Face checkpoint directory (config.json, safetensors weights, tokenizer).
    OUT gets config.json (with a `dpe` section, auto_map and the target length as max_position_embeddings),
    the unchanged weights, the tokenizer files, modeling_dpe.py and dpe_core.py, the selected-frequency file
    when --topk is given, and a README.md model card. Nothing is written unless every check passes, and a
    failed or interrupted export leaves nothing behind.
    """
    if dim_scores is not None and topk is None:
        raise click.UsageError("--dim-scores needs --topk K")
    push_only = [name for name, given in (("--private", private), ("--revision", revision is not None),
                 ("--commit-message", commit_message is not None), ("--dry-run", dry_run)) if given]
    if push_only and not push:
        raise click.UsageError(f"{push_only[0]} needs --push")
    if push and not repo_id:
        raise click.UsageError("--push needs --repo-id ORG/NAME")
    _setup_logging()
    if model_dir is None and model_source is None:
        from dpe_export import sources

        raise click.UsageError(f"give --model SOURCE ({sources.describe_sources()})")
    card_inputs = _card_inputs(calibration_file, eval_json)
    if base_model is not None:
        from dpe_export.card import hub_id_or_none

        if hub_id_or_none(base_model) is None:
            raise click.UsageError(f"--base-model must be a Hub repo id ORG/NAME, got {base_model!r}")
    if repo_id is not None:
        from dpe_export import publish

        publish.check_repo_id(repo_id)
        publish.check_revision(revision)
        if push:
            publish.check_push_ready(repo_id, dry_run=dry_run)
    _quiet_transformers()
    from dpe_export import export
    from dpe_export.presets import load_preset

    source = _open_model(model_dir, model_source, model_revision, gguf_file, dtype, workdir=Path(output).parent)
    model_dir = source.path
    if base_model is None:
        base_model = source.hub_id
    if source.kind == "gguf":
        card_inputs["gguf"] = source.gguf

    chosen = load_preset(preset) if preset else None
    calibration, calibration_from = None, None
    if calibration_device_map and (calibration_file is not None or scale_factors is not None or chosen is not None):
        raise click.UsageError("--calibration-device-map applies only when convert calibrates (no --scale-factors, "
                               "--preset or --calibration)")
    if calibration_file is not None:
        calibration, calibration_from = _read_own_calibration(calibration_file, model_dir), calibration_file.parent
    elif scale_factors is None and chosen is None:
        if target_length is None:
            raise click.UsageError("give --scale-factors, a --preset or a --calibration file, or --target-length "
                                   "to calibrate the model first")
        export.check_output_target(Path(output), Path(model_dir), overwrite)  # before minutes of calibration
        calibration_from = calibration_dir or output.parent / f"{output.name}.calibration"
        calibration = _run_calibration(
            model_dir, calibration_from, target_length=target_length, window=window, num_groups=None,
            dimension_groups=dimension_groups, top_k=topk if dim_scores is None else None,
            pretrain_length=pretrain_length, samples=calibration_samples, shard=None,
            device_map=calibration_device_map)
        _print_calibration_summary(calibration, calibration_from)
        card_inputs["calibration"] = calibration
    selected = None
    if calibration is not None and scale_factors is None:
        from dpe_export.calibrate import selection_from

        scale_factors, dimension_groups = calibration["chosen"], calibration["dimension_groups_range"]
        window = _first_given(window, calibration["window"])
        target_length = _first_given(target_length, calibration["target_length"])
        pretrain_length = _first_given(pretrain_length, calibration["pretrain_length"])
        if dim_scores is None:
            selected = selection_from(calibration, calibration_from)
    if topk is not None and dim_scores is None and selected is None:
        raise click.UsageError("--topk needs --dim-scores FILE (or a calibration that computes them)")
    window = _first_given(window, chosen and chosen.local_window_size)
    if window is None:
        raise click.UsageError("give --window (the local window size in tokens) or a --preset that sets it")
    scale_factors = _first_given(scale_factors, chosen and list(chosen.scale_factors))
    if scale_factors is None:
        raise click.UsageError("give --scale-factors (one per dimension group) or a --preset that sets them")
    dimension_groups = _first_given(dimension_groups, chosen and list(chosen.dimension_groups_range))

    info = export.inspect_model(model_dir)
    params = export.build_params(
        info,
        local_window_size=window,
        scale_factors=scale_factors,
        dimension_groups_range=dimension_groups,
        target_length=_first_given(target_length, chosen and chosen.target_length),
        pretrain_length=pretrain_length,
    )
    if dim_scores is not None:
        from dpe_export.selection import load_dim_scores, top_k_mask

        scores = load_dim_scores(dim_scores, info.num_layers, info.num_heads, 2 * info.num_freqs)
        selected = top_k_mask(scores, topk)
    if chosen is not None and chosen.model_type and chosen.model_type != info.architecture.model_type:
        logging.getLogger("dpe_export").warning(
            "preset %s was tuned for %s (%s), but %s is a %s model",
            chosen.name, chosen.base_model, chosen.model_type, model_dir, info.architecture.model_type,
        )
    if base_model is None:
        base_model = export.guess_base_model(info.model_dir)
    if base_model is None and chosen is not None and chosen.model_type == info.architecture.model_type:
        base_model = chosen.base_model

    difference = export.export_difference(output, info, params, selected) if push and not overwrite else "-"
    if difference is None:
        click.echo(f"{output} already holds this export (an earlier run's upload did not finish); pushing it")
        out = Path(output)
    elif push and not overwrite and Path(output, "config.json").is_file() and difference != "it is not a DPE export":
        raise DPEExportError(f"{output} holds an export that is not what this convert writes ({difference}); "
                             "pass --overwrite to export it again, then push")
    else:
        out = export.convert(
            info, output, params, selected, overwrite=overwrite, link=link, base_model=base_model,
            repo_id=repo_id, **card_inputs,
        )

    from dpe_export.selection import describe_selection

    files = export.output_summary(out)
    click.echo(
        f"Exported a DPE {info.architecture.display_name} checkpoint to {out} "
        f"(window {params.local_window_size}, scale factors {','.join(map(str, params.scale_factors))}, "
        f"groups {','.join(map(str, params.dimension_groups_range))}, {describe_selection(selected)}, "
        f"target length {params.target_length})"
    )
    width = max(len(name) for name, _ in files)
    for name, size in files:
        click.echo(f"  {name:<{width}}  {_human_size(size):>10}")
    click.echo(f"  {'total':<{width}}  {_human_size(sum(size for _, size in files)):>10}")
    click.echo(f"Load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    if push:
        _push(out, repo_id, private=private, revision=revision, commit_message=commit_message, dry_run=dry_run,
              after_convert=True)


def _read_own_calibration(path: Path, model_dir: Path) -> Optional[dict[str, Any]]:
    """A calibration.json written by `dpe-export calibrate` (checked against the model), else None."""
    import json

    from dpe_export import calibrate

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DPEExportError(f"cannot read calibration file {path}: {e}") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        return None  # a hand-made grid for the card only
    if Path(model_dir).joinpath("config.json").is_file():
        calibrate.check_calibration_for(data, model_dir)
    return data


def _card_inputs(calibration_file: Optional[Path], eval_json) -> dict[str, Any]:
    """calibration and eval_records for export.convert, read (and checked) before anything is written."""
    from dpe_export import card

    calibration = card.load_calibration(calibration_file) if calibration_file is not None else None
    eval_files = list(eval_json)
    if not eval_files and calibration_file is not None:
        eval_files = card.find_eval_files(calibration_file)
    eval_records = card.load_eval_records(eval_files) if eval_files else None
    return {"calibration": calibration, "eval_records": eval_records}


def _push(out: Path, repo_id: str, *, private: bool, revision: Optional[str], commit_message: Optional[str],
          dry_run: bool, after_convert: bool = False) -> None:
    from dpe_export import publish

    hint = None
    if after_convert:  # running convert again would stop at the existing output: say how to finish instead
        hint = "the export is complete; finish the upload with: "
        hint += f"dpe-export push {shlex.quote(str(out))} --repo-id {repo_id}"
        hint += f" --revision {shlex.quote(revision)}" if revision else ""
        hint += " --private" if private else ""
    publish.push(out, repo_id, private=private, revision=revision, commit_message=commit_message, dry_run=dry_run,
                 echo=click.echo, retry_hint=hint)


@main.command("push")
@click.argument("out", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, metavar="ORG/NAME", help="The Hub repo to publish to (created if needed).")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", metavar="BRANCH", help="The branch to commit to (created if needed). Default: main.")
@click.option("--commit-message", metavar="MSG", help="The commit message.")
@click.option("--dry-run", is_flag=True, help="List the files that would be uploaded, with sizes, and upload nothing.")
def push_command(out: Path, repo_id: str, private: bool, revision: Optional[str], commit_message: Optional[str],
                 dry_run: bool) -> None:
    """Publish the DPE export in OUT to the Hugging Face Hub repo ORG/NAME.

    huggingface_hub does the upload: the token comes from HF_TOKEN or the stored login (hf auth login), the
    repo is created if it does not exist, and the new and changed files go up in one commit; files the repo
    already has are not uploaded again, so re-running a push that failed finishes it. OUT is only read.

    \b
    Examples:
      dpe-export push ./llama3-dpe --repo-id my-org/Llama-3-8B-Instruct-DPE --dry-run
      dpe-export push ./llama3-dpe --repo-id my-org/Llama-3-8B-Instruct-DPE --private
    """
    _setup_logging()
    _push(out, repo_id, private=private, revision=revision, commit_message=commit_message, dry_run=dry_run)


@main.command("upgrade")
@click.argument("export_dir", metavar="EXPORT_DIR", type=click.Path(path_type=Path))
def upgrade_command(export_dir: Path) -> None:
    """Bring a DPE export written by an earlier dpe-export up to date, in place.

    Rewrites the generated files (modeling_dpe.py, dpe_core.py, and in config.json the auto_map, architectures
    and the dpe-export version) with this version's runtime. Weights, tokenizer, selection file and model card
    are left untouched and checked unchanged by hash; a following `dpe-export push` uploads only the changed
    files. Exports written before 0.2.0 are silently wrong on transformers 5.24 until upgraded.

    \b
    Examples:
      dpe-export upgrade ./my-llama-dpe
      dpe-export upgrade ./my-llama-dpe && dpe-export push ./my-llama-dpe --repo-id my-org/my-llama-dpe
    """
    from dpe_export.export import upgrade_export

    _setup_logging()
    result = upgrade_export(export_dir)
    was = result.written_by or "0.1.0 or earlier"
    if not result.changed:
        click.echo(f"{export_dir} is up to date (dpe-export {__version__}); nothing changed")
        return
    click.echo(f"Upgraded {export_dir} (written by dpe-export {was}) to dpe-export {__version__}: "
               f"rewrote {', '.join(result.changed)}; {len(result.untouched)} other files unchanged (checked by hash)")


@main.command("presets")
@click.argument("name", required=False)
def presets_command(name: Optional[str]) -> None:
    """List the shipped presets, or show the settings of preset NAME.

    \b
    Examples:
      dpe-export presets
      dpe-export presets meta-llama-3-8b-instruct
    """
    from dpe_export.presets import list_presets, load_preset

    for p in [load_preset(name)] if name else list_presets():
        click.echo(f"{p.name}  ({p.base_model})")
        click.echo(f"    {p.description}")
        if name:
            click.echo(f"    local window:     {p.local_window_size}")
            click.echo(f"    scale factors:    {', '.join(map(str, p.scale_factors))}")
            click.echo(f"    dimension groups: {', '.join(map(str, p.dimension_groups_range))}")
            click.echo(f"    target length:    {p.target_length}")


EVAL_EPILOG = """\b
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

\b
Methods (--method, base models only):
  none               the model as it is (default)
  linear:F           position interpolation: positions divided by F
  dynamic:F          dynamic NTK scaling with factor F (theta for prompt + answer length)
  yarn:F             YaRN with factor F (original length = the model's max_position_embeddings)
  self-extend:W,G    SelfExtend: plain RoPE within W tokens, positions grouped by G beyond
  dpe:W,S1,...,SG    DPE, window W, one integer scale per group (an even split of head_dim/2)
"""


def _length_list(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[list[int]]:
    if value is None:
        return None
    out = []
    for item in value.replace(",", " ").split():
        text = item.lower()
        mult = 1024 if text.endswith("k") else 1
        try:
            n = int(text[:-1] if mult > 1 else text) * mult
        except ValueError:
            n = 0
        if n < 1:
            raise click.BadParameter(f"give comma-separated positive token counts, e.g. 1024,2048 or 4k,8k; got {value!r}")
        out.append(n)
    if not out:
        raise click.BadParameter("give comma-separated positive token counts, e.g. 1024,2048 or 4k,8k")
    return list(dict.fromkeys(out))


def _depth_list(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[list[float]]:
    if value is None:
        return None
    try:
        out = [float(x) for x in value.replace(",", " ").split()]
    except ValueError:
        out = []
    if not out or not all(0.0 <= d <= 1.0 for d in out):
        raise click.BadParameter(f"give comma-separated depths between 0 and 1, e.g. 0,0.5,1; got {value!r}")
    return list(dict.fromkeys(out))


@main.command("eval", epilog=EVAL_EPILOG)
@_model_source_options
@click.option("--task", type=click.Choice(["passkey", "niah", "ppl"]), default="passkey", show_default=True,
              help="passkey: one 5-digit pass key hidden in filler; niah: several 6-digit needles per context, "
              "each asked for in turn (score: fraction retrieved); ppl: perplexity of held-out text.")
@click.option("--lengths", required=True, callback=_length_list, metavar="N1,N2,...",
              help="Prompt lengths in tokens (exact), e.g. 1024,2048,4096 or 4k,8k.")
@click.option("--samples", type=click.IntRange(min=1), default=10, show_default=True, metavar="N",
              help="passkey: prompts per (length, depth); niah: needles asked per (length, depth); "
              "ppl: text windows per length.")
@click.option("--depths", callback=_depth_list, metavar="D1,D2,...",
              help="Needle depths, 0 = right after the instructions, 1 = right before the question "
              "[default: 0,0.25,0.5,0.75,1]. niah: each context puts its needles at different depths of this "
              "grid, in turn, so every depth gets --samples needles. Not used by ppl.")
@click.option("--needles", type=click.IntRange(min=1), metavar="K",
              help="niah only: needles per context (each queried once)  [default: 4]")
@click.option("--method", default="none", show_default=True, metavar="SPEC",
              help="Baseline applied to a base model when it is loaded, without writing anything: none, "
              "linear:F, dynamic:F, yarn:F, self-extend:W,G or dpe:W,S1,...,SG (see below).")
@click.option("--haystack", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="FILE",
              help="Text file to use as filler (passkey/niah) or as the text (ppl) instead of the generated "
              "haystack; repeated if too short.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.json",
              help="Write the results: one record per (length, depth) with accuracy and sample count.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.png",
              help="Save a depth x length accuracy heatmap (ppl: perplexity by length). Needs matplotlib.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Fixes prompts, needles and text; the same command gives the same numbers.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, metavar="B",
              help="Prompts run together (all prompts of a length have the same length: no padding).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: cuda when available.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="auto: float32 on CPU, bfloat16 on CUDA.")
@click.option("--attn", type=click.Choice(["sdpa", "eager"]), default="sdpa", show_default=True,
              help="Attention implementation.")
@_device_map_option
@click.option("--trust-remote-code", is_flag=True,
              help="Run a DPE export's own modeling code even when it is not exactly what this dpe-export writes "
                   "(an export edited by hand, or from another tool). Never needed for base models.")
@click.option("--no-progress", is_flag=True, help="Do not show the progress bar (stderr).")
def eval_command(
    model_dir: Path, task: str, lengths: list[int], samples: int, depths: Optional[list[float]],
    needles: Optional[int], method: str, haystack: Optional[Path], json_out: Optional[Path],
    plot_out: Optional[Path], seed: int, batch_size: int, device: str, dtype: str, attn: str, device_map: Optional[str],
    trust_remote_code: bool, no_progress: bool, model_source: Optional[str] = None,
    model_revision: Optional[str] = None, gguf_file: Optional[str] = None,
) -> None:
    """Evaluate MODEL on pass-key retrieval, multi-needle NIAH or perplexity at the given lengths.

    MODEL is a base checkpoint directory or a DPE export. An export's code (modeling_dpe.py, dpe_core.py) runs
    only when it is byte for byte what this dpe-export writes (`dpe-export upgrade` makes an older export so),
    or with --trust-remote-code; a base model's own code never runs. Prompts are
    exactly the requested number of tokens. Prints a table (per length and depth: accuracy and sample count,
    plus an `all` row per length); --json and --plot save the results. Generation is greedy.
    """
    if task == "ppl" and depths is not None:
        raise click.UsageError("--depths applies to passkey and niah, not to ppl")
    if task != "niah" and needles is not None:
        raise click.UsageError("--needles applies to --task niah only")
    _setup_logging()
    _quiet_transformers()
    from dpe_export import evaluate, report
    from dpe_export.methods import parse_method

    spec = parse_method(method)
    if plot_out is not None:
        report.require_matplotlib()
    import tempfile

    source = _open_model(model_dir, model_source, model_revision, gguf_file, dtype,
                         workdir=Path(tempfile.gettempdir()))
    result = evaluate.run_eval(
        source.path, task, lengths, samples=samples, depths=depths,
        needles=evaluate.DEFAULT_NEEDLES if needles is None else needles, method=spec, haystack=haystack,
        seed=seed, batch_size=batch_size, device=device, dtype=dtype, attn=attn, progress=not no_progress,
        device_map=device_map, trust_remote_code=trust_remote_code,
    )
    click.echo(report.format_table(result))
    if json_out is not None:
        click.echo(f"Wrote {report.write_json(result, json_out)}")
    if plot_out is not None:
        click.echo(f"Wrote {report.plot_result(result, plot_out)}")


CALIBRATE_EPILOG = """\b
Examples:
  # calibrate a model trained at 8K for 128K: grid of 8 groups x scales 1..128, 4-needle NIAH at 128K
  dpe-export calibrate ./Meta-Llama-3-8B-Instruct --target-length 131072 --window 1024 -d runs/llama3
  # with the top-48 key frequencies per head (2-norm attention contribution), as the final model will use
  dpe-export calibrate ./my-llama --target-length 32768 --window 1024 --topk 48 -d runs/llama
  # split the grid over 4 processes or machines (e.g. a Slurm array), then join the shards
  dpe-export calibrate ./my-llama --target-length 32768 --window 1024 -d runs/llama --shard $I/4
  dpe-export calibrate --merge -d runs/llama
  # then export with the chosen factors (the card shows the grid)
  dpe-export convert ./my-llama -o ./my-llama-dpe --calibration runs/llama/calibration.json

A killed run resumes where it stopped: every finished (group, scale) cell is already on disk.
"""


@main.command("calibrate", epilog=CALIBRATE_EPILOG)
@_model_source_options
@click.option("-d", "--output-dir", required=True, type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Where the plan, the per-cell results (cells*.jsonl), dim_scores.safetensors and "
              "calibration.json go. Re-running with the same settings resumes.")
@click.option("--target-length", type=click.IntRange(min=2), metavar="T",
              help="The context length to calibrate for (NIAH prompts are this long).")
@click.option("--window", type=click.IntRange(min=1), metavar="W",
              help="Local window size in tokens. Default: the pretraining length / 8.")
@click.option("--groups", "num_groups", type=click.IntRange(min=1), metavar="G",
              help="Split the head_dim/2 rotary frequencies evenly into G groups. Default: 8 (or fewer when "
              "there are fewer frequencies).")
@click.option("--dimension-groups", callback=_int_list, metavar="B0,...,BG",
              help="Explicit group boundaries, from 0 to head_dim/2 (instead of --groups).")
@click.option("--topk", type=click.IntRange(min=1), metavar="K",
              help="Scale only the top-K frequencies per (layer, head) by 2-norm attention contribution "
              "(computed first, saved as dim_scores.safetensors). Default: all frequencies.")
@click.option("--pretrain-length", type=click.IntRange(min=1), metavar="L",
              help="The base model's pretraining length. Default: its max_position_embeddings.")
@click.option("--dim-statistic", type=click.Choice(["norms", "authors"]), default="norms", show_default=True,
              help="With --topk: norms scores mean ||q_f|| x mean ||k_f|| (query and key as different tokens, as "
                   "in every pair DPE changes); authors scores mean ||q_f|| ||k_f|| over the same token, as the "
                   "DPE authors' code does (to reproduce their selections).")
@click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True, metavar="N",
              help="NIAH contexts per (group, scale) cell (each asked about every needle).")
@click.option("--needles", type=click.IntRange(min=1), default=4, show_default=True, metavar="K",
              help="Needles per NIAH context.")
@click.option("--metric", type=click.Choice(["niah", "passkey"]), default="niah", show_default=True,
              help="What scores a cell: K-needle NIAH (the authors' choice), or pass-key retrieval for models "
              "whose multi-needle retrieval is weak even at their pretraining length (samples x needles "
              "prompts per cell either way).")
@click.option("--seed", type=int, default=1234, show_default=True,
              help="Seed of the calibration prompts (eval defaults to seed 0, so its samples are held out).")
@click.option("--shard", metavar="I/N", help="Run only every N-th cell starting at I (0 <= I < N).")
@click.option("--merge", is_flag=True, help="Join the shards' results in --output-dir into calibration.json.")
@click.option("--haystack", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="FILE",
              help="Filler text for the prompts instead of the generated haystack.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, metavar="B")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True)
@_device_map_option
def calibrate_command(model_dir, model_source, model_revision, gguf_file, output_dir, target_length, window,
                      num_groups, dimension_groups, topk, pretrain_length, dim_statistic, samples, needles, metric,
                      seed, shard, merge, haystack, batch_size, device, dtype, device_map):
    """Find each frequency group's scale factor on the model itself.

    Stage 1 (with --topk): score every (layer, head, frequency) by its 2-norm attention contribution on
    haystack text at lengths doubling from max(W, L/4) to L. Stage 2: at the target length T, each group in
    turn tries the scales 1, 2, 4, ..., T/W while the others use the scale nearest 2T/L, scored by 4-needle
    NIAH; each group gets its best scale (ties: the one nearest 2T/L, then the smaller). Writes
    calibration.json, which `dpe-export convert --calibration` uses.
    """
    from dpe_export import calibrate

    _setup_logging()
    if merge:
        result = calibrate.merge(output_dir)
    else:
        if (model_dir is None and model_source is None) or target_length is None:
            raise click.UsageError("give --model SOURCE and --target-length (or --merge to join shards)")
        _quiet_transformers()
        source = _open_model(model_dir, model_source, model_revision, gguf_file, dtype, workdir=output_dir)
        result = _run_calibration(source.path, output_dir, target_length=target_length, window=window,
                                  num_groups=num_groups, dimension_groups=dimension_groups, top_k=topk,
                                  pretrain_length=pretrain_length, samples=samples, needles=needles, metric=metric,
                                  seed=seed, dim_statistic=dim_statistic,
                                  shard=calibrate.parse_shard(shard), haystack=haystack, batch_size=batch_size,
                                  device=device, dtype=dtype, device_map=device_map)
        if result is None:
            click.echo(f"Shard {shard} done; join the shards with: dpe-export calibrate --merge -d {output_dir}")
            return
    _print_calibration_summary(result, output_dir)


def _run_calibration(model_dir: Path, output_dir: Path, *, window: Optional[int], pretrain_length=None, **kw):
    from dpe_export import calibrate
    from dpe_export.export import load_base_config

    if window is None:
        length = pretrain_length or load_base_config(Path(model_dir)).max_position_embeddings
        window = max(1, length // 8)
    return calibrate.calibrate(model_dir, output_dir, window=window, pretrain_length=pretrain_length, **kw)


def _print_calibration_summary(result: dict[str, Any], output_dir: Path) -> None:
    scales = result["scales"]
    click.echo(f"\nCalibration at {result['target_length']} tokens, window {result['window']}, "
               f"{result['metric']} ({result['samples_per_cell']} queries per cell):")
    click.echo("  group   freqs  " + " ".join(f"{'s=' + str(s):>6}" for s in scales) + "  chosen")
    for g, (rng, row, pick) in enumerate(zip(result["groups"], result["grid"], result["chosen"])):
        cells = " ".join(f"{v:6.2f}" for v in row)
        click.echo(f"  {g:>5}  {rng[0]:>3}-{rng[1] - 1:<3} {cells}  {pick:>6}")
    click.echo(f"Chosen scale factors: {','.join(map(str, result['chosen']))}")
    click.echo(f"Wrote {Path(output_dir) / 'calibration.json'}; export with: dpe-export convert MODEL -o OUT "
               f"--calibration {Path(output_dir) / 'calibration.json'}")
