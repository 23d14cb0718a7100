# coding=utf-8
# dpe_workarounds.py: what particular transformers releases need, each dated (the cache argument's new name in
# 5.24, weight conversions that skip remote-code classes, 5.0's save without code, 5.3's untied
# embeddings). Delete an entry when the oldest supported release no longer needs it.
from __future__ import annotations

import sys

from .dpe_cache import is_cache
from .dpe_guards import DPERuntimeError


CACHE_ARGUMENT_NAMES = ("past_key_values", "cache")  # 5.0-5.23, 5.24+


def take_cache_argument(owner: str, params: tuple, kwargs: dict) -> str:
    """The name a base model's forward (`owner`, taking `params`) takes the KV cache under, with a cache passed
    under another known name moved to it in `kwargs`.

    transformers 5.24 renamed `past_key_values` to `cache`; 5.25 lists the old name beside the new one as a
    deprecated alias (deprecate_kwarg(..., expose_in_signature=True)): the newest name listed is the cache's. A
    cache under any other name is an error, never ignored.
    """
    listed = [p for p in CACHE_ARGUMENT_NAMES if p in params]
    if not listed:
        raise DPERuntimeError(f"{owner}.forward takes no KV cache argument DPE knows ({', '.join(CACHE_ARGUMENT_NAMES)})")
    name = listed[-1]
    for key in list(kwargs):
        value = kwargs[key]
        if key == name or not (key in listed or is_cache(value)):
            continue
        if key in listed and (value is None or (is_cache(value) and kwargs.get(name) is None)):
            del kwargs[key]
            if value is not None:
                kwargs[name] = value
        else:
            raise DPERuntimeError(f"{owner}.forward got a KV cache as {key!r}; this transformers release takes it "
                                  f"as {name!r}")
    return name


def register_weight_conversions(cls) -> None:
    """Give this class the checkpoint key conversions of the family it extends (e.g. GPT-NeoX's embed_out ->
    lm_head, Qwen3-MoE's per-expert weights -> fused ones). transformers applies them by class name or
    model_type, but skips classes from remote code unless they are registered (5.x releases that have
    conversion mappings; older ones convert nothing for anyone)."""
    try:
        from transformers import conversion_mapping as cm
    except ImportError:
        return
    get = getattr(cm, "get_checkpoint_conversion_mapping", None)
    register = getattr(cm, "register_checkpoint_conversion_mapping", None)
    if get is None or register is None or cls.__name__ in getattr(cm, "USER_REGISTERED_MAPPINGS", ()):
        return
    base = next((k for k in cls.__mro__[1:] if k.__module__.startswith("transformers.models.")), None)
    if base is None:
        return
    base_type = getattr(getattr(base, "config_class", None), "model_type", None)
    mapping = get(base.__name__) or get(base_type)
    if mapping:
        register(cls.__name__, mapping, overwrite=True)
        # Releases that look conversions up by config.model_type only (5.0) need them under the export's own
        # model_type (dpe_<family>) too.
        own_type = getattr(getattr(cls, "config_class", None), "model_type", None)
        if own_type and own_type != base_type:
            register(own_type, mapping, overwrite=True)


def copy_code_files(model, save_directory) -> None:
    """Put the model's modeling file and the runtime files it imports beside a saved export (transformers 5.0's
    save_pretrained copies no remote code)."""
    import os
    import shutil

    from transformers.dynamic_module_utils import get_relative_import_files

    module_file = getattr(sys.modules.get(type(model).__module__), "__file__", None)
    if not module_file or not os.path.isfile(module_file):
        return
    for path in (module_file, *get_relative_import_files(module_file)):
        if os.path.isfile(path):
            target = os.path.join(save_directory, os.path.basename(path))
            if not os.path.exists(target):
                shutil.copyfile(path, target)


def tie_unloaded_weights(model) -> None:
    """Tie each tied weight that loading left on the meta device to its loaded source.

    transformers 5.3.0 drops a remote-code model's tied weights from the keys it treats as missing, then finds
    "both present" and ties nothing: the output embedding of every export with tied embeddings (Gemma, small
    Llama and Qwen models) stays unloaded and the logits are garbage. 5.4.0 fixed it; on other releases a tied
    weight is never left on the meta device, so this does nothing. A source that is itself on the meta device
    (offloaded with accelerate) is left to accelerate.
    """
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if expand is None:
        return
    for target, source in expand(all_submodels=True).items():
        try:
            target_param, source_param = model.get_parameter(target), model.get_parameter(source)
        except AttributeError:
            continue
        if target_param.device.type == "meta" and source_param.device.type != "meta":
            parent, _, name = target.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, source_param)
            tied = getattr(model, "all_tied_weights_keys", None)
            if isinstance(tied, dict):
                tied[target] = source  # what save_pretrained and resize_token_embeddings read
