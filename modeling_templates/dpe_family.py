# coding=utf-8
# dpe_family.py: what DPE reads from a model family's config: its RoPE parameters (per layer type where it has
# several), how many head dims rotate, which layers are full attention, and whether DPE can run on it at all.
from __future__ import annotations

import importlib
from typing import Optional

import torch


def rope_parameters_of(config, layer_type: Optional[str] = None) -> dict:
    """The RoPE parameters of one layer type (families like Gemma 3 keep one dict per layer type)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope and all(isinstance(v, dict) or v is None for v in rope.values()):
        rope = rope.get(layer_type or "full_attention") or {}
    return rope if isinstance(rope, dict) else {}


def rotary_dim_of(config, rotary=None) -> int:
    """R: how many of the head dims rotate (partial rotary embeddings rotate the first R only).

    Taken from the family's own rotary embedding (`rotary`, or one built from the config), which is what the
    model really uses; from the config's partial-rotary factor only where no rotary module can be built.
    """
    if rotary is None:
        rotary = _family_rotary(config)
    if rotary is not None:
        for name, buf in rotary.named_buffers():
            if name.endswith("inv_freq") and "original" not in name:
                return 2 * int(buf.shape[-1])
    head_dim = head_dim_of(config)
    rope = rope_parameters_of(config)
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if factor is None:
        factor = getattr(config, "rotary_pct", None) or 1.0
    dim = int(head_dim * float(factor))
    return dim - dim % 2


def base_model_type(config) -> str:
    """The family's model_type: an export's config class states it (its own model_type is dpe_<family>)."""
    return getattr(config, "dpe_base_model_type", None) or config.model_type


def _family_rotary(config):
    """The family's rotary embedding module built from `config` (None where that cannot be done)."""
    try:
        from transformers.models.auto.configuration_auto import model_type_to_module_name

        name = model_type_to_module_name(base_model_type(config))
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except Exception:
        return None
    classes = [c for n, c in vars(module).items() if n.endswith("RotaryEmbedding") and isinstance(c, type)
               and issubclass(c, torch.nn.Module)]
    for cls in classes:
        try:
            return cls(config=config)
        except Exception:
            continue
    return None


def full_attention_layers(config) -> list[int]:
    """The layers DPE applies to: full attention (sliding-window and chunked layers keep the base's)."""
    n = int(config.num_hidden_layers)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [i for i in range(n) if layer_types[i] == "full_attention"]
    sliding = getattr(config, "sliding_window", None)
    if sliding is not None and getattr(config, "use_sliding_window", True) is not False:
        return []
    return list(range(n))


def check_supported_config(config) -> None:
    """Raise ValueError naming the reason when a model config cannot run DPE attention."""
    rope = rope_parameters_of(config)
    if not rope and getattr(config, "rope_theta", None) is None:
        raise ValueError(f"model type {getattr(config, 'model_type', '?')!r} has no rotary position embeddings (RoPE)")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0
                              or theta == float("inf")):
        raise ValueError(f"rope_theta must be a positive number, got {theta!r}")
    if rope.get("rope_type") in ("mrope", "3d", "m_rope"):
        raise ValueError(f"multimodal RoPE ({rope.get('rope_type')}) is not supported")
    if rotary_dim_of(config) < 2:
        raise ValueError("no dimension of the attention heads rotates")
    if not full_attention_layers(config):
        raise ValueError(
            f"every layer uses sliding-window attention (sliding_window={getattr(config, 'sliding_window', None)}); "
            "DPE applies to full-attention layers (set sliding_window to null if the model does not use it)"
        )


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
