"""What dpe-export does with the export runtime that exports themselves never do: DPE applied to a base model it
has loaded (calibration, evaluation, analysis), even frequency groups, and the name a transformers release gives
the KV cache in a forward's arguments and outputs. The runtime's files are dpe_export.modeling_templates.dpe_*; this
module is not shipped with exports.
"""
from __future__ import annotations

import copy
import inspect
from typing import Optional

import torch

from dpe_export.modeling_templates import dpe_hf_model, dpe_workarounds
from dpe_export.modeling_templates.dpe_family import _family_rotary
from dpe_export.modeling_templates.dpe_params import DPEParams


def even_group_boundaries(num_freqs: int, num_groups: int) -> list[int]:
    """Boundaries that split frequencies [0, num_freqs) evenly into num_groups contiguous groups."""
    if num_groups < 1 or num_groups > num_freqs:
        raise ValueError(f"cannot split {num_freqs} rotary frequencies into {num_groups} groups")
    return [round(g * num_freqs / num_groups) for g in range(num_groups + 1)]


def apply_dpe(model, params: DPEParams, selected: Optional[torch.Tensor] = None):
    """DPE on an already loaded base model (what dpe-export uses to calibrate and evaluate)."""
    dpe_hf_model.install_dpe(model, params)
    dpe_hf_model.set_dpe_selection(model, selected)
    return model


def cache_argument(model) -> str:
    """The name this transformers release's model forward takes the KV cache under ("past_key_values"/"cache"),
    by the runtime's own rule (dpe_workarounds.take_cache_argument)."""
    params = tuple(inspect.signature(type(model).forward).parameters)
    return dpe_workarounds.take_cache_argument(type(model).__name__, params, {})


def output_cache(outputs):
    """The KV cache a model output carries, under whichever name this transformers release gives it."""
    for name in reversed(dpe_workarounds.CACHE_ARGUMENT_NAMES):
        if name in outputs:
            return outputs[name]
    return None


def family_inv_freq(config, layer_type: str = "full_attention",
                    pretrain_length: Optional[int] = None) -> Optional[torch.Tensor]:
    """The family's rotary frequencies for a layer type (float32, CPU), as the export's transformers runtime uses
    them: the family's rotary embedding built from the config at the pretraining length (dpe_hf_model.install_dpe).
    None when that embedding cannot be built from the config."""
    rope_config = config
    if pretrain_length and pretrain_length != getattr(config, "max_position_embeddings", None):
        rope_config = copy.deepcopy(config)
        rope_config.max_position_embeddings = pretrain_length
    rotary = _family_rotary(rope_config)
    if rotary is None:
        return None
    inv = getattr(rotary, f"{layer_type}_inv_freq", None)  # one per layer type (Gemma 3)
    if inv is None:
        inv = rotary.inv_freq
    return inv.detach().float().cpu()
