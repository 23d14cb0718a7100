"""The code every export carries: modeling_dpe.py rendered from the family registry, dpe_core.py copied verbatim,
the config's auto_map, and whether an export's code is exactly what this dpe-export writes (so that loading it
with trust_remote_code runs only our own code)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

from dpe_export import __version__
from dpe_export.architectures import Architecture, export_architecture
from dpe_export.errors import DPEExportError
from dpe_export.runtime import (
    MODELING_TEMPLATES,
    dpe_core_path,
    load_dpe_core,
    resource_dir,
)
from dpe_export.safefiles import safe_file

logger = logging.getLogger("dpe_export")


MODELING_TEMPLATE = "modeling_dpe.py.jinja"


MODELING_FILE = "modeling_dpe.py"


DPE_CORE_FILE = "dpe_core.py"


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
    dpe_core = load_dpe_core()
    variables = dict(arch.template_variables(), tool_version=__version__,
                     min_transformers=dpe_core.MIN_TRANSFORMERS_VERSION, max_transformers=dpe_core.MAX_TRANSFORMERS_VERSION)
    source = render_template(modeling_template_path(), variables)
    try:
        compile(source, MODELING_FILE, "exec")
    except SyntaxError as e:
        raise DPEExportError(f"the rendered {MODELING_FILE} is not valid Python (line {e.lineno}: {e.msg})") from None
    return source


def write_modeling_files(info, out_dir: Path) -> None:
    """modeling_dpe.py rendered from the template, and dpe_core.py copied verbatim."""
    (out_dir / MODELING_FILE).write_text(render_modeling_source(info.architecture), encoding="utf-8")
    shutil.copyfile(dpe_core_path(), out_dir / DPE_CORE_FILE)


def config_auto_map(arch: Architecture) -> dict[str, str]:
    """The config class (the export's own model_type) and both model classes an export serves; AutoModel must not
    fall back to the base model's plain attention, and any other Auto class fails on the unknown config class."""
    module = MODELING_FILE[:-3]
    return {"AutoConfig": f"{module}.{arch.dpe_prefix}Config", "AutoModel": f"{module}.{arch.dpe_prefix}Model",
            "AutoModelForCausalLM": f"{module}.{arch.dpe_causal_lm_class}"}


def foreign_code(export_dir: Path, raw: dict[str, Any]) -> Optional[str]:
    """None when the export's code is exactly what this dpe-export writes (auto_map, modeling_dpe.py and
    dpe_core.py), so that loading it with trust_remote_code runs only our own code; else what differs."""
    arch = export_architecture(raw.get("model_type"))
    if arch is None:
        return f"its model type {raw.get('model_type')!r} is not one this dpe-export writes"
    if raw.get("auto_map") != config_auto_map(arch):  # the code that would run, named first
        return f"its config.json auto_map is {json.dumps(raw.get('auto_map'))[:200]}, not {json.dumps(config_auto_map(arch))}"
    if raw.get("model_type") != arch.dpe_model_type:
        return f"its model type {raw.get('model_type')!r} is not {arch.dpe_model_type!r}"
    for name, want in ((MODELING_FILE, render_modeling_source(arch).encode("utf-8")),
                       (DPE_CORE_FILE, dpe_core_path().read_bytes())):
        path = safe_file(export_dir, name)
        if path is None or path.read_bytes() != want:
            return f"its {name} is not the one dpe-export {__version__} writes"
    return None

