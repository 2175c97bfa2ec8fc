"""Brain Tumor MRI (Nickparvar) as downloaded: ``Training|Testing/<class>/*.jpg``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedscan.common.core.errors import DataError
from fedscan.common.data.classes import BRAIN_CLASSES
from fedscan.common.data.datasets._layout import assemble, resolve_root
from fedscan.common.data.datasets.base import ImageCollection, class_folders, list_images
from fedscan.common.data.datasets.registry import DATASETS

SPLIT_FOLDERS = {"Training": "train", "Testing": "test"}


@DATASETS.register("brain_mri")
def load(cfg: Mapping[str, Any], *, data_root: Path | None, cache_root: Path) -> ImageCollection:
    root = resolve_root(cfg, data_root, "brain-tumor-mri")
    rows, skipped = [], []
    for folder, split in SPLIT_FOLDERS.items():
        split_root = root / folder
        if not split_root.is_dir():
            raise DataError(split_root, "missing; expected Training/ and Testing/ folders")
        for cls, sub in class_folders(split_root, "brain_mri", BRAIN_CLASSES).items():
            images, other = list_images(sub)
            rows += [(p, cls, split) for p in images]
            skipped += other
    return assemble(
        name="brain_mri",
        domain="brain_mri",
        classes=BRAIN_CLASSES,
        root=root,
        rows=rows,
        skipped=skipped,
    )
