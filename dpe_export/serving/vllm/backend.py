"""The DPE attention backend for vLLM: plain KV layout, DPE computed by the export's runtime.

Registered under the backend name DPE_TORCH. Only the full-attention layers of a DPE model use it (models.py swaps
it in); sliding-window layers keep the backend vLLM picks. Each layer runs one of two paths on the same cache:
- flash (serving/flash.py): on a CUDA device in float16/bfloat16 when vllm.vllm_flash_attn imports, two
  flash_attn_varlen_func calls merged by vLLM's merge_attn_states (unit-tested on CPU with a stand-in; not yet run
  on a GPU); DPE_VLLM_FLASH=0 turns it off;
- torch (serving/paged.py): everywhere else, and on the GPU for what flash cannot take (a top-K selection whose
  doubled far head size exceeds 256).
docs/vllm-design.md explains the choices.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

from dpe_export.serving.flash import (
    FLASH_MAX_HEAD_SIZE,
    dpe_flash_paged_attention,
    load_flash_varlen,
    load_merge,
    plan_batch,
)
from dpe_export.serving.paged import dpe_paged_attention, write_kv

BACKEND_NAME = "DPE_TORCH"
FLASH_DTYPES = (torch.float16, torch.bfloat16)
logger = logging.getLogger(__name__)


@dataclass
class DPELayerSpec:
    """What one DPE attention layer needs besides vLLM's arguments (passed to the impl as `dpe=`)."""

    window: int
    scales: torch.Tensor  # long [R/2]: each rotary frequency's scale factor
    inv_freq: torch.Tensor  # float [R/2]: the family's rotary frequencies for this layer type
    rotary_dim: int
    selected: Optional[torch.Tensor] = None  # bool [H, R/2], None: every frequency


@dataclass
class DPEAttentionMetadata(AttentionMetadata):
    num_actual_tokens: int
    query_start_loc: list  # python ints, num_reqs + 1
    seq_lens: list  # python ints, num_reqs
    block_table: torch.Tensor  # [num_reqs, max_blocks]
    slot_mapping: torch.Tensor
    flash_plans: dict = field(default_factory=dict)  # (window, block_size) -> flash.FlashBatch, shared by layers


class DPEAttentionMetadataBuilder(AttentionMetadataBuilder[DPEAttentionMetadata]):
    reorder_batch_threshold: ClassVar[Optional[int]] = None

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> DPEAttentionMetadata:
        m = common_attn_metadata
        num_reqs = m.num_reqs
        qsl = m.query_start_loc_cpu[: num_reqs + 1].tolist()
        seq_lens = m.seq_lens[:num_reqs].cpu().tolist()
        return DPEAttentionMetadata(num_actual_tokens=m.num_actual_tokens, query_start_loc=qsl, seq_lens=seq_lens,
                                    block_table=m.block_table_tensor[:num_reqs], slot_mapping=m.slot_mapping)


class DPEAttentionImpl(AttentionImpl[DPEAttentionMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: Optional[int] = None,
                 alibi_slopes=None, sliding_window: Optional[int] = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: Optional[float] = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: Optional[str] = None, dpe: Optional[DPELayerSpec] = None) -> None:
        if dpe is None:
            raise ValueError("the DPE attention backend serves DPE layers only (no `dpe` layer spec given)")
        if alibi_slopes is not None:
            raise ValueError("DPE attention does not support ALiBi")
        if sliding_window is not None:
            raise ValueError("DPE applies to full-attention layers; a sliding-window layer keeps vLLM's backend")
        if attn_type != AttentionType.DECODER:
            raise ValueError(f"DPE attention serves decoder attention only, not {attn_type}")
        if kv_cache_dtype not in ("auto",):
            raise ValueError(f"DPE attention keeps its KV cache in the model's dtype; kv_cache_dtype={kv_cache_dtype!r}"
                             " is not supported")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.logits_soft_cap = logits_soft_cap or None
        self.sliding_window = None
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.dpe = dpe
        self.flash, self.merge = None, None
        if os.environ.get("DPE_VLLM_FLASH", "1") != "0":
            self.flash = load_flash_varlen()
        if self.flash is not None:
            far_head = 2 * head_size if dpe.selected is not None else head_size
            if far_head > FLASH_MAX_HEAD_SIZE:
                logger.warning("DPE attention: a top-K selection doubles the far part's head size to %d, over "
                               "flash-attention's %d; this layer uses the torch path", far_head, FLASH_MAX_HEAD_SIZE)
                self.flash = None
            else:
                self.merge = load_merge()

    def uses_flash(self, query: torch.Tensor) -> bool:
        """The flash path for this call: flash loaded, a CUDA query in half precision."""
        return self.flash is not None and query.is_cuda and query.dtype in FLASH_DTYPES

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        if kv_cache.numel() == 0:
            return
        write_kv(kv_cache, key, value, slot_mapping)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: Optional[DPEAttentionMetadata], output: torch.Tensor,
                output_scale: Optional[torch.Tensor] = None,
                output_block_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by DPE attention")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        n = attn_metadata.num_actual_tokens
        d = self.dpe
        if self.uses_flash(query):
            key = (d.window, int(kv_cache.shape[2]))
            batch = attn_metadata.flash_plans.get(key)
            if batch is None:
                batch = attn_metadata.flash_plans[key] = plan_batch(
                    attn_metadata.query_start_loc, attn_metadata.seq_lens, attn_metadata.block_table, key[1],
                    d.window)
            dpe_flash_paged_attention(query[:n], kv_cache, output[:n], batch=batch,
                                      block_table=attn_metadata.block_table, head_size=self.head_size,
                                      window=d.window, scales=d.scales, inv_freq=d.inv_freq,
                                      rotary_dim=d.rotary_dim, scale=self.scale, selected=d.selected,
                                      softcap=self.logits_soft_cap, flash=self.flash, merge=self.merge)
            return output
        dpe_paged_attention(query[:n], kv_cache, output[:n], query_start_loc=attn_metadata.query_start_loc,
                            seq_lens=attn_metadata.seq_lens, block_table=attn_metadata.block_table,
                            head_size=self.head_size, window=d.window, scales=d.scales, inv_freq=d.inv_freq,
                            rotary_dim=d.rotary_dim, scale=self.scale, selected=d.selected,
                            softcap=self.logits_soft_cap)
        return output


class DPEAttentionBackend(AttentionBackend):
    """DPE attention over a plain paged KV cache ([blocks, Hkv, block, Dk + Dv], keys in their plain rotation), in
    flash-attention calls on a GPU or torch elsewhere. vLLM writes the cache through do_kv_cache_update before
    calling forward."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        return DPEAttentionImpl

    @staticmethod
    def get_builder_cls():
        return DPEAttentionMetadataBuilder

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


def ensure_backend_registered() -> None:
    """Give DPE_TORCH a member of vLLM's AttentionBackendEnum (Attention layers look their backend up by name);
    idempotent, as vLLM calls plugins in every process."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, f"{__name__}.DPEAttentionBackend")


ensure_backend_registered()
