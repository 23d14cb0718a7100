"""Write a DPE checkpoint: config with a `dpe` section, unchanged weights, tokenizer, generated modeling files.

Nothing is written until every input has been checked. The export is assembled in a hidden temporary
directory beside the output and renamed into place at the end, so an interrupted or failed export leaves
nothing behind and never a half-written output.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from dpe_export.errors import DPEExportError
from dpe_export.staging import claim_staging, release_staging
from dpe_export.sources.checkpoint import LICENSE_FILES, TOKENIZER_FILES, Checkpoint

logger = logging.getLogger("dpe_export")


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
    r"config\.json", r"generation_config\.json", r"modeling_dpe\.py", r"dpe_[a-z_]+\.py", r"README\.md",
    r"model\.safetensors", r"model\.safetensors\.index\.json", r"model-\d+-of-\d+\.safetensors",
    r"dpe_selected_dims\.safetensors", r"dpe_[a-z_]+\.png", r"eval[\w.-]*\.json", r"\.gitattributes",
    r"\.dpe-export-manifest\.json",
)

# What convert wrote, with hashes: push publishes exactly these files (and what the user names), and refuses an
# export whose files no longer have the hashes they were written with. The card is listed without a hash: it is
# the user's to edit (analyze --card adds a section). Hidden, so it is never published itself.
MANIFEST_FILE = ".dpe-export-manifest.json"
UNHASHED = ("README.md",)


def write_manifest(folder: Path, keep: Optional[dict] = None) -> None:
    """Record every (non-hidden) file of `folder` with its size and sha256 (README.md without), in MANIFEST_FILE.
    `keep`: entries of an earlier manifest to carry over for files that are not rewritten (upgrade)."""
    files = {}
    for path in sorted(Path(folder).rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or any(part.startswith(".") for part in rel.split("/")):
            continue
        if keep is not None and rel in keep:
            files[rel] = keep[rel]
            continue
        files[rel] = {"size": path.stat().st_size} if rel in UNHASHED else {"sha256": file_sha256(path)}
    text = json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True) + "\n"
    (Path(folder) / MANIFEST_FILE).write_text(text, encoding="utf-8")


def read_manifest(folder: Path) -> Optional[dict]:
    """The manifest's files ({name: entry}), or None for an export written before manifests (or without one)."""
    path = Path(folder) / MANIFEST_FILE
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise DPEExportError(f"{path} is not a manifest dpe-export wrote; convert again") from None
    return files


def manifest_difference(folder: Path, files: dict, present: list[str]) -> Optional[str]:
    """Why `folder`'s files (`present`, relative names) are not the ones its manifest records, or None."""
    for rel in sorted(files):
        if rel not in present:
            return f"{rel}, which convert wrote, is missing"
    for rel in present:
        entry = files.get(rel)
        if entry is not None and "sha256" in entry and file_sha256(Path(folder) / rel) != entry["sha256"]:
            return f"{rel} changed after convert wrote it"
    return None


def is_export_file(rel: str) -> bool:
    """Whether a path inside an export (relative, forward slashes) is one that dpe-export writes."""
    return "/" not in rel and (rel in set(TOKENIZER_FILES) | set(LICENSE_FILES)
                               or any(re.fullmatch(pat, rel) for pat in _EXPORT_FILE_PATTERNS))


def foreign_entries(folder: Path) -> Optional[str]:
    """None when `folder` is a DPE export holding only files an export has; else why it is not (for messages)."""
    try:
        export = Checkpoint(folder)
        is_export = export.has_config and export.is_export
    except (OSError, DPEExportError):
        is_export = False
    if not is_export:
        names = sorted(p.name for p in folder.iterdir())
        return f"is not a DPE export (it holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
    for p in sorted(folder.iterdir()):
        if p.is_symlink() or not p.is_file() or not is_export_file(p.name):
            return f"holds {p.name}, which no export writes"
    return None


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


def move_into_place(staging: Path, output: Path, overwrite: bool) -> None:
    """Rename the finished export into place, replacing an existing output if allowed."""
    if output.is_dir() and not output.is_symlink() and not any(output.iterdir()):
        output.rmdir()
    if not (output.exists() or output.is_symlink()):
        os.rename(staging, output)
        return
    if not overwrite:  # it appeared while we were working
        raise DPEExportError(f"output {output} appeared while exporting; pass --overwrite to replace it")
    old = claim_staging(output, "old")
    try:
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
    finally:
        release_staging(old)


def output_summary(output: Path) -> list[tuple[str, int]]:
    """(name, size in bytes) of each file in an export, sorted by name."""
    return sorted((p.name, p.stat().st_size) for p in Path(output).iterdir() if p.is_file())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    _feed(h, path)
    return h.hexdigest()


def _feed(h, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover

