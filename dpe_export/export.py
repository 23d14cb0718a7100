"""Write a DPE checkpoint: config with a `dpe` section, unchanged weights, tokenizer, generated modeling files.

Nothing is written until every input has been checked. The export is assembled in a hidden temporary
directory beside the output and renamed into place at the end, so an interrupted or failed export leaves
nothing behind and never a half-written output.
"""
from __future__ import annotations

import copy
import errno
import json
import logging
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from dpe_export import __version__
from dpe_export.architectures import ARCHITECTURES, Architecture, get_architecture, supported_families
from dpe_export.errors import DPEExportError
from dpe_export.resources import MODELING_TEMPLATES, dpe_core_path, load_dpe_core, resource_dir
from dpe_export.publish import file_sha256
from dpe_export.safefiles import links_in, safe_file

logger = logging.getLogger("dpe_export")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
MODELING_TEMPLATE = "modeling_dpe.py.jinja"
MODELING_FILE = "modeling_dpe.py"
DPE_CORE_FILE = "dpe_core.py"
MODEL_CARD_TEMPLATE = "model_card.md.jinja"
MODEL_CARD_FILE = "README.md"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# Any one of these makes a usable tokenizer; without them the export has none.
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# Licence terms travel with the weights (e.g. Llama's licence asks redistributors to include it).
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "NOTICE.txt", "USE_POLICY.md")
PICKLED_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")

_COPY_CHUNK = 16 << 20
_HF_CACHE_SNAPSHOT = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\][^/\\]+$")


# ----------------------------------------------------------------------------------------------------------
# Reading and checking the base model
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    """What the export needs to know about a base checkpoint directory."""

    model_dir: Path
    config: Any  # transformers PretrainedConfig, as AutoConfig loaded (and standardized) it
    architecture: Architecture
    head_dim: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    weight_files: list[str]  # names relative to model_dir: the index (if any) and the safetensors files
    rotary_dim: int = 0  # R: the head dims that rotate (head_dim unless the family rotates only part)

    @property
    def num_freqs(self) -> int:
        return (self.rotary_dim or self.head_dim) // 2


def inspect_model(model_dir) -> ModelInfo:
    """Check a base checkpoint directory and read what the export needs; DPEExportError when unusable."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    raw = read_config_json(model_dir)
    check_not_an_export(model_dir, raw)
    weight_files = find_weight_files(model_dir)
    config = load_base_config(model_dir)
    architecture = get_architecture(config)
    check_core_fields(model_dir, raw)
    head_dim = head_dim_of(config)
    max_pos = getattr(config, "max_position_embeddings", None)
    if not isinstance(max_pos, int) or max_pos < 1:
        raise DPEExportError(f"{model_dir / CONFIG_FILE} has no valid max_position_embeddings (got {max_pos!r})")
    check_weight_headers(model_dir, weight_files)
    check_weight_shapes(model_dir, weight_files, config)
    return ModelInfo(
        model_dir=model_dir,
        config=config,
        architecture=architecture,
        head_dim=head_dim,
        num_layers=int(config.num_hidden_layers),
        num_heads=int(config.num_attention_heads),
        max_position_embeddings=max_pos,
        weight_files=weight_files,
        rotary_dim=load_dpe_core().rotary_dim_of(config),
    )


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.exists():
        raise DPEExportError(f"model directory not found: {model_dir}")
    if not model_dir.is_dir():
        raise DPEExportError(f"model path is not a directory: {model_dir}")
    if safe_file(model_dir, CONFIG_FILE) is None:
        raise DPEExportError(
            f"{model_dir} has no {CONFIG_FILE}; give a Hugging Face checkpoint directory "
            "(e.g. a local clone or a snapshot from huggingface-cli download)"
        )


def find_weight_files(model_dir: Path) -> list[str]:
    """The weight files transformers would load: the index and its shards, or model.safetensors.

    Pickled checkpoints (pytorch_model.bin, ...) are refused, never loaded.
    """
    index = safe_file(model_dir, WEIGHTS_INDEX_FILE)
    if index is not None:
        shards = read_index_shards(index)
        missing = [s for s in shards if safe_file(model_dir, s) is None]
        if missing:
            raise DPEExportError(
                f"{index} lists {len(missing)} shard(s) missing from {model_dir}, e.g. {missing[0]}; "
                "is the download complete?"
            )
        files = [WEIGHTS_INDEX_FILE, *shards]
    elif safe_file(model_dir, WEIGHTS_FILE) is not None:
        files = [WEIGHTS_FILE]
    else:
        other = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if other:
            raise DPEExportError(
                f"{model_dir} has safetensors files ({', '.join(other[:3])}) but neither {WEIGHTS_FILE} nor "
                f"{WEIGHTS_INDEX_FILE}, so transformers could not load it"
            )
        pickled = sorted({p.name for pattern in PICKLED_WEIGHT_PATTERNS for p in model_dir.glob(pattern)})
        if pickled:
            raise DPEExportError(
                f"{model_dir} holds only pickled weights ({', '.join(pickled[:3])}); dpe-export reads safetensors "
                "only and never loads pickles: convert the checkpoint to safetensors first (in a trusted "
                "environment: model.save_pretrained(path, safe_serialization=True))"
            )
        raise DPEExportError(f"no safetensors weights ({WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}) in {model_dir}")
    skipped = sorted(p.name for p in model_dir.glob("*.safetensors") if p.name not in files)
    if skipped:
        logger.warning(
            "not copying %s: not part of the checkpoint that transformers loads (%s)",
            ", ".join(skipped),
            files[0],
        )
    return files


def read_index_shards(index: Path) -> list[str]:
    """Shard file names listed in a model.safetensors.index.json (plain file names only)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DPEExportError(f"{index} is not a valid safetensors index: {e}") from None
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
            raise DPEExportError(f"{index} lists an invalid shard name {shard!r} (must be a plain file name)")
    if not shards:
        raise DPEExportError(f"{index} lists no weight shards")
    return shards


def check_weight_headers(model_dir: Path, weight_files: Sequence[str]) -> None:
    """Read each safetensors header (not the tensors), so truncated downloads fail before any copying."""
    from safetensors import SafetensorError, safe_open

    for name in weight_files:
        if not name.endswith(".safetensors"):
            continue
        try:
            with safe_open(str(model_dir / name), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise DPEExportError(f"{model_dir / name} is not a valid safetensors file: {e}") from None


def read_config_json(model_dir: Path) -> dict[str, Any]:
    """config.json as a dict; DPEExportError when it cannot be read or is not a JSON object."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        if safe_file(model_dir, CONFIG_FILE) is None:
            raise OSError("no such file")
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DPEExportError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise DPEExportError(f"{path} must hold a JSON object")
    return raw


def load_base_config(model_dir: Path):
    """The base config via transformers.AutoConfig (which standardizes rope_parameters); never runs remote code."""
    path = model_dir / CONFIG_FILE
    raw = read_config_json(model_dir)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:  # transformers raises ValueError, OSError, KeyError, ... for bad configs
        model_type = raw.get("model_type")
        if model_type not in ARCHITECTURES:
            raise DPEExportError(
                f"model type {model_type!r} is not supported; supported families: {supported_families()}"
            ) from None
        reason = " ".join(str(e).split()) or type(e).__name__  # the whole reason, on one line
        raise DPEExportError(f"transformers cannot load {path}: {reason[:600]}") from None
    return config


CORE_CONFIG_FIELDS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def check_not_an_export(model_dir: Path, raw: dict[str, Any]) -> None:
    """An export's config describes the export (its max_position_embeddings is the target length): refuse it as
    a base model, naming what to do instead."""
    if "dpe" in raw:
        dpe = raw.get("dpe") if isinstance(raw.get("dpe"), dict) else {}
        written = raw.get("dpe_export_version") or "0.1.0 or earlier"
        raise DPEExportError(
            f"{model_dir} is already a DPE export (written by dpe-export {written}, pretrained length "
            f"{dpe.get('pretrain_length')!r}); convert its base model instead, or bring it up to date with "
            "`dpe-export upgrade`"
        )


def check_core_fields(model_dir: Path, raw: dict[str, Any]) -> None:
    missing = [k for k in CORE_CONFIG_FIELDS if k not in raw and k not in (raw.get("text_config") or {})]
    if missing:
        raise DPEExportError(f"{model_dir / CONFIG_FILE} lacks {', '.join(missing)}; transformers would fill in "
                             "its defaults, which do not describe these weights")


def check_weight_shapes(model_dir: Path, weight_files: Sequence[str], config) -> None:
    """The config must describe the weights: embedding, attention projections and layer count, from the
    safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for name in weight_files:
        if name.endswith(".safetensors"):
            with safe_open(str(model_dir / name), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = list(f.get_slice(key).get_shape())
    hd = head_dim_of(config)
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    expected = {
        "embed_tokens.weight": [int(config.vocab_size), hidden],
        "layers.0.self_attn.q_proj.weight": [heads * hd, hidden],
        "layers.0.self_attn.k_proj.weight": [kv * hd, hidden],
    }
    for suffix, want in expected.items():
        key = next((k for k in shapes if k == suffix or k.endswith("." + suffix)), None)
        if key is not None and shapes[key] != want:
            raise DPEExportError(f"{model_dir}: tensor {key} has shape {shapes[key]}, but {CONFIG_FILE} describes "
                                 f"{want}; the config does not match the weights")
    layers = {int(m.group(1)) for k in shapes for m in [re.search(r"(?:^|\.)layers\.(\d+)\.", k)] if m}
    if layers and max(layers) + 1 != int(config.num_hidden_layers):
        raise DPEExportError(f"{model_dir}: the weights have {max(layers) + 1} layers, but {CONFIG_FILE} says "
                             f"num_hidden_layers={config.num_hidden_layers}")


def head_dim_of(config) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % 2:
        raise DPEExportError(f"head_dim {head_dim} is odd; rotary embeddings need an even head dimension")
    return int(head_dim)


# ----------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------


def default_target_length(info: ModelInfo) -> int:
    return 4 * info.max_position_embeddings


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
    dpe_core = load_dpe_core()
    if dimension_groups_range is None:
        try:
            dimension_groups_range = dpe_core.even_group_boundaries(info.num_freqs, len(scale_factors))
        except ValueError as e:
            raise DPEExportError(f"invalid DPE parameters: {e}") from None
    params = dpe_core.DPEParams(
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
    dpe_core = load_dpe_core()
    pretrain = params.pretrain_length if params.pretrain_length is not None else info.max_position_embeddings
    resolved = dpe_core.DPEParams(
        local_window_size=params.local_window_size,
        scale_factors=_as_list(params.scale_factors),
        dimension_groups_range=_as_list(params.dimension_groups_range),
        target_length=params.target_length if params.target_length is not None else default_target_length(info),
        pretrain_length=pretrain,
        selected_dims=dpe_core.SELECTED_DIMS_FILENAME if selected is not None else None,
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


# ----------------------------------------------------------------------------------------------------------
# The output directory
# ----------------------------------------------------------------------------------------------------------


def check_output_target(output: Path, model_dir: Path, overwrite: bool) -> None:
    """Refuse outputs that would clobber data: an existing non-empty dir without overwrite, the model itself."""
    if output.is_symlink():
        raise DPEExportError(
            f"output {output} is a symbolic link; give the path it points to ({output.resolve()}) instead"
        )
    if output.exists():
        if not output.is_dir():
            raise DPEExportError(f"output {output} exists and is not a directory")
        if output.resolve() == model_dir.resolve():
            raise DPEExportError(f"output {output} is the model directory itself; choose another output")
        if overwrite and _is_within(model_dir.resolve(), output.resolve()):
            raise DPEExportError(f"the model directory {model_dir} is inside output {output}; --overwrite would delete it")
        if any(output.iterdir()) and not overwrite:
            raise DPEExportError(
                f"output directory {output} already exists and is not empty; pass --overwrite to replace it"
            )
        if overwrite and any(output.iterdir()):
            foreign = foreign_entries(output)
            if foreign:
                raise DPEExportError(
                    f"--overwrite replaces only an empty directory or an earlier DPE export, and {output} "
                    f"{foreign}; choose another output"
                )
    ancestor = output.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DPEExportError(f"cannot create output {output}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DPEExportError(f"cannot create output {output}: no write permission in {ancestor}")


# What an export directory holds: anything else in it means it is not (only) an export, so it is never deleted.
_EXPORT_FILE_PATTERNS = (
    r"config\.json", r"generation_config\.json", r"modeling_dpe\.py", r"dpe_core\.py", r"README\.md",
    r"model\.safetensors", r"model\.safetensors\.index\.json", r"model-\d+-of-\d+\.safetensors",
    r"dpe_selected_dims\.safetensors", r"dpe_[a-z_]+\.png", r"eval[\w.-]*\.json", r"\.gitattributes",
)


def foreign_entries(folder: Path) -> Optional[str]:
    """None when `folder` is a DPE export holding only files an export has; else why it is not (for messages)."""
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")) if (folder / CONFIG_FILE).is_file() else None
    except (OSError, ValueError):
        raw = None
    if not isinstance(raw, dict) or "dpe" not in raw:
        names = sorted(p.name for p in folder.iterdir())
        return f"is not a DPE export (it holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
    allowed = set(TOKENIZER_FILES) | set(LICENSE_FILES)
    for p in sorted(folder.iterdir()):
        if p.is_symlink() or not p.is_file():
            return f"holds {p.name}, which no export writes"
        if p.name not in allowed and not any(re.fullmatch(pat, p.name) for pat in _EXPORT_FILE_PATTERNS):
            return f"holds {p.name}, which no export writes"
    return None


_STAGING = re.compile(r"^\.(?P<name>.+)\.dpe-export-(?P<kind>tmp|old|src)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_staging(output: Path) -> list[Path]:
    """Remove the staging directories an interrupted convert of `output` left (its process is gone), and put
    back an earlier output that such a run had moved aside. Returns what was removed."""
    removed = []
    parent = output.parent
    if not parent.is_dir():
        return removed
    for entry in sorted(parent.iterdir()):
        m = _STAGING.match(entry.name)
        if not m or (m.group("name") != output.name and m.group("kind") != "src") or _pid_alive(int(m.group("pid"))):
            continue
        if entry.is_symlink() or not entry.is_dir():
            continue
        if m.group("kind") == "old" and not (output.exists() or output.is_symlink()):
            os.rename(entry, output)  # the run died between moving the old output aside and replacing it
            logger.warning("restored %s, which an interrupted convert (pid %s) had moved aside", output, m.group("pid"))
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        logger.warning("removed %s, left by an interrupted convert (pid %s)", entry, m.group("pid"))
    return removed


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _make_parents(path: Path) -> list[Path]:
    """mkdir -p path's parent; return the directories created (deepest last)."""
    created = []
    for p in reversed(path.parents):
        if not p.exists():
            p.mkdir()
            created.append(p)
    return created


def _sibling_name(output: Path, kind: str) -> Path:
    return output.parent / f".{output.name}.dpe-export-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def make_staging_dir(output: Path) -> Path:
    """A hidden, empty directory beside `output` (same file system, so it can be renamed into place)."""
    staging = _sibling_name(output, "tmp")
    staging.mkdir()  # honours the umask, unlike tempfile.mkdtemp's 0700
    return staging


def publish(staging: Path, output: Path, overwrite: bool) -> None:
    """Rename the finished export into place, replacing an existing output if allowed."""
    if output.is_dir() and not output.is_symlink() and not any(output.iterdir()):
        output.rmdir()
    if not (output.exists() or output.is_symlink()):
        os.rename(staging, output)
        return
    if not overwrite:  # it appeared while we were working
        raise DPEExportError(f"output {output} appeared while exporting; pass --overwrite to replace it")
    old = _sibling_name(output, "old")
    os.rename(output, old)  # move the old output aside, so that a failure here can put it back
    try:
        os.rename(staging, output)
    except BaseException:
        os.rename(old, output)
        raise
    if old.is_symlink() or not old.is_dir():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)
        if old.exists():
            logger.warning("could not delete all of the replaced output, left at %s", old)


# ----------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------


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
    written = json.loads((out_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    if written.get("dpe") != params.to_dict():  # pragma: no cover - guards against transformers dropping keys
        raise DPEExportError("transformers did not write the dpe section to config.json")


def write_selected_dims(selected, out_dir: Path) -> None:
    from safetensors.torch import save_file

    dpe_core = load_dpe_core()
    save_file(
        {dpe_core.SELECTED_DIMS_TENSOR: selected.to("cpu").contiguous()},
        str(out_dir / dpe_core.SELECTED_DIMS_FILENAME),
        metadata={"format": "pt", "dpe_format_version": str(dpe_core.DPE_FORMAT_VERSION)},
    )


def modeling_template_path() -> Path:
    return resource_dir(MODELING_TEMPLATES) / MODELING_TEMPLATE


def model_card_template_path() -> Path:
    return resource_dir(MODELING_TEMPLATES) / MODEL_CARD_TEMPLATE


def render_template(path: Path, variables: dict[str, Any], filters: Optional[dict[str, Any]] = None) -> str:
    """Render a jinja2 template file; undefined variables are errors."""
    import jinja2

    if not path.is_file():
        raise DPEExportError(f"template {path.name} not found in {path.parent}; the dpe-export installation is incomplete")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(path.parent)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters.update(filters or {})
    try:
        return env.get_template(path.name).render(**variables)
    except jinja2.TemplateError as e:
        raise DPEExportError(f"cannot render template {path}: {e}") from None


def render_modeling_source(arch: Architecture) -> str:
    """modeling_dpe.py for one family, rendered from the template (only registry data goes into it)."""
    dpe_core = load_dpe_core()
    variables = dict(arch.template_variables(), tool_version=__version__,
                     min_transformers=dpe_core.MIN_TRANSFORMERS_VERSION, max_transformers=dpe_core.MAX_TRANSFORMERS_VERSION)
    source = render_template(modeling_template_path(), variables)
    try:
        compile(source, MODELING_FILE, "exec")
    except SyntaxError as e:
        raise DPEExportError(f"the rendered {MODELING_FILE} is not valid Python (line {e.lineno}: {e.msg})") from None
    return source


def write_modeling_files(info: ModelInfo, out_dir: Path) -> None:
    """modeling_dpe.py rendered from the template, and dpe_core.py copied verbatim."""
    (out_dir / MODELING_FILE).write_text(render_modeling_source(info.architecture), encoding="utf-8")
    shutil.copyfile(dpe_core_path(), out_dir / DPE_CORE_FILE)


def config_auto_map(arch: Architecture) -> dict[str, str]:
    """Both Auto classes an export serves: AutoModel must not fall back to the base model's plain attention."""
    return {"AutoModel": f"{MODELING_FILE[:-3]}.{arch.dpe_prefix}Model",
            "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{arch.dpe_causal_lm_class}"}


def foreign_code(export_dir: Path, raw: dict[str, Any]) -> Optional[str]:
    """None when the export's code is exactly what this dpe-export writes (auto_map, modeling_dpe.py and
    dpe_core.py), so that loading it with trust_remote_code runs only our own code; else what differs."""
    arch = ARCHITECTURES.get(raw.get("model_type"))
    if arch is None:
        return f"its model type {raw.get('model_type')!r} is not one this dpe-export writes"
    if raw.get("auto_map") != config_auto_map(arch):
        return f"its config.json auto_map is {json.dumps(raw.get('auto_map'))[:200]}, not {json.dumps(config_auto_map(arch))}"
    for name, want in ((MODELING_FILE, render_modeling_source(arch).encode("utf-8")),
                       (DPE_CORE_FILE, dpe_core_path().read_bytes())):
        path = safe_file(export_dir, name)
        if path is None or path.read_bytes() != want:
            return f"its {name} is not the one dpe-export {__version__} writes"
    return None


# ----------------------------------------------------------------------------------------------------------
# Upgrading an export written by an earlier dpe-export
# ----------------------------------------------------------------------------------------------------------


@dataclass
class UpgradeResult:
    export_dir: Path
    written_by: Optional[str]  # the dpe-export version the export recorded (None: 0.1.0 recorded none)
    changed: list[str]  # generated files rewritten
    untouched: dict[str, str]  # every other file, name -> sha256, checked unchanged after the rewrite


def _regular_files(folder: Path) -> dict[str, Path]:
    """Every file under folder by relative name; a symlink anywhere is an error (never followed)."""
    links = links_in(folder)
    if links:
        raise DPEExportError(f"{links[0]} is a symbolic link; dpe-export does not follow links out of an export")
    files = {}
    for root, _, names in os.walk(folder, followlinks=False):
        for name in names:
            path = Path(root) / name
            files[path.relative_to(folder).as_posix()] = path
    return files


def upgrade_export(export_dir) -> UpgradeResult:
    """Rewrite the generated files of a DPE export with this dpe-export's runtime, in place.

    modeling_dpe.py and dpe_core.py are regenerated and config.json gets the current auto_map, architectures
    and dpe_export_version; weights, tokenizer, selection file and model card are not touched (their hashes
    are compared before and after). Each file is written to a temporary name and renamed into place, so an
    interrupted upgrade leaves every file either old or new. Files whose content is already current are left
    alone, so a following push uploads only what changed.
    """
    export_dir = Path(export_dir)
    if export_dir.is_symlink() or not export_dir.is_dir():
        raise DPEExportError(f"{export_dir} is not a directory")
    files = _regular_files(export_dir)
    if CONFIG_FILE not in files:
        raise DPEExportError(f"{export_dir} has no {CONFIG_FILE}; it is not a model directory")
    try:
        config = json.loads(files[CONFIG_FILE].read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DPEExportError(f"cannot read {files[CONFIG_FILE]}: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("dpe"), dict) or MODELING_FILE not in files:
        raise DPEExportError(f"{export_dir} is not a DPE export (no dpe section in {CONFIG_FILE} or no {MODELING_FILE})")
    arch = ARCHITECTURES.get(config.get("model_type"))
    if arch is None:
        raise DPEExportError(f"{export_dir}: model type {config.get('model_type')!r} is not one this dpe-export "
                             f"supports ({supported_families()})")
    try:
        load_dpe_core().DPEParams.from_dict(config["dpe"])
    except (TypeError, ValueError) as e:
        raise DPEExportError(f"{export_dir}: the dpe section of {CONFIG_FILE} is invalid: {e}") from None
    written_by = config.get("dpe_export_version")
    generated = {MODELING_FILE, DPE_CORE_FILE, CONFIG_FILE}
    before = {name: file_sha256(path) for name, path in files.items() if name not in generated}

    new_config = dict(config, auto_map=config_auto_map(arch), architectures=[arch.dpe_causal_lm_class],
                      dpe_export_version=__version__)
    wanted = {
        MODELING_FILE: render_modeling_source(arch).encode("utf-8"),
        DPE_CORE_FILE: dpe_core_path().read_bytes(),
        CONFIG_FILE: (json.dumps(new_config, indent=2, sort_keys=True) + "\n").encode("utf-8"),
    }
    changed = []
    for name, data in wanted.items():
        path = export_dir / name
        if path.is_file() and path.read_bytes() == data:
            continue
        tmp = export_dir / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        changed.append(name)
    after = {name: file_sha256(path) for name, path in _regular_files(export_dir).items() if name not in generated}
    if after != before:  # pragma: no cover - nothing above writes these
        raise DPEExportError(f"files other than the generated ones changed in {export_dir}: "
                             f"{sorted(set(after.items()) ^ set(before.items()))}")
    return UpgradeResult(export_dir, written_by, changed, before)


def copy_tokenizer_files(model_dir: Path, out_dir: Path, max_length: Optional[int] = None) -> list[str]:
    """Copy the tokenizer (and generation config) files that exist; warn when there is no tokenizer.

    A tokenizer_config.json `auto_map` (the base repo's own tokenizer code, possibly in another repo) is
    dropped, with a warning: the export must load with nothing but transformers' own tokenizer classes.
    """
    copied = _copy_present(model_dir, out_dir, TOKENIZER_FILES)
    tok_config = out_dir / "tokenizer_config.json"
    if "tokenizer_config.json" in copied:
        try:
            data = json.loads(tok_config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DPEExportError(f"{model_dir / 'tokenizer_config.json'} is not valid JSON: {e}") from None
        if isinstance(data, dict):
            if "auto_map" in data:
                logger.warning("dropping the auto_map of %s (%s): the export's tokenizer uses transformers' own code",
                               model_dir / "tokenizer_config.json", json.dumps(data["auto_map"])[:200])
                del data["auto_map"]
            if max_length is not None:
                data["model_max_length"] = max_length  # the export's target length, not the base's
            tok_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if not any(name in copied for name in TOKENIZER_VOCAB_FILES):
        logger.warning(
            "%s has no tokenizer (none of %s); the export will have none either",
            model_dir,
            ", ".join(TOKENIZER_VOCAB_FILES),
        )
    return copied


def copy_license_files(model_dir: Path, out_dir: Path) -> list[str]:
    return _copy_present(model_dir, out_dir, LICENSE_FILES)


def _copy_present(model_dir: Path, out_dir: Path, names: Sequence[str]) -> list[str]:
    """Copy the files of `names` that exist, as regular files; links out of the model directory are refused."""
    copied = []
    for name in names:
        src = safe_file(model_dir, name)
        if src is not None:
            shutil.copyfile(src, out_dir / name)
            copied.append(name)
    return copied


def copy_weights(model_dir: Path, out_dir: Path, names: Sequence[str], link: bool = False) -> None:
    """Copy (or hard-link) weight files unchanged, with a byte progress bar on a terminal.

    Linking falls back to copying, with a warning, where the file system refuses (e.g. across devices).
    """
    from tqdm.auto import tqdm

    # resolve: HF cache files are links into the entry's blobs/ (safe_file allows those and nothing else)
    sources = [(name, safe_file(model_dir, name).resolve()) for name in names]
    total = sum(src.stat().st_size for _, src in sources)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="Linking weights" if link else "Copying weights",
        disable=None,  # only on a terminal
        file=sys.stderr,
        leave=False,
    ) as progress:
        for name, src in sources:
            dst = out_dir / name
            if link:
                try:
                    os.link(src, dst)
                    progress.update(src.stat().st_size)
                    continue
                except OSError as e:
                    logger.warning("cannot hard-link weights (%s); copying them instead", e.strerror or e)
                    link = False
            copy_file_with_progress(src, dst, progress.update)
            if dst.stat().st_size != src.stat().st_size:  # pragma: no cover - e.g. the source changed meanwhile
                raise DPEExportError(f"copying {src} produced a file of a different size")


def copy_file_with_progress(src: Path, dst: Path, update) -> None:
    """Copy bytes from src to dst (kernel-side where possible), calling update(n) as they go."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        use_sendfile = hasattr(os, "sendfile")
        while True:
            if use_sendfile:
                try:
                    n = os.sendfile(fout.fileno(), fin.fileno(), None, _COPY_CHUNK)
                except OSError as e:
                    if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) and fout.tell() == 0:
                        use_sendfile = False
                        continue
                    raise
            else:
                chunk = fin.read(_COPY_CHUNK)
                n = len(chunk)
                fout.write(chunk)
            if n == 0:
                break
            update(n)


# ----------------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------------


def guess_base_model(model_dir: Path) -> Optional[str]:
    """The Hub id of a Hugging Face cache snapshot directory (models--org--name/snapshots/<rev>), else None."""
    m = _HF_CACHE_SNAPSHOT.search(str(model_dir.resolve()))
    return f"{m.group(1)}/{m.group(2)}" if m else None


# ----------------------------------------------------------------------------------------------------------
# The export
# ----------------------------------------------------------------------------------------------------------


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

    `params` is a dpe_core.DPEParams; its missing lengths are defaulted (pretrain: the base
    max_position_embeddings; target: 4 x that) and its selected_dims is set from `selected`, a bool
    tensor [layers, heads, head_dim/2] or None (all frequencies). `base_model` is the Hub id named in the
    model card (default: guessed from a Hugging Face cache path); `repo_id` the Hub repo the card names (default:
    the output directory's name); `calibration` and `eval_records` optional card sections (see dpe_export.card).
    DPEExportError for any bad input, raised before anything is written.
    `model_dir` may also be the ModelInfo that inspect_model returned for it, to skip reading it again.
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
        base_model = guess_base_model(info.model_dir)
    if base_model is None:
        logger.warning("no Hub id of the base model is known, so the model card cannot name or link it "
                       "(pass --base-model ORG/NAME)")
    from dpe_export.card import read_base_license

    if not read_base_license(info.model_dir, read_config_json(info.model_dir)):
        logger.warning("the base model states no license (README.md front matter or config.json), so the model "
                       "card states none; check the base model's terms before publishing")
    if calibration is not None:
        from dpe_export.card import normalize_calibration

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
        publish(staging, output, overwrite)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for parent in reversed(created_parents):
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    return output


def export_difference(output, info: ModelInfo, params, selected=None) -> Optional[str]:
    """None when `output` is exactly a finished export of this model with these parameters (so that re-running
    `convert --push` after a failed upload can push it); else what differs, for messages. Generated code is
    compared with a fresh render, copied files with the base model's by hash."""
    output = Path(output)
    try:
        raw = read_config_json(output)
        params = resolve_params(params, info, selected)
    except DPEExportError:
        return "it is not a DPE export"
    if raw.get("dpe") != params.to_dict():
        return "it was exported with other DPE settings"
    foreign = foreign_code(output, raw) or foreign_entries(output)
    if foreign:
        return foreign
    names = list(info.weight_files) + [n for n in (*TOKENIZER_FILES, *LICENSE_FILES)
                                       if n != "tokenizer_config.json" and safe_file(info.model_dir, n) is not None]
    for name in names:
        src, dst = safe_file(info.model_dir, name), output / name
        if not dst.is_file() or dst.is_symlink() or src.stat().st_size != dst.stat().st_size or file_sha256(src) != file_sha256(dst):
            return f"its {name} differs from the base model's"
    tok = safe_file(info.model_dir, "tokenizer_config.json")
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
    dpe_core = load_dpe_core()
    sel_path = output / dpe_core.SELECTED_DIMS_FILENAME
    if (selected is None) != (not sel_path.is_file()):
        return f"its {dpe_core.SELECTED_DIMS_FILENAME} does not match the selection"
    if selected is not None:
        import torch
        from safetensors.torch import load_file

        if not torch.equal(load_file(str(sel_path))[dpe_core.SELECTED_DIMS_TENSOR], selected.cpu()):
            return f"its {dpe_core.SELECTED_DIMS_FILENAME} holds another selection"
    return None


def holds_same_export(output, info: ModelInfo, params, selected=None) -> bool:
    return export_difference(output, info, params, selected) is None


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
    from dpe_export import card

    card.write_model_card(
        info, params, selected, out_dir, base_model=base_model, model_name=model_name, repo_id=repo_id,
        calibration=calibration, eval_records=eval_records, export_dir=export_dir or out_dir, gguf=gguf,
    )
    copy_tokenizer_files(info.model_dir, out_dir, params.target_length)
    copy_license_files(info.model_dir, out_dir)
    copy_weights(info.model_dir, out_dir, info.weight_files, link=link)


def output_summary(output: Path) -> list[tuple[str, int]]:
    """(name, size in bytes) of each file in an export, sorted by name."""
    return sorted((p.name, p.stat().st_size) for p in Path(output).iterdir() if p.is_file())
