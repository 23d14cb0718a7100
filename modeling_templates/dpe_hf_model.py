# coding=utf-8
# dpe_hf_model.py: a transformers model made DPE. install_dpe points each full-attention layer's attention at the
# "dpe" function (weights, projections and norms untouched) and gives the base model DPE's cache handling; the
# mixins are what an export's generated modeling_dpe.py puts in front of the family's own classes.
#
# What this relies on in transformers (checked on every 5.x release by scripts/compat_matrix.py): Cache,
# DynamicCache, DynamicLayer (`keys`, `values`, `is_initialized`, `update(k, v, *args, **kwargs)`), `cache.layers`,
# each decoder's `rotary_emb` and `layers`, and the family module's `eager_attention_forward` and `rotate_half`.
from __future__ import annotations

import copy
import inspect
import sys
from typing import Optional

import torch

from .dpe_cache import prepare_cache
from .dpe_family import check_supported_config, full_attention_layers, rotary_dim_of
from .dpe_guards import caller_stacklevel, check_transformers_version, refuse_serving_engines
from .dpe_hf_attention import DPEAttentionConfig, DPELayerState, compiling, per_class, register_dpe_attention
from .dpe_params import SELECTED_DIMS_TENSOR, DPEParams
from .dpe_workarounds import copy_code_files, register_weight_conversions, take_cache_argument, tie_unloaded_weights


@per_class
def _forward_parameters(cls: type) -> tuple:
    """Parameter names (without self) of the first forward after DPEModelMixin in cls's MRO."""
    mro = cls.__mro__
    for klass in mro[mro.index(DPEModelMixin) + 1 :]:
        fn = klass.__dict__.get("forward")
        if fn is not None:
            return tuple(inspect.signature(fn).parameters)[1:]
    raise TypeError(f"{cls.__name__} has no forward")


class DPEModelMixin:
    """Mixed into a family's base model (e.g. LlamaModel): a fresh DynamicCache gets DPE cache layers."""

    def forward(self, *args, **kwargs):
        params = _forward_parameters(type(self))
        name = take_cache_argument(type(self).__name__, params, kwargs)
        idx = params.index(name)
        cache = args[idx] if len(args) > idx else kwargs.get(name)
        if cache is None:
            u = params.index("use_cache") if "use_cache" in params else None
            use_cache = args[u] if u is not None and len(args) > u else kwargs.get("use_cache")
            if use_cache is None:
                use_cache = getattr(self.config, "use_cache", False)
            if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
                use_cache = False
            if use_cache:
                from transformers import DynamicCache

                cache = DynamicCache(config=self.config)
                if len(args) > idx:
                    args = (*args[:idx], cache, *args[idx + 1 :])
                else:
                    kwargs[name] = cache
        past = 0
        states = self.__dict__.get("_dpe_states", {})
        if cache is not None:
            # Under torch.compile the cache keeps plain keys (DPE rotates them on the fly, as for a static cache):
            # inductor (torch 2.13) freed and reused the buffer of a DPE layer it made inside the compiled graph
            # while the layer still held it, and the logits past the window were wrong (issue 33).
            if not compiling():
                prepare_cache(cache, states)
            past = int(cache.get_seq_length())  # where this forward's keys start
        self._dpe_warn_past_target(past, args, kwargs, params)
        for state in states.values():
            state.set_past_length(past if cache is not None else None)
        try:
            return super().forward(*args, **kwargs)
        finally:
            for state in states.values():
                state.set_past_length(None)

    def _dpe_warn_past_target(self, past: int, args, kwargs, params) -> None:
        """One warning per model when an input reaches past the length the export was made for."""
        if self.__dict__.get("_dpe_warned"):
            return
        dpe = getattr(self.config, "dpe", None) or {}
        target = dpe.get("target_length") if isinstance(dpe, dict) else None
        x = next((v for k, v in list(zip(params, args)) + list(kwargs.items())
                  if k in ("input_ids", "inputs_embeds") and v is not None), None)
        if not target or x is None or past + x.shape[1] <= target:
            return
        self.__dict__["_dpe_warned"] = True
        import warnings

        warnings.warn(
            f"DPE: this input reaches {past + x.shape[1]} tokens, past the {target} this export was made for "
            f"(pretrained on {dpe.get('pretrain_length')}, window {dpe.get('local_window_size')}, scale factors "
            f"{dpe.get('scale_factors')}); quality beyond {target} tokens was not calibrated",
            stacklevel=caller_stacklevel())


def _dpe_subclass(base: type, mixin: type) -> type:
    if issubclass(base, mixin):
        return base
    return type(f"DPE{base.__name__}", (mixin, base), {"__module__": __name__})


def install_dpe(model, params: DPEParams, model_class: Optional[type] = None) -> None:
    """Turn a loaded or freshly built model (causal LM or base model) into its DPE version, in place.

    Points each full-attention layer's attention at DPE (weights, projections and norms untouched), gives the
    base model DPE's cache handling and, when the config's max_position_embeddings was raised to the target
    length, rebuilds the rotary embedding from the pretraining length so that theta and the attention scaling
    stay exactly those of the base model.
    """
    register_dpe_attention()
    config = model.config
    check_supported_config(config)
    decoder = decoder_of(model)
    rotary = decoder.rotary_emb
    rotary_dim = rotary_dim_of(config, rotary)
    params.validate(rotary_dim)
    if params.pretrain_length and params.pretrain_length != config.max_position_embeddings:
        rope_config = copy.deepcopy(config)
        rope_config.max_position_embeddings = params.pretrain_length
        device = next(rotary.buffers()).device
        decoder.rotary_emb = type(rotary)(config=rope_config).to(device)
    decoder.__class__ = model_class if model_class is not None else _dpe_subclass(type(decoder), DPEModelMixin)
    states: dict = {}
    layer_types = getattr(config, "layer_types", None)
    for idx in full_attention_layers(config):
        attn = attention_module(decoder.layers[idx])
        if not hasattr(attn, "config"):
            raise ValueError(f"{type(attn).__name__} does not dispatch attention through its config")
        _check_rotary_pairing(attn)
        state = DPELayerState(params, decoder, idx, rotary_dim, first=not states,
                              layer_type=layer_types[idx] if layer_types else "full_attention")
        attn.__dict__["dpe"] = state
        if not isinstance(attn.config, DPEAttentionConfig):
            attn.config = DPEAttentionConfig(attn.config)
        states[idx] = state
    decoder.__dict__["_dpe_states"] = states
    model.dpe_params = params


ATTENTION_ATTRIBUTES = ("self_attn", "attention", "attn")  # what decoder layers call their attention


def decoder_of(model):
    """The base model that holds the layers and the rotary embedding (the model itself for AutoModel)."""
    if isinstance(getattr(model, "layers", None), torch.nn.ModuleList) and hasattr(model, "rotary_emb"):
        return model
    return model.get_decoder()


def _check_rotary_pairing(attn) -> None:
    """DPE's rotation pairs dim f with f + R/2 (transformers' rotate_half). A family whose own rotate_half pairs
    them otherwise (interleaved, as Cohere's) is refused rather than rotated wrongly."""
    fn = getattr(sys.modules.get(type(attn).__module__), "rotate_half", None)
    if fn is None:
        return
    x = torch.arange(1.0, 9.0)[None]
    try:
        same = torch.equal(fn(x), torch.cat((-x[..., 4:], x[..., :4]), dim=-1))
    except Exception:  # pragma: no cover - an unusual signature: nothing to compare
        return
    if not same:
        raise ValueError(f"{type(attn).__name__} pairs its rotary dimensions differently (interleaved); DPE "
                         "supports the half-split pairing of transformers' rotate_half")


def attention_module(layer):
    for name in ATTENTION_ATTRIBUTES:
        attn = getattr(layer, name, None)
        if isinstance(attn, torch.nn.Module):
            return attn
    raise ValueError(f"{type(layer).__name__} has no attention module ({', '.join(ATTENTION_ATTRIBUTES)})")


def set_dpe_selection(model, selected: Optional[torch.Tensor]) -> None:
    """Set the selected frequencies, bool [layers, query heads, R/2]; None selects every frequency."""
    decoder = decoder_of(model)
    states = decoder.__dict__.get("_dpe_states", {})
    if selected is not None:
        config = model.config
        expected = (config.num_hidden_layers, config.num_attention_heads,
                    rotary_dim_of(config, getattr(decoder, "rotary_emb", None)) // 2)
        if tuple(selected.shape) != expected or selected.dtype != torch.bool:
            raise ValueError(f"selected dims must be bool {list(expected)}, got {selected.dtype} {list(selected.shape)}")
    for idx, state in states.items():
        sel = None if selected is None or bool(selected[idx].all()) else selected[idx]
        attn = attention_module(decoder.layers[idx])
        weight = next(attn.parameters(), None)
        if sel is not None and weight is not None and weight.device.type != "meta":  # meta: offloaded
            sel = sel.to(weight.device)
        # KV heads as the attention module computes them (a config may carry a num_key_value_heads its family
        # ignores, e.g. GPT-NeoX, which is always multi-head)
        rep = int(getattr(attn, "num_key_value_groups", 1) or 1)
        state.set_selection(sel, max(1, int(model.config.num_attention_heads) // rep))
    model.dpe_selected_dims = selected


class DPEPretrainedMixin:
    """from_pretrained / save_pretrained of an export's classes: the selection file and the code files."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        register_weight_conversions(cls)
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        tie_unloaded_weights(model)
        name = model.config.dpe.get("selected_dims")
        if name:
            from safetensors.torch import load_file
            from transformers.utils import cached_file

            hub = {k: kwargs[k] for k in ("cache_dir", "force_download", "local_files_only", "token",
                                          "revision", "subfolder") if k in kwargs}
            path = cached_file(str(pretrained_model_name_or_path), name, **hub)
            set_dpe_selection(model, load_file(path)[SELECTED_DIMS_TENSOR])
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        import os

        if not os.path.isdir(save_directory):
            return
        copy_code_files(self, save_directory)
        name = self.config.dpe.get("selected_dims")
        if name and self.dpe_selected_dims is not None:
            from safetensors.torch import save_file

            save_file({SELECTED_DIMS_TENSOR: self.dpe_selected_dims.cpu().contiguous()}, os.path.join(save_directory, name))


class DPEForCausalLMMixin(DPEPretrainedMixin):
    """Mixed into a family's causal LM class: installs DPE and carries its selection file."""

    dpe_model_class: Optional[type] = None

    def __init__(self, config, *args, **kwargs):
        check_transformers_version()
        refuse_serving_engines(config)
        super().__init__(config, *args, **kwargs)
        install_dpe(self, DPEParams.from_dict(config.dpe), self.dpe_model_class)
        self.dpe_selected_dims = None


class DPEBaseModelMixin(DPEPretrainedMixin, DPEModelMixin):
    """Mixed into a family's base model class for AutoModel: the same model, DPE included, without the head."""

    def __init__(self, config, *args, **kwargs):
        check_transformers_version()
        refuse_serving_engines(config)
        super().__init__(config, *args, **kwargs)
        install_dpe(self, DPEParams.from_dict(config.dpe), type(self))
        self.dpe_selected_dims = None
