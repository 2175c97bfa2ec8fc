"""Decode-once image cache: every image decoded and resized once into a uint8 memmap.

Decoding a JPEG costs more than the augmentation and, on a CPU site, a good share
of a forward pass. The cache turns an epoch's input into slicing a memory-mapped
array. Its key covers every file's (path, size, mtime), the target size and the
preprocessing version, so a changed file, size or preprocessing builds a new
cache instead of silently serving stale pixels.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from fedscan.common.core.errors import UnreadableImageError
from fedscan.common.core.parallel import pmap
from fedscan.common.data.datasets.base import ImageCollection
from fedscan.common.data.dicom import CT_WINDOWS
from fedscan.common.data.imageio import read_resized

PREPROCESS_VERSION = 1


@dataclass(frozen=True)
class PreprocessSpec:
    """What is baked into the cached pixels; anything else happens later on tensors."""

    size: int
    resample: str = "bilinear"
    channels: int = 1
    ct_window: tuple[float, float] = CT_WINDOWS["lung"]  # (center, width) for CT DICOMs

    def as_dict(self) -> dict:
        return {
            "size": self.size,
            "resample": self.resample,
            "channels": self.channels,
            "ct_window": list(self.ct_window),
            "version": PREPROCESS_VERSION,
        }


@dataclass(frozen=True)
class ImageCache:
    """``images[i]`` is collection item ``i`` as uint8 [size, size]; ``ok[i]`` if it decoded."""

    images: np.ndarray
    ok: np.ndarray
    errors: dict[int, str]
    path: Path
    key: str


def cache_key(collection: ImageCollection, spec: PreprocessSpec) -> str:
    """Identity of a decoded-image cache: preprocessing, the folder, each file's size and mtime.

    The folder enters resolved and the files relative to it, so two spellings of one
    folder (``../shared/datasets`` from a clone, ``/work/shared/datasets``) share one
    cache instead of decoding and running the trunk twice.
    """
    h = hashlib.sha1(json.dumps(spec.as_dict(), sort_keys=True).encode())
    root = Path(collection.root)
    h.update(str(root.resolve()).encode())
    for p in collection.paths:
        name = p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p.resolve())
        try:
            st = p.stat()
            h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{name}|missing\n".encode())
    return h.hexdigest()[:20]


def _decode(path: Path, size: int, window: tuple[float, float]) -> np.ndarray | str:
    try:
        return read_resized(path, size, ct_window=window)
    except UnreadableImageError as exc:
        return exc.reason


def build_cache(collection: ImageCollection, spec: PreprocessSpec, cache_root: Path) -> ImageCache:
    """Open the cache for ``collection`` at ``spec``, building it on first use."""
    key = cache_key(collection, spec)
    folder = cache_root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    data, meta = folder / f"{collection.name}-{spec.size}-{key}.npy", folder / f"{key}.json"
    if not (data.exists() and meta.exists()):
        tmp = data.with_suffix(".partial.npy")
        out = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(len(collection), spec.size, spec.size)
        )
        errors: dict[int, str] = {}
        results = pmap(
            partial(_decode, size=spec.size, window=spec.ct_window),
            list(collection.paths),
            desc="decode",
        )
        for i, r in enumerate(results):
            if isinstance(r, str):
                errors[i] = r
            else:
                out[i] = r
        out.flush()
        del out
        tmp.replace(data)
        meta.write_text(
            json.dumps(
                {
                    "spec": spec.as_dict(),
                    "n": len(collection),
                    "errors": {str(k): v for k, v in errors.items()},
                }
            )
        )
    info = json.loads(meta.read_text())
    errors = {int(k): v for k, v in info["errors"].items()}
    ok = np.ones(len(collection), bool)
    ok[list(errors)] = False
    return ImageCache(images=np.load(data, mmap_mode="r"), ok=ok, errors=errors, path=data, key=key)
