"""Supported model families, as data.

Each entry names the transformers classes the generated modeling file builds on and the class-name prefix
of the DPE classes it defines. Adding a RoPE family whose attention goes through transformers' attention
interface is one `family(...)` line here; the tests build a tiny model of every entry (tests/test_families.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from dpe_export.errors import DPEExportError
from dpe_export.modeling_templates import dpe_family


EXPORT_MODEL_TYPE_PREFIX = "dpe_"  # an export of family "llama" has model_type "dpe_llama"


@dataclass(frozen=True)
class Architecture:
    """How one transformers model family maps onto the generated DPE modeling code.

    Families whose attention goes through transformers' attention interface need nothing else: DPE runs as an
    attention function inside the family's own forward (its projections, q/k norms, RoPE and cache).
    """

    model_type: str  # config.model_type
    display_name: str  # for messages and model cards
    transformers_module: str  # module that defines the classes below
    causal_lm_class: str  # e.g. LlamaForCausalLM
    model_class: str  # the base model, e.g. LlamaModel
    dpe_prefix: str  # generated classes: <dpe_prefix>ForCausalLM, <dpe_prefix>Model
    # Config values that make the tiny random model the tests build from this entry meaningful (e.g. a
    # full-attention layer among sliding ones). Not used outside the tests.
    test_config: tuple = ()
    # Served by the vLLM plugin (dpe_export.serving.vllm): only families whose exports vLLM was checked to serve
    # token for token like transformers (tests/test_vllm_plugin.py); vLLM refuses the others' exports in one line.
    vllm: bool = False
    # False where transformers' sdpa attention leaves out part of the family's attention: Gemma 2's attention logit
    # softcapping, which sdpa dropped without a word before transformers 5.21 (5.21 stopped offering sdpa for
    # Gemma 2). The export's classes then say they do not support sdpa, so every release loads them with eager
    # and refuses an explicit sdpa, as 5.21 does; otherwise, on 5.0-5.20, the DPE layers would apply the softcap
    # and the sliding layers, running transformers' sdpa, would not.
    sdpa: bool = True

    @property
    def dpe_causal_lm_class(self) -> str:
        return f"{self.dpe_prefix}ForCausalLM"

    @property
    def dpe_model_type(self) -> str:
        """An export's own model_type: transformers knows no such type, so loading an export without its code
        (no trust_remote_code, or a tool that builds the family's plain classes) fails instead of dropping DPE."""
        return EXPORT_MODEL_TYPE_PREFIX + self.model_type

    def template_variables(self) -> dict[str, str]:
        """Variables for the modeling template (without tool_version)."""
        d = asdict(self)
        d["family"] = d.pop("model_type")
        d.pop("display_name")
        d.pop("test_config")
        d.pop("vllm")
        d["dpe_model_type"] = self.dpe_model_type
        return d


def family(model_type: str, name: str, *, module: Optional[str] = None, causal_lm: Optional[str] = None,
           base: Optional[str] = None, display: Optional[str] = None, test_config: tuple = (),
           vllm: bool = False, sdpa: bool = True) -> Architecture:
    """A registry entry from the family's class-name stem, for the usual transformers layout
    (transformers.models.<type>.modeling_<type>: <Name>ForCausalLM, <Name>Model); irregular ones say so."""
    module = module or model_type
    return Architecture(
        model_type=model_type,
        display_name=display or name,
        transformers_module=f"transformers.models.{module}.modeling_{module}",
        causal_lm_class=causal_lm or f"{name}ForCausalLM",
        model_class=base or f"{name}Model",
        dpe_prefix=f"DPE{name}",
        test_config=test_config,
        vllm=vllm,
        sdpa=sdpa,
    )


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        family("llama", "Llama", vllm=True),
        family("mistral", "Mistral", test_config=(("sliding_window", None),), vllm=True),
        family("qwen2", "Qwen2", vllm=True),
        family("qwen3", "Qwen3", vllm=True),
        family("qwen3_moe", "Qwen3Moe", display="Qwen3-MoE",
               test_config=(("num_experts", 4), ("num_experts_per_tok", 2), ("moe_intermediate_size", 32)), vllm=True),
        family("gemma3_text", "Gemma3", module="gemma3", base="Gemma3TextModel", display="Gemma 3",
               test_config=(("layer_types", ("sliding_attention", "full_attention")), ("sliding_window", 8),
                            ("query_pre_attn_scalar", 24)), vllm=True),
        family("gemma2", "Gemma2", display="Gemma 2",
               test_config=(("sliding_window", 8), ("attn_logit_softcapping", 20.0), ("query_pre_attn_scalar", 24)),
               vllm=True, sdpa=False),
        family("phi3", "Phi3", vllm=True),
        family("olmo2", "Olmo2", display="OLMo 2"),
        family("granite", "Granite", test_config=(("attention_multiplier", 0.2),), vllm=True),
        family("starcoder2", "Starcoder2", display="StarCoder2"),
        family("gpt_neox", "GPTNeoX", display="GPT-NeoX", test_config=(("rotary_pct", 0.5),)),
        family("stablelm", "StableLm", display="StableLM", test_config=(("partial_rotary_factor", 0.5),), vllm=True),
    )
}


@dataclass(frozen=True)
class Wrapper:
    """A multimodal checkpoint whose language model is a registered family: dpe-export converts the text model.

    Its config holds the text model's config under `text_config_key`; its weights are renamed by the first
    matching (old prefix, new prefix) pair, and weights that match none (vision tower, projector) are left out.
    """

    model_type: str
    text_model_type: str  # a key of ARCHITECTURES
    renames: tuple  # ((old prefix, new prefix), ...), tried in order
    text_config_key: str = "text_config"
    # Tests only: the config class's keyword arguments besides text_config (a tiny vision tower).
    test_config: tuple = ()


def wrapper(model_type: str, text_model_type: str, *, test_config: tuple = ()) -> Wrapper:
    """The usual layout: the text model under language_model (as saved: language_model.model.* and
    language_model.lm_head.*; as transformers 5 names them in memory: model.language_model.* and lm_head.*)."""
    renames = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
               ("model.language_model.", "model."), ("lm_head.", "lm_head."))
    return Wrapper(model_type, text_model_type, renames, test_config=test_config)


_SIGLIP = (("vision_config", (("hidden_size", 16), ("intermediate_size", 32), ("num_hidden_layers", 1),
                              ("num_attention_heads", 2), ("image_size", 28), ("patch_size", 14))),)
WRAPPERS: dict[str, Wrapper] = {
    w.model_type: w
    for w in (
        wrapper("gemma3", "gemma3_text", test_config=_SIGLIP + (("mm_tokens_per_image", 4),)),
        wrapper("mistral3", "mistral", test_config=(
            ("vision_config", (("hidden_size", 16), ("intermediate_size", 32), ("num_hidden_layers", 1),
                               ("num_attention_heads", 2), ("head_dim", 8), ("image_size", 28), ("patch_size", 14))),
            ("vision_feature_layer", -1), ("spatial_merge_size", 1))),
    )
}


def export_architecture(model_type) -> Optional[Architecture]:
    """The family of an export's config.json model_type: dpe_<family>, or the family's own type as exports of
    dpe-export 0.2 and earlier wrote it (`dpe-export upgrade` rewrites those)."""
    if isinstance(model_type, str) and model_type.startswith(EXPORT_MODEL_TYPE_PREFIX):
        arch = ARCHITECTURES.get(model_type[len(EXPORT_MODEL_TYPE_PREFIX):])
        return arch if arch is not None and arch.dpe_model_type == model_type else None
    return ARCHITECTURES.get(model_type)


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
        dpe_family.check_supported_config(config)
    except ValueError as e:
        raise DPEExportError(f"this {arch.display_name} model cannot run DPE attention: {e}") from None
    return arch
