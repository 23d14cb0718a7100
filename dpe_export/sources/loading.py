"""Loading a model to evaluate or calibrate: a base checkpoint with a --method applied, or an export (whose code
runs only when it is exactly what this dpe-export writes), on a device or spread with a device map.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dpe_export.architectures import export_architecture
from dpe_export.errors import DPEExportError, first_line
from dpe_export.generated import foreign_code
from dpe_export.sources.checkpoint import (
    PICKLED_WEIGHT_PATTERNS,
    TOKENIZER_FILES,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    Checkpoint,
)
from dpe_export.sources.methods import (
    MethodSpec,
    base_rope_parameters,
    dpe_params_for,
    rope_parameters_for,
)
from dpe_export.modeling_templates import dpe_family
from dpe_export import dpe_ops

logger = logging.getLogger("dpe_export")


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


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # what --dtype accepts
DEVICE_CHOICES = ("auto", "cpu", "cuda")  # what --device accepts
ATTN_CHOICES = ("sdpa", "eager")  # what --attn accepts (flash_attention_2 through the Python API only)
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


def _check_weights(ckpt: Checkpoint) -> None:
    model_dir = ckpt.path
    if ckpt.file(WEIGHTS_FILE) is not None or ckpt.file(WEIGHTS_INDEX_FILE) is not None:
        return
    pickled = sorted({p.name for pattern in PICKLED_WEIGHT_PATTERNS for p in model_dir.glob(pattern)})
    if pickled:
        raise DPEExportError(
            f"{model_dir} holds only pickled weights ({', '.join(pickled[:3])}); dpe-export reads safetensors "
            "only and never loads pickles"
        )
    raise DPEExportError(f"no safetensors weights ({WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}) in {model_dir}")


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


def check_eval_model(model, method: Optional[MethodSpec] = None, trust_remote_code: bool = False) -> Checkpoint:
    """Fast checks before anything is loaded: the directory, config.json, safetensors weights, that a method
    is not asked of a DPE export, and that an export's code is dpe-export's own unless trust_remote_code.
    `model`: a directory or its Checkpoint; returns the Checkpoint (config.json read once)."""
    ckpt = Checkpoint.of(model)
    model_dir = ckpt.path
    method = method or MethodSpec("none")
    raw = ckpt.check().raw
    _check_weights(ckpt)

    for name in TOKENIZER_FILES:  # what transformers reads besides config and weights: no link out of the dir
        ckpt.file(name)
    is_export = ckpt.is_export
    if is_export and method.kind != "none":
        raise DPEExportError(
            f"{model_dir} is already a DPE export; --method {method} applies only to base models "
            "(evaluate the export with --method none, or give its base model)"
        )
    if is_export and not trust_remote_code:

        why = foreign_code(model_dir, raw)
        if why is not None:
            raise DPEExportError(
                f"{model_dir} carries code dpe-export did not write ({why}); loading it would run that code. "
                "If it is an export of an earlier dpe-export, run `dpe-export upgrade` on it; if you trust its "
                "code, pass --trust-remote-code"
            )
    return ckpt


def load_tokenizer(model):
    """The checkpoint's tokenizer (AutoTokenizer); DPEExportError when there is none. `model`: a directory or its
    Checkpoint."""
    from transformers import AutoConfig, AutoTokenizer

    ckpt = Checkpoint.of(model)
    model_dir = ckpt.path
    kwargs = {}
    arch = export_architecture(ckpt.model_type) if ckpt.has_config and ckpt.is_export else None
    if arch is not None and ckpt.model_type != arch.model_type:
        # An export's config class is in its own code (model_type dpe_<family>); the tokenizer needs none of it:
        # its family's config stands in, so no code runs and transformers does not ask for trust_remote_code.
        kwargs["config"] = AutoConfig.for_model(arch.model_type)
    try:
        # trust_remote_code=False: a base model's tokenizer code (an auto_map) never runs, and with a terminal
        # transformers does not ask about it either
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False, **kwargs)
    except Exception as e:
        raise DPEExportError(f"cannot load a tokenizer from {model_dir}: {first_line(e)}") from None
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


def _eval_config(ckpt: Checkpoint, method: MethodSpec, target_length: Optional[int]):
    """The config to load with (the method's RoPE parameters applied) and the base model's (to check against)."""
    from transformers import AutoConfig

    if ckpt.is_export:
        try:
            return AutoConfig.from_pretrained(str(ckpt.path), trust_remote_code=True), None
        except Exception as e:
            raise DPEExportError(f"cannot load the DPE export config in {ckpt.path}: {first_line(e)}") from None
    config = copy.deepcopy(ckpt.config)  # changed below; the Checkpoint keeps the base model's
    base_config = copy.deepcopy(ckpt.config)
    if method.is_rope:
        old = base_rope_parameters(config)
        if old.get("rope_type", "default") != "default":
            logger.warning("%s replaces the model's own %r RoPE scaling", method, old.get("rope_type"))
        config.rope_parameters = rope_parameters_for(method, config)
    elif method.is_dpe:
        try:
            dpe_family.check_supported_config(config)
        except ValueError as e:
            raise DPEExportError(f"cannot apply {method}: {e}") from None
        dpe_params_for(method, config, target_length)  # bad parameters fail before the weights load
    return config, base_config


def load_model(model_dir, method: Optional[MethodSpec] = None, *, device=None, dtype=None, attn: str = "sdpa",
               target_length: Optional[int] = None, tokenizer=None, device_map: Optional[str] = None,
               trust_remote_code: bool = False, **load_kwargs) -> LoadedModel:
    """Load a base checkpoint (with ``method`` applied) or a DPE export (``trust_remote_code=True``).

    `model_dir`: a directory or its Checkpoint. Weights are read from safetensors only. A method other than ``none`` on a DPE export is an error.
    ``target_length`` (the longest evaluated length) is recorded in the DPE parameters of self-extend/dpe.
    ``tokenizer``: reuse one already loaded (else it is loaded from ``model_dir``).
    ``device_map`` ("auto", "balanced", ...): spread the layers over every visible GPU (then CPU RAM) with
    accelerate, for models larger than one GPU; ``load_kwargs`` (e.g. ``max_memory``, ``offload_folder``)
    go to ``from_pretrained`` with it.
    """
    from transformers import AutoModelForCausalLM

    method = method or MethodSpec("none")
    ckpt = check_eval_model(model_dir, method, trust_remote_code)
    model_dir, is_export = ckpt.path, ckpt.is_export
    check_device_map(device_map, None if hasattr(device, "type") else device)
    dev = device if hasattr(device, "type") else resolve_device(None if device_map else device)
    torch_dtype = dtype if hasattr(dtype, "is_floating_point") else resolve_dtype(dtype, dev)
    if attn not in ("sdpa", "eager", "flash_attention_2"):
        raise DPEExportError(f"unknown attention implementation {attn!r}; use sdpa or eager")
    if tokenizer is None:
        tokenizer = load_tokenizer(ckpt)

    config, base_config = _eval_config(ckpt, method, target_length)
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
        raise DPEExportError(f"cannot load the model in {model_dir}: {first_line(e)}") from None
    if method.is_rope:
        _check_rope_changed(model, base_config, method)
    elif method.is_dpe:
        params = dpe_params_for(method, model.config, target_length)
        try:
            dpe_ops.apply_dpe(model, params)
        except ValueError as e:
            raise DPEExportError(f"cannot apply {method}: {e}") from None
    if device_map:
        if method.is_dpe:
            _rebind_dispatch_hooks(model)
        model.eval()
        dev = input_device(model)
    else:
        model.to(dev).eval()
    return LoadedModel(model, tokenizer, model_dir, method, is_export, dev, torch_dtype, ckpt.pretraining_length)

