"""A hospital site's own folder: ``<class>/`` sub-folders of JPEG / PNG / DICOM files.

``dataset.domain`` says which class vocabulary applies (``brain_mri`` or
``lung_ct``); folder names are matched through the alias table.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedscan.common.core.errors import ConfigError, DataError
from fedscan.common.data.classes import CLASSES, canonical_class
from fedscan.common.data.datasets._layout import assemble
from fedscan.common.data.datasets.base import ImageCollection, class_folders, list_images
from fedscan.common.data.datasets.registry import DATASETS


def read_site_folder(
    root: Path, domain: str, *, name: str = "site", synthetic: bool = False
) -> ImageCollection:
    if domain not in CLASSES:
        raise ConfigError("dataset.domain", f"'{domain}' is not one of {sorted(CLASSES)}")
    classes = CLASSES[domain]
    rows, skipped = [], []
    for cls, sub in class_folders(root, domain, classes).items():
        images, other = list_images(sub)
        rows += [(p, cls, None) for p in images]
        skipped += other
    return assemble(
        name=name,
        domain=domain,
        classes=classes,
        root=root,
        rows=rows,
        skipped=skipped,
        synthetic=synthetic,
    )


def detect_site_folder(root: Path, domain: str | None = None) -> ImageCollection:
    """``root`` read with ``domain``'s class names, or with whichever vocabulary fits."""
    if domain is not None:
        return read_site_folder(root, domain)
    if not root.is_dir():
        raise DataError(root, "data folder does not exist")
    folders = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    # the domain whose class names most sub-folders match; its error names the misfits
    best = max(
        sorted(CLASSES), key=lambda d: sum(canonical_class(d, f) is not None for f in folders)
    )
    return read_site_folder(root, best)


@DATASETS.register("site")
def load(cfg: Mapping[str, Any], *, data_root: Path | None, cache_root: Path) -> ImageCollection:
    if not cfg.get("path"):
        raise ConfigError("dataset.path", "the site dataset needs the path of the site's folder")
    root = Path(str(cfg["path"])).expanduser()
    if not root.is_absolute() and data_root is not None:
        root = data_root / root
    if not root.is_dir():
        raise DataError(root, "site data folder does not exist (dataset.path)")
    return read_site_folder(root, str(cfg.get("domain", "brain_mri")))
