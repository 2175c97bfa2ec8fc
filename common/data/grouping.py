"""Which images must stay together: exact duplicates, near duplicates, scan groups.

Leakage in medical imaging comes from the same patient (or the same pixels) on
both sides of a split. Every split and every federated partition in fedscan is
made over *groups* computed here, never over single images.

Scan-group rule for IQ-OTH/NCCD (derived from the images, see docs/explanation/data.md):
files are numbered per class, and consecutive numbers are mostly consecutive
slices of one scan. Neighbouring slices differ little; the first slice of the
next patient differs a lot (body outline, field of view, table position). A new
group starts where the mean absolute difference of 32x32 thumbnails of two
consecutive files exceeds ``threshold`` (default 15 of 255) or the image size
changes. On the public copy this yields 18 / 41 / 40 groups for benign /
malignant / normal against the 15 / 40 / 55 patients the dataset text states.
Groups smaller than ``min_size`` slices are merged into their most similar
neighbour, because a lone slice is far more likely a mis-cut than a patient.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from fedscan.common.data.datasets.base import ImageCollection
from fedscan.common.data.fingerprint import Fingerprints


def connected_labels(n: int, pairs: np.ndarray) -> np.ndarray:
    """Component label per node for an undirected edge list ``pairs`` of shape [E, 2]."""
    if len(pairs) == 0:
        return np.arange(n)
    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(g, directed=False)[1]


def exact_duplicate_groups(fp: Fingerprints) -> list[list[int]]:
    """Groups (size >= 2) of readable images with identical decoded pixels."""
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(fp.pixel_hash.tolist()):
        if h:
            by_hash.setdefault(h, []).append(i)
    return sorted((g for g in by_hash.values() if len(g) > 1), key=lambda g: g[0])


def near_duplicate_pairs(fp: Fingerprints, max_distance: int, chunk: int = 1024) -> np.ndarray:
    """Pairs (i < j) whose perceptual hashes differ in at most ``max_distance`` bits.

    Pixel-identical pairs are included (distance 0); callers subtract them if needed.
    """
    idx = np.flatnonzero(fp.readable)
    h = fp.phash[idx]
    out = []
    for s in range(0, len(idx), chunk):
        block = h[s : s + chunk, None] ^ h[None, :]
        dist = np.bitwise_count(block)
        ii, jj = np.nonzero(dist <= max_distance)
        ii = ii + s
        keep = ii < jj
        out.append(np.stack([idx[ii[keep]], idx[jj[keep]]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def scan_groups(
    collection: ImageCollection, fp: Fingerprints, *, threshold: float = 15.0, min_size: int = 3
) -> np.ndarray:
    """Scan-group id per image (ids unique across classes); see the module docstring."""
    groups = np.full(len(collection), -1, dtype=np.int64)
    next_id = 0
    thumbs = fp.thumbs.astype(np.float32)
    for label in range(len(collection.classes)):
        members = np.flatnonzero(collection.labels == label)
        members = members[np.argsort(collection.numbers[members], kind="stable")]
        if len(members) == 0:
            continue
        diff = np.abs(thumbs[members[1:]] - thumbs[members[:-1]]).mean(axis=(1, 2))
        resized = (fp.height[members[1:]] != fp.height[members[:-1]]) | (
            fp.width[members[1:]] != fp.width[members[:-1]]
        )
        unreadable = ~fp.readable[members[1:]] | ~fp.readable[members[:-1]]
        cut = ((diff > threshold) | resized) & ~unreadable
        bounds = [0, *(np.flatnonzero(cut) + 1).tolist(), len(members)]
        segments = [list(range(a, b)) for a, b in pairwise(bounds)]
        segments = _merge_small(segments, diff, min_size)
        for seg in segments:
            groups[members[seg]] = next_id
            next_id += 1
    return groups


def _merge_small(segments: list[list[int]], diff: np.ndarray, min_size: int) -> list[list[int]]:
    """Merge segments shorter than ``min_size`` into the neighbour across the smaller jump."""
    segs = [s for s in segments if s]
    changed = True
    while changed and len(segs) > 1:
        changed = False
        for k, seg in enumerate(segs):
            if len(seg) >= min_size:
                continue
            left = diff[seg[0] - 1] if k > 0 else np.inf
            right = diff[seg[-1]] if k < len(segs) - 1 else np.inf
            j = k - 1 if left <= right else k + 1
            a, b = sorted((k, j))
            segs[a : b + 1] = [segs[a] + segs[b]]
            changed = True
            break
    return segs


def leakage_groups(
    base: np.ndarray, fp: Fingerprints, *, near_distance: int | None = 0
) -> np.ndarray:
    """Join ``base`` group ids with exact (and optionally near-) duplicate groups.

    The result is the unit of every split and partition: two images end up on the
    same side whenever they share a scan group or (near-)identical pixels.
    """
    n = len(base)
    pairs = [np.stack([np.arange(n), _first_of(base)], axis=1)]
    for g in exact_duplicate_groups(fp):
        pairs.append(np.array([[g[0], j] for j in g[1:]]))
    if near_distance is not None:
        pairs.append(near_duplicate_pairs(fp, near_distance))
    return connected_labels(n, np.concatenate(pairs).astype(np.int64))


def _first_of(ids: np.ndarray) -> np.ndarray:
    """Index of the first member of each element's group (a star edge list)."""
    _, first, inv = np.unique(ids, return_index=True, return_inverse=True)
    return first[inv]
