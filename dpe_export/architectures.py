"""Supported model families, as data.

Each entry names the transformers classes the generated modeling file builds on and the class-name prefix
of the DPE classes it defines. Adding a RoPE family whose attention follows the Llama layout is one entry here
(plus whatever the modeling template needs).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from dpe_export.errors import DPEExportError
from dpe_export.resources import load_dpe_core


@dataclass(frozen=True)
class Architecture:
    """How one transformers model family maps onto the generated DPE modeling code."""

    model_type: str  # config.model_type
    display_name: str  # for messages and model cards
    transformers_module: str  # module that defines the classes below
    causal_lm_class: str  # e.g. LlamaForCausalLM
    model_class: str  # the base model, e.g. LlamaModel
    dpe_prefix: str  # generated classes: <dpe_prefix>ForCausalLM, <dpe_prefix>Attention, ...

    @property
    def dpe_causal_lm_class(self) -> str:
        return f"{self.dpe_prefix}ForCausalLM"

    def template_variables(self) -> dict[str, str]:
        """Variables for the modeling template (without tool_version)."""
        d = asdict(self)
        d["family"] = d.pop("model_type")
        d.pop("display_name")
        return d


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture(
            model_type="llama",
            display_name="Llama",
            transformers_module="transformers.models.llama.modeling_llama",
            causal_lm_class="LlamaForCausalLM",
            model_class="LlamaModel",
            dpe_prefix="DPELlama",
        ),
        Architecture(
            model_type="mistral",
            display_name="Mistral",
            transformers_module="transformers.models.mistral.modeling_mistral",
            causal_lm_class="MistralForCausalLM",
            model_class="MistralModel",
            dpe_prefix="DPEMistral",
        ),
        Architecture(
            model_type="qwen2",
            display_name="Qwen2",
            transformers_module="transformers.models.qwen2.modeling_qwen2",
            causal_lm_class="Qwen2ForCausalLM",
            model_class="Qwen2Model",
            dpe_prefix="DPEQwen2",
        ),
    )
}


def supported_families() -> str:
    """'llama (Llama), mistral (Mistral), qwen2 (Qwen2)': for messages."""
    return ", ".join(f"{a.model_type} ({a.display_name})" for a in ARCHITECTURES.values())


def has_rotary_embeddings(config) -> bool:
    return bool(getattr(config, "rope_parameters", None)) or getattr(config, "rope_theta", None) is not None


def get_architecture(config) -> Architecture:
    """The registry entry for `config`, after checking that DPE can run on it; DPEExportError otherwise."""
    model_type = getattr(config, "model_type", None) or "?"
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        if not has_rotary_embeddings(config):
            raise DPEExportError(
                f"model type {model_type!r} has no rotary position embeddings (RoPE), so DPE does not apply to it; "
                f"supported families: {supported_families()}"
            )
        raise DPEExportError(
            f"model type {model_type!r} is not supported yet; supported families: {supported_families()}"
        )
    try:
        load_dpe_core().check_supported_config(config)
    except ValueError as e:
        raise DPEExportError(f"this {arch.display_name} model cannot run DPE attention: {e}") from None
    return arch
