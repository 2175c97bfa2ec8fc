"""IQ-OTH/NCCD lung CT as downloaded: ``<Class> cases/<Class> case (N).jpg``.

There is no official split and no patient id; splits are built from inferred scan
groups (see :mod:`common.data.grouping`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedscan.common.data.classes import LUNG_CLASSES
from fedscan.common.data.datasets._layout import assemble, resolve_root
from fedscan.common.data.datasets.base import ImageCollection, class_folders, list_images
from fedscan.common.data.datasets.registry import DATASETS


@DATASETS.register("lung_ct")
def load(cfg: Mapping[str, Any], *, data_root: Path | None, cache_root: Path) -> ImageCollection:
    root = resolve_root(cfg, data_root, "iq-oth-nccd")
    rows, skipped = [], []
    # Folder names are "Bengin cases" etc.; the alias table strips the " cases" part.
    for cls, sub in class_folders(root, "lung_ct", LUNG_CLASSES).items():
        images, other = list_images(sub)
        rows += [(p, cls, None) for p in images]
        skipped += other
    return assemble(
        name="lung_ct",
        domain="lung_ct",
        classes=LUNG_CLASSES,
        root=root,
        rows=rows,
        skipped=skipped,
    )
