"""Staging directories beside an output, and the OS locks that say whose they are.

convert writes an export into a hidden directory beside its output and renames it into place; a GGUF source is
dequantized into another. Each such directory has a lock file beside it, held (flock) by the process that works
in it from before the directory exists until after it is renamed or removed. A later convert of the same output
removes a staging directory only when it can take that lock, that is when no process holds it: a PID says
nothing across PID namespaces (containers, a file system shared between machines). A directory without a lock
file was left by a dpe-export that predates the locks, and its PID decides, as it did then.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path

logger = logging.getLogger("dpe_export")

_STAGING = re.compile(r"^\.(?P<name>.+)\.dpe-export-(?P<kind>tmp|old|src)-(?P<pid>\d+)-[0-9a-f]{8}$")
LOCK_SUFFIX = ".lock"

# Staging names of this process -> their lock file, held open while the work runs.
_HELD: dict[str, object] = {}


def _lock_file(entry: Path) -> Path:
    return entry.with_name(entry.name + LOCK_SUFFIX)


def claim_staging(output: Path, kind: str) -> Path:
    """A new staging name beside `output` (tmp: the export being written; old: the earlier output moved aside;
    src: a GGUF's dequantized checkpoint), its lock taken; the directory itself is not made."""
    entry = _sibling_name(output, kind)
    lock = open(_lock_file(entry), "x")
    try:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # pragma: no cover - no flock (Windows): the PID rule below stands alone
        pass
    _HELD[str(entry)] = lock
    return entry


def release_staging(entry: Path) -> None:
    """Drop the lock of a staging name this process claimed (after the directory was renamed or removed)."""
    lock = _HELD.pop(str(entry), None)
    if lock is not None:
        try:
            _lock_file(entry).unlink()
        except OSError:
            pass
        lock.close()


def _owner_alive(entry: Path, pid: int) -> bool:
    """Whether the convert that made this staging directory still runs: its lock is held (or, for a directory
    without a lock file, left by an older dpe-export: its PID is alive here)."""
    lock = _lock_file(entry)
    if str(entry) in _HELD:
        return True
    if not lock.is_file() or lock.is_symlink():
        return _pid_alive(pid)
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return _pid_alive(pid)
    try:
        with open(lock, "r") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return True  # cannot tell: leave it
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True



def _sibling_name(output: Path, kind: str) -> Path:
    return output.parent / f".{output.name}.dpe-export-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def clean_stale_staging(output: Path) -> list[Path]:
    """Remove the staging directories an interrupted convert of `output` left (its process is gone), and put
    back an earlier output that such a run had moved aside. Returns what was removed."""
    removed = []
    parent = output.parent
    if not parent.is_dir():
        return removed
    for entry in sorted(parent.iterdir()):
        m = _STAGING.match(entry.name)
        if not m or m.group("name") != output.name or entry.is_symlink() or not entry.is_dir():
            continue
        if _owner_alive(entry, int(m.group("pid"))):
            continue
        lock = _lock_file(entry)
        if m.group("kind") == "old" and not (output.exists() or output.is_symlink()):
            os.rename(entry, output)  # the run died between moving the old output aside and replacing it
            logger.warning("restored %s, which an interrupted convert (pid %s) had moved aside", output, m.group("pid"))
        else:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            logger.warning("removed %s, left by an interrupted convert (pid %s)", entry, m.group("pid"))
        if lock.is_file() and not lock.is_symlink():
            lock.unlink()
    return removed


def make_staging_dir(output: Path, kind: str = "tmp") -> Path:
    """A hidden, empty directory beside `output` (same file system, so it can be renamed into place), locked as
    this process's until release_staging."""
    staging = claim_staging(output, kind)
    try:
        staging.mkdir()  # honours the umask, unlike tempfile.mkdtemp's 0700
    except BaseException:
        release_staging(staging)
        raise
    return staging
