"""Layers before the first DPE layer, run once per calibration context and replayed for every other setting.

DPE changes only full-attention layers. In families with sliding-window layers first (Gemma 3: layers 0-4 of 18
before the first global layer), those layers compute the same activations and the same cache for a context
whatever the scale factors are. The first prefill of a context records, per chunk, the output of the last such
layer and their cache layers after the chunk; a later prefill of the same context replaces those layers with a
replay of what was recorded (the cache restored after each chunk, so the model sees the lengths and masks it
would have). The questions that follow the prefill run through the real layers. Families whose first layer is a
DPE layer (most) gain nothing and run as before.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any, Optional
from dpe_export.modeling_templates import dpe_family, dpe_hf_model


CACHE_KEYWORDS = ("cache", "past_key_values")  # the decoder layers' name for it from transformers 5.24 on, before


class PrefixReuse:
    def __init__(self, model):
        self.decoder = dpe_hf_model.decoder_of(model)
        full = dpe_family.full_attention_layers(model.config.get_text_config())
        self.first = min(full) if full else 0
        self.context: Any = None
        self.outputs: list = []
        self.snapshots: list = []

    @property
    def active(self) -> bool:
        return self.first > 0

    @contextlib.contextmanager
    def prefill(self, context):
        """Around the chunked prefill of `context`: record it the first time, replay it after."""
        if not self.active:
            yield
            return
        if context == self.context:
            with self._replaying():
                yield
            return
        self.context, self.outputs, self.snapshots = None, [], []
        with self._recording():
            yield
        # a release whose decoder layers do not receive the cache by a name we know: its layers' state cannot be
        # restored chunk by chunk, so every prefill runs in full
        self.context = context if all(s is not None for s in self.snapshots) else None

    def _cache_layers(self, kwargs) -> Optional[list]:
        cache = next((kwargs[k] for k in CACHE_KEYWORDS if kwargs.get(k) is not None), None)
        return None if cache is None else cache.layers

    @contextlib.contextmanager
    def _recording(self):
        last = self.decoder.layers[self.first - 1]

        def record(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.outputs.append((hidden.detach().clone(), isinstance(output, tuple)))
            layers = self._cache_layers(kwargs)
            self.snapshots.append(None if layers is None else copy.deepcopy(list(layers[:self.first])))

        handle = last.register_forward_hook(record, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _replaying(self):
        layers = self.decoder.layers
        originals = [layers[i] for i in range(self.first)]
        step = {"chunk": 0}

        def forward_first(i):
            def forward(hidden_states, *args, **kwargs):
                if i < self.first - 1:
                    return hidden_states  # the recorded output of the last replayed layer stands for all of them
                hidden, as_tuple = self.outputs[step["chunk"]]
                cache_layers = self._cache_layers(kwargs)
                for j, layer in enumerate(copy.deepcopy(self.snapshots[step["chunk"]])):
                    cache_layers[j] = layer
                step["chunk"] += 1
                return (hidden,) if as_tuple else hidden
            return forward

        try:
            for i in range(self.first):
                layers._modules[str(i)] = _replay_module(forward_first(i))
            yield
        finally:
            for i, layer in enumerate(originals):
                layers._modules[str(i)] = layer
        if step["chunk"] != len(self.outputs):
            raise RuntimeError(f"replayed {step['chunk']} of {len(self.outputs)} recorded chunks: the prefill of a "
                               "context must be chunked the same way each time")


@functools.lru_cache(maxsize=1)
def _replay_class():
    import torch  # on first use, as the rest of the package imports torch

    class ReplayLayer(torch.nn.Module):
        """Decoder layer i < first during a replayed prefill."""

        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, hidden_states, *args, **kwargs):
            return self.fn(hidden_states, *args, **kwargs)

    return ReplayLayer


def _replay_module(fn):
    return _replay_class()(fn)
