"""convert(): a DPE checkpoint from a base checkpoint and DPE parameters: config with a `dpe` section, unchanged
weights, tokenizer, generated modeling files, selection file and model card; plus the check that an existing
output already holds the very same export (for convert --push after an interrupted upload).
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

from dpe_export import __version__, dpe_ops
from dpe_export.calibration.result import normalize_calibration
from dpe_export.errors import DPEExportError
from dpe_export.export import card
from dpe_export.export.copying import copy_license_files, copy_tokenizer_files, copy_weights
from dpe_export.export.files import (
    _make_parents,
    check_output_target,
    file_sha256,
    foreign_entries,
    move_into_place,
    write_manifest,
)
from dpe_export.generated import config_auto_map, foreign_code, write_modeling_files
from dpe_export.modeling_templates import dpe_params
from dpe_export.sources.checkpoint import CONFIG_FILE, Checkpoint, ModelInfo, inspect_model
from dpe_export.staging import clean_stale_staging, make_staging_dir, release_staging

logger = logging.getLogger("dpe_export")


def build_params(
    info: ModelInfo,
    *,
    local_window_size: int,
    scale_factors: Sequence[int],
    dimension_groups_range: Optional[Sequence[int]] = None,
    target_length: Optional[int] = None,
    pretrain_length: Optional[int] = None,
):
    """DPEParams with defaults filled in and checked against the model.

    Defaults: dimension groups split head_dim/2 evenly into one group per scale factor; pretrain length is
    the base max_position_embeddings; target length is 4 x that.
    """
    if dimension_groups_range is None:
        try:
            dimension_groups_range = dpe_ops.even_group_boundaries(info.num_freqs, len(scale_factors))
        except ValueError as e:
            raise DPEExportError(f"invalid DPE parameters: {e}") from None
    params = dpe_params.DPEParams(
        local_window_size=local_window_size,
        scale_factors=list(scale_factors),
        dimension_groups_range=list(dimension_groups_range),
        target_length=target_length,
        pretrain_length=pretrain_length,
    )
    return resolve_params(params, info, selected=None)


def resolve_params(params, info: ModelInfo, selected=None):
    """A copy of `params` with the lengths defaulted, selected_dims set from `selected`, validated.

    Defaults: pretrain length = the base max_position_embeddings; target length = 4 x that.
    """
    pretrain = params.pretrain_length if params.pretrain_length is not None else info.max_position_embeddings
    resolved = dpe_params.DPEParams(
        local_window_size=params.local_window_size,
        scale_factors=_as_list(params.scale_factors),
        dimension_groups_range=_as_list(params.dimension_groups_range),
        target_length=params.target_length if params.target_length is not None else info.default_target_length,
        pretrain_length=pretrain,
        selected_dims=dpe_params.SELECTED_DIMS_FILENAME if selected is not None else None,
    )
    try:
        resolved.validate(2 * info.num_freqs)
    except ValueError as e:
        raise DPEExportError(f"invalid DPE parameters: {e}") from None
    return resolved


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value  # anything else: validate() says why


def check_selection(selected, info: ModelInfo) -> None:
    import torch

    expected = (info.num_layers, info.num_heads, info.num_freqs)
    if not isinstance(selected, torch.Tensor) or selected.dtype != torch.bool:
        raise DPEExportError("the frequency selection must be a bool tensor")
    if tuple(selected.shape) != expected:
        raise DPEExportError(
            f"the frequency selection has shape {list(selected.shape)}, expected [layers, heads, head_dim/2] = "
            f"{list(expected)}"
        )


def write_config(info: ModelInfo, params, out_dir: Path) -> None:
    """config.json: the base config with the DPE section, auto_map, architectures and the target length."""
    arch = info.architecture
    config = copy.deepcopy(info.config)
    config.max_position_embeddings = params.target_length
    config.auto_map = config_auto_map(arch)
    config.architectures = [arch.dpe_causal_lm_class]
    config.dpe = params.to_dict()
    config.dpe_export_version = __version__  # which dpe-export wrote this export (`dpe-export upgrade` rewrites it)
    config.save_pretrained(str(out_dir))
    path = out_dir / CONFIG_FILE
    written = json.loads(path.read_text(encoding="utf-8"))
    if written.get("dpe") != params.to_dict():  # pragma: no cover - guards against transformers dropping keys
        raise DPEExportError("transformers did not write the dpe section to config.json")
    written["model_type"] = arch.dpe_model_type  # the config class in modeling_dpe.py (see architectures.py)
    path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_selected_dims(selected, out_dir: Path) -> None:
    from safetensors.torch import save_file

    save_file(
        {dpe_params.SELECTED_DIMS_TENSOR: selected.to("cpu").contiguous()},
        str(out_dir / dpe_params.SELECTED_DIMS_FILENAME),
        metadata={"format": "pt", "dpe_format_version": str(dpe_params.DPE_FORMAT_VERSION)},
    )


def convert(
    model_dir,
    output,
    params,
    selected=None,
    overwrite: bool = False,
    link: bool = False,
    *,
    base_model: Optional[str] = None,
    repo_id: Optional[str] = None,
    calibration: Optional[dict[str, Any]] = None,
    eval_records: Optional[Sequence[dict[str, Any]]] = None,
    gguf: Optional[dict[str, Any]] = None,
) -> Path:
    """Export `model_dir` as a DPE checkpoint at `output`; return the output path.

    `params` is a dpe_params.DPEParams; its missing lengths are defaulted (pretrain: the base
    max_position_embeddings; target: 4 x that) and its selected_dims is set from `selected`, a bool
    tensor [layers, heads, head_dim/2] or None (all frequencies). `base_model` is the Hub id named in the
    model card (default: guessed from a Hugging Face cache path); `repo_id` the Hub repo the card names (default:
    the output directory's name); `calibration` and `eval_records` optional card sections (see dpe_export.card).
    DPEExportError for any bad input, raised before anything is written.
    `model_dir` may also be its Checkpoint, or the ModelInfo that inspect_model returned for it, to skip reading
    it again.
    """
    info = model_dir if isinstance(model_dir, ModelInfo) else inspect_model(model_dir)
    params = resolve_params(params, info, selected)
    if selected is not None:
        check_selection(selected, info)
    if params.target_length < params.pretrain_length:
        logger.warning(
            "the target length (%d) is shorter than the pretraining length (%d)",
            params.target_length,
            params.pretrain_length,
        )
    output = Path(output)
    clean_stale_staging(output)
    check_output_target(output, info.model_dir, overwrite)
    if base_model is None:
        base_model = info.checkpoint.hub_id
    if base_model is None:
        logger.warning("no Hub id of the base model is known, so the model card cannot name or link it "
                       "(pass --base-model ORG/NAME)")

    if not info.checkpoint.license:
        logger.warning("the base model states no license (README.md front matter or config.json), so the model "
                       "card states none; check the base model's terms before publishing")
    if calibration is not None:
        try:
            calibration = normalize_calibration(calibration, info.num_freqs)
        except ValueError as e:
            raise DPEExportError(f"invalid calibration: {e}") from None

    created_parents = _make_parents(output)
    staging = None
    try:
        staging = make_staging_dir(output)
        write_export(
            info, params, selected, staging, link=link, base_model=base_model, model_name=output.name,
            repo_id=repo_id, calibration=calibration, eval_records=eval_records, export_dir=output, gguf=gguf,
        )
        write_manifest(staging)
        move_into_place(staging, output, overwrite)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            release_staging(staging)
        for parent in reversed(created_parents):
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    release_staging(staging)
    return output


def export_difference(output, info: ModelInfo, params, selected=None) -> Optional[str]:
    """None when `output` is exactly a finished export of this model with these parameters (so that re-running
    `convert --push` after a failed upload can push it); else what differs, for messages. Generated code is
    compared with a fresh render, copied files with the base model's by hash."""
    output, base = Path(output), info.checkpoint
    try:
        raw = Checkpoint(output).raw
        params = resolve_params(params, info, selected)
    except DPEExportError:
        return "it is not a DPE export"
    if raw.get("dpe") != params.to_dict():
        return "it was exported with other DPE settings"
    foreign = foreign_code(output, raw) or foreign_entries(output)
    if foreign:
        return foreign
    names = list(info.weight_files) + [n for n in (*base.tokenizer_files, *base.license_files)
                                       if n != "tokenizer_config.json"]
    for name in names:
        src, dst = base.file(name), output / name
        if not dst.is_file() or dst.is_symlink() or src.stat().st_size != dst.stat().st_size or file_sha256(src) != file_sha256(dst):
            return f"its {name} differs from the base model's"
    tok = base.file("tokenizer_config.json")
    if tok is not None:
        def stripped(path: Path):
            data = json.loads(path.read_text(encoding="utf-8"))
            drop = ("auto_map", "model_max_length")  # what convert rewrites
            return {k: v for k, v in data.items() if k not in drop} if isinstance(data, dict) else data
        try:
            if stripped(tok) != stripped(output / "tokenizer_config.json"):
                return "its tokenizer_config.json differs from the base model's"
        except (OSError, ValueError):
            return "its tokenizer_config.json is missing or unreadable"
    sel_path = output / dpe_params.SELECTED_DIMS_FILENAME
    if (selected is None) != (not sel_path.is_file()):
        return f"its {dpe_params.SELECTED_DIMS_FILENAME} does not match the selection"
    if selected is not None:
        import torch
        from safetensors.torch import load_file

        if not torch.equal(load_file(str(sel_path))[dpe_params.SELECTED_DIMS_TENSOR], selected.cpu()):
            return f"its {dpe_params.SELECTED_DIMS_FILENAME} holds another selection"
    return None


def write_export(
    info: ModelInfo,
    params,
    selected,
    out_dir: Path,
    *,
    link: bool,
    base_model: Optional[str],
    model_name: str,
    repo_id: Optional[str] = None,
    calibration: Optional[dict[str, Any]] = None,
    eval_records: Optional[Sequence[dict[str, Any]]] = None,
    export_dir: Optional[Path] = None,
    gguf: Optional[dict[str, Any]] = None,
) -> None:
    """Write every file of the export into `out_dir`; the weights last, as they take longest."""
    write_config(info, params, out_dir)
    write_modeling_files(info, out_dir)
    if selected is not None:
        write_selected_dims(selected, out_dir)

    card.write_model_card(
        info, params, selected, out_dir, base_model=base_model, model_name=model_name, repo_id=repo_id,
        calibration=calibration, eval_records=eval_records, export_dir=export_dir or out_dir, gguf=gguf,
    )
    copy_tokenizer_files(info.checkpoint, out_dir, params.target_length)
    copy_license_files(info.checkpoint, out_dir)
    copy_weights(info.checkpoint, out_dir, link=link)

