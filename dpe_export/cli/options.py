"""Every option that two commands share, declared once with one validation; choices come from the registries.

Each declaration is a decorator factory: the validation, metavar and choices are fixed here, and a command may
give its own help text where the option means something slightly different there (--samples counts prompts per
depth in eval and contexts per cell in calibrate).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from dpe_export.calibration import procedures
from dpe_export.calibration.dim_scores import STATISTICS
from dpe_export.errors import DPEExportError
from dpe_export.evaluation import registry
from dpe_export.evaluation.prompts import parse_length_items
from dpe_export.sources import describe_sources
from dpe_export.sources.loading import DEVICE_CHOICES, DEVICE_MAPS, DTYPE_CHOICES

# ----------------------------------------------------------------------------------------------------------
# Value parsers
# ----------------------------------------------------------------------------------------------------------


def int_list(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[list[int]]:
    """'2,8,2,8' -> [2, 8, 2, 8]."""
    if value is None:
        return None
    items = value.replace(",", " ").split()
    if not items:
        raise click.BadParameter("give comma-separated integers, e.g. 2,8,2,8")
    try:
        return [int(x) for x in items]
    except ValueError:
        raise click.BadParameter(f"give comma-separated integers, e.g. 2,8,2,8; got {value!r}") from None


def length_list(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[list]:
    """'1024,4k,2x' -> [1024, 4096, '2x']: token counts, or multiples of the model's pretraining length L, which
    the command resolves once the model is known (evaluation.prompts.resolve_lengths)."""
    if value is None:
        return None
    try:
        return parse_length_items(value)
    except ValueError:
        raise click.BadParameter(f"give comma-separated positive token counts (1024,4k) or multiples of the "
                                 f"pretraining length (1x,2x); got {value!r}") from None


def lengths(required: bool = False, default: Optional[str] = None, help: str = ""):
    return click.option("--lengths", required=required, default=default, show_default=default is not None,
                        callback=length_list, metavar="N1,N2,...",
                        help=help + " Token counts (1024,4k) or multiples of the pretraining length L (1x,2x).")


def key_paths(ctx: click.Context, param: click.Parameter, value) -> dict:
    """('squad=a.json', ...) -> {'squad': Path('a.json')}; each file must exist."""
    out = {}
    for item in value or ():
        key, sep, path = str(item).partition("=")
        if not sep or not key.strip() or not path.strip():
            raise click.BadParameter(f"expected KEY=PATH, got {item!r}")
        if not Path(path).is_file():
            raise click.BadParameter(f"file not found: {path}")
        out[key.strip()] = Path(path)
    return out


def depth_list(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[list[float]]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0], each in [0, 1]."""
    if value is None:
        return None
    try:
        out = [float(x) for x in value.replace(",", " ").split()]
    except ValueError:
        out = []
    if not out or not all(0.0 <= d <= 1.0 for d in out):
        raise click.BadParameter(f"give comma-separated depths between 0 and 1, e.g. 0,0.5,1; got {value!r}")
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------------------------------------
# The model a command reads
# ----------------------------------------------------------------------------------------------------------

SOURCE_HELP = ("The base model: a Hub repo id ORG/NAME (its safetensors, config and tokenizer are downloaded into "
               "the Hugging Face cache; HF_TOKEN or `hf auth login` for gated and private repos; HF_HUB_OFFLINE=1 "
               "uses the cache only), a local checkpoint directory (or cache snapshot), or a .gguf file "
               "(dequantized to safetensors). Same as the positional MODEL.")


def model_source(f):
    """MODEL (positional) or --model SOURCE, with --model-revision and --gguf-file."""
    f = click.option("--gguf-file", metavar="NAME", help="With --model DIR: the .gguf file inside DIR to read.")(f)
    f = click.option("--model-revision", metavar="REV",
                     help="With a Hub repo id: the branch, tag or commit to download. Default: main.")(f)
    f = click.option("--model", "model_source", metavar="SOURCE", help=SOURCE_HELP)(f)
    return click.argument("model_dir", metavar="[MODEL]", required=False)(f)


def model_spec(model_dir: Optional[str], model_source: Optional[str], required: bool = True) -> Optional[str]:
    """The one model given (as MODEL or --model SOURCE)."""
    if model_dir is not None and model_source is not None:
        raise click.UsageError("give the model once: as MODEL or as --model SOURCE")
    spec = model_source if model_source is not None else model_dir
    if spec is None and required:
        raise click.UsageError(f"give --model SOURCE ({describe_sources()})")
    return spec


# ----------------------------------------------------------------------------------------------------------
# DPE settings (convert, calibrate)
# ----------------------------------------------------------------------------------------------------------


# --window and --topk take any integer here: their range depends on the model (head_dim/2, the length limit)
# and is checked by the library with one message for every command.
def window(help: str):
    return click.option("--window", type=int, metavar="W", help=help)


def dimension_groups(help: str):
    return click.option("--dimension-groups", callback=int_list, metavar="B0,...,BG", help=help)


def topk(help: str):
    return click.option("--topk", type=int, metavar="K", help=help)


def target_length(help: str):
    return click.option("--target-length", type=click.IntRange(min=2), metavar="T", help=help)


def pretrain_length(help: str):
    return click.option("--pretrain-length", type=click.IntRange(min=1), metavar="L", help=help)


def dim_statistic(f):
    return click.option(
        "--dim-statistic", type=click.Choice(STATISTICS), default=STATISTICS[0], show_default=True,
        help="With --topk: norms scores mean ||q_f|| x mean ||k_f|| (query and key as different tokens, as in "
             "every pair DPE changes); authors scores mean ||q_f|| ||k_f|| over the same token, as the DPE "
             "authors' code does (to reproduce their selections).")(f)


# ----------------------------------------------------------------------------------------------------------
# Running a model (eval, calibrate)
# ----------------------------------------------------------------------------------------------------------


def samples(default: Optional[int], help: str):
    return click.option("--samples", type=click.IntRange(min=1), default=default, show_default=default is not None,
                        metavar="N", help=help)


def needles(help: str, default: Optional[int] = None):
    return click.option("--needles", type=click.IntRange(min=1), default=default, show_default=default is not None,
                        metavar="K", help=help)


def seed(default: int, help: str):
    return click.option("--seed", type=int, default=default, show_default=True, help=help)


def haystack(help: str):
    return click.option("--haystack", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="FILE",
                        help=help)


def batch_size(help: Optional[str] = None):
    return click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, metavar="B",
                        help=help)


def device(help: Optional[str] = None):
    return click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True, help=help)


def dtype(help: Optional[str] = None):
    return click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True, help=help)


def device_map(name: str = "--device-map", dest: str = "device_map", help: Optional[str] = None):
    return click.option(
        name, dest, type=click.Choice(DEVICE_MAPS), metavar="MAP",
        help=help or "For models larger than one GPU: spread the layers over every visible GPU (then CPU RAM) with "
                     f"accelerate ({', '.join(DEVICE_MAPS)}). Replaces --device.")


def _task_spec(ctx, param, value):
    if value is None:
        return value
    try:
        registry.get_task(value)
    except DPEExportError as e:
        raise click.BadParameter(str(e)) from None
    return value


def task(f):
    names = registry.task_names()
    return click.option(
        "--task", default=names[0], show_default=True, callback=_task_spec, metavar="|".join(names),
        help="; ".join(f"{t}: {registry.get_task(t).help}" for t in names) + ".")(f)


def retrieval_tasks() -> list[str]:
    """The registered tasks that generate answers to prompts (what analyze --ablate-task measures)."""
    return list(registry.retrieval_task_names())


def metric(f):
    choices = registry.calibration_metrics()
    default = procedures.PROCEDURES[procedures.DEFAULT_PROCEDURE].metrics[0]
    return click.option(
        "--metric", type=click.Choice(choices), default=default if default in choices else choices[0],
        show_default=True,
        help="What scores a cell: K-needle NIAH (the authors' choice), or pass-key retrieval for models whose "
             "multi-needle retrieval is weak even at their pretraining length (samples x needles prompts per cell "
             "either way).")(f)


# ----------------------------------------------------------------------------------------------------------
# Publishing (convert --push, push)
# ----------------------------------------------------------------------------------------------------------


def push_target(after_convert: bool):
    """--repo-id, --private, --revision, --commit-message, --dry-run; with convert, each but --repo-id needs --push."""
    pre = "With --push: " if after_convert else ""

    def wrap(f):
        f = click.option("--dry-run", is_flag=True,
                         help=pre + ("export, then list what would be uploaded, without uploading." if after_convert
                                     else "List the files that would be uploaded, with sizes, and upload nothing."))(f)
        f = click.option("--commit-message", metavar="MSG", help=pre + "the commit message.")(f)
        f = click.option("--revision", metavar="BRANCH",
                         help=pre + "the branch to commit to (created if needed). Default: main.")(f)
        f = click.option("--private", is_flag=True,
                         help=pre + "create the repo private (an existing repo keeps its visibility).")(f)
        return click.option(
            "--repo-id", required=not after_convert, metavar="ORG/NAME",
            help="Hub repo to publish to with --push; also named in the model card." if after_convert
            else "The Hub repo to publish to (created if needed).")(f)
    return wrap


def no_progress(f):
    return click.option("--no-progress", is_flag=True, help="Do not show the progress bar (stderr).")(f)
