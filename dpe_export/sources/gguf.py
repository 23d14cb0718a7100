"""A .gguf file as a checkpoint: its metadata read with the gguf package, the model loaded through transformers'
GGUF support, dequantized and written as safetensors into a temporary directory.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

from dpe_export.architectures import get_architecture
from dpe_export.errors import DPEExportError, first_line
from dpe_export.sources.checkpoint import check_config_sizes
from dpe_export.sources.model_source import ModelSource
from dpe_export.staging import clean_stale_staging, make_staging_dir

logger = logging.getLogger(__name__)


GGUF_MAGIC = b"GGUF"


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
        raise DPEExportError(f"{path} is not a readable GGUF file (truncated or corrupt?): {first_line(e)}") from None

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
    arch = field_value("general.architecture")
    block_count = field_value(f"{arch}.block_count") if isinstance(arch, str) else None
    blocks = {int(m.group(1)) for t in reader.tensors for m in [re.match(r"blk\.(\d+)\.", str(t.name))] if m}
    file_type = field_value("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(int(file_type)).name.replace("MOSTLY_", "") if file_type is not None else None
    except (ValueError, TypeError):
        file_type_name = None
    return {"architecture": arch, "file_type": file_type_name, "tensor_types": quant_types,
            "block_count": block_count, "blocks": blocks}


def check_blocks(path: Path, meta: dict[str, Any]) -> None:
    """The blocks the header announces are the blocks the file holds tensors for (before anything is sized by the
    announced count: a 436 KB file claiming 20000 blocks would be built as 20000 layers)."""
    count, blocks = meta["block_count"], meta["blocks"]
    if count is None:
        return
    try:
        count = int(count)
    except (TypeError, ValueError):
        raise DPEExportError(f"{path}: {meta['architecture']}.block_count is {count!r}, not a number") from None
    if count != len(blocks) or (blocks and max(blocks) + 1 != count):
        raise DPEExportError(f"{path} says it has {count} blocks ({meta['architecture']}.block_count) but holds "
                             f"tensors for {len(blocks)}; the file is incomplete or inconsistent")


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


    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        raise DPEExportError(f"transformers cannot read {path} (architecture {meta['architecture']!r}): "
                             f"{first_line(e)}") from None
    check_config_sizes(config.to_dict(), path)
    get_architecture(config)  # refuse an unsupported family before dequantizing anything
    check_blocks(path, meta)
    quantized = any(t not in ("F32", "F16", "BF16") for t in meta["tensor_types"])
    if dtype in (None, "auto"):
        float_types = [t for t in meta["tensor_types"] if t in ("F32", "F16", "BF16")]
        dtype = "bfloat16" if quantized or not float_types else {"F32": "float32", "F16": "float16",
                                                                  "BF16": "bfloat16"}[max(float_types)]
    torch_dtype = getattr(torch, dtype)
    # The dequantized checkpoint goes into a locked staging directory named after its owner: the output being
    # converted (so only a later convert of that output may clear it if this run dies), else the GGUF itself.
    owner = Path(workdir) if workdir is not None else path
    owner.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(owner)
    tmp = make_staging_dir(owner, "src")
    source = ModelSource(spec, "gguf", tmp, gguf={"file": name, "quantization": meta["file_type"] or
                                                  "/".join(meta["tensor_types"]), "dtype": dtype,
                                                  "architecture": meta["architecture"]}, temporary=tmp)
    try:
        logger.info("dequantizing %s to %s", path, dtype)
        # mismatched sizes are reported here rather than raised ("look at the above report!" of a report that
        # TRANSFORMERS_VERBOSITY=error hides), and refused below with the tensor and its shapes
        model, info = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype,
                                                           output_loading_info=True, ignore_mismatched_sizes=True)
        missing = sorted(info.get("missing_keys") or [])
        if missing:  # transformers filled them with fresh random weights: never export those
            raise DPEExportError(f"{path} lacks {len(missing)} tensor(s) the {config.model_type} architecture needs "
                                 f"(e.g. {missing[0]}); the file is incomplete")
        mismatched = sorted(info.get("mismatched_keys") or [], key=str)
        if mismatched:
            first = mismatched[0]
            what = (f"{first[0]} has shape {list(first[1])} in the file, the header describes {list(first[2])}"
                    if isinstance(first, (tuple, list)) and len(first) == 3 else str(first))
            raise DPEExportError(f"{path}: {len(mismatched)} tensor(s) do not have the shape its header describes "
                                 f"({what})")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        model.hf_quantizer = None  # the weights are plain tensors now: save them as safetensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    except BaseException as e:
        source.cleanup()
        if isinstance(e, (KeyboardInterrupt, SystemExit, DPEExportError)):
            raise
        raise DPEExportError(f"cannot convert {path} to a checkpoint: {first_line(e)}") from None
    return source

