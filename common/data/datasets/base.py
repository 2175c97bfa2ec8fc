"""The in-memory index of a labelled image collection (paths and labels, no pixels)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedscan.common.core.errors import DataError
from fedscan.common.data.classes import canonical_class
from fedscan.common.data.dicom import looks_like_dicom
from fedscan.common.data.imageio import DICOM_SUFFIXES, IMAGE_SUFFIXES


@dataclass(frozen=True)
class ImageCollection:
    """Every labelled image of one dataset, in a fixed, sorted order.

    ``official_split`` holds ``"train"``/``"test"`` where the publisher defined a
    split and ``None`` where it did not. ``numbers`` holds the file number of
    layouts numbered like ``Normal case (17).jpg`` (scan-group inference needs it)
    and -1 elsewhere.
    """

    name: str
    domain: str
    classes: tuple[str, ...]
    root: Path
    paths: tuple[Path, ...]
    labels: np.ndarray
    official_split: tuple[str | None, ...]
    numbers: np.ndarray
    synthetic: bool = False
    skipped: tuple[Path, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self, indices: np.ndarray | None = None) -> dict[str, int]:
        labels = self.labels if indices is None else self.labels[indices]
        counts = Counter(int(i) for i in labels)
        return {c: counts.get(i, 0) for i, c in enumerate(self.classes)}

    def relpath(self, i: int) -> str:
        return self.paths[i].relative_to(self.root).as_posix()


def _is_scan(path: Path) -> bool:
    """JPEG / PNG / DICOM by suffix; PACS exports often have no suffix, so a
    suffix-less file is a scan when it carries the DICOM preamble."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES:
        return True
    if suffix or not path.is_file():  # never open a FIFO or device to sniff it
        return False
    try:
        with open(path, "rb") as fh:
            return looks_like_dicom(fh.read(132))
    except OSError:
        return False


def list_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """Scan files under ``folder`` (recursive, sorted) and the other files skipped."""
    images, other = [], []
    for p in sorted(folder.rglob("*")):
        if p.is_dir():
            continue
        (images if _is_scan(p) else other).append(p)
    return images, other


def class_folders(
    root: Path, domain: str, classes: tuple[str, ...], *, strip_suffix: str = ""
) -> dict[str, Path]:
    """Map canonical class -> folder for a ``<class>/`` layout, rejecting unknown folders."""
    if not root.is_dir():
        raise DataError(root, "data folder does not exist")
    found: dict[str, Path] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cls = canonical_class(domain, sub.name.removesuffix(strip_suffix))
        if cls is None:
            raise DataError(
                sub,
                f"unknown class folder '{sub.name}' for {domain}; expected "
                f"{', '.join(classes)} (other accepted spellings: common/data/classes.py)",
            )
        if cls in found:
            raise DataError(sub, f"second folder for class '{cls}' (first: {found[cls].name})")
        found[cls] = sub
    if not found:
        raise DataError(root, f"no class folders found; expected folders named {list(classes)}")
    return found
