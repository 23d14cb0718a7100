"""A checkpoint directory and everything dpe-export reads from it, read once and safely: `Checkpoint` answers
what the stages ask of a model directory (is it a DPE export, its dpe section, its pretraining length, head and
rotary dims, license, weight, tokenizer and license files) from one read of config.json, through the safe readers
below: config.json and the safetensors index are parsed as JSON, safetensors headers read without loading
tensors, no pickle is ever unpickled, no link out of the directory is followed (safefiles.safe_file) and no code
of the model's own runs. `inspect_model` checks a base model for export (shapes and tensor coverage from the
headers). The files an export writes are copied by dpe_export/export/copying.py.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from dpe_export.architectures import (
    ARCHITECTURES,
    EXPORT_MODEL_TYPE_PREFIX,
    Architecture,
    get_architecture,
    supported_families,
)
from dpe_export.errors import DPEExportError, first_line
from dpe_export.generated import MODEL_CARD_FILE
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


_HF_CACHE_SNAPSHOT = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\][^/\\]+$")


# A Hub license id, and a license link a card may carry: only such values are taken from a base model's card.
LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]{0,63}$")


SAFE_LINK = re.compile(r"^(?:https?://[A-Za-z0-9._~:/?#@!$&'()*+,;=%-]{1,400}|[A-Za-z0-9._-]{1,100})$")


class Checkpoint:
    """One model directory (a base checkpoint or a DPE export), each fact read once and kept.

    Nothing is read on construction: `check()` runs the directory checks every command runs first (the
    directory exists, holds config.json, and nothing in it leads outside), `raw` is config.json as read once by
    read_config_json, and every other fact is derived from those or read on first use. Stages pass the
    Checkpoint on instead of the path, so no stage reads config.json again.
    """

    TOKENIZER_VOCAB_FILES = TOKENIZER_VOCAB_FILES

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self._checked = False

    @classmethod
    def of(cls, model: Union["Checkpoint", "ModelInfo", str, Path]) -> "Checkpoint":
        """`model` itself when it is a Checkpoint (or a ModelInfo's), else a new Checkpoint of that directory."""
        if isinstance(model, Checkpoint):
            return model
        if isinstance(model, ModelInfo):
            return model.checkpoint
        return cls(model)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    def __str__(self) -> str:  # the directory, as messages and records name it
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    def check(self) -> "Checkpoint":
        """The checks of a model directory (check_model_dir), run once; returns self."""
        if not self._checked:
            check_model_dir(self.path)
            self._checked = True
        return self

    def file(self, name: str) -> Optional[Path]:
        """The regular file `name` of the directory, or None (safe_file: a link out of it is refused)."""
        return safe_file(self.path, name)

    @property
    def has_config(self) -> bool:
        return "raw" in self.__dict__ or self.file(CONFIG_FILE) is not None

    @cached_property
    def raw(self) -> dict[str, Any]:
        """config.json as a dict, read once (read_config_json: sizes checked, one-line errors)."""
        return read_config_json(self.path)

    @property
    def is_export(self) -> bool:
        """Whether this is a DPE export: its config.json has a dpe section. The one place that decides."""
        return "dpe" in self.raw

    @property
    def dpe(self) -> dict[str, Any]:
        """An export's dpe section ({} for a base model, or where the section is not an object)."""
        dpe = self.raw.get("dpe")
        return dpe if isinstance(dpe, dict) else {}

    @property
    def written_by(self) -> Optional[str]:
        """The dpe-export version that wrote an export (None before 0.2.0, and for base models)."""
        return self.raw.get("dpe_export_version")

    @property
    def model_type(self) -> Any:
        return self.raw.get("model_type")

    @property
    def text_config(self) -> dict[str, Any]:
        """The language model's part of config.json (a multimodal config's text_config, else all of it)."""
        text = self.raw.get("text_config")
        return text if isinstance(text, dict) else self.raw

    @property
    def pretraining_length(self) -> Optional[int]:
        """The length the base model was trained at: an export's recorded pretrain_length, a base model's
        max_position_embeddings; None when config.json states no valid one."""
        value = self.dpe.get("pretrain_length") if self.is_export else self.raw.get("max_position_embeddings")
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None

    def require_pretraining_length(self) -> int:
        """pretraining_length, or DPEExportError naming the config when it states none."""
        if self.pretraining_length is None:
            key, value = ("dpe.pretrain_length", self.dpe.get("pretrain_length")) if self.is_export else \
                ("max_position_embeddings", self.raw.get("max_position_embeddings"))
            raise DPEExportError(f"{self.path / CONFIG_FILE} has no valid {key} (got {value!r})")
        return self.pretraining_length

    @property
    def head_dim(self) -> int:
        """The attention head dimension config.json describes (head_dim, else hidden_size / heads); for sizing
        memory before anything is loaded. The rotating part of it is `rotary_dim`."""
        cfg = self.text_config
        heads = int(cfg.get("num_attention_heads") or 1)
        return int(cfg.get("head_dim") or int(cfg.get("hidden_size") or 1) // heads)

    @cached_property
    def config(self):
        """The base model's transformers config (load_base_config: AutoConfig, never remote code), loaded once."""
        return load_base_config(self)

    @property
    def rotary_dim(self) -> int:
        """R: how many head dims rotate (the head dim unless the family rotates only part); twice the number of
        rotary frequencies."""
        return int(dpe_family.rotary_dim_of(self.config))

    @cached_property
    def weight_files(self) -> list[str]:
        """find_weight_files: the index and its shards, or model.safetensors (pickles refused)."""
        return find_weight_files(self.path)

    @property
    def tokenizer_files(self) -> list[str]:
        """The tokenizer (and generation config) files present, as regular files inside the directory."""
        return [name for name in TOKENIZER_FILES if self.file(name) is not None]

    @property
    def has_tokenizer(self) -> bool:
        return any(self.file(name) is not None for name in TOKENIZER_VOCAB_FILES)

    @property
    def license_files(self) -> list[str]:
        """The license and notice files present (they travel with the weights)."""
        return [name for name in LICENSE_FILES if self.file(name) is not None]

    @cached_property
    def license(self) -> dict[str, str]:
        """The license the model states (read_base_license: README.md front matter, else config.json)."""
        return read_base_license(self.path, self.raw)

    @property
    def hub_id(self) -> Optional[str]:
        """The Hub id of a Hugging Face cache snapshot directory, else None (guess_base_model)."""
        return guess_base_model(self.path)


@dataclass
class ModelInfo:
    """A base checkpoint checked for export (inspect_model), with what the export needs to know about it."""

    checkpoint: Checkpoint
    config: Any  # transformers PretrainedConfig, as AutoConfig loaded (and standardized) it
    architecture: Architecture
    head_dim: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    weight_files: list[str]  # names relative to model_dir: the index (if any) and the safetensors files
    rotary_dim: int = 0  # R: the head dims that rotate (head_dim unless the family rotates only part)

    @property
    def model_dir(self) -> Path:
        return self.checkpoint.path

    @property
    def num_freqs(self) -> int:
        return (self.rotary_dim or self.head_dim) // 2

    @property
    def default_target_length(self) -> int:
        return 4 * self.max_position_embeddings


def inspect_model(model) -> ModelInfo:
    """Check a base checkpoint (a directory or its Checkpoint) and read what the export needs; DPEExportError
    when unusable."""
    ckpt = Checkpoint.of(model).check()
    model_dir, raw = ckpt.path, ckpt.raw
    check_not_an_export(ckpt)
    weight_files = ckpt.weight_files
    config = ckpt.config
    architecture = get_architecture(config)
    check_core_fields(model_dir, raw)
    head_dim = head_dim_of(config)
    max_pos = ckpt.require_pretraining_length()
    check_weight_headers(model_dir, weight_files)
    check_weight_shapes(model_dir, weight_files, config)
    check_tensor_coverage(model_dir, weight_files, config)
    return ModelInfo(
        checkpoint=ckpt,
        config=config,
        architecture=architecture,
        head_dim=head_dim,
        num_layers=int(config.num_hidden_layers),
        num_heads=int(config.num_attention_heads),
        max_position_embeddings=max_pos,
        weight_files=weight_files,
        rotary_dim=ckpt.rotary_dim,
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


def load_base_config(model):
    """The base config via transformers.AutoConfig (which standardizes rope_parameters); never runs remote code.
    `model`: a directory or its Checkpoint (whose config.json is then not read again)."""
    ckpt = Checkpoint.of(model)
    model_dir, raw = ckpt.path, ckpt.raw
    path = model_dir / CONFIG_FILE
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type.startswith(EXPORT_MODEL_TYPE_PREFIX) and not ckpt.is_export:
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


def check_not_an_export(ckpt: Checkpoint) -> None:
    """An export's config describes the export (its max_position_embeddings is the target length): refuse it as
    a base model, naming what to do instead."""
    if ckpt.is_export:
        raise DPEExportError(
            f"{ckpt.path} is already a DPE export (written by dpe-export {ckpt.written_by or '0.1.0 or earlier'}, "
            f"pretrained length {ckpt.dpe.get('pretrain_length')!r}); convert its base model instead, or bring it up "
            "to date with `dpe-export upgrade`"
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
    """The head dimension of a transformers config (dpe_core's reading), refused when odd."""
    head_dim = dpe_family.head_dim_of(config)
    if head_dim % 2:
        raise DPEExportError(f"head_dim {head_dim} is odd; rotary embeddings need an even head dimension")
    return int(head_dim)


def read_base_license(model_dir: Path, raw_config: Optional[dict] = None) -> dict[str, str]:
    """The base model's license from its README.md front matter (else config.json): {} when it says none.

    Returns {"license": id} with a Hub-style id, plus license_name / license_link when the card gives them in a
    safe form. A license string that is not a plain id becomes {"license": "other", "license_text": <it>}: the
    front matter keeps a valid id and the card body shows the original text (escaped).
    """
    meta: dict[str, Any] = {}
    readme = safe_file(model_dir, MODEL_CARD_FILE)
    if readme is not None:
        try:
            meta = _front_matter(readme.read_text(encoding="utf-8", errors="replace"))
        except Exception as e:  # a broken card is the base model's problem, not a reason to fail the export
            logger.warning("cannot read the front matter of %s (%s); the card will not name a license", readme, e)
            meta = {}
    value = meta.get("license")
    if value is None and isinstance(raw_config, dict):
        value = raw_config.get("license")
    if isinstance(value, list) and value:
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        return {}
    value = value.strip()
    out: dict[str, str] = {}
    if LICENSE_ID.match(value):
        out["license"] = value
    else:
        out["license"] = "other"
        out["license_text"] = value
    for key in ("license_name", "license_link"):
        v = meta.get(key)
        if isinstance(v, str) and v.strip():
            v = v.strip()
            ok = LICENSE_ID.match(v) if key == "license_name" else SAFE_LINK.match(v)
            if ok:
                out[key] = v
    return out


def _front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a model card as a dict ({} when there is none), with huggingface_hub's parser."""
    from huggingface_hub import ModelCard

    if not text.lstrip().startswith("---"):  # no front matter (huggingface_hub would say so on stderr)
        return {}
    data = ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    return data if isinstance(data, dict) else {}


def guess_base_model(model_dir: Path) -> Optional[str]:
    """The Hub id of a Hugging Face cache snapshot directory (models--org--name/snapshots/<rev>), else None."""
    m = _HF_CACHE_SNAPSHOT.search(str(Path(model_dir).resolve()))
    return f"{m.group(1)}/{m.group(2)}" if m else None

