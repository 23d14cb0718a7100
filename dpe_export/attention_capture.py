"""Seeing the queries and keys each attention layer really uses, without changing what it computes.

`capture_attention(model, callback)` points every attention layer, while the context is open, at a recording
attention function registered with transformers' AttentionInterface: it calls `callback(layer_idx, module,
query, key, kwargs)` with the family's rotated queries and keys (after its q/k norms and RoPE, and for a DPE
export before DPE's own rotation), then runs the layer's real attention function ("sdpa", "eager", "dpe", ...).
Used by the 2-norm dimension scores (calibration) and the positional-head analysis.
"""
from __future__ import annotations

import contextlib
from typing import Callable
from dpe_export.modeling_templates import dpe_hf_attention, dpe_hf_model


RECORDER = "dpe_capture"

Callback = Callable[..., None]


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    callback, idx, real = module.__dict__["_dpe_capture"]
    callback(idx, module, query, key, kwargs)
    impl = real._attn_implementation or "eager"
    if impl == "eager":
        fn = dpe_hf_attention.family_eager_attention(type(module))
    else:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        fn = ALL_ATTENTION_FUNCTIONS[impl]
    return fn(module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def capture_attention(model, callback: Callback):
    """While open, every attention layer of `model` calls `callback(layer_idx, module, query, key, kwargs)`."""
    from transformers import AttentionInterface

    AttentionInterface.register(RECORDER, _recording_attention)
    patched = []
    try:
        for idx, layer in enumerate(model.get_decoder().layers):
            attn = dpe_hf_model.attention_module(layer)
            patched.append((attn, attn.config))
            attn.__dict__["_dpe_capture"] = (callback, idx, attn.config)
            attn.config = dpe_hf_attention.DPEAttentionConfig(attn.config, RECORDER)
        yield
    finally:
        for attn, config in patched:
            attn.config = config
            attn.__dict__.pop("_dpe_capture", None)
