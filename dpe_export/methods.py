"""Context-extension baselines applied to a base model at load time, and model loading for evaluation.

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
self-extend/dpe through ``dpe_core.apply_dpe`` on the loaded base model. Nothing is written to disk.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dpe_export.errors import DPEExportError
from dpe_export.resources import load_dpe_core

logger = logging.getLogger("dpe_export")

__all__ = [
    "METHOD_FORMS",
    "ROPE_METHODS",
    "DPE_METHODS",
    "MethodSpec",
    "parse_method",
    "rope_parameters_for",
    "dpe_params_for",
    "LoadedModel",
    "check_eval_model",
    "load_tokenizer",
    "load_model",
    "resolve_device",
    "input_device",
    "check_device_map",
    "DEVICE_MAPS",
    "resolve_dtype",
]

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


# ----------------------------------------------------------------------------------------------------------
# What a method changes
# ----------------------------------------------------------------------------------------------------------


def _head_dim(config) -> int:
    """Twice the number of rotary frequencies (the head dimension, unless only part of it rotates)."""
    return load_dpe_core().rotary_dim_of(config)


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
    core = load_dpe_core()
    half = _head_dim(config) // 2
    try:
        if method.kind == "self-extend":
            bounds = [0, half]
        else:
            bounds = core.even_group_boundaries(half, len(method.scales))
        pretrain = int(config.max_position_embeddings)
        target = max(int(target_length or 0), pretrain, method.window + 1)
        params = core.DPEParams(
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


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready for evaluation, its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    model_dir: Path
    method: MethodSpec
    is_export: bool
    device: Any
    dtype: Any
    pretrain_length: Optional[int]  # the base model's max_position_embeddings (an export's pretrain_length)

    def describe(self) -> str:
        if self.is_export:
            dpe = getattr(self.model.config, "dpe", None) or {}
            return (f"DPE export (window {dpe.get('local_window_size')}, scale factors "
                    f"{','.join(map(str, dpe.get('scale_factors') or []))})")
        return "base model" if self.method.kind == "none" else f"base model + {self.method}"


def resolve_device(device: Optional[str]):
    """'auto' / None -> cuda when available else cpu; DPEExportError for an unusable device."""
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DPEExportError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DPEExportError("--device cuda was requested, but torch sees no CUDA GPU")
    return dev


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def resolve_dtype(dtype: Optional[str], device):
    """'auto' / None -> float32 on CPU, bfloat16 on CUDA (float16 where bf16 is unsupported)."""
    import torch

    if dtype in (None, "", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    name = _DTYPES.get(str(dtype).lower())
    if name is None:
        raise DPEExportError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, name)


def _read_raw_config(model_dir: Path) -> dict[str, Any]:
    from dpe_export.export import check_model_dir, read_config_json

    check_model_dir(model_dir)
    return read_config_json(model_dir)


def _check_weights(model_dir: Path) -> None:
    from dpe_export.export import PICKLED_WEIGHT_PATTERNS, WEIGHTS_FILE, WEIGHTS_INDEX_FILE
    from dpe_export.safefiles import safe_file

    if safe_file(model_dir, WEIGHTS_FILE) is not None or safe_file(model_dir, WEIGHTS_INDEX_FILE) is not None:
        return
    pickled = sorted({p.name for pattern in PICKLED_WEIGHT_PATTERNS for p in model_dir.glob(pattern)})
    if pickled:
        raise DPEExportError(
            f"{model_dir} holds only pickled weights ({', '.join(pickled[:3])}); dpe-export reads safetensors "
            "only and never loads pickles"
        )
    raise DPEExportError(f"no safetensors weights ({WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}) in {model_dir}")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _rotary_of(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return getattr(decoder, "rotary_emb", None)


def _check_rope_changed(model, base_config, method: MethodSpec) -> None:
    """Guard against a model class that silently ignores config.rope_parameters."""
    import torch

    rotary = _rotary_of(model)
    if rotary is None:
        raise DPEExportError(f"{type(model).__name__} has no rotary embedding module; {method} cannot be applied")
    if method.kind == "dynamic":  # dynamic NTK changes inv_freq only on sequences past the base length
        changed = getattr(rotary, "rope_type", None) == "dynamic"
    else:  # every inv_freq buffer and attention scaling (one per layer type where the family has several)
        plain = type(rotary)(config=base_config)
        freqs = [name for name, _ in plain.named_buffers() if name.endswith("inv_freq") and "original" not in name]
        scalings = [name for name in vars(plain) if name.endswith("attention_scaling")]
        changed = any(not torch.equal(plain.get_buffer(n).cpu().float(), rotary.get_buffer(n).detach().cpu().float())
                      for n in freqs) or any(float(getattr(plain, n)) != float(getattr(rotary, n)) for n in scalings)
    if not changed:
        raise DPEExportError(f"{type(model).__name__} ignored the RoPE parameters of {method}; cannot apply it")


def check_eval_model(model_dir, method: Optional[MethodSpec] = None,
                     trust_remote_code: bool = False) -> tuple[dict[str, Any], bool]:
    """Fast checks before anything is loaded: the directory, config.json, safetensors weights, that a method
    is not asked of a DPE export, and that an export's code is dpe-export's own unless trust_remote_code.
    Returns the raw config.json and whether it is a DPE export."""
    model_dir = Path(model_dir)
    method = method or MethodSpec("none")
    raw = _read_raw_config(model_dir)
    _check_weights(model_dir)
    from dpe_export.export import TOKENIZER_FILES
    from dpe_export.safefiles import safe_file

    for name in TOKENIZER_FILES:  # what transformers reads besides config and weights: no link out of the dir
        safe_file(model_dir, name)
    is_export = "dpe" in raw
    if is_export and method.kind != "none":
        raise DPEExportError(
            f"{model_dir} is already a DPE export; --method {method} applies only to base models "
            "(evaluate the export with --method none, or give its base model)"
        )
    if is_export and not trust_remote_code:
        from dpe_export.export import foreign_code

        why = foreign_code(model_dir, raw)
        if why is not None:
            raise DPEExportError(
                f"{model_dir} carries code dpe-export did not write ({why}); loading it would run that code. "
                "If it is an export of an earlier dpe-export, run `dpe-export upgrade` on it; if you trust its "
                "code, pass --trust-remote-code"
            )
    return raw, is_export


def load_tokenizer(model_dir):
    """The checkpoint's tokenizer (AutoTokenizer); DPEExportError when there is none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise DPEExportError(f"cannot load a tokenizer from {model_dir}: {_first_line(e)}") from None
    if tokenizer is None or isinstance(tokenizer, bool):  # pragma: no cover - defensive
        raise DPEExportError(f"no tokenizer in {model_dir}")
    return tokenizer


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: Optional[str], device: Optional[str] = None) -> None:
    """A device map needs accelerate and replaces --device; DPEExportError otherwise."""
    if device_map is None:
        return
    if device_map not in DEVICE_MAPS:
        raise DPEExportError(f"unknown device map {device_map!r}; use one of {', '.join(DEVICE_MAPS)}")
    if device not in (None, "", "auto"):
        raise DPEExportError("give --device or --device-map, not both (a device map places the layers itself)")
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise DPEExportError("--device-map needs the accelerate package: pip install accelerate") from None


def input_device(model):
    """Where input ids go: the device of the input embeddings (the first device of a device map). Weights
    that a device map offloaded sit on the meta device; accelerate's hooks then move the inputs, so CPU."""
    import torch

    try:
        dev = model.get_input_embeddings().weight.device
    except AttributeError:  # pragma: no cover - models without input embeddings
        dev = next(model.parameters()).device
    return torch.device("cpu") if dev.type == "meta" else dev


def _rebind_dispatch_hooks(model) -> None:
    """accelerate's dispatch hooks call the forward a module's class had when the model was dispatched;
    point them at the DPE classes that apply_dpe swapped in afterwards."""
    import types

    for module in model.modules():
        if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward"):
            module._old_forward = types.MethodType(type(module).forward, module)


def load_model(model_dir, method: Optional[MethodSpec] = None, *, device=None, dtype=None, attn: str = "sdpa",
               target_length: Optional[int] = None, tokenizer=None, device_map: Optional[str] = None,
               trust_remote_code: bool = False, **load_kwargs) -> LoadedModel:
    """Load a base checkpoint (with ``method`` applied) or a DPE export (``trust_remote_code=True``).

    Weights are read from safetensors only. A method other than ``none`` on a DPE export is an error.
    ``target_length`` (the longest evaluated length) is recorded in the DPE parameters of self-extend/dpe.
    ``tokenizer``: reuse one already loaded (else it is loaded from ``model_dir``).
    ``device_map`` ("auto", "balanced", ...): spread the layers over every visible GPU (then CPU RAM) with
    accelerate, for models larger than one GPU; ``load_kwargs`` (e.g. ``max_memory``, ``offload_folder``)
    go to ``from_pretrained`` with it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    method = method or MethodSpec("none")
    raw, is_export = check_eval_model(model_dir, method, trust_remote_code)
    check_device_map(device_map, None if hasattr(device, "type") else device)
    dev = device if hasattr(device, "type") else resolve_device(None if device_map else device)
    torch_dtype = dtype if hasattr(dtype, "is_floating_point") else resolve_dtype(dtype, dev)
    if attn not in ("sdpa", "eager", "flash_attention_2"):
        raise DPEExportError(f"unknown attention implementation {attn!r}; use sdpa or eager")
    if tokenizer is None:
        tokenizer = load_tokenizer(model_dir)

    if is_export:
        try:
            config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True)
        except Exception as e:
            raise DPEExportError(f"cannot load the DPE export config in {model_dir}: {_first_line(e)}") from None
        base_config = None
    else:
        from dpe_export.export import load_base_config

        config = load_base_config(model_dir)
        base_config = copy.deepcopy(config)
        if method.is_rope:
            old = base_rope_parameters(config)
            if old.get("rope_type", "default") != "default":
                logger.warning("%s replaces the model's own %r RoPE scaling", method, old.get("rope_type"))
            config.rope_parameters = rope_parameters_for(method, config)
        elif method.is_dpe:
            try:
                load_dpe_core().check_supported_config(config)
            except ValueError as e:
                raise DPEExportError(f"cannot apply {method}: {e}") from None
            dpe_params_for(method, config, target_length)  # bad parameters fail before the weights load
    try:
        def load(implementation):
            return AutoModelForCausalLM.from_pretrained(
                str(model_dir), config=copy.deepcopy(config), dtype=torch_dtype, attn_implementation=implementation,
                trust_remote_code=is_export, use_safetensors=True,
                **({"device_map": device_map, **load_kwargs} if device_map else load_kwargs),
            )

        try:
            model = load(attn)
        except ValueError as e:  # families without sdpa (Gemma 2's soft-capping) run eager, as transformers advises
            if attn != "sdpa" or "scaled_dot_product_attention" not in str(e):
                raise
            logger.info("%s does not support sdpa attention; using eager", model_dir)
            model = load("eager")
    except (ImportError, ValueError, OSError, RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise DPEExportError(f"cannot load the model in {model_dir}: {_first_line(e)}") from None
    if method.is_rope:
        _check_rope_changed(model, base_config, method)
    elif method.is_dpe:
        params = dpe_params_for(method, model.config, target_length)
        try:
            load_dpe_core().apply_dpe(model, params)
        except ValueError as e:
            raise DPEExportError(f"cannot apply {method}: {e}") from None
    if device_map:
        if method.is_dpe:
            _rebind_dispatch_hooks(model)
        model.eval()
        dev = input_device(model)
    else:
        model.to(dev).eval()
    max_pos = (raw.get("dpe") or {}).get("pretrain_length") if is_export else raw.get("max_position_embeddings")
    return LoadedModel(model, tokenizer, model_dir, method, is_export, dev, torch_dtype,
                       max_pos if isinstance(max_pos, int) else None)
