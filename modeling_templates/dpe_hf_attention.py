# coding=utf-8
# dpe_hf_attention.py: DPE as a transformers attention function, registered with AttentionInterface as "dpe".
# The family's own attention forward runs unchanged (projections, q/k norms, its own RoPE, its KV cache) and calls
# it with queries and keys already rotated at their plain positions; each DPE layer's `config` attribute is a view
# of the model config whose `_attn_implementation` reads "dpe" (where every family looks its function up), and the
# base model's choice ("sdpa", "eager", "flash_attention_2") still decides the mask transformers builds and the
# kernels DPE uses. Below the window a layer calls the base model's own attention function, so it is the base
# model bit for bit. Everything that arrives (positions, masks, the cache's keys) is checked where it is used, and
# a broken assumption raises DPERuntimeError naming the transformers release.
from __future__ import annotations

import copy
import importlib
import sys
import threading
import weakref
from typing import Optional

import torch

from .dpe_attention import dpe_attention
from .dpe_cache import is_cache, window_plain_keys
from .dpe_guards import DPERuntimeError
from .dpe_params import DPEParams
from .dpe_rule import dpe_delta_positions, rotate_by


DPE_ATTENTION = "dpe"  # the name DPE is registered under in transformers' AttentionInterface


class DPELayerState:
    """What one DPE attention layer needs at run time; its DPE cache layers point at it too."""

    def __init__(self, params: DPEParams, decoder, layer_idx: int, rotary_dim: int, first: bool,
                 layer_type: str = "full_attention"):
        self.layer_type = layer_type
        self.window = int(params.local_window_size)
        self.scale_list = params.scale_per_frequency().tolist()  # a list: this may run on the meta device
        self.layer_idx = layer_idx
        self.rotary_dim = rotary_dim
        self.first = first  # the first DPE layer checks what every layer receives (positions, cache lengths)
        self.selected: Optional[torch.Tensor] = None  # bool [H, R/2], or None for every frequency
        # A selection on which the query heads sharing each KV head agree is the same as per-head scale factors
        # that are 1 on the frequencies not selected (angle d, plain RoPE): then keys are stored once, in their
        # scaled rotation, as without a selection. [H, R/2] lists of each query head's scales, or None.
        self.folded: Optional[list] = None
        self.selection_version = 0  # a cache filled under one selection is refused under another
        self._decoder = weakref.ref(decoder)
        self._scale: dict = {}
        self._local = threading.local()

    @property
    def layout(self) -> str:
        """How DPE cache layers of this layer store keys: scaled only, or [plain | scaled] heads (a selection
        whose query heads disagree within a KV group needs both rotations of every key)."""
        return "scaled" if self.selected is None or self.folded is not None else "both"

    def set_selection(self, selected: Optional[torch.Tensor], num_kv_heads: int) -> None:
        """bool [H, R/2] or None; folded into per-head scales when every KV group's query heads agree."""
        self.selected, self.folded, self._scale = selected, None, {}
        self.selection_version += 1
        if selected is None:
            return
        sel = selected.detach().cpu()
        heads = sel.shape[0]
        if num_kv_heads and heads % num_kv_heads == 0:
            groups = sel.view(num_kv_heads, heads // num_kv_heads, -1)
            if bool((groups == groups[:, :1]).all()):
                self.folded = [[s if on else 1 for s, on in zip(self.scale_list, row)] for row in sel.tolist()]
        self._num_kv_heads = num_kv_heads

    def scale(self, device) -> torch.Tensor:
        """Each frequency's scale factor, long [R/2] (the groups' factors, whatever the selection)."""
        s = self._scale.get(device)
        if s is None:
            s = self._scale[device] = torch.tensor(self.scale_list, dtype=torch.long, device=device)
        return s

    def query_key_scales(self, device) -> tuple:
        """(query scales, key scales) for the rotations: [R/2] each, or with a folded selection [H, R/2] and
        [Hkv, R/2]."""
        if self.folded is None:
            s = self.scale(device)
            return s, s
        key = ("folded", device)
        pair = self._scale.get(key)
        if pair is None:
            q = torch.tensor(self.folded, dtype=torch.long, device=device)
            pair = self._scale[key] = (q, q[:: q.shape[0] // self._num_kv_heads].contiguous())
        return pair

    def inv_freq(self) -> torch.Tensor:
        """The inverse frequencies the family's rotary embedding is using now (dynamic RoPE updates them)."""
        decoder = self._decoder()
        rotary = getattr(decoder, "rotary_emb", None)
        inv = getattr(rotary, f"{self.layer_type}_inv_freq", None)  # one per layer type (Gemma 3)
        if inv is None:
            inv = getattr(rotary, "inv_freq", None)
        if inv is None:
            raise DPERuntimeError("the model's rotary embedding (rotary_emb.inv_freq) is gone")
        if 2 * inv.shape[-1] != self.rotary_dim:
            raise DPERuntimeError(f"the rotary embedding has {inv.shape[-1]} frequencies, DPE expects "
                                  f"{self.rotary_dim // 2}")
        return inv

    def base_implementation(self) -> str:
        return self._decoder().config._attn_implementation or "eager"

    def set_past_length(self, past: Optional[int]) -> None:
        """Tokens in the cache before the current forward (DPEModelMixin sets it for every layer; not a keyword
        argument, which some families' decoder layers do not pass on to their attention, e.g. StableLM's)."""
        self._local.past = past

    def past_length(self) -> Optional[int]:
        return getattr(self._local, "past", None)

    def set_pending(self, layer) -> None:
        self._local.pending = weakref.ref(layer)

    def take_pending(self):
        pending = getattr(self._local, "pending", None)
        self._local.pending = None
        return None if pending is None else pending()

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        decoder = self._decoder()
        new._decoder = weakref.ref(memo.get(id(decoder), decoder))
        new._scale, new._local = {}, threading.local()
        new.selected = copy.deepcopy(self.selected, memo)
        return new

    def __getstate__(self):
        raise TypeError("DPE layer state is not picklable; save the model with save_pretrained")


class DPEAttentionConfig:
    """The model config as a DPE attention layer sees it: all of it, except that attention dispatches to DPE.

    Every family's attention looks its function up by `self.config._attn_implementation`; this view answers
    "dpe" there and forwards everything else (reads and writes) to the model's config, so the base model's
    choice of implementation stays in one place.
    """

    __slots__ = ("_dpe_config", "_dpe_implementation")

    def __init__(self, config, implementation: str = DPE_ATTENTION):
        object.__setattr__(self, "_dpe_config", config)
        object.__setattr__(self, "_dpe_implementation", implementation)

    @property
    def _attn_implementation(self) -> str:
        return self._dpe_implementation

    def __getattr__(self, name):
        if name in ("_dpe_config", "_dpe_implementation"):
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "_dpe_config"), name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_dpe_config"), name, value)

    def __reduce__(self):
        return (DPEAttentionConfig, (self._dpe_config, self._dpe_implementation))

    def __repr__(self):
        return f"DPEAttentionConfig({self._dpe_config!r})"


def _key_valid_from_mask(attention_mask, n_kv: int) -> Optional[torch.Tensor]:
    """Which keys are real tokens (bool [B, n]), from a 2D padding mask or the last query row of a 4D mask."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise DPERuntimeError(f"unexpected attention mask of type {type(attention_mask).__name__}")
    if attention_mask.shape[-1] < n_kv or attention_mask.dim() not in (2, 4):
        raise DPERuntimeError(f"attention mask of shape {list(attention_mask.shape)} for {n_kv} keys")
    # Some releases build masks longer than the keys (their attention functions slice them): do the same.
    row = attention_mask[..., :n_kv] if attention_mask.dim() == 2 else attention_mask[:, 0, -1, :n_kv]
    if row.dtype == torch.bool:
        return row
    if attention_mask.dim() == 2:
        return row != 0
    return row > torch.finfo(row.dtype).min / 2


def per_class(fn):
    """Cache fn(cls) per class in a plain dict: torch.compile traces it as a dict lookup (it warns on lru_cache)."""
    results: dict = {}

    def cached(cls: type):
        if cls not in results:
            results[cls] = fn(cls)
        return results[cls]

    cached.__doc__ = fn.__doc__
    cached.cache_clear = results.clear
    return cached


@per_class
def family_eager_attention(attention_class: type):
    """The eager attention function of the family's own modeling module (transformers registers no "eager"
    interface: each modeling file carries its own), so the base path below the window is the base model's."""
    for cls in attention_class.__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
    raise DPERuntimeError(f"no eager_attention_forward beside any base class of {attention_class.__name__}")


def _base_attention_function(module, implementation: str):
    if implementation == "eager":
        return family_eager_attention(type(module))
    if implementation == DPE_ATTENTION:
        raise DPERuntimeError("the model's attn_implementation is 'dpe' itself; choose sdpa, eager or flash_attention_2")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    try:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    except KeyError:
        raise DPERuntimeError(f"attn_implementation {implementation!r} is not a registered attention function") from None


_DPE_BACKENDS = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "flash_attention_2",
                 "flash_attention_3": "flash_attention_2", "flex_attention": "sdpa"}


def _require_flash_attn() -> None:
    try:
        importlib.import_module("flash_attn")
    except ImportError as err:
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash-attn package (CUDA only): "
            "pip install flash-attn --no-build-isolation, or load with attn_implementation='sdpa'"
        ) from err


def compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _check_positions(pos, key_pos, key_valid, n: int) -> None:
    """Positions and keys must describe one sequence per row; anything else is an error, not an answer."""
    m = pos.shape[1]
    slot0_valid = torch.ones_like(key_pos[:, 0], dtype=torch.bool) if key_valid is None else key_valid[:, 0]
    early = (key_pos[:, 0] > 0) & slot0_valid
    if bool(early.any()):
        b = int(early.nonzero()[0])
        raise DPERuntimeError(
            f"the positions say {int(key_pos[b, 0])} tokens came before the {n} keys this attention layer received "
            f"(row {b}): the KV cache did not reach the attention"
        )
    if key_valid is None:
        first = key_pos[:, 0]
        has = torch.ones_like(first, dtype=torch.bool)
    else:
        has = key_valid.any(dim=1)
        first = key_pos.gather(1, key_valid.to(torch.int8).argmax(dim=1, keepdim=True))[:, 0]
    late = (first < 0) & has
    if bool(late.any()):
        b = int(late.nonzero()[0])
        raise DPERuntimeError(
            f"the attention layer received {n} keys but the positions account for only {n + int(first[b])} "
            f"(row {b}): the KV cache holds tokens of another sequence (reset it between prompts)"
        )
    if m > 1:
        step = pos[:, 1:] - pos[:, :-1]
        both = torch.ones_like(step, dtype=torch.bool) if key_valid is None else (
            key_valid[:, n - m + 1 :] & key_valid[:, n - m : n - 1])
        if bool(((step != 1) & both).any()):
            raise DPERuntimeError("position ids are not consecutive within a sequence (packed sequences are not "
                                  "supported by DPE attention)")


def dpe_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """DPE attention with transformers' attention-function contract (registered as "dpe").

    query [B, H, m, D] and key/value [B, Hkv, n, D] as the family's attention hands them over: rotated at their
    plain positions, after the cache update. Returns ([B, m, H, D], None).
    """
    state = module.__dict__.get("dpe")
    if state is None:
        raise DPERuntimeError(f"{type(module).__name__} dispatched to DPE attention without DPE parameters")
    for name, val in kwargs.items():
        if is_cache(val):
            raise DPERuntimeError(f"a KV cache reached the attention function as {name!r}, which DPE does not know")
    if kwargs.get("s_aux") is not None:
        raise DPERuntimeError("attention sinks (s_aux) are not supported by DPE attention")
    if kwargs.get("sliding_window") is not None:
        raise DPERuntimeError(f"layer {state.layer_idx} is a sliding-window layer; DPE applies to full attention only")
    implementation = state.base_implementation()
    backend = _DPE_BACKENDS.get(implementation)
    if backend is None and implementation != DPE_ATTENTION:
        raise DPERuntimeError(f"DPE attention cannot run under attn_implementation={implementation!r}; "
                              f"use one of {', '.join(_DPE_BACKENDS)}")
    softcap = kwargs.get("softcap")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    bsz, _, m, d = query.shape
    w, rdim = state.window, state.rotary_dim

    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise DPERuntimeError("position_ids did not reach the attention function")
    if position_ids.shape[-1] != m:
        raise DPERuntimeError(f"{position_ids.shape[-1]} position ids for {m} queries")
    pos = position_ids.to(query.device).reshape(-1, m).expand(bsz, m)

    layer = state.take_pending()
    if layer is not None:
        if getattr(layer, "keys", None) is not key or layer._dpe_pending != m:
            raise DPERuntimeError("the keys reaching DPE attention are not the ones its cache layer just stored")
        if layer._dpe_layout != state.layout or layer._dpe_version != state.selection_version:
            raise DPERuntimeError("the top-K selection changed while a KV cache was in use; start a new cache")
    elif getattr(key, "shape", (0, 0, 0, d))[-1] != d:
        raise DPERuntimeError(f"keys of width {key.shape[-1]} for queries of width {d}")

    past = state.past_length()  # tokens in the cache before this forward (DPEModelMixin), None without a cache
    full_key, full_value, full_mask = key, value, attention_mask
    n = key.shape[2]
    key_valid = _key_valid_from_mask(attention_mask, n)
    if n > m and layer is None:
        # Static caches hand over their whole buffer: keep the slots up to the queries' own.
        if past is not None:
            end = past + m
        elif key_valid is not None and bool(key_valid.any()):
            end = int(key_valid.nonzero()[:, 1].max()) + 1
        else:
            end = n
        if end < n:
            key, value, n = key[:, :, :end], value[:, :, :end], end
            key_valid = None if key_valid is None else key_valid[:, :end]
    if n < m:
        raise DPERuntimeError(f"{n} keys for {m} queries")
    # Keys are consecutive positions ending at the last query's (checked below on the first DPE layer).
    key_pos = pos if n == m else pos[:, -1:] - torch.arange(n - 1, -1, -1, device=pos.device)
    if state.first and not compiling():
        _check_positions(pos, key_pos, key_valid, n)

    q_scale, k_scale = state.query_key_scales(query.device)
    selected = None if state.folded is not None else state.selected  # a folded selection is in the scales
    if k_scale.dim() == 2 and k_scale.shape[0] != value.shape[1]:
        raise DPERuntimeError(f"the selection was folded for {k_scale.shape[0]} KV heads, but the attention has "
                              f"{value.shape[1]}")
    inv_freq = state.inv_freq()
    k_far_plain = None
    if layer is not None:  # a DPE cache layer: store the new keys in their scaled rotation
        hkv = value.shape[1]
        if layer._dpe_layout == "both":  # [plain heads | scaled heads] on the head axis
            new_scaled = rotate_by(key[:, :hkv, n - m :], dpe_delta_positions(pos, k_scale, w, query=False),
                                   inv_freq, rdim)
            key[:, hkv:, n - m :].copy_(new_scaled)
            k_local, local_start, k_far, k_far_plain = key[:, :hkv], 0, key[:, hkv:], key[:, :hkv]
        else:
            k_local, local_start = window_plain_keys(layer, key, pos, key_pos, k_scale, inv_freq, w, rdim)
            key[:, :, n - m :].copy_(rotate_by(key[:, :, n - m :], dpe_delta_positions(pos, k_scale, w, query=False),
                                               inv_freq, rdim))
            k_far = key
        layer._dpe_pending = 0
        layer._dpe_seen = weakref.ref(key)
        if n <= w:
            base = _base_attention_function(module, implementation)
            return base(module, query, k_local, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    else:
        if n <= w:  # no pair is as far apart as the window: exactly the base model's attention
            base = _base_attention_function(module, implementation)
            return base(module, query, full_key, full_value, full_mask, dropout=dropout, scaling=scaling, **kwargs)
        if selected is not None and selected.device != query.device:  # layers placed by a device map
            selected = state.selected = selected.to(query.device)
        args = (query, key, value, pos, key_pos, q_scale, k_scale, inv_freq, key_valid, selected, w, rdim, scale,
                backend or "sdpa", softcap, float(dropout))
        if compiling() and not torch.is_grad_enabled():
            return _COMPILED_ATTENTION(*args), None
        return _attention_on_plain_keys(*args), None

    if backend == "flash_attention_2":
        _require_flash_attn()
    if selected is not None and selected.device != query.device:  # layers placed by a device map
        selected = state.selected = selected.to(query.device)
    q_scaled = rotate_by(query, dpe_delta_positions(pos, q_scale, w, query=True), inv_freq, rdim)
    out = dpe_attention(
        query, q_scaled, k_local, k_far, value, window=w, scale=scale, selected=selected, k_far_plain=k_far_plain,
        local_start=local_start, key_valid=key_valid, backend=backend or "sdpa", softcap=softcap, dropout=dropout,
    )
    return out, None


def _attention_on_plain_keys(query, key, value, pos, key_pos, q_scale, k_scale, inv_freq, key_valid, selected,
                             w: int, rdim: int, scale: float, backend: str, softcap, dropout: float):
    """DPE attention over keys in their plain rotation (no DPE cache layer): the scaled keys made on the fly."""
    if backend == "flash_attention_2":
        _require_flash_attn()
    k_far = rotate_by(key, dpe_delta_positions(key_pos, k_scale, w, query=False), inv_freq, rdim)
    q_scaled = rotate_by(query, dpe_delta_positions(pos, q_scale, w, query=True), inv_freq, rdim)
    return dpe_attention(query, q_scaled, key, k_far, value, window=w, scale=scale, selected=selected,
                         k_far_plain=key if selected is not None else None, key_valid=key_valid, backend=backend,
                         softcap=softcap, dropout=dropout)


def _define_compiled_attention_op():
    """_attention_on_plain_keys as a torch custom op, which torch.compile calls as one opaque kernel.

    Traced into, DPE attention came out of inductor (torch 2.13) with wrong numbers past the window: it reused
    buffers the attention still read (issue 33; tests/test_transformers_integration.py and tests/fuzz_runtime.py
    have the cases). As one functional op (fresh output, inputs untouched) there is nothing of it to plan.
    Defined at import, once per copy of this file (two exports' runtimes in one process keep their own).
    """
    import hashlib

    qualname = "dpe_export::attention_" + hashlib.sha1(__name__.encode()).hexdigest()[:16]

    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor,
                  key_pos: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor, inv_freq: torch.Tensor,
                  key_valid: Optional[torch.Tensor], selected: Optional[torch.Tensor], w: int, rdim: int,
                  scale: float, backend: str, softcap: Optional[float], dropout: float) -> torch.Tensor:
        return _attention_on_plain_keys(query, key, value, pos, key_pos, q_scale, k_scale, inv_freq, key_valid,
                                        selected, w, rdim, scale, backend, softcap, dropout).contiguous()

    try:
        op = torch.library.custom_op(qualname, mutates_args=())(attention)
    except RuntimeError:  # this file imported again under the same name (a reload): the op defined then serves
        return getattr(torch.ops.dpe_export, qualname.split("::")[1])

    @op.register_fake
    def _(query, *args):
        bsz, h, m, d = query.shape
        return query.new_empty(bsz, m, h, d)

    return op


_COMPILED_ATTENTION = _define_compiled_attention_op()


def register_dpe_attention() -> None:
    """Register dpe_attention_forward with transformers' AttentionInterface (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(DPE_ATTENTION, dpe_attention_forward)
