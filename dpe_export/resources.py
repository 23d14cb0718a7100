"""Locate the files that ship with dpe-export: modeling templates and preset configs.

In an installed wheel the repository's ``modeling_templates/`` and ``configs/`` directories live inside the
package (``dpe_export/modeling_templates``, ``dpe_export/configs``; see setup.cfg). In a source checkout they
are beside the package, at the repository root. ``resource_dir`` finds them in either layout.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from dpe_export.errors import DPEExportError

PACKAGE_DIR = Path(__file__).resolve().parent
MODELING_TEMPLATES = "modeling_templates"
CONFIGS = "configs"
DPE_CORE_FILENAME = "dpe_core.py"
DPE_CORE_MODULE = "dpe_export.dpe_core"


def resource_dir(name: str) -> Path:
    """The directory of shipped resource `name`: inside the package (wheel), else at the repository root."""
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise DPEExportError(
        f"resource directory {name!r} not found in {PACKAGE_DIR} or {PACKAGE_DIR.parent}; "
        "the dpe-export installation is incomplete (reinstall it)"
    )


def dpe_core_path() -> Path:
    """The one dpe_core.py file: imported by dpe-export and copied verbatim into every export."""
    path = resource_dir(MODELING_TEMPLATES) / DPE_CORE_FILENAME
    if not path.is_file():
        raise DPEExportError(f"{path} is missing; the dpe-export installation is incomplete (reinstall it)")
    return path


def load_dpe_core() -> ModuleType:
    """Import modeling_templates/dpe_core.py by file path as module ``dpe_export.dpe_core`` (cached).

    dpe-export never keeps a copy of the DPE code: this is the same file that is written into exports.
    """
    module = sys.modules.get(DPE_CORE_MODULE)
    if module is not None:
        return module
    path = dpe_core_path()
    spec = importlib.util.spec_from_file_location(DPE_CORE_MODULE, path)
    if spec is None or spec.loader is None:  # pragma: no cover - only for a broken file system
        raise DPEExportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: dataclasses look their module up in sys.modules.
    sys.modules[DPE_CORE_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(DPE_CORE_MODULE, None)
        raise
    import dpe_export

    dpe_export.dpe_core = module  # as a regular submodule import would
    return module
