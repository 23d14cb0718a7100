"""The code every export carries: modeling_dpe.py rendered from the family registry, the runtime files it imports
(modeling_templates/dpe_*.py) copied verbatim, the config's auto_map, and whether an export's code is exactly what this dpe-export writes (so that loading it
with trust_remote_code runs only our own code)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from dpe_export import __version__
from dpe_export.architectures import Architecture, export_architecture
from dpe_export.errors import DPEExportError
from dpe_export.modeling_templates import dpe_guards
from dpe_export.runtime import MODELING_TEMPLATES, resource_dir, runtime_files
from dpe_export.safefiles import safe_file

logger = logging.getLogger("dpe_export")


MODELING_TEMPLATE = "modeling_dpe.py.jinja"


MODELING_FILE = "modeling_dpe.py"


RETIRED_RUNTIME_FILES = ("dpe_core.py",)  # the runtime's files in earlier releases (upgrade removes them)


MODEL_CARD_TEMPLATE = "model_card.md.jinja"


MODEL_CARD_FILE = "README.md"


def modeling_template_path() -> Path:
    return resource_dir(MODELING_TEMPLATES) / MODELING_TEMPLATE


def model_card_template_path() -> Path:
    return resource_dir(MODELING_TEMPLATES) / MODEL_CARD_TEMPLATE


def render_template(path: Path, variables: dict[str, Any], filters: Optional[dict[str, Any]] = None) -> str:
    """Render a jinja2 template file; undefined variables are errors."""
    import jinja2

    if not path.is_file():
        raise DPEExportError(f"template {path.name} not found in {path.parent}; the dpe-export installation is incomplete")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(path.parent)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters.update(filters or {})
    try:
        return env.get_template(path.name).render(**variables)
    except jinja2.TemplateError as e:
        raise DPEExportError(f"cannot render template {path}: {e}") from None


def render_modeling_source(arch: Architecture) -> str:
    """modeling_dpe.py for one family, rendered from the template (only registry data goes into it)."""
    variables = dict(arch.template_variables(), tool_version=__version__,
                     min_transformers=dpe_guards.MIN_TRANSFORMERS_VERSION, max_transformers=dpe_guards.MAX_TRANSFORMERS_VERSION)
    source = render_template(modeling_template_path(), variables)
    try:
        compile(source, MODELING_FILE, "exec")
    except SyntaxError as e:
        raise DPEExportError(f"the rendered {MODELING_FILE} is not valid Python (line {e.lineno}: {e.msg})") from None
    return source


def code_files(arch: Architecture) -> dict[str, bytes]:
    """Every code file of an export of this family, by name: modeling_dpe.py rendered from the template and the
    runtime files it imports, verbatim."""
    source = render_modeling_source(arch)
    return {MODELING_FILE: source.encode("utf-8"), **runtime_files(source)}


def write_modeling_files(info, out_dir: Path) -> None:
    """The export's code files (code_files)."""
    for name, data in code_files(info.architecture).items():
        (out_dir / name).write_bytes(data)


def config_auto_map(arch: Architecture) -> dict[str, str]:
    """The config class (the export's own model_type) and both model classes an export serves; AutoModel must not
    fall back to the base model's plain attention, and any other Auto class fails on the unknown config class."""
    module = MODELING_FILE[:-3]
    return {"AutoConfig": f"{module}.{arch.dpe_prefix}Config", "AutoModel": f"{module}.{arch.dpe_prefix}Model",
            "AutoModelForCausalLM": f"{module}.{arch.dpe_causal_lm_class}"}


def foreign_code(export_dir: Path, raw: dict[str, Any]) -> Optional[str]:
    """None when the export's code is exactly what this dpe-export writes (auto_map, modeling_dpe.py and the
    runtime files), so that loading it with trust_remote_code runs only our own code; else what differs."""
    arch = export_architecture(raw.get("model_type"))
    if arch is None:
        return f"its model type {raw.get('model_type')!r} is not one this dpe-export writes"
    if raw.get("auto_map") != config_auto_map(arch):  # the code that would run, named first
        return f"its config.json auto_map is {json.dumps(raw.get('auto_map'))[:200]}, not {json.dumps(config_auto_map(arch))}"
    if raw.get("model_type") != arch.dpe_model_type:
        return f"its model type {raw.get('model_type')!r} is not {arch.dpe_model_type!r}"
    for name, want in code_files(arch).items():
        path = safe_file(export_dir, name)
        if path is None or path.read_bytes() != want:
            return f"its {name} is not the one dpe-export {__version__} writes"
    return None

