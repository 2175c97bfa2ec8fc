"""Shared assembly of an :class:`ImageCollection` from ``(path, class, split)`` rows."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedscan.common.core.errors import ConfigError, DataError
from fedscan.common.data.datasets.base import ImageCollection

_NUMBER = re.compile(r"\((\d+)\)\s*$")


def file_number(path: Path) -> int:
    """``Normal case (17).jpg`` -> 17; -1 for names without a bracketed number."""
    m = _NUMBER.search(path.stem)
    return int(m.group(1)) if m else -1


def resolve_root(cfg: Mapping[str, Any], data_root: Path | None, default_subdir: str) -> Path:
    """``dataset.path`` if absolute, else under the data root; errors name the key to set."""
    path = cfg.get("path") or default_subdir
    p = Path(str(path)).expanduser()
    if not p.is_absolute():
        if data_root is None:
            raise ConfigError(
                "data_root",
                f"dataset '{cfg['name']}' needs a data root; set data_root=... or FEDSCAN_DATA "
                "to the folder holding brain-tumor-mri/ and iq-oth-nccd/",
            )
        p = data_root / p
    if not p.is_dir():
        raise DataError(p, f"dataset folder for '{cfg['name']}' does not exist")
    return p


def assemble(
    *,
    name: str,
    domain: str,
    classes: tuple[str, ...],
    root: Path,
    rows: Iterable[tuple[Path, str, str | None]],
    skipped: Iterable[Path] = (),
    synthetic: bool = False,
) -> ImageCollection:
    rows = sorted(rows, key=lambda r: (r[2] or "", classes.index(r[1]), file_number(r[0]), r[0]))
    if not rows:
        raise DataError(root, f"no JPEG/PNG images found for dataset '{name}'")
    index = {c: i for i, c in enumerate(classes)}
    return ImageCollection(
        name=name,
        domain=domain,
        classes=classes,
        root=root,
        paths=tuple(r[0] for r in rows),
        labels=np.array([index[r[1]] for r in rows], dtype=np.int64),
        official_split=tuple(r[2] for r in rows),
        numbers=np.array([file_number(r[0]) for r in rows], dtype=np.int64),
        synthetic=synthetic,
        skipped=tuple(skipped),
    )
