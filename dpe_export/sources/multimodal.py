"""A multimodal checkpoint whose language model is a registered family (architectures.WRAPPERS): its text model
written as a checkpoint of that family.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

from dpe_export.architectures import ARCHITECTURES, WRAPPERS
from dpe_export.errors import DPEExportError
from dpe_export.export.copying import copy_license_files, copy_tokenizer_files
from dpe_export.safefiles import safe_file
from dpe_export.sources.checkpoint import CONFIG_FILE, MODEL_CARD_FILE, WEIGHTS_INDEX_FILE
from dpe_export.sources.model_source import ModelSource
from dpe_export.staging import clean_stale_staging, make_staging_dir

logger = logging.getLogger(__name__)


def text_model_of(source: ModelSource, workdir: Optional[Path] = None) -> ModelSource:
    """`source` itself, or for a multimodal checkpoint whose language model is a registered family
    (architectures.WRAPPERS, e.g. Gemma 3 4B-27B) its text model, written as a checkpoint of that family into
    a temporary directory: the text config, the renamed language-model weights (the vision tower and projector
    are left out), tokenizer, generation config, README and license files."""
    import json

    ckpt = source.checkpoint
    raw = ckpt.raw if ckpt.has_config else {}
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
    names = ckpt.weight_files
    owner = Path(workdir) if workdir is not None else source.path  # as for a GGUF (sources/gguf.py)
    owner.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(owner)
    tmp = make_staging_dir(owner, "src")
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
        copy_tokenizer_files(ckpt, tmp)
        copy_license_files(ckpt, tmp)
        if ckpt.file(MODEL_CARD_FILE) is not None:
            shutil.copyfile(source.path / MODEL_CARD_FILE, tmp / MODEL_CARD_FILE)
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

