"""Where data, caches and runs live: config keys first, then environment variables.

The public datasets are read-only in CI, so nothing is ever written next to the
images: caches go to ``cache_dir`` (``FEDSCAN_CACHE``, default ``~/.cache/fedscan``).
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "FEDSCAN_DATA"
CACHE_ENV = "FEDSCAN_CACHE"


def data_root(configured: str | os.PathLike | None) -> Path | None:
    """The folder holding ``brain-tumor-mri/`` and ``iq-oth-nccd/``, or ``None`` if unset."""
    value = configured if configured not in (None, "") else os.environ.get(DATA_ENV)
    return Path(value).expanduser().resolve() if value else None


def cache_root(configured: str | os.PathLike | None) -> Path:
    value = configured if configured not in (None, "") else os.environ.get(CACHE_ENV)
    root = Path(value).expanduser() if value else Path.home() / ".cache" / "fedscan"
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()
