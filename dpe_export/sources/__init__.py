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
from pathlib import Path
from typing import Optional

from dpe_export.errors import DPEExportError
from dpe_export.sources.gguf import _from_gguf
from dpe_export.sources.hub import _from_hub
from dpe_export.sources.loading import LoadedModel, load_model, load_tokenizer
from dpe_export.sources.methods import MethodSpec, parse_method
from dpe_export.sources.model_source import HUB_ID, ModelSource
from dpe_export.sources.multimodal import text_model_of

__all__ = ["LoadedModel", "MethodSpec", "ModelSource", "describe_sources", "load_model", "load_tokenizer",
           "parse_method", "resolve_model"]

logger = logging.getLogger(__name__)


def describe_sources() -> str:
    return "a Hub repo id ORG/NAME, a local checkpoint directory, or a .gguf file"


def resolve_model(spec, *, revision: Optional[str] = None, gguf_file: Optional[str] = None,
                  dtype: Optional[str] = None, workdir: Optional[Path] = None) -> ModelSource:
    """Resolve SOURCE; DPEExportError (one line) when it is none of the three or cannot be had.

    `workdir`: the path a GGUF's dequantized checkpoint (or a multimodal model's text model) is written beside, in
    a hidden, locked staging directory named after it: the output of a convert.
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

