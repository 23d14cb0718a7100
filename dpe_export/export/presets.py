"""Named DPE settings, one YAML file each in configs/ (shipped as dpe_export/configs in the wheel).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from dpe_export.errors import DPEExportError
from dpe_export.runtime import CONFIGS, resource_dir

PRESET_SUFFIX = ".yaml"


_REQUIRED = ("description", "base_model", "local_window_size", "scale_factors", "dimension_groups_range")


_OPTIONAL = ("model_type", "target_length")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    base_model: str  # Hugging Face id of the model the settings were tuned for
    local_window_size: int
    scale_factors: tuple[int, ...]
    dimension_groups_range: tuple[int, ...]
    target_length: Optional[int] = None
    model_type: Optional[str] = None  # config.model_type of base_model, to warn on a mismatch

    @classmethod
    def from_json(cls, name: str, data: Any, path: Path) -> "Preset":
        """A preset from its parsed file (YAML, a JSON-compatible mapping); DPEExportError naming what is wrong."""
        return Preset.from_json(name, data, path)

    def to_json(self) -> dict[str, Any]:
        """The mapping its file holds (what from_json reads back)."""
        d = {k: getattr(self, k) for k in (*_REQUIRED, *_OPTIONAL) if getattr(self, k) is not None}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def presets_dir() -> Path:
    return resource_dir(CONFIGS)


def preset_names() -> list[str]:
    return sorted(p.name[: -len(PRESET_SUFFIX)] for p in presets_dir().glob(f"*{PRESET_SUFFIX}"))


def list_presets() -> list[Preset]:
    """All shipped presets, sorted by name."""
    return [load_preset(name) for name in preset_names()]


def load_preset(name: str) -> Preset:
    """The preset called `name` (a file stem in configs/); DPEExportError naming the available ones if unknown."""
    names = preset_names()
    if name not in names:
        raise DPEExportError(f"unknown preset {name!r}; available presets: {', '.join(names) or '(none)'}")
    path = presets_dir() / f"{name}{PRESET_SUFFIX}"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise DPEExportError(f"cannot read preset file {path}: {e}") from None
    return _preset_from_mapping(name, data, path)


def _preset_from_mapping(name: str, data: Any, path: Path) -> Preset:
    if not isinstance(data, dict):
        raise DPEExportError(f"preset file {path} must hold a mapping")
    missing = [k for k in _REQUIRED if k not in data]
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if missing or unknown:
        what = []
        if missing:
            what.append(f"lacks {', '.join(missing)}")
        if unknown:
            what.append(f"has unknown keys {', '.join(unknown)}")
        raise DPEExportError(f"preset file {path} {' and '.join(what)}")

    def integer(key: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise DPEExportError(f"preset file {path}: {key} must hold integers, got {value!r}")
        return value

    def integers(key: str) -> tuple[int, ...]:
        value = data[key]
        if not isinstance(value, list):
            raise DPEExportError(f"preset file {path}: {key} must be a list of integers, got {value!r}")
        return tuple(integer(key, x) for x in value)

    target = data.get("target_length")
    return Preset(
        name=name,
        description=str(data["description"]),
        base_model=str(data["base_model"]),
        local_window_size=integer("local_window_size", data["local_window_size"]),
        scale_factors=integers("scale_factors"),
        dimension_groups_range=integers("dimension_groups_range"),
        target_length=None if target is None else integer("target_length", target),
        model_type=None if data.get("model_type") is None else str(data["model_type"]),
    )

