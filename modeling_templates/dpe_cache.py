# coding=utf-8
# dpe_cache.py: the DPE KV cache layer. With any cache transformers offers (dynamic, static, offloaded, one the
# user built) the cache holds the family's plain keys and DPE rotates them on the fly: exact, and slower past the
# window. When the model's forward gets a fresh DynamicCache outside torch.compile, its full-attention layers
# become DPE layers (a subclass of DynamicLayer) that hold every key in its scaled rotation (what the far part
# reads) plus the plain keys of the last w - 1 positions (what the local part reads): about the base model's cache
# size, and decoding never re-rotates the cache. A top-K selection on which the query heads sharing each KV head
# agree is per-head scale factors (1 on the frequencies not selected) and is stored the same way; otherwise the
# layer holds both rotations of every key.
from __future__ import annotations

import torch

from .dpe_guards import DPERuntimeError
from .dpe_rule import dpe_delta_positions, rotate_by


def is_cache(value) -> bool:
    """Whether value is a transformers KV cache (of any kind)."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, Cache)


class Shared:
    """Holds a reference that copies of its holder share (a cache layer copied with deepcopy keeps its layer)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __deepcopy__(self, memo):
        return self


class DPECacheLayerMixin:
    """Mixed into transformers' DynamicLayer: keys are kept in DPE's scaled rotation (see the header).

    `update` stores the family's plain keys as they come; the DPE attention that runs right after it (it has
    the positions) rotates them in place and keeps the plain keys of the last w - 1 positions. Anything that
    replaces `keys` in between (crop, reorder, offload, deepcopy) is noticed, and the window's plain keys are
    rebuilt from the scaled ones.
    """

    def update(self, key_states, value_states, *args, **kwargs):  # noqa: D102
        shared = self.__dict__.get("_dpe_shared")
        if shared is None:
            raise DPERuntimeError("a DPE cache layer lost its attention layer")
        state = shared.value
        if self._dpe_pending:
            raise DPERuntimeError("the keys of the previous cache update never reached DPE attention (did an earlier "
                                  "forward fail?); start a new cache")
        seen = self._dpe_seen
        if seen is None or seen() is not getattr(self, "keys", None):
            self._dpe_tail = None
        if self._dpe_layout == "both":
            key_states = torch.cat((key_states, key_states), dim=1)  # [plain | scaled] heads, the latter filled later
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self._dpe_pending = key_states.shape[-2]
        state.set_pending(self)
        return keys, values


_DPE_LAYER_CLASSES: dict = {}


def dpe_cache_layer(layer, state):
    """A DPE cache layer with the (empty) state of `layer`, to take its place in the cache; `state` is the
    attention layer's DPELayerState (dpe_hf_attention.py)."""
    base = type(layer)
    cls = _DPE_LAYER_CLASSES.get(base)
    if cls is None:
        cls = _DPE_LAYER_CLASSES[base] = type(f"DPE{base.__name__}", (DPECacheLayerMixin, base), {"__module__": __name__})
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    layer = new
    layer._dpe_shared = Shared(state)
    layer._dpe_pending = 0
    layer._dpe_tail = None
    layer._dpe_tail_len = 0
    layer._dpe_seen = None
    layer._dpe_layout = state.layout
    layer._dpe_version = state.selection_version
    return layer


def prepare_cache(cache, states: dict) -> None:
    """Turn the empty full-attention layers of a DynamicCache into DPE cache layers; leave anything else."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover
        return
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or not states:
        return
    if not layers and getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        layers.extend(DynamicLayer() for _ in range(max(states) + 1))  # what the cache would append lazily
    for idx, state in states.items():
        if idx < len(layers) and type(layers[idx]) is DynamicLayer and not getattr(layers[idx], "is_initialized", True):
            layers[idx] = dpe_cache_layer(layers[idx], state)


def window_plain_keys(layer, key, pos, key_pos, k_scale, inv_freq, w: int, rdim: int):
    """The plain keys the local part reads, from a DPE cache layer that keeps keys scaled: the last w - 1 cached
    ones and the m new ones (still plain in `key`). Returns (k_local, local_start).

    They live in a buffer of the layer with room for w more, so decoding appends in place and copies the window
    only once every w steps; when the buffer is missing or stale (the cache was cropped, reordered, moved), the
    window is rebuilt from the scaled keys by the inverse rotation.
    """
    bsz, hkv, n, d = key.shape
    m = pos.shape[1]
    keep = min(n - m, max(w - 1, 0))
    new_plain = key[:, :, n - m :]
    buf, blen = layer._dpe_tail, layer._dpe_tail_len
    usable = buf is not None and blen >= keep and buf.shape[0] == bsz and buf.device == key.device
    if usable and m < w and blen + m <= buf.shape[2]:  # decoding: append in place
        buf[:, :, blen : blen + m] = new_plain
        layer._dpe_tail_len = blen + m
        return buf[:, :, blen + m - keep - m : blen + m], n - m - keep
    if not keep:
        old = None
    elif usable:
        old = buf[:, :, blen - keep : blen]
    else:  # rebuild the window's plain keys from their scaled rotation
        lo = n - m - keep
        shift = dpe_delta_positions(key_pos[:, lo : n - m], k_scale, w, query=False)
        old = rotate_by(key[:, :, lo : n - m], -shift, inv_freq, rdim)
    k_local = new_plain.clone() if old is None else torch.cat((old, new_plain), dim=2)
    tail = k_local[:, :, k_local.shape[2] - min(k_local.shape[2], max(w - 1, 0)) :]
    buf = key.new_empty(bsz, hkv, max(w - 1, 0) + w, d)
    buf[:, :, : tail.shape[2]] = tail
    layer._dpe_tail, layer._dpe_tail_len = buf, tail.shape[2]
    return k_local, n - k_local.shape[2]
