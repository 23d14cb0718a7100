"""Tiny models built from configs, saved as real checkpoint directories (safetensors + tokenizer)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(124)]

_FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_config(family: str = "llama", **overrides):
    """A 2-layer model config with head_dim 16 (8 rotary frequencies) and GQA (4 query heads, 2 kv heads)."""
    config_cls, _ = _FAMILIES[family]
    kwargs = dict(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if family == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return config_cls(**kwargs)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config_cls, model_cls = _FAMILIES[family]
    model = model_cls(tiny_config(family, **overrides)).eval()
    # Larger-than-default weights make attention sharp, so position errors show up in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny_model(path, family: str = "llama", seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    """Write a tiny model checkpoint (safetensors) and, by default, a tokenizer to `path`."""
    path = Path(path)
    model = tiny_model(family, seed=seed, **overrides)
    model.save_pretrained(path)
    if tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return path


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (byte-level BPE without merges): decode(encode(text)) == text, vocab 260."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def left_padded(prompts):
    """Token id lists (tensors) as one left-padded batch: (ids, attention_mask), pad id 0."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    return ids, mask


def assert_batch_generates_as_alone(model, prompts, new_tokens, label="", **generate_kwargs):
    """Greedy generation of a left-padded batch of `prompts` equals each prompt generated alone (row by row)."""
    ids, mask = left_padded(prompts)
    width = ids.shape[1]
    fixed = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **fixed, **generate_kwargs)
        for row, p in enumerate(prompts):
            alone = model.generate(p[None], **fixed)
            assert batch[row, width:].tolist() == alone[0, len(p):].tolist(), (label, row)


def one_error(r) -> str:
    """The one "Error:" line of a CLI result that failed with status 1, and no traceback."""
    assert r.exit_code == 1, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, n, D] by cos/sin [B, n, D], as transformers' Llama does (a family's own RoPE, for tests
    that build rotated queries and keys without a model)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float, dtype: torch.dtype):
    """cos/sin [B, n, D] for per-frequency integer positions [B, n, D/2] (or [B, n, 1] to broadcast)."""
    freqs = positions.float() * inv_freq.to(device=positions.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


RUNTIME_DIR = Path(__file__).resolve().parents[1] / "modeling_templates"
# The export runtime: every file an export ships beside modeling_dpe.py, as the repository holds them.
RUNTIME_FILES = tuple(sorted(p.name for p in RUNTIME_DIR.glob("dpe_*.py")))
