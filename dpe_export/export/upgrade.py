"""Bringing an export written by an earlier dpe-export up to date in place: the generated files are rewritten,
every other file is checked unchanged by hash.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dpe_export import __version__
from dpe_export.architectures import export_architecture, supported_families
from dpe_export.errors import DPEExportError
from dpe_export.export.files import MANIFEST_FILE, file_sha256, read_manifest, write_manifest
from dpe_export.export.retired_runtime import DPE_CORE_SHA256
from dpe_export.generated import MODELING_FILE, RETIRED_RUNTIME_FILES, code_files, config_auto_map
from dpe_export.modeling_templates import dpe_params
from dpe_export.safefiles import check_model_tree, links_in
from dpe_export.sources.checkpoint import CONFIG_FILE

logger = logging.getLogger("dpe_export")




@dataclass
class UpgradeResult:
    export_dir: Path
    written_by: Optional[str]  # the dpe-export version the export recorded (None: 0.1.0 recorded none)
    changed: list[str]  # generated files rewritten
    removed: list[str]  # files of an earlier runtime layout that this runtime does not run (dpe_core.py)
    untouched: dict[str, str]  # every other file, name -> sha256, checked unchanged after the rewrite


def _regular_files(folder: Path) -> dict[str, Path]:
    """Every file under folder by relative name; a symlink anywhere is an error (never followed)."""
    links = links_in(folder)
    if links:
        raise DPEExportError(f"{links[0]} is a symbolic link; dpe-export does not follow links out of an export")
    files = {}
    for root, _, names in os.walk(folder, followlinks=False):
        for name in names:
            path = Path(root) / name
            files[path.relative_to(folder).as_posix()] = path
    return files


def upgrade_export(export_dir) -> UpgradeResult:
    """Rewrite the generated files of a DPE export with this dpe-export's runtime, in place.

    modeling_dpe.py and the runtime files it imports are regenerated, dpe_core.py (the runtime in one file, as
    releases before the split wrote it) is removed when dpe-export wrote it, and config.json gets the current auto_map, architectures
    and dpe_export_version; weights, tokenizer, selection file and model card are not touched (their hashes
    are compared before and after). Each file is written to a temporary name and renamed into place, so an
    interrupted upgrade leaves every file either old or new. Files whose content is already current are left
    alone, so a following push uploads only what changed.
    """
    export_dir = Path(export_dir)
    if export_dir.is_symlink() or not export_dir.is_dir():
        raise DPEExportError(f"{export_dir} is not a directory")
    files = _regular_files(export_dir)
    if CONFIG_FILE not in files:
        raise DPEExportError(f"{export_dir} has no {CONFIG_FILE}; it is not a model directory")
    check_model_tree(export_dir)  # the rules of every command that reads a model directory
    try:
        config = json.loads(files[CONFIG_FILE].read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DPEExportError(f"cannot read {files[CONFIG_FILE]}: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("dpe"), dict) or MODELING_FILE not in files:
        raise DPEExportError(f"{export_dir} is not a DPE export (no dpe section in {CONFIG_FILE} or no {MODELING_FILE})")
    arch = export_architecture(config.get("model_type"))
    if arch is None:
        raise DPEExportError(f"{export_dir}: model type {config.get('model_type')!r} is not one this dpe-export "
                             f"supports ({supported_families()})")
    try:
        dpe_params.DPEParams.from_dict(config["dpe"])
    except (TypeError, ValueError) as e:
        raise DPEExportError(f"{export_dir}: the dpe section of {CONFIG_FILE} is invalid: {e}") from None
    written_by = config.get("dpe_export_version")
    code = code_files(arch)
    generated = {*code, *RETIRED_RUNTIME_FILES, CONFIG_FILE, MANIFEST_FILE}
    manifest = read_manifest(export_dir)
    retired = [name for name in RETIRED_RUNTIME_FILES if name in files]
    for name in retired:  # removed only when dpe-export wrote it: never delete what it did not write
        digest = file_sha256(files[name])
        recorded = (manifest or {}).get(name, {})
        if digest not in DPE_CORE_SHA256 and not (isinstance(recorded, dict) and recorded.get("sha256") == digest):
            raise DPEExportError(f"{files[name]} is not a file any dpe-export release wrote (it was edited?); this "
                                 "release does not run it: move it out of the export and run upgrade again")
    before = {name: file_sha256(path) for name, path in files.items() if name not in generated}

    new_config = dict(config, model_type=arch.dpe_model_type, auto_map=config_auto_map(arch),
                      architectures=[arch.dpe_causal_lm_class], dpe_export_version=__version__)
    wanted = {
        **code,
        CONFIG_FILE: (json.dumps(new_config, indent=2, sort_keys=True) + "\n").encode("utf-8"),
    }
    changed = []
    for name, data in wanted.items():
        path = export_dir / name
        if path.is_file() and path.read_bytes() == data:
            continue
        tmp = export_dir / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        changed.append(name)
    for name in retired:  # after the new files are in place: an interrupted upgrade leaves a loadable export
        files[name].unlink()
    # The manifest: the rewritten files get their new hashes; every other entry stays as convert recorded it (an
    # export from before manifests gets one of its files as they are now: upgrading it says they are the export).
    write_manifest(export_dir, keep=None if manifest is None else {k: v for k, v in manifest.items()
                                                                   if k not in wanted and k not in retired})
    after = {name: file_sha256(path) for name, path in _regular_files(export_dir).items() if name not in generated}
    if after != before:  # pragma: no cover - nothing above writes these
        raise DPEExportError(f"files other than the generated ones changed in {export_dir}: "
                             f"{sorted(set(after.items()) ^ set(before.items()))}")
    return UpgradeResult(export_dir, written_by, changed, retired, before)

