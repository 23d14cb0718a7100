"""Where a base model comes from: a Hub repo id, a local checkpoint directory, or a GGUF file.

`resolve_model(SOURCE)` turns what the user typed after `--model` into a local checkpoint directory that the
rest of dpe-export reads:
- ORG/NAME (optionally with a revision): the files an export needs are downloaded through huggingface_hub into
  its normal cache (progress bars, resumable, HF_TOKEN or `hf auth login`, HF_HUB_OFFLINE=1 served from the
  cache). Only config, generation config, safetensors weights and their index, tokenizer files and the README
  and license files are fetched; pickles never are, and a repo with only pickled weights is refused.
- a directory: a local checkpoint, or a Hugging Face cache snapshot (models--org--name/snapshots/<rev>).
- a .gguf file (or a directory with `gguf_file`): loaded through transformers' GGUF support, dequantized and
  written as safetensors (with the tokenizer transformers converts from the GGUF) into a temporary directory
  beside the output, removed when the work is done.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dpe_export.errors import DPEExportError

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
GGUF_MAGIC = b"GGUF"


def hub_patterns() -> list[str]:
    """The files of a Hub repo an export needs (allow_patterns for snapshot_download)."""
    from dpe_export.export import LICENSE_FILES, TOKENIZER_FILES

    return ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
            "README.md", *TOKENIZER_FILES, *LICENSE_FILES]


@dataclass
class ModelSource:
    """A resolved --model: `path` is a local checkpoint directory the rest of dpe-export reads."""

    spec: str
    kind: str  # "hub", "dir" or "gguf"
    path: Path
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    gguf: dict[str, Any] = field(default_factory=dict)  # file, quantization, dtype (for the card)
    temporary: Optional[Path] = None  # removed by cleanup()
    text_of: Optional[str] = None  # the multimodal model type whose text model `path` holds

    def cleanup(self) -> None:
        if self.temporary is not None and self.temporary.exists():
            shutil.rmtree(self.temporary, ignore_errors=True)
        self.temporary = None

    def __enter__(self) -> "ModelSource":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def describe_sources() -> str:
    return "a Hub repo id ORG/NAME, a local checkpoint directory, or a .gguf file"


def resolve_model(spec, *, revision: Optional[str] = None, gguf_file: Optional[str] = None,
                  dtype: Optional[str] = None, workdir: Optional[Path] = None) -> ModelSource:
    """Resolve SOURCE; DPEExportError (one line) when it is none of the three or cannot be had.

    `workdir`: where a GGUF's dequantized checkpoint is written (a hidden directory beside the output).
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if gguf_file is not None:
        if not path.is_dir():
            raise DPEExportError(f"--gguf-file needs --model DIR, the directory that holds {gguf_file}; {spec} is not one")
        if Path(gguf_file).name != gguf_file:
            raise DPEExportError(f"--gguf-file must be a file name inside {spec}, got {gguf_file!r}")
        path = path / gguf_file
    if path.is_file() or spec.lower().endswith(".gguf"):
        if revision is not None:
            raise DPEExportError("--model-revision applies to Hub repo ids, not to files")
        return _from_gguf(spec, path, dtype, workdir)
    if path.is_dir():
        if revision is not None:
            raise DPEExportError("--model-revision applies to Hub repo ids, not to local directories")
        return text_model_of(ModelSource(spec, "dir", path), workdir)
    if HUB_ID.match(spec) and ".." not in spec and not spec.startswith((".", "/", "~")):
        return text_model_of(_from_hub(spec, revision), workdir)
    raise DPEExportError(f"--model {spec!r} is neither a local directory, a .gguf file nor a Hub repo id "
                         "ORG/NAME (no such file or directory)")


# ----------------------------------------------------------------------------------------------------------
# Multimodal checkpoints: their text model
# ----------------------------------------------------------------------------------------------------------


def text_model_of(source: ModelSource, workdir: Optional[Path] = None) -> ModelSource:
    """`source` itself, or for a multimodal checkpoint whose language model is a registered family
    (architectures.WRAPPERS, e.g. Gemma 3 4B-27B) its text model, written as a checkpoint of that family into
    a temporary directory: the text config, the renamed language-model weights (the vision tower and projector
    are left out), tokenizer, generation config, README and license files."""
    import json

    from dpe_export.architectures import ARCHITECTURES, WRAPPERS
    from dpe_export.export import (CONFIG_FILE, copy_license_files, copy_tokenizer_files, find_weight_files,
                                   read_config_json)
    from dpe_export.safefiles import safe_file

    raw = read_config_json(source.path) if safe_file(source.path, "config.json") is not None else {}
    wrap = WRAPPERS.get(raw.get("model_type"))
    if wrap is None:
        return source
    text = raw.get(wrap.text_config_key)
    if not isinstance(text, dict):
        raise DPEExportError(f"this {wrap.model_type} config has no {wrap.text_config_key!r} object")
    arch = ARCHITECTURES[wrap.text_model_type]
    text = {**text, "model_type": wrap.text_model_type, "architectures": [arch.causal_lm_class]}
    for name in ("dtype", "torch_dtype"):
        if name in raw and name not in text:
            text[name] = raw[name]
    if "tie_word_embeddings" in raw:  # the multimodal model ties (or not) by its own config, not the text one's
        text["tie_word_embeddings"] = raw["tie_word_embeddings"]
    names = find_weight_files(source.path)
    base = Path(workdir) if workdir is not None else source.path.parent
    base.mkdir(parents=True, exist_ok=True)
    import secrets

    tmp = base / f".{source.path.name}.dpe-export-text-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    out = ModelSource(source.spec, source.kind, tmp, hub_id=source.hub_id, revision=source.revision,
                      temporary=tmp, text_of=wrap.model_type)
    try:
        logger.info("taking the text model of the %s checkpoint %s", wrap.model_type, source.path)
        kept = _renamed_weights(source.path, [n for n in names if n.endswith(".safetensors")], wrap.renames, tmp)
        if not any(k.startswith("model.") for k in kept):
            raise DPEExportError(f"no language-model weights in this {wrap.model_type} checkpoint")
        if "lm_head.weight" not in kept and not text.get("tie_word_embeddings", True):
            raise DPEExportError(f"this {wrap.model_type} checkpoint has no lm_head weight and untied embeddings")
        if "lm_head.weight" in kept and "tie_word_embeddings" not in text:
            text["tie_word_embeddings"] = False
        (tmp / CONFIG_FILE).write_text(json.dumps(text, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        copy_tokenizer_files(source.path, tmp)
        copy_license_files(source.path, tmp)
        if safe_file(source.path, "README.md") is not None:
            shutil.copyfile(source.path / "README.md", tmp / "README.md")
    except BaseException:
        out.cleanup()
        source.cleanup()
        raise
    source.cleanup()
    return out


def _renamed_weights(model_dir: Path, shards: list[str], renames, out_dir: Path) -> set[str]:
    """Write each safetensors shard's kept tensors, renamed, to out_dir (same shard names, a new index)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from dpe_export.export import WEIGHTS_INDEX_FILE
    from dpe_export.safefiles import safe_file

    kept: dict[str, str] = {}
    for shard in shards:
        path = safe_file(model_dir, shard)
        if path is None:
            raise DPEExportError(f"weight file {shard} is missing")
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for name in f.keys():
                new = next((new + name[len(old):] for old, new in renames if name.startswith(old)), None)
                if new is not None:
                    if new in kept or new in tensors:
                        raise DPEExportError(f"two weights of the checkpoint map to {new}")
                    tensors[new] = f.get_tensor(name)
        if tensors:
            save_file(tensors, str(out_dir / shard), metadata={**meta, "format": "pt"})
            kept.update(dict.fromkeys(tensors, shard))
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(kept.items()))}
        (out_dir / WEIGHTS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return set(kept)


# ----------------------------------------------------------------------------------------------------------
# The Hub
# ----------------------------------------------------------------------------------------------------------


def _from_hub(repo_id: str, revision: Optional[str]) -> ModelSource:
    from huggingface_hub import constants, snapshot_download

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        if not offline:
            from huggingface_hub import HfApi

            info = HfApi().model_info(repo_id, revision=revision)
            _check_hub_files(repo_id, [s.rfilename for s in (info.siblings or [])])
        local = snapshot_download(repo_id, revision=revision, allow_patterns=hub_patterns(), repo_type="model")
    except DPEExportError:
        raise
    except Exception as e:  # huggingface_hub's many error types, mapped to one line each
        raise DPEExportError(_describe_hub_error(e, repo_id, revision, offline)) from None
    path = Path(local)
    if not (path / "config.json").is_file():
        raise DPEExportError(f"{repo_id} has no config.json; it is not a transformers checkpoint")
    if offline:
        _check_hub_files(repo_id, [p.name for p in path.iterdir()])
    return ModelSource(repo_id, "hub", path, hub_id=repo_id, revision=revision)


def _check_hub_files(repo_id: str, names: list[str]) -> None:
    if any(n.endswith(".safetensors") for n in names):
        return
    pickled = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise DPEExportError(
            f"{repo_id} has only pickled weights ({', '.join(pickled[:3])}); dpe-export never loads pickles. "
            "Convert them to safetensors in a trusted environment (model.save_pretrained(dir)) and give that "
            "directory, or use a repo that ships safetensors"
        )
    raise DPEExportError(f"{repo_id} has no safetensors weights")


def _describe_hub_error(e: BaseException, repo_id: str, revision: Optional[str], offline: bool) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, GatedRepoError):
        return f"{repo_id} is gated: accept its conditions on its Hub page, then {login}"
    if isinstance(e, RepositoryNotFoundError):
        return f"{repo_id} was not found on the Hub at {constants.ENDPOINT} (if it is private, {login})"
    if isinstance(e, RevisionNotFoundError):
        return f"revision {revision!r} was not found in {repo_id}"
    if isinstance(e, LocalEntryNotFoundError) or offline:
        if offline:
            return (f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set; unset it to "
                    "download the model")
        return (f"cannot reach the Hub at {constants.ENDPOINT} to download {repo_id} ({_first_line(e)}); with "
                "HF_HUB_OFFLINE=1 a model already in the cache is used")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return f"the Hub refused access to {repo_id} (HTTP {status}); {login}"
        return f"the Hub answered HTTP {status} for {repo_id}: {_first_line(e)}"
    return (f"cannot download {repo_id} from {constants.ENDPOINT}: {type(e).__name__}: {_first_line(e)}; with "
            "HF_HUB_OFFLINE=1 a model already in the cache is used")


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


# ----------------------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------------------


def gguf_metadata(path: Path) -> dict[str, Any]:
    """Architecture and quantization of a GGUF file, from its header; DPEExportError when it is not one."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise DPEExportError(f"cannot read {path}: {e.strerror or e}") from None
    if magic != GGUF_MAGIC:
        raise DPEExportError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        import gguf
    except ImportError:
        raise DPEExportError("reading a GGUF file needs the gguf and accelerate packages: "
                             "pip install 'dpe-export[gguf]'") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # truncated or corrupt files raise ValueError, IndexError, struct errors, ...
        raise DPEExportError(f"{path} is not a readable GGUF file (truncated or corrupt?): {_first_line(e)}") from None

    def field_value(name):
        f = reader.fields.get(name)
        if f is None:
            return None
        try:
            return f.contents()
        except Exception:  # older gguf releases: decode by hand
            part = f.parts[f.data[0]]
            return bytes(part).decode("utf-8", "replace") if f.types and f.types[0] == gguf.GGUFValueType.STRING else part[0]

    quant_types = sorted({t.tensor_type.name for t in reader.tensors})
    file_type = field_value("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(int(file_type)).name.replace("MOSTLY_", "") if file_type is not None else None
    except (ValueError, TypeError):
        file_type_name = None
    return {"architecture": field_value("general.architecture"), "file_type": file_type_name,
            "tensor_types": quant_types}


def _from_gguf(spec: str, path: Path, dtype: Optional[str], workdir: Optional[Path]) -> ModelSource:
    if not path.is_file():
        raise DPEExportError(f"GGUF file not found: {path}")
    meta = gguf_metadata(path)
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loading needs it)
    except ImportError:
        raise DPEExportError("reading a GGUF file needs the gguf and accelerate packages: "
                             "pip install 'dpe-export[gguf]'") from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dpe_export.architectures import get_architecture

    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        raise DPEExportError(f"transformers cannot read {path} (architecture {meta['architecture']!r}): "
                             f"{_first_line(e)}") from None
    get_architecture(config)  # refuse an unsupported family before dequantizing anything
    quantized = any(t not in ("F32", "F16", "BF16") for t in meta["tensor_types"])
    if dtype in (None, "auto"):
        float_types = [t for t in meta["tensor_types"] if t in ("F32", "F16", "BF16")]
        dtype = "bfloat16" if quantized or not float_types else {"F32": "float32", "F16": "float16",
                                                                  "BF16": "bfloat16"}[max(float_types)]
    torch_dtype = getattr(torch, dtype)
    base = Path(workdir) if workdir is not None else path.parent
    base.mkdir(parents=True, exist_ok=True)
    import secrets

    tmp = base / f".{path.stem}.dpe-export-src-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    source = ModelSource(spec, "gguf", tmp, gguf={"file": name, "quantization": meta["file_type"] or
                                                  "/".join(meta["tensor_types"]), "dtype": dtype,
                                                  "architecture": meta["architecture"]}, temporary=tmp)
    try:
        logger.info("dequantizing %s to %s", path, dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model.hf_quantizer = None  # the weights are plain tensors now: save them as safetensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    except BaseException as e:
        source.cleanup()
        if isinstance(e, (KeyboardInterrupt, SystemExit, DPEExportError)):
            raise
        raise DPEExportError(f"cannot convert {path} to a checkpoint: {_first_line(e)}") from None
    return source
