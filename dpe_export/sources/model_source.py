"""ModelSource: a resolved --model, the local checkpoint directory the rest of dpe-export reads, and the
temporary directory to remove when done.
"""
from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

from dpe_export.sources.checkpoint import Checkpoint
from dpe_export.staging import release_staging

logger = logging.getLogger(__name__)


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass
class ModelSource:
    """A resolved --model: `path` is a local checkpoint directory the rest of dpe-export reads."""

    spec: str
    kind: str  # "hub", "dir" or "gguf"
    path: Path
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    gguf: dict[str, Any] = field(default_factory=dict)  # file, quantization, dtype (for the card)
    temporary: Optional[Path] = None  # removed by cleanup()
    text_of: Optional[str] = None  # the multimodal model type whose text model `path` holds

    @cached_property
    def checkpoint(self) -> Checkpoint:
        """The checkpoint at `path`, read once for every stage that follows."""
        return Checkpoint(self.path)

    def cleanup(self) -> None:
        if self.temporary is not None:
            if self.temporary.exists():
                shutil.rmtree(self.temporary, ignore_errors=True)
            release_staging(self.temporary)
        self.temporary = None

    def __enter__(self) -> "ModelSource":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


