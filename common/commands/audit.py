"""``fedscan audit``: what is in a data folder before anyone trains on it.

Per-class counts, unreadable files and why, exact and near duplicates, images
shared between train and test, and (for numbered CT slices) inferred scan groups.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fedscan.common.core.errors import DataError
from fedscan.common.data.datasets import ImageCollection, load_dataset
from fedscan.common.data.datasets.site_folder import detect_site_folder
from fedscan.common.data.fingerprint import compute_fingerprints
from fedscan.common.data.grouping import exact_duplicate_groups, near_duplicate_pairs, scan_groups

NEAR_DISTANCE = 4  # perceptual-hash bits; <= 4 of 64 is "the same picture" in practice


def detect(path: Path, cache_root: Path) -> ImageCollection:
    """Recognise the brain layout, the lung layout or a generic site folder."""
    if not path.is_dir():
        raise DataError(path, "audit path is not a folder")
    if (path / "Training").is_dir() and (path / "Testing").is_dir():
        return load_dataset(
            {"name": "brain_mri", "path": str(path)}, data_root=None, cache_root=cache_root
        )
    if any(p.name.lower().endswith(" cases") for p in path.iterdir() if p.is_dir()):
        return load_dataset(
            {"name": "lung_ct", "path": str(path)}, data_root=None, cache_root=cache_root
        )
    return detect_site_folder(path)


def audit(path: Path, cache_root: Path) -> dict[str, Any]:
    c = detect(path, cache_root)
    fp = compute_fingerprints(c, cache_root)
    rel = [c.relpath(i) for i in range(len(c))]
    groups = exact_duplicate_groups(fp)
    split = [s or "" for s in c.official_split]
    train_hashes = {
        fp.pixel_hash[i] for i in range(len(c)) if split[i] == "train" and fp.readable[i]
    }
    cross = [
        rel[i]
        for i in range(len(c))
        if split[i] == "test" and fp.readable[i] and fp.pixel_hash[i] in train_hashes
    ]
    near = [
        (int(a), int(b))
        for a, b in near_duplicate_pairs(fp, NEAR_DISTANCE)
        if fp.pixel_hash[a] != fp.pixel_hash[b]
    ]
    near_cross = [(a, b) for a, b in near if {split[a], split[b]} == {"train", "test"}]
    conflicts = [g for g in groups if len({int(c.labels[i]) for i in g}) > 1]
    sizes = Counter(
        f"{w}x{h}" for w, h, ok in zip(fp.width, fp.height, fp.readable, strict=True) if ok
    )
    report: dict[str, Any] = {
        "path": str(c.root),
        "dataset": c.name,
        "images": len(c),
        "classes": c.class_counts(),
        "unreadable": [
            {"path": rel[i], "reason": str(fp.error[i])} for i in np.flatnonzero(~fp.readable)
        ],
        "non_image_files": [p.relative_to(c.root).as_posix() for p in c.skipped],
        "exact_duplicate_groups": [[rel[i] for i in g] for g in groups],
        "removable_duplicates": [rel[i] for g in groups for i in g[1:]],
        "label_conflicts": [[rel[i] for i in g] for g in conflicts],
        "cross_split_duplicates": cross,
        "near_duplicate_pairs": [[rel[a], rel[b]] for a, b in near],
        "near_duplicate_distance": NEAR_DISTANCE,
        "cross_split_near_duplicates": [[rel[a], rel[b]] for a, b in near_cross],
        "image_sizes": dict(sizes.most_common()),
    }
    if any(s for s in split):
        report["splits"] = {
            s: c.class_counts(np.flatnonzero(np.array(split) == s)) for s in sorted(set(split)) if s
        }
    if (c.numbers >= 0).all():
        sg = scan_groups(c, fp)
        report["scan_groups"] = {
            cls: {
                "groups": len(np.unique(sg[c.labels == k])),
                "sizes": np.unique(sg[c.labels == k], return_counts=True)[1].tolist(),
            }
            for k, cls in enumerate(c.classes)
        }
    return report


def format_report(r: dict[str, Any]) -> str:
    """The audit as a few readable lines for a terminal."""
    lines = [f"audit of {r['path']} ({r['dataset']})", f"  images: {r['images']}"]
    lines.append("  classes: " + ", ".join(f"{k} {v}" for k, v in r["classes"].items()))
    for s, counts in r.get("splits", {}).items():
        lines.append(f"  {s}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    lines.append(f"  unreadable: {len(r['unreadable'])}")
    lines += [f"    {u['path']}: {u['reason']}" for u in r["unreadable"][:20]]
    if r["non_image_files"]:
        lines.append(f"  non-image files ignored: {len(r['non_image_files'])}")
    n_groups, n_rm = len(r["exact_duplicate_groups"]), len(r["removable_duplicates"])
    lines.append(f"  exact-duplicate groups: {n_groups} ({n_rm} removable images)")
    lines.append(f"  duplicate groups with conflicting labels: {len(r['label_conflicts'])}")
    if "splits" in r:
        lines.append(
            f"  test images pixel-identical to a training image: {len(r['cross_split_duplicates'])}"
        )
    lines.append(
        f"  near-duplicate pairs (phash distance <= {r['near_duplicate_distance']}, "
        f"not identical): {len(r['near_duplicate_pairs'])}"
        + (f", {len(r['cross_split_near_duplicates'])} across train/test" if "splits" in r else "")
    )
    for cls, g in r.get("scan_groups", {}).items():
        lines.append(
            f"  scan groups [{cls}]: {g['groups']} (sizes {min(g['sizes'])}-"
            f"{max(g['sizes'])}, median {int(np.median(g['sizes']))})"
        )
    lines.append(
        "  image sizes: " + ", ".join(f"{k} x{v}" for k, v in list(r["image_sizes"].items())[:6])
    )
    return "\n".join(lines)
