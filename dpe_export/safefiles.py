"""Reading a model directory without following links out of it.

A model directory can hold symbolic links (the Hugging Face cache is made of them: snapshots/<rev>/name ->
../../blobs/<hash>). dpe-export reads or copies a file only when its real path is a regular file inside the
model directory itself, or inside the blobs/ of the same Hugging Face cache entry; anything else (a link to
/proc/self/environ, to ~/.ssh/id_rsa, to another model) is refused with one line, before anything is written.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Optional

from dpe_export.errors import DPEExportError

_HF_SNAPSHOT = re.compile(r"^(?P<entry>.*/models--[^/]+--[^/]+)/snapshots/[^/]+$")


def allowed_roots(model_dir: Path) -> list[Path]:
    """Where files of `model_dir` may really live: the directory itself, and its cache entry's blobs/."""
    root = Path(os.path.realpath(model_dir))
    roots = [root]
    m = _HF_SNAPSHOT.match(root.as_posix())
    if m:
        roots.append(Path(m.group("entry")) / "blobs")
    return roots


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def safe_file(model_dir, name: str) -> Optional[Path]:
    """model_dir/name when it is a regular file that really lives in the model directory; None when there is
    no such entry; DPEExportError when it is a link that leads elsewhere, or not a regular file."""
    model_dir = Path(model_dir)
    path = model_dir / name
    if not os.path.lexists(path):
        return None
    real = Path(os.path.realpath(path))
    if not any(_within(real, root) for root in allowed_roots(model_dir)):
        raise DPEExportError(f"{path} is a link to {real}, outside the model directory; dpe-export never follows "
                             "links out of a model directory (copy the file in if you mean to include it)")
    try:
        mode = os.stat(real).st_mode
    except OSError as e:
        raise DPEExportError(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise DPEExportError(f"{path} is not a regular file")
    return path


MAX_TREE_ENTRIES = 100_000  # a model directory with more entries than this is not a checkpoint
SKIPPED_DIRS = (".git",)  # version control, which transformers never reads


def check_model_tree(model_dir) -> None:
    """The rules convert applies, to every entry of a model directory, for every command that reads one.

    Walks the directory without following links and refuses, in one line: a link whose target is outside the
    model directory (and its Hugging Face cache entry's blobs/), anything that is neither a regular file nor a
    directory (devices, FIFOs, sockets), and a hard link with names outside the directory (a file whose link
    count exceeds the names it has inside; its contents would be another file's, as with a link out). Weights
    (*.safetensors) may be hard links: `convert --link` makes them so, and their bytes are checked as tensors.
    """
    model_dir = Path(model_dir)
    roots = allowed_roots(model_dir)
    names: dict = {}  # (device, inode) -> [link count, names seen in the directory, first path]
    seen = 0
    for root, dirs, files in os.walk(model_dir, followlinks=False):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        for name in dirs + files:
            seen += 1
            if seen > MAX_TREE_ENTRIES:
                raise DPEExportError(f"{model_dir} holds more than {MAX_TREE_ENTRIES} files; it is not a model "
                                     "checkpoint directory")
            path = Path(root) / name
            try:
                st = os.lstat(path)
                linked = stat.S_ISLNK(st.st_mode)
                if linked:
                    real = Path(os.path.realpath(path))
                    if not any(_within(real, r) for r in roots):
                        raise DPEExportError(f"{path} is a link to {real}, outside the model directory; dpe-export "
                                             "never follows links out of a model directory (copy the file in if "
                                             "you mean to include it)")
                    st = os.stat(path)
            except FileNotFoundError:
                raise DPEExportError(f"{path} is a broken link") from None
            except OSError as e:
                raise DPEExportError(f"cannot read {path}: {e.strerror or e}") from None
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise DPEExportError(f"{path} is not a regular file (a device, a FIFO or a socket); a model "
                                     "directory holds files and folders only")
            if st.st_nlink > 1 and not linked and not name.endswith(".safetensors"):
                entry = names.setdefault((st.st_dev, st.st_ino), [st.st_nlink, 0, path])
                entry[1] += 1
    for count, inside, path in names.values():
        if inside < count:
            raise DPEExportError(f"{path} is a hard link with {count - inside} name(s) outside the model directory; "
                                 "dpe-export copies only files that live in the model directory (copy the file "
                                 "in if you mean to include it)")


def read_bytes(model_dir, name: str) -> Optional[bytes]:
    path = safe_file(model_dir, name)
    return None if path is None else path.read_bytes()


def links_in(folder) -> list[Path]:
    """Every symbolic link under `folder` (not followed), for refusing to publish a folder that has any."""
    found = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        for name in dirs + names:
            p = Path(root) / name
            if p.is_symlink():
                found.append(p)
    return found

