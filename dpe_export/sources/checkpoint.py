"""What a checkpoint directory holds and how it is read safely: config.json, the safetensors weight files and
their index, shape and field checks, the tokenizer and license files (copied without following links), and the
base model's Hub id when it sits in a Hugging Face cache.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from dpe_export.architectures import (
    ARCHITECTURES,
    EXPORT_MODEL_TYPE_PREFIX,
    Architecture,
    get_architecture,
    supported_families,
)
from dpe_export.errors import DPEExportError, first_line
from dpe_export.safefiles import check_model_tree, safe_file
from dpe_export.modeling_templates import dpe_family

logger = logging.getLogger("dpe_export")


CONFIG_FILE = "config.json"


WEIGHTS_FILE = "model.safetensors"


WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


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
    check_tensor_coverage(model_dir, weight_files, config)
    return ModelInfo(
        model_dir=model_dir,
        config=config,
        architecture=architecture,
        head_dim=head_dim,
        num_layers=int(config.num_hidden_layers),
        num_heads=int(config.num_attention_heads),
        max_position_embeddings=max_pos,
        weight_files=weight_files,
        rotary_dim=dpe_family.rotary_dim_of(config),
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
    check_model_tree(model_dir)  # every command that reads a model directory comes through here


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
    """config.json as a dict, its sizes checked (check_config_sizes); DPEExportError when it cannot be read, is not
    a JSON object, or describes a model no machine could hold."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        if safe_file(model_dir, CONFIG_FILE) is None:
            raise OSError("no such file")
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DPEExportError(f"cannot read {path}: {e}") from None
    except RecursionError:
        raise DPEExportError(f"{path} is nested too deeply to be a model config") from None
    if not isinstance(raw, dict):
        raise DPEExportError(f"{path} must hold a JSON object")
    check_config_sizes(raw, path)
    return raw


# Far beyond any released model (Llama 3.1 405B: 126 layers, 128 heads, hidden 16384; Gemma 3: vocabulary
# 262144), and small enough that nothing sized by them is allocated before the weights are checked.
SIZE_LIMITS = {"num_hidden_layers": 1 << 12, "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12,
               "head_dim": 1 << 12, "hidden_size": 1 << 17, "intermediate_size": 1 << 20,
               "moe_intermediate_size": 1 << 20, "num_experts": 1 << 12, "vocab_size": 1 << 24,
               "max_position_embeddings": 1 << 30}


def check_config_sizes(raw: dict[str, Any], where) -> None:
    """Refuse, before anything is allocated, a config whose sizes no model has (SIZE_LIMITS): every command
    reads the config first and sizes lists, caches and estimates from it."""
    for cfg in (raw, raw.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        for key, limit in SIZE_LIMITS.items():
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= limit:
                raise DPEExportError(f"{where}: {key} = {value} is not a size any model has (dpe-export accepts "
                                     f"0 to {limit})")


def load_base_config(model_dir: Path):
    """The base config via transformers.AutoConfig (which standardizes rope_parameters); never runs remote code."""
    path = model_dir / CONFIG_FILE
    raw = read_config_json(model_dir)
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type.startswith(EXPORT_MODEL_TYPE_PREFIX) and "dpe" not in raw:
        raise DPEExportError(f"{path} has the model type {model_type!r} of a DPE export but no dpe section (edited or "
                             "damaged); convert the base model again")
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


def check_tensor_coverage(model_dir: Path, weight_files: Sequence[str], config) -> None:
    """Every tensor the architecture needs is in the weights (from the safetensors headers): a tensor missing
    there would be freshly initialised, at random, wherever the export is loaded. The model is built on the meta
    device (nothing allocated); a tensor is present when the weights hold it, or when its module holds no tensor of
    its own in the weights but tensors of submodules (checkpoints that store in parts what transformers fuses, such
    as Qwen3-MoE's experts)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    keys: set[str] = set()
    for name in weight_files:
        if name.endswith(".safetensors"):
            with safe_open(str(model_dir / name), framework="pt") as f:
                keys.update(f.keys())
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # pragma: no cover - the config loaded above; this is not expected to fail
        raise DPEExportError(f"transformers cannot build the model {model_dir / CONFIG_FILE} describes: "
                             f"{first_line(e)}") from None
    expected = model.state_dict()
    loaded = _names_after_loading(keys, model, expected)
    if loaded is None:  # a release without the conversion API: names as saved, the base-model prefix either way
        prefix = getattr(model, "base_model_prefix", "model") + "."
        loaded = keys | {k[len(prefix):] for k in keys if k.startswith(prefix)} | {prefix + k for k in keys}
    direct = {k.rsplit(".", 1)[0] for k in loaded}  # modules holding tensors of their own
    deeper = {k[:i] for k in loaded for i in range(len(k)) if k[i] == "."} - direct  # only through submodules
    tied = set()
    if getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "tie_word_embeddings",
               False):
        tied = set(getattr(model, "all_tied_weights_keys", None) or {}) or {k for k in expected if
                                                                            k.startswith("lm_head.")}
    missing = [k for k in expected if k not in loaded and k not in tied and k.rsplit(".", 1)[0] not in deeper]
    if missing:
        raise DPEExportError(f"{model_dir}: the weights lack {len(missing)} tensor(s) the {config.model_type} "
                             f"architecture needs (e.g. {missing[0]}); transformers would fill them with random "
                             "values: is the checkpoint complete?")


def _names_after_loading(keys: set[str], model, expected: dict) -> Optional[set[str]]:
    """The parameter names transformers loads these checkpoint names as (its renamings and conversions, e.g.
    GPT-NeoX's embed_out -> lm_head, Qwen3-MoE's per-expert weights -> fused experts); None where the release has
    no such API (they came with transformers 5's loader; PEFT uses the same two functions)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        prefix = getattr(model, "base_model_prefix", None)
        return {rename_source_key(k, renamings, converters, prefix, expected)[0] for k in keys}
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


def head_dim_of(config) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % 2:
        raise DPEExportError(f"head_dim {head_dim} is odd; rotary embeddings need an even head dimension")
    return int(head_dim)


def default_target_length(info: ModelInfo) -> int:
    return 4 * info.max_position_embeddings


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
            try:
                shutil.copyfile(src, out_dir / name)
            except OSError as e:
                raise DPEExportError(f"cannot write {out_dir / name}: {e.strerror or e}") from None
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
    """Copy bytes from src to dst (kernel-side where possible), calling update(n) as they go; a write error (a full
    disk) is one line naming dst."""
    try:
        _copy_bytes(src, dst, update)
    except OSError as e:
        raise DPEExportError(f"cannot write {dst}: {e.strerror or e}") from None


def _copy_bytes(src: Path, dst: Path, update) -> None:
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


def guess_base_model(model_dir: Path) -> Optional[str]:
    """The Hub id of a Hugging Face cache snapshot directory (models--org--name/snapshots/<rev>), else None."""
    m = _HF_CACHE_SNAPSHOT.search(str(model_dir.resolve()))
    return f"{m.group(1)}/{m.group(2)}" if m else None

