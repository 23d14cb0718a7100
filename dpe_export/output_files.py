"""Writing a file the user named (--json, --plot, a calibration directory's files) without harming what is there.

A regular file (or nothing) at the path is replaced atomically: the text goes to a temporary file beside it,
which is renamed over it, so a failed write leaves the old file whole. A character device or a FIFO
(`--json /dev/stdout`, `/dev/null`, a named pipe) is written through and never replaced. A directory, a socket
or a block device is refused in one line. Write errors (a full disk, no permission) name the path.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Union

from dpe_export.errors import DPEExportError


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def write_output(path, data: Union[str, bytes]) -> Path:
    """Write `data` (text as UTF-8) to `path` as the module docstring says; return the path."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        mode = os.stat(path).st_mode  # follows a link: /dev/stdout is one, to the process's own output
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise DPEExportError(f"cannot write {path}: {e.strerror or e}") from None
    if mode is not None and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        try:
            with open(path, "wb") as f:  # written through: a device or a pipe is never replaced by a file
                f.write(payload)
        except OSError as e:
            raise DPEExportError(f"cannot write {path}: {e.strerror or e}") from None
        return path
    if mode is not None and not stat.S_ISREG(mode):
        raise DPEExportError(f"{path} is {_kind(mode)}; give the name of a file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DPEExportError(f"cannot create the folder {path.parent}: {e.strerror or e}") from None
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.dpe-export-tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except OSError as e:
        raise DPEExportError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()
    return path
