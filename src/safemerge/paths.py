"""Where safemerge keeps what it builds once: converted backbones, cached datasets, the model zoo."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$SAFEMERGE_CACHE`, else `~/.cache/safemerge`; created on demand."""
    root = Path(os.environ.get("SAFEMERGE_CACHE", Path.home() / ".cache" / "safemerge"))
    root.mkdir(parents=True, exist_ok=True)
    return root
