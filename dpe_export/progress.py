"""Progress bars on stderr (tqdm), the same everywhere dpe-export does long work."""
from __future__ import annotations

import sys


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "prompt", **kwargs):
    """A tqdm bar on stderr; a no-op bar when not `enabled` (--no-progress)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                leave=True, **kwargs)
