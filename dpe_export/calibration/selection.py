"""Per-(layer, head) rotary frequency selection from dimension scores (DPE's key-dimension identification).

A scores file is a safetensors file with one tensor ``scores`` of shape
[num_hidden_layers, num_attention_heads, head_dim / 2]: one score per rotary frequency of each query head,
higher meaning more important (e.g. the 2-norm attention contribution used by the DPE authors). The top K
frequencies of each (layer, head) are selected for DPE's scaled far-distance rotation.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dpe_export.errors import DPEExportError

if TYPE_CHECKING:
    import torch


SCORES_TENSOR = "scores"


_PICKLE_HINT = (
    " (it looks like a pickled torch file; dpe-export never loads pickles: in a trusted environment run "
    "safetensors.torch.save_file({'scores': torch.load(path)}, 'scores.safetensors'))"
)


def load_dim_scores(path, num_layers: int, num_heads: int, head_dim: int) -> torch.Tensor:
    """Read the ``scores`` tensor of a safetensors file as float32 [num_layers, num_heads, head_dim // 2].

    Raises DPEExportError (one line) for a missing or unreadable file, a missing tensor, a wrong shape, or
    non-finite values. Never unpickles anything.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise DPEExportError(f"dimension scores file not found: {path}")
    if not path.is_file():
        raise DPEExportError(f"dimension scores path is not a file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            if SCORES_TENSOR not in names:
                found = ", ".join(repr(n) for n in names) or "none"
                raise DPEExportError(
                    f"dimension scores file {path} has no tensor named {SCORES_TENSOR!r} (tensors found: {found})"
                )
            scores = f.get_tensor(SCORES_TENSOR)
    except (SafetensorError, OSError, ValueError) as e:
        hint = _PICKLE_HINT if _looks_pickled(path) else ""
        raise DPEExportError(f"{path} is not a valid safetensors file: {e}{hint}") from None

    expected = (num_layers, num_heads, head_dim // 2)
    if tuple(scores.shape) != expected:
        raise DPEExportError(
            f"dimension scores in {path} have the wrong shape: expected [layers, heads, head_dim/2] = "
            f"{list(expected)}, got {list(scores.shape)}"
        )
    if scores.dtype == torch.bool or scores.is_complex():
        raise DPEExportError(f"dimension scores in {path} must be real numbers, got dtype {scores.dtype}")
    scores = scores.to(torch.float32)
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).sum())
        raise DPEExportError(f"dimension scores in {path} contain {bad} non-finite value(s) (NaN or inf)")
    return scores


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool tensor shaped like `scores`: True for the k highest-scoring frequencies of each (layer, head)."""
    import torch

    num_freqs = scores.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_freqs:
        raise DPEExportError(f"top-K must be an integer between 1 and head_dim/2 = {num_freqs}, got {k!r}")
    index = torch.topk(scores, k, dim=-1).indices
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    mask.scatter_(-1, index, True)
    return mask


def describe_selection(mask) -> str:
    """One line for summaries: 'all rotary frequencies' or 'top 4 of 8 rotary frequencies per (layer, head)'."""
    if mask is None:
        return "all rotary frequencies"
    counts = mask.sum(dim=-1).unique().tolist()
    num_freqs = mask.shape[-1]
    if len(counts) == 1:
        return f"top {counts[0]} of {num_freqs} rotary frequencies per (layer, head)"
    return f"{int(mask.sum())} of {mask.numel()} (layer, head, frequency) entries"


def _looks_pickled(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return head[:1] == b"\x80" or head == b"PK"  # pickle protocol 2+, or torch's zip container

