"""Copying a checkpoint's files into an export (or into a checkpoint that dpe-export writes as a source, such
as a multimodal model's text model): tokenizer, license and weight files, as regular files, without following a
link out of the model directory. What to copy comes from the source's Checkpoint (dpe_export/sources/checkpoint.py),
which this module receives and does not import (the sources package imports it).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from dpe_export.errors import DPEExportError

logger = logging.getLogger("dpe_export")


_COPY_CHUNK = 16 << 20


def copy_tokenizer_files(ckpt, out_dir: Path, max_length: Optional[int] = None) -> list[str]:
    """Copy the tokenizer (and generation config) files of the Checkpoint `ckpt`; warn when there is no tokenizer.

    A tokenizer_config.json `auto_map` (the base repo's own tokenizer code, possibly in another repo) is
    dropped, with a warning: the export must load with nothing but transformers' own tokenizer classes.
    """
    model_dir = ckpt.path
    copied = _copy_present(ckpt, out_dir, ckpt.tokenizer_files)
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
    if not ckpt.has_tokenizer:
        logger.warning(
            "%s has no tokenizer (none of %s); the export will have none either",
            model_dir,
            ", ".join(ckpt.TOKENIZER_VOCAB_FILES),
        )
    return copied


def copy_license_files(ckpt, out_dir: Path) -> list[str]:
    """Copy the license and notice files of the Checkpoint `ckpt`."""
    return _copy_present(ckpt, out_dir, ckpt.license_files)


def _copy_present(ckpt, out_dir: Path, names: Sequence[str]) -> list[str]:
    """Copy the files of `names` that exist, as regular files; links out of the model directory are refused."""
    copied = []
    for name in names:
        src = ckpt.file(name)
        if src is not None:
            try:
                shutil.copyfile(src, out_dir / name)
            except OSError as e:
                raise DPEExportError(f"cannot write {out_dir / name}: {e.strerror or e}") from None
            copied.append(name)
    return copied


def copy_weights(ckpt, out_dir: Path, link: bool = False, copy_file: Optional[Callable] = None) -> None:
    """Copy (or hard-link) the weight files of the Checkpoint `ckpt` unchanged, with a byte progress bar on a
    terminal.

    Linking falls back to copying, with a warning, where the file system refuses (e.g. across devices).
    `copy_file(src, dst, update)` copies one file (default: copy_file_with_progress).
    """
    from tqdm.auto import tqdm

    copy_file = copy_file or copy_file_with_progress  # looked up now: tests/test_security.py replaces it to pause
    # resolve: HF cache files are links into the entry's blobs/ (safe_file allows those and nothing else)
    sources = [(name, ckpt.file(name).resolve()) for name in ckpt.weight_files]
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
            copy_file(src, dst, progress.update)
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
