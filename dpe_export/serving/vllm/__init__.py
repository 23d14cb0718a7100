"""vLLM plugin: serve DPE exports with DPE attention (`pip install 'dpe-export[vllm]'`).

vLLM calls register() (the `vllm.general_plugins` entry point `dpe`) in every process it starts. It registers:
- for each family of dpe_export.architectures checked on vLLM (Architecture.vllm) that vLLM has in tree, the architecture an export's config.json names
  (DPE<Family>ForCausalLM) with vLLM's ModelRegistry, pointing at dpe_export.serving.vllm.models, which subclasses
  vLLM's own model of the family and swaps DPE attention into its full-attention layers;
- the export's model_type (dpe_<family>) with vLLM's config registry and transformers' AutoConfig, as the family's
  own transformers config class under that name, so vLLM reads the config without running the export's code
  (no trust_remote_code needed, and with it the plugin's classes still win over the export's remote code).
It is a vLLM plugin: importing it imports vLLM.
"""
from __future__ import annotations

from transformers import AutoConfig
from vllm import ModelRegistry
from vllm.transformers_utils import config as vllm_config_module

from dpe_export.architectures import ARCHITECTURES
from dpe_export.serving.vllm.backend import ensure_backend_registered
from dpe_export.serving.vllm.models import dpe_config_class

_REGISTERED = False


def served_architectures() -> list:
    """The families this plugin serves (Architecture.vllm: checked token for token against transformers; the
    other families' exports stay refused)."""
    return [a for a in ARCHITECTURES.values() if a.vllm]


def registered_families() -> dict:
    """{DPE architecture name: vLLM base architecture} for the families this plugin serves."""
    return {a.dpe_causal_lm_class: a.causal_lm_class for a in served_architectures()}


def register() -> None:
    """Register DPE architectures and config types with vLLM (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    supported = set(ModelRegistry.get_supported_archs())
    for arch in served_architectures():
        if arch.causal_lm_class not in supported:
            continue
        try:
            config_cls = dpe_config_class(arch)
        except KeyError:  # this transformers release lacks the family
            continue
        AutoConfig.register(arch.dpe_model_type, config_cls, exist_ok=True)
        # vLLM's own registry of config classes: a model_type found there is read with that class and
        # trust_remote_code=False, whatever the user passed.
        vllm_config_module._CONFIG_REGISTRY[arch.dpe_model_type] = config_cls
        ModelRegistry.register_model(arch.dpe_causal_lm_class,
                                     f"dpe_export.serving.vllm.models:{arch.dpe_causal_lm_class}")
    ensure_backend_registered()
    _REGISTERED = True
