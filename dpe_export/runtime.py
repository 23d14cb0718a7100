"""The files that ship with dpe-export, as package data: the DPE runtime and templates, and the presets.

The repository keeps them at its top level, `modeling_templates/` and `configs/` (each a package with an empty
`__init__.py`); setup.cfg installs them inside this package as `dpe_export.modeling_templates` and
`dpe_export.configs`, and they are found one way only, `importlib.resources.files(...)`: in a wheel they are
in site-packages, and in a checkout installed with `pip install -e .` setuptools maps the same package names to
the top-level folders.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import dpe_export
from dpe_export.errors import DPEExportError

MODELING_TEMPLATES = "modeling_templates"


CONFIGS = "configs"


DPE_CORE_FILENAME = "dpe_core.py"


DPE_CORE_MODULE = "dpe_export.dpe_core"


def resource_dir(name: str) -> Path:
    """The folder of shipped package `dpe_export.<name>` (MODELING_TEMPLATES or CONFIGS)."""
    import importlib.resources

    try:
        folder = importlib.resources.files(f"dpe_export.{name}")
    except ModuleNotFoundError:
        raise DPEExportError(
            f"dpe_export.{name} is not installed; install dpe-export (pip install dpe-export, or pip install -e . "
            "in a checkout)"
        ) from None
    return Path(str(folder))


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

    dpe_export.dpe_core = module  # as a regular submodule import would
    return module

