"""Per-file fingerprints: pixel hash, perceptual hash, size and a small thumbnail.

Duplicate detection, scan-group inference and the audit all need one full-
resolution decode of every file; fingerprints do that decode once and are kept on
disk, keyed by (relative path, byte size, mtime), so a changed file is re-read and
an unchanged one never is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from fedscan.common.core.errors import UnreadableImageError
from fedscan.common.core.parallel import pmap
from fedscan.common.data.datasets.base import ImageCollection
from fedscan.common.data.dicom import domain_window
from fedscan.common.data.imageio import read_gray

THUMB = 32
VERSION = 1


@dataclass(frozen=True)
class Fingerprints:
    """Column arrays aligned with ``collection.paths``; ``error`` is '' when readable."""

    pixel_hash: np.ndarray  # str: sha1 of the decoded grayscale pixels and shape
    phash: np.ndarray  # uint64 perceptual hash (DCT), 0 when unreadable
    height: np.ndarray
    width: np.ndarray
    thumbs: np.ndarray  # uint8 [N, THUMB, THUMB]
    error: np.ndarray  # str

    @property
    def readable(self) -> np.ndarray:
        return self.error == ""


def _one(path: Path, window: tuple[float, float]) -> tuple[str, int, int, int, np.ndarray, str]:
    try:
        arr = read_gray(path, ct_window=window)
    except UnreadableImageError as exc:
        return "", 0, 0, 0, np.zeros((THUMB, THUMB), np.uint8), exc.reason
    digest = hashlib.sha1(f"{arr.shape}".encode() + arr.tobytes()).hexdigest()
    img = Image.fromarray(arr)
    ph = int(str(imagehash.phash(img)), 16)
    thumb = np.asarray(img.resize((THUMB, THUMB), Image.BILINEAR), dtype=np.uint8)
    return digest, ph, arr.shape[0], arr.shape[1], thumb, ""


def _stat_key(path: Path) -> str:
    try:
        st = path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "missing"


def compute_fingerprints(collection: ImageCollection, cache_root: Path) -> Fingerprints:
    """Fingerprint every file of ``collection``, reusing cached rows of unchanged files.

    DICOMs are read with the collection's domain CT window, which is part of the
    store's name.
    """
    window = domain_window(collection.domain)
    tag = f"-v{VERSION}-w{window[0]:g}_{window[1]:g}.npz"
    store = (
        cache_root
        / "fingerprints"
        / (hashlib.sha1(str(collection.root).encode()).hexdigest()[:16] + tag)
    )
    rel = [collection.relpath(i) for i in range(len(collection))]
    keys = [f"{r}|{_stat_key(p)}" for r, p in zip(rel, collection.paths, strict=True)]
    old: dict[str, int] = {}
    cached = None
    if store.exists():
        with np.load(store, allow_pickle=False) as npz:
            cached = {k: npz[k] for k in npz.files}  # NpzFile re-reads an array per access
        old = {k: i for i, k in enumerate(cached["keys"].tolist())}
    todo = [i for i, k in enumerate(keys) if k not in old]
    fresh = dict(
        zip(
            todo,
            pmap(
                partial(_one, window=window),
                [collection.paths[i] for i in todo],
                desc="fingerprint",
            ),
            strict=True,
        )
    )
    rows = []
    for i, k in enumerate(keys):
        if i in fresh:
            rows.append(fresh[i])
        else:
            j = old[k]
            rows.append(
                (
                    str(cached["pixel_hash"][j]),
                    int(cached["phash"][j]),
                    int(cached["height"][j]),
                    int(cached["width"][j]),
                    cached["thumbs"][j],
                    str(cached["error"][j]),
                )
            )
    fp = Fingerprints(
        pixel_hash=np.array([r[0] for r in rows], dtype="U40"),
        phash=np.array([r[1] for r in rows], dtype=np.uint64),
        height=np.array([r[2] for r in rows], dtype=np.int64),
        width=np.array([r[3] for r in rows], dtype=np.int64),
        thumbs=np.stack([r[4] for r in rows]) if rows else np.zeros((0, THUMB, THUMB), np.uint8),
        error=np.array([r[5] for r in rows], dtype=object).astype(str),
    )
    if todo:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            keys=np.array(keys),
            pixel_hash=fp.pixel_hash,
            phash=fp.phash,
            height=fp.height,
            width=fp.width,
            thumbs=fp.thumbs,
            error=fp.error,
        )
        tmp.replace(store)
    return fp
