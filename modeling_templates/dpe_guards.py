# coding=utf-8
# dpe_guards.py: the transformers releases this runtime supports (setup.cfg states the same range), the error
# DPE raises when transformers hands it something it does not expect, and the refusal of serving engines that
# would run an export without DPE.
from __future__ import annotations

import os
import sys
from typing import Optional

_HERE = os.path.dirname(os.path.abspath(__file__))  # the runtime's folder: these files and modeling_dpe.py


# The transformers releases this file is checked on (scripts/compat_matrix.py); setup.cfg states the same range.
MIN_TRANSFORMERS_VERSION = "5.0.0"


MAX_TRANSFORMERS_VERSION = "6"  # exclusive


class DPERuntimeError(RuntimeError):
    """Something transformers handed to DPE attention is not what DPE needs; never answered with a guess."""

    def __init__(self, message: str):
        super().__init__(f"DPE: {message} (transformers {transformers_version()}; the export supports "
                         f"transformers>={MIN_TRANSFORMERS_VERSION},<{MAX_TRANSFORMERS_VERSION})")


def transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except Exception:  # pragma: no cover
        return "?"


def check_transformers_version() -> None:
    """Fail early, and in one line, on a transformers outside the range this code supports."""
    from packaging import version

    have = version.parse(transformers_version())
    if have < version.parse(MIN_TRANSFORMERS_VERSION) or have >= version.parse(MAX_TRANSFORMERS_VERSION):
        raise ImportError(
            f"This DPE checkpoint needs transformers>={MIN_TRANSFORMERS_VERSION},<{MAX_TRANSFORMERS_VERSION}, but "
            f"transformers {transformers_version()} is installed. Install a supported release with: "
            f"pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION},<{MAX_TRANSFORMERS_VERSION}'"
        )


# Frames a warning should not point at: the export's own code, and what runs a model's forward for the user.
_LIBRARY_MODULES = ("torch", "transformers", "transformers_modules", "accelerate", "peft")


def caller_stacklevel() -> int:
    """The warnings stacklevel, seen from the function that calls this, of the first frame outside this file
    and the libraries that call a model's forward (torch, transformers and its remote code, accelerate, peft):
    the user's model(...) or generate(...) line rather than torch's module dispatch."""
    frame, level = sys._getframe(2), 2
    while frame is not None:
        here = os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _HERE
        if not here and package_of(frame, _LIBRARY_MODULES) is None:
            return level
        frame, level = frame.f_back, level + 1
    return 2


def package_of(frame, packages) -> Optional[str]:
    """Which of these top-level packages the frame's code belongs to, if any (by its module's name)."""
    name = str(frame.f_globals.get("__name__", ""))
    return next((p for p in packages if name == p or name.startswith(p + ".")), None)


SERVING_ENGINES = ("vllm", "sglang", "text_generation_server", "tensorrt_llm", "lmdeploy")


def refuse_serving_engines(config=None) -> None:
    """Refuse, in one line, to be built by a serving engine: engines run their own attention and paged KV
    cache, which do not apply DPE (vLLM's Transformers backend swaps in its paged attention), so an export
    served by one would answer as the plain base model, or as garbage. Checked when the config is loaded and
    when a model is built, from the calling code's module names and the attention implementation."""
    implementation = getattr(config, "_attn_implementation", None) if config is not None else None
    engine = implementation if implementation in SERVING_ENGINES else None
    frame = sys._getframe(1)
    while engine is None and frame is not None:
        engine = package_of(frame, SERVING_ENGINES)
        frame = frame.f_back
    if engine is not None:
        raise DPEServingError(
            f"This is a DPE export (dimension-wise RoPE scaling, arXiv 2504.18857); {engine} cannot serve it: its "
            "attention and KV cache do not apply DPE, so answers would be the base model's or wrong. Run it with "
            "transformers (AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)).")


class DPEServingError(RuntimeError):
    """An engine that cannot run DPE tried to load an export."""

    def __str__(self) -> str:  # one line, whatever the engine prints around it
        return " ".join(super().__str__().split())


class DPEConfigMixin:
    """Mixed into an export's config class (model_type dpe_<family>): refuses serving engines on load."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):  # noqa: D102
        refuse_serving_engines()
        return super().from_pretrained(*args, **kwargs)

    @classmethod
    def from_dict(cls, *args, **kwargs):  # noqa: D102
        refuse_serving_engines()
        return super().from_dict(*args, **kwargs)
