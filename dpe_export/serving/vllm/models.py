"""vLLM model classes for DPE exports: each family's in-tree vLLM model with DPE attention in its full-attention
layers, and the config classes that let vLLM read an export's config.json without trust_remote_code.

DPE<Family>ForCausalLM (the `architectures` an export's config.json names) is made on first use by subclassing
the vLLM class registered for the family's own architecture (LlamaForCausalLM, Qwen2ForCausalLM, ...): its
weights, projections, norms, RoPE and MLPs are vLLM's; after the model is built, the Attention module of each
full-attention layer (dpe_family.full_attention_layers: sliding-window layers keep theirs) is replaced by one
running the DPE_TORCH backend (backend.py) with the layer's DPE parameters.
"""
from __future__ import annotations

from typing import Optional

import torch
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import PPMissingLayer

from dpe_export.architectures import ARCHITECTURES, Architecture
from dpe_export.dpe_ops import family_inv_freq
from dpe_export.modeling_templates.dpe_family import full_attention_layers, rotary_dim_of
from dpe_export.modeling_templates.dpe_guards import DPEServingError
from dpe_export.modeling_templates.dpe_params import SELECTED_DIMS_TENSOR, DPEParams
from dpe_export.serving.vllm.backend import DPEAttentionBackend, DPELayerSpec, ensure_backend_registered


def architecture_for_dpe_class(name: str) -> Optional[Architecture]:
    return next((a for a in ARCHITECTURES.values() if a.dpe_causal_lm_class == name), None)


# ----------------------------------------------------------------------------------------------------------------
# Config classes: model_type dpe_<family>, the family's own config class underneath.

def _check_architectures(name, value):
    """An export's config may not be pointed at a model class without DPE (vLLM's hf_overrides={"architectures":
    ["LlamaForCausalLM"]} would serve the plain base model), nor given to vLLM's Transformers backend (which sets
    the attention implementation to its own paged attention): refused in one line, as without the plugin."""
    if name == "_attn_implementation" and isinstance(value, str) and value.startswith("vllm"):
        raise DPEServingError(
            "This is a DPE export (dimension-wise RoPE scaling, arXiv 2504.18857); vLLM's Transformers backend "
            "would run it with vLLM's attention, without DPE. Serve it with the default model_impl, which the "
            "dpe-export vLLM plugin provides.")
    if name == "architectures" and value and any(not str(a).startswith("DPE") for a in value):
        raise DPEServingError(
            f"This is a DPE export (dimension-wise RoPE scaling, arXiv 2504.18857); architectures {list(value)} would "
            "serve it without DPE. Serve it under the architecture its config.json names, which the dpe-export "
            "vLLM plugin provides.")


_CONFIG_CLASSES: dict = {}


def dpe_config_class(arch: Architecture):
    """The config class for an export of this family (model_type dpe_<family>), made from transformers' own
    config class of the family: no code from the export runs."""
    cls = _CONFIG_CLASSES.get(arch.model_type)
    if cls is None:
        from transformers import CONFIG_MAPPING

        base = CONFIG_MAPPING[arch.model_type]

        def __setattr__(self, name, value):
            _check_architectures(name, value)
            base.__setattr__(self, name, value)

        cls = type(f"{arch.dpe_prefix}ServingConfig", (base,), {
            "__setattr__": __setattr__,
            "model_type": arch.dpe_model_type,
            "dpe_base_model_type": base.model_type,
            "__module__": __name__,
            "__doc__": f"{base.__name__} under an export's model_type {arch.dpe_model_type!r}, for serving engines.",
        })
        _CONFIG_CLASSES[arch.model_type] = cls
    return cls


# ----------------------------------------------------------------------------------------------------------------
# Model classes.

def _inv_freq(config, params: DPEParams, layer_type: str) -> torch.Tensor:
    """The family's rotary frequencies for this layer type, as the export's transformers runtime uses them."""
    inv = family_inv_freq(config, layer_type, params.pretrain_length)
    if inv is None:
        raise ValueError(f"cannot build the rotary embedding of model type {config.model_type!r}")
    return inv


def _load_selection(vllm_config, params: DPEParams) -> Optional[torch.Tensor]:
    """bool [layers, heads, R/2] from the export's selection file (safetensors), or None."""
    if not params.selected_dims:
        return None
    import os

    from safetensors.torch import load_file

    model = vllm_config.model_config.model
    path = os.path.join(model, params.selected_dims)
    if not os.path.isfile(path):
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model, params.selected_dims, revision=vllm_config.model_config.revision)
    return load_file(path)[SELECTED_DIMS_TENSOR].bool()


def install_dpe_attention(model: torch.nn.Module, vllm_config) -> list:
    """Replace the Attention module of every full-attention layer of a freshly built vLLM model with a DPE one.

    Returns the names of the layers that now run DPE. Refuses (ValueError) a model that is not laid out as the
    in-tree families are, rather than serving it without DPE.
    """
    ensure_backend_registered()
    config = vllm_config.model_config.hf_config
    params = DPEParams.from_dict(config.dpe)
    rotary_dim = rotary_dim_of(config)
    params.validate(rotary_dim)
    selection = _load_selection(vllm_config, params)
    scales = params.scale_per_frequency()
    layer_types = getattr(config, "layer_types", None)
    context = vllm_config.compilation_config.static_forward_context
    decoder = model.model
    done = []
    for idx in full_attention_layers(config):
        layer = decoder.layers[idx]
        if isinstance(layer, PPMissingLayer):
            continue
        attn_module = getattr(layer, "self_attn", None)
        old = getattr(attn_module, "attn", None)
        if type(old) is not Attention:
            raise ValueError(f"layer {idx} of {type(model).__name__} has no plain vLLM Attention at self_attn.attn "
                             f"({type(old).__name__}); DPE cannot be installed")
        if old.sliding_window is not None:
            raise ValueError(f"layer {idx} is a sliding-window layer in vLLM but full attention in the config")
        rotary = getattr(attn_module, "rotary_emb", None)
        if rotary is None or not getattr(rotary, "is_neox_style", False):
            raise ValueError(f"layer {idx}: DPE needs the half-split (neox-style) rotary pairing")
        if int(getattr(rotary, "rotary_dim", rotary_dim)) != rotary_dim:
            raise ValueError(f"layer {idx}: vLLM rotates {rotary.rotary_dim} dims, the config {rotary_dim}")
        layer_type = layer_types[idx] if layer_types else "full_attention"
        inv_freq = _inv_freq(config, params, layer_type)
        if hasattr(rotary, "_compute_inv_freq") and hasattr(rotary, "base") and type(rotary).__name__ == "RotaryEmbedding":
            ours = rotary._compute_inv_freq(rotary.base).float().cpu()
            if ours.shape != inv_freq.shape or not torch.allclose(ours, inv_freq, rtol=1e-5, atol=0):
                raise ValueError(f"layer {idx}: vLLM's rotary frequencies differ from the family's")
        sel = None
        if selection is not None:
            sel = selection[idx]
            sel = None if bool(sel.all()) else sel
        if sel is not None and sel.shape[0] != old.num_heads:  # tensor parallelism splits the heads over ranks
            raise ValueError(f"layer {idx}: the top-K selection covers {sel.shape[0]} query heads, this rank holds "
                             f"{old.num_heads}; a top-K export is not served with tensor parallelism")
        spec = DPELayerSpec(window=int(params.local_window_size), scales=scales, inv_freq=inv_freq,
                            rotary_dim=rotary_dim, selected=sel)
        name = old.layer_name
        context.pop(name, None)  # Attention.__init__ refuses a name already there
        soft_cap = getattr(old.impl, "logits_soft_cap", None) or None
        new = Attention(old.num_heads, old.head_size, old.impl.scale, num_kv_heads=old.num_kv_heads,
                        cache_config=vllm_config.cache_config, quant_config=old.quant_config,
                        logits_soft_cap=soft_cap, prefix=name, attn_type=old.attn_type,
                        attn_backend=DPEAttentionBackend, dpe=spec)
        attn_module.attn = new
        done.append(name)
    if not done and not any(isinstance(l, PPMissingLayer) for l in decoder.layers):
        raise ValueError("no full-attention layer to run DPE in")
    return done


_MODEL_CLASSES: dict = {}


def dpe_model_class(name: str):
    """DPE<Family>ForCausalLM for vLLM: the family's in-tree vLLM class with DPE attention installed."""
    cls = _MODEL_CLASSES.get(name)
    if cls is not None:
        return cls
    arch = architecture_for_dpe_class(name)
    if arch is None:
        raise AttributeError(name)
    from vllm.model_executor.models.registry import ModelRegistry

    base = ModelRegistry._try_load_model_cls(arch.causal_lm_class)
    if base is None:
        raise AttributeError(f"vLLM has no in-tree model {arch.causal_lm_class} for {name}")

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.dpe_layers = install_dpe_attention(self, vllm_config)

    def load_weights(self, weights):
        # vLLM reads every *.safetensors file of a directory as weights, the export's top-K selection file
        # (dpe_selected_dims.safetensors, read by install_dpe_attention) too: its tensor is not a weight.
        return base.load_weights(self, ((n, w) for n, w in weights if n != SELECTED_DIMS_TENSOR))

    cls = type(name, (base,), {"__init__": __init__, "load_weights": load_weights, "__module__": __name__,
                               "__doc__": f"vLLM's {base.__name__} with DPE attention in its full-attention layers."})
    cls.__qualname__ = name
    _MODEL_CLASSES[name] = cls
    return cls


def __getattr__(name: str):
    """`dpe_export.serving.vllm.models:DPELlamaForCausalLM` (the lazy form ModelRegistry.register_model takes)."""
    if name.startswith("DPE") and name.endswith("ForCausalLM"):
        return dpe_model_class(name)
    if name.startswith("DPE") and name.endswith("ServingConfig"):  # also how pickle finds a config's class
        arch = next((a for a in ARCHITECTURES.values() if f"{a.dpe_prefix}ServingConfig" == name), None)
        if arch is not None:
            return dpe_config_class(arch)
    raise AttributeError(name)
