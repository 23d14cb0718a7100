"""Running a calibration's units of work, in this process or on a Ray cluster, with one results file.

A procedure says what is still to do given what is done (``pending``), what a finished unit's record is
(``record``) and under which key it is stored (``key``); this module runs the pending units through an
executor, appends each record to the shard's results file the moment it arrives (fsynced: a killed driver
resumes from it), and asks for more until nothing is pending. Executors yield (unit, result, seconds) as units
finish, in any order.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from dpe_export.errors import DPEExportError

logger = logging.getLogger(__name__)

CELLS_GLOB = "cells*.jsonl"

Unit = tuple
Executor = Callable[[list], Iterator[tuple[Unit, dict, float]]]


@dataclass(frozen=True)
class UnitKind:
    """How a procedure's work is cut into units."""

    read: Callable[..., dict]  # (out_dir, plan) -> {key: record}
    pending: Callable[..., list]  # (plan, done, shard) -> units still to run (the next round)
    record: Callable[..., dict]  # (plan, unit, result, seconds) -> the JSON line
    key: Callable[[dict], Any]  # record -> its key in done
    planned: Callable[..., int]  # (plan, shard) -> units this shard runs at most (the progress bar's total)
    counted: Callable[..., int]  # (plan, done, shard) -> units of this shard already done
    describe: Callable[[Unit], str]  # for the progress bar
    unit: str = "unit"


# ---- the results file ------------------------------------------------------------------------------------


def cells_path(out_dir: Path, shard: Optional[tuple[int, int]]) -> Path:
    return out_dir / ("cells.jsonl" if shard is None else f"cells.shard-{shard[0]}-of-{shard[1]}.jsonl")


def plan_lines(out_dir: Path, plan):
    """(path, line number, record) of every result of this plan in out_dir's results files (a cut-off last line
    is skipped; a line of another plan is refused)."""
    key = plan.key()
    for path in sorted(Path(out_dir).glob(CELLS_GLOB)):
        lines = path.read_text(encoding="utf-8").split("\n")
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                cell = json.loads(line)
            except ValueError:
                if lineno == len(lines):
                    continue  # the last line, cut off by a killed run (repaired before the next append)
                raise DPEExportError(f"{path} line {lineno} is not JSON; delete that line to compute the cell "
                                     "again") from None
            if not isinstance(cell, dict) or cell.get("plan") != key:
                if isinstance(cell, dict) and "plan" in cell:
                    raise DPEExportError(
                        f"{path} holds results of a different calibration (other model or settings); "
                        "use another --output-dir")
                continue
            yield path, lineno, cell


def repair_tail(path: Path) -> bool:
    """Cut a torn last line (a kill or a full disk mid-write) so that the next appended cell starts on its own
    line. Returns whether anything was cut."""
    if not path.is_file():
        return False
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return False
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    logger.warning("%s ended in a cut-off line (%d bytes), from an interrupted run; removed it", path, len(data) - keep)
    return True


def append_unit(path: Path, cell: dict) -> None:
    """Append one finished result as a line and make it durable before going on."""
    if not math.isfinite(cell["score"]):
        where = (f"cell (group {cell['group']}, scale {cell['scale']})" if "group" in cell
                 else f"factors {cell['factors']} on context {cell['context']}")
        raise DPEExportError(f"{where} scored {cell['score']}; a score must be a finite number")
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(cell) + "\n")
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def grid_lock(path: Path):
    """One process at a time per results file: a second calibration in the same place is refused, not run twice."""
    import fcntl

    lock_path = path.with_name(f".{path.name}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise DPEExportError(f"another calibration (pid {holder}) is writing {path}; wait for it to finish, or "
                                 "use another --output-dir (or --shard to split one grid)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


# ---- running units ---------------------------------------------------------------------------------------


def timed(evaluate: Callable[[Unit], dict], unit: Unit) -> tuple[dict, float]:
    """evaluate(unit) and its wall seconds; the result gains `cpu_share`, the CPU time this process got over
    wall time x torch threads: about 1 on cores of its own, lower where another job shared them."""
    import torch

    t0, c0 = time.perf_counter(), time.process_time()
    result = evaluate(unit)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    share = cpu / max(wall * torch.get_num_threads(), 1e-9)
    return {**result, "cpu_share": round(min(share, 1.0), 3)}, wall


def local_executor(evaluate: Callable[[Unit], dict]) -> Executor:
    """Run units one after the other in this process."""
    def run(units: list) -> Iterator[tuple[Unit, dict, float]]:
        for unit in units:
            result, seconds = timed(evaluate, unit)
            yield unit, result, seconds
    return run


def execute(plan, kind: UnitKind, executor: Executor, out_dir: Path, shard: Optional[tuple[int, int]] = None,
            progress: bool = True, desc: str = "calibration") -> dict:
    """Run (or resume) this shard's units; returns every finished record of the plan, keyed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = cells_path(out_dir, shard)
    with grid_lock(path):
        repair_tail(path)
        return _execute_locked(plan, kind, executor, out_dir, shard, path, progress, desc)


def _execute_locked(plan, kind, executor, out_dir, shard, path, progress, desc):
    from tqdm.auto import tqdm

    done = kind.read(out_dir, plan)
    bar = tqdm(total=kind.planned(plan, shard), desc=desc, unit=kind.unit, disable=not progress)
    try:
        while True:
            todo = kind.pending(plan, done, shard)
            bar.n = kind.counted(plan, done, shard)
            bar.total = max(bar.total, bar.n + len(todo))
            bar.refresh()
            if not todo:
                break
            for unit, result, seconds in executor(todo):
                rec = kind.record(plan, unit, result, seconds)
                if "cpu_share" in result:  # whether the cores were shared while it ran
                    rec["cpu_share"] = result["cpu_share"]
                append_unit(path, rec)
                done[kind.key(rec)] = rec
                bar.set_postfix_str(kind.describe(unit))
                bar.update(1)
        bar.total = bar.n
    finally:
        bar.close()
    return done


