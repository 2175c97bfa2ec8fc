"""Dataset registry: ``load_dataset(cfg)`` turns a ``dataset`` config into an index.

Each reader lives in its own module and registers itself by name; importing this
package imports them all.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedscan.common.data.datasets.base import ImageCollection
from fedscan.common.data.datasets.registry import DATASETS


def load_dataset(
    cfg: Mapping[str, Any], *, data_root: Path | None, cache_root: Path
) -> ImageCollection:
    """Read the dataset described by ``cfg`` (the ``dataset`` config group)."""
    return DATASETS.get(str(cfg["name"]))(cfg, data_root=data_root, cache_root=cache_root)


# Registration side effects; keep at the bottom.
from fedscan.common.data.datasets import brain_mri, lung_ct, site_folder, synthetic  # noqa: E402, F401

__all__ = ["DATASETS", "ImageCollection", "load_dataset"]
