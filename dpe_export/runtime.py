"""The files that ship with dpe-export, as package data: the export runtime and templates, and the presets.

The repository keeps them at its top level, `modeling_templates/` and `configs/` (each a package with an empty
`__init__.py`); setup.cfg installs them inside this package as `dpe_export.modeling_templates` and
`dpe_export.configs`, and they are found one way only, `importlib.resources.files(...)`: in a wheel they are
in site-packages, and in a checkout installed with `pip install -e .` setuptools maps the same package names to
the top-level folders. The runtime files (`modeling_templates/dpe_*.py`) are imported by dpe-export as the
package `dpe_export.modeling_templates` and copied verbatim into exports, so both run the same code.
"""
from __future__ import annotations

import ast
from pathlib import Path

from dpe_export.errors import DPEExportError

MODELING_TEMPLATES = "modeling_templates"


CONFIGS = "configs"


RUNTIME_PACKAGE = "dpe_export.modeling_templates"  # the export runtime, dpe_*.py, imported by dpe-export as is


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


def relative_imports(source: str) -> list[str]:
    """The sibling modules a Python source imports relatively (`from .dpe_rule import ...`), in order."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module and node.module not in names:
            names.append(node.module)
    return names


def runtime_files(modeling_source: str) -> dict[str, bytes]:
    """The runtime files an export ships beside its modeling file, by name: what `modeling_source` imports from
    its folder, and what those import, recursively (so an export ships only what it runs). Read from this
    installation's runtime folder, byte for byte."""
    folder = resource_dir(MODELING_TEMPLATES)
    files: dict[str, bytes] = {}
    todo = relative_imports(modeling_source)
    while todo:
        name = f"{todo.pop(0)}.py"
        if name in files:
            continue
        path = folder / name
        if not path.is_file():
            raise DPEExportError(f"{path} is missing; the dpe-export installation is incomplete (reinstall it)")
        files[name] = path.read_bytes()
        todo.extend(relative_imports(files[name].decode("utf-8")))
    return dict(sorted(files.items()))
