"""Context-extension baselines applied to a base model at load time (--method), as parsed specs.

A method spec (``--method``) is one of::

    none                 the model as it is (a base model, or a DPE export with its own settings)
    linear:F             position interpolation: RoPE positions divided by F
    dynamic:F            dynamic NTK scaling with factor F (theta grows once a sequence exceeds the base length;
                         evaluate.py fixes it at the length of prompt + answer while generating, so the
                         KV cache and the new tokens share one rotation)
    yarn:F               YaRN with factor F (original_max_position_embeddings = the base max_position_embeddings)
    self-extend:W,G      SelfExtend: plain RoPE within W tokens, beyond it positions grouped by G, for every
                         rotary frequency (DPE with one scale G over all frequencies)
    dpe:W,S1,...,SG      DPE with window W and one integer scale per group of rotary frequencies, the G groups
                         an even split of head_dim/2

linear/dynamic/yarn go through transformers' own rotary embeddings (``config.rope_parameters``);
self-extend/dpe through ``dpe_ops.apply_dpe`` on the loaded base model. Nothing is written to disk.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

from dpe_export.errors import DPEExportError
from dpe_export.modeling_templates import dpe_family, dpe_params
from dpe_export import dpe_ops

logger = logging.getLogger("dpe_export")


METHOD_FORMS = "none, linear:F, dynamic:F, yarn:F (F a factor >= 1), self-extend:W,G (window W, group size G) " \
               "or dpe:W,S1,...,SG (window W, one integer scale per group of rotary frequencies)"


ROPE_METHODS = ("linear", "dynamic", "yarn")


DPE_METHODS = ("self-extend", "dpe")


@dataclass(frozen=True)
class MethodSpec:
    """A parsed --method: ``kind`` is none, linear, dynamic, yarn, self-extend or dpe."""

    kind: str
    factor: Optional[float] = None  # linear / dynamic / yarn
    window: Optional[int] = None  # self-extend / dpe
    scales: tuple[int, ...] = ()  # self-extend: (G,); dpe: (S1, ..., SG)

    @property
    def is_rope(self) -> bool:
        return self.kind in ROPE_METHODS

    @property
    def is_dpe(self) -> bool:
        return self.kind in DPE_METHODS

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        if self.is_rope:
            return f"{self.kind}:{self.factor:g}"
        return f"{self.kind}:{self.window}," + ",".join(map(str, self.scales))


def _bad(spec: str, why: str = "") -> DPEExportError:
    reason = f" ({why})" if why else ""
    return DPEExportError(f"invalid method {spec!r}{reason}; valid forms: {METHOD_FORMS}")


def _ints(spec: str, text: str) -> list[int]:
    items = [x.strip() for x in text.split(",")]
    try:
        values = [int(x) for x in items]
    except ValueError:
        raise _bad(spec, "expected comma-separated integers after the colon") from None
    return values


def parse_method(spec: Optional[str]) -> MethodSpec:
    """Parse a method spec (see the module docstring); DPEExportError naming the valid forms when invalid."""
    if spec is None:
        return MethodSpec("none")
    text = spec.strip().lower()
    if text in ("", "none", "base"):
        return MethodSpec("none")
    kind, sep, rest = text.partition(":")
    kind = kind.strip().replace("_", "-")
    if kind == "selfextend":
        kind = "self-extend"
    if kind in ROPE_METHODS:
        if not sep or not rest.strip():
            raise _bad(spec, f"{kind} needs a factor, e.g. {kind}:4")
        try:
            factor = float(rest)
        except ValueError:
            raise _bad(spec, f"the factor must be a number, got {rest.strip()!r}") from None
        if not math.isfinite(factor) or factor < 1:
            raise _bad(spec, "the factor must be >= 1")
        return MethodSpec(kind, factor=factor)
    if kind in DPE_METHODS:
        if not sep or not rest.strip():
            example = "self-extend:1024,8" if kind == "self-extend" else "dpe:1024,2,8,32,4"
            raise _bad(spec, f"{kind} needs a window and scales, e.g. {example}")
        values = _ints(spec, rest)
        if kind == "self-extend" and len(values) != 2:
            raise _bad(spec, "self-extend takes exactly a window and a group size: self-extend:W,G")
        if kind == "dpe" and len(values) < 2:
            raise _bad(spec, "dpe takes a window and at least one scale: dpe:W,S1,...,SG")
        window, scales = values[0], tuple(values[1:])
        if window < 1:
            raise _bad(spec, "the window must be >= 1")
        if any(s < 1 for s in scales):
            raise _bad(spec, "scales must be integers >= 1")
        return MethodSpec(kind, window=window, scales=scales)
    raise _bad(spec)


SCALED_LAYER_TYPE = "full_attention"  # with per-layer-type RoPE, the layer type a RoPE method rescales


def _per_layer_type(rope: dict) -> bool:
    return all(isinstance(v, dict) for v in rope.values())


def base_rope_parameters(config) -> dict[str, Any]:
    """The config's RoPE parameters that a RoPE method rescales: the flat dict, or with per-layer-type RoPE
    (Gemma 3: local and global bases) the full-attention layers' entry, as Gemma 3's own long-context
    checkpoints scale only their global layers. DPEExportError for models without RoPE."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or not rope:
        raise DPEExportError(
            f"model type {getattr(config, 'model_type', '?')!r} has no rotary position embeddings (RoPE), "
            "so RoPE scaling methods do not apply"
        )
    if _per_layer_type(rope):
        if not isinstance(rope.get(SCALED_LAYER_TYPE), dict):
            raise DPEExportError(f"the per-layer-type RoPE parameters have no {SCALED_LAYER_TYPE!r} entry")
        return rope[SCALED_LAYER_TYPE]
    return rope


def rope_parameters_for(method: MethodSpec, config) -> dict[str, Any]:
    """The ``config.rope_parameters`` dict for a linear / dynamic / yarn method on a base model config (with
    per-layer-type RoPE, only the full-attention entry changes)."""
    if not method.is_rope:
        raise ValueError(f"{method} is not a RoPE scaling method")
    new = _scaled_rope_parameters(method, config, base_rope_parameters(config))
    if _per_layer_type(config.rope_parameters):
        return {**copy.deepcopy(config.rope_parameters), SCALED_LAYER_TYPE: new}
    return new


def _scaled_rope_parameters(method: MethodSpec, config, rope: dict[str, Any]) -> dict[str, Any]:
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise DPEExportError("the model config has no rope_theta")
    new: dict[str, Any] = {"rope_type": method.kind, "rope_theta": float(theta), "factor": float(method.factor)}
    if "partial_rotary_factor" in rope:
        new["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if method.kind == "yarn":
        new["original_max_position_embeddings"] = int(config.max_position_embeddings)
    return new


def dpe_params_for(method: MethodSpec, config, target_length: Optional[int] = None):
    """DPEParams for a self-extend / dpe method on a base model config (validated against its head_dim).

    self-extend:W,G is DPE with window W and the single scale G over all head_dim/2 frequencies; dpe:W,S1..SG
    splits the frequencies evenly into G groups. The pretraining length is the base max_position_embeddings
    (so the base rotary embedding is kept as it is); the target length is only recorded.
    """
    if not method.is_dpe:
        raise ValueError(f"{method} is not a DPE method")
    half = dpe_family.rotary_dim_of(config) // 2  # the rotary frequencies (all head dims, unless only part rotates)
    try:
        if method.kind == "self-extend":
            bounds = [0, half]
        else:
            bounds = dpe_ops.even_group_boundaries(half, len(method.scales))
        pretrain = int(config.max_position_embeddings)
        target = max(int(target_length or 0), pretrain, method.window + 1)
        params = dpe_params.DPEParams(
            local_window_size=method.window,
            scale_factors=list(method.scales),
            dimension_groups_range=bounds,
            target_length=target,
            pretrain_length=pretrain,
        )
        params.validate(2 * half)
    except ValueError as e:
        raise DPEExportError(f"invalid method {method}: {e}") from None
    return params

