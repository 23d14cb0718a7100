"""A Hub repo id as a checkpoint: the files an export needs downloaded through huggingface_hub into its cache
(safetensors only, never pickles), with each Hub failure as one line.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from dpe_export.errors import DPEExportError, first_line
from dpe_export.generated import MODEL_CARD_FILE
from dpe_export.sources.checkpoint import (
    CONFIG_FILE,
    LICENSE_FILES,
    PICKLED_WEIGHT_PATTERNS,
    TOKENIZER_FILES,
    WEIGHTS_INDEX_FILE,
)
from dpe_export.sources.model_source import ModelSource

logger = logging.getLogger(__name__)


def hub_patterns() -> list[str]:
    """The files of a Hub repo an export needs (allow_patterns for snapshot_download)."""

    return [CONFIG_FILE, "generation_config.json", "*.safetensors", WEIGHTS_INDEX_FILE, MODEL_CARD_FILE,
            *TOKENIZER_FILES, *LICENSE_FILES]


def _from_hub(repo_id: str, revision: Optional[str]) -> ModelSource:
    from huggingface_hub import constants, snapshot_download

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        if not offline:
            from huggingface_hub import HfApi

            info = HfApi().model_info(repo_id, revision=revision)
            _check_hub_files(repo_id, [s.rfilename for s in (info.siblings or [])])
        local = snapshot_download(repo_id, revision=revision, allow_patterns=hub_patterns(), repo_type="model")
    except DPEExportError:
        raise
    except Exception as e:  # huggingface_hub's many error types, mapped to one line each
        raise DPEExportError(_describe_hub_error(e, repo_id, revision, offline)) from None
    path = Path(local)
    if not (path / CONFIG_FILE).is_file():
        raise DPEExportError(f"{repo_id} has no {CONFIG_FILE}; it is not a transformers checkpoint")
    if offline:
        _check_hub_files(repo_id, [p.name for p in path.iterdir()])
    return ModelSource(repo_id, "hub", path, hub_id=repo_id, revision=revision)


def _check_hub_files(repo_id: str, names: list[str]) -> None:
    if any(n.endswith(".safetensors") for n in names):
        return
    pickled = sorted(n for n in names if any(n.endswith(p.lstrip("*")) for p in PICKLED_WEIGHT_PATTERNS))
    if pickled:
        raise DPEExportError(
            f"{repo_id} has only pickled weights ({', '.join(pickled[:3])}); dpe-export never loads pickles. "
            "Convert them to safetensors in a trusted environment (model.save_pretrained(dir)) and give that "
            "directory, or use a repo that ships safetensors"
        )
    raise DPEExportError(f"{repo_id} has no safetensors weights")


def _describe_hub_error(e: BaseException, repo_id: str, revision: Optional[str], offline: bool) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, GatedRepoError):
        return f"{repo_id} is gated: accept its conditions on its Hub page, then {login}"
    if isinstance(e, RepositoryNotFoundError):
        return f"{repo_id} was not found on the Hub at {constants.ENDPOINT} (if it is private, {login})"
    if isinstance(e, RevisionNotFoundError):
        return f"revision {revision!r} was not found in {repo_id}"
    if isinstance(e, LocalEntryNotFoundError) or offline:
        if offline:
            return (f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set; unset it to "
                    "download the model")
        return (f"cannot reach the Hub at {constants.ENDPOINT} to download {repo_id} ({first_line(e)}); with "
                "HF_HUB_OFFLINE=1 a model already in the cache is used")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return f"the Hub refused access to {repo_id} (HTTP {status}); {login}"
        return f"the Hub answered HTTP {status} for {repo_id}: {first_line(e)}"
    return (f"cannot download {repo_id} from {constants.ENDPOINT}: {type(e).__name__}: {first_line(e)}; with "
            "HF_HUB_OFFLINE=1 a model already in the cache is used")

