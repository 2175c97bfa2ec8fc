"""The embedded default: a small synthetic scan-like dataset, generated on the fly.

A new user without the public datasets still sees the whole pipeline (decode,
cache, split, train, metrics, plots) work in about a minute. The images are
written as PNG files into the cache folder so they travel the same code path as
real data. Every output of a run on them is labelled ``SYNTHETIC``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fedscan.common.core.errors import ConfigError
from fedscan.common.data.classes import CLASSES
from fedscan.common.data.datasets.base import ImageCollection
from fedscan.common.data.datasets.registry import DATASETS
from fedscan.common.data.datasets.site_folder import read_site_folder

GENERATOR_VERSION = 2
SYNTHETIC_LABEL = "SYNTHETIC embedded default (not medical data)"


def _blob(h: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:h]
    return np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2)))


def render(label: int, n_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One scan-like slice: a noisy ellipse, plus a class-specific bright lesion.

    Class 0 of each domain's vocabulary is placed by index: lesions sit in a
    class-specific region, the "healthy" class (``notumor`` / ``normal``) has none.
    """
    h = size
    yy, xx = np.mgrid[0:h, 0:h] / h
    cy, cx = 0.5 + rng.normal(0, 0.02), 0.5 + rng.normal(0, 0.02)
    head = (((yy - cy) / 0.42) ** 2 + ((xx - cx) / 0.36) ** 2) < 1.0
    img = head * (0.35 + 0.1 * rng.random()) + rng.normal(0, 0.05, (h, h))
    # Per-domain lesion positions (row, col, radius) as fractions of the image.
    sites = {
        4: [(0.35, 0.35, 0.08), (0.18, 0.5, 0.06), None, (0.62, 0.5, 0.04)],
        3: [None, (0.4, 0.3, 0.04), (0.55, 0.65, 0.09)],
    }[n_classes]
    spec = sites[label]
    if spec is not None:
        r, c, rad = spec
        img += 0.6 * _blob(h, (r + rng.normal(0, 0.03)) * h, (c + rng.normal(0, 0.03)) * h, rad * h)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def generate(folder: Path, domain: str, *, per_class: int, size: int, seed: int) -> Path:
    """Write the dataset under ``folder`` once; later calls reuse it."""
    marker = folder / "fedscan-synthetic.json"
    meta = {
        "version": GENERATOR_VERSION,
        "domain": domain,
        "per_class": per_class,
        "size": size,
        "seed": seed,
        "label": SYNTHETIC_LABEL,
    }
    if marker.exists() and json.loads(marker.read_text()) == meta:
        return folder
    classes = CLASSES[domain]
    rng = np.random.default_rng(seed)
    for label, cls in enumerate(classes):
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(render(label, len(classes), size, rng)).save(
                folder / cls / f"{i:04d}.png"
            )
    marker.write_text(json.dumps(meta))
    return folder


@DATASETS.register("synthetic")
def load(cfg: Mapping[str, Any], *, data_root: Path | None, cache_root: Path) -> ImageCollection:
    domain = str(cfg.get("domain", "brain_mri"))
    if domain not in CLASSES:
        raise ConfigError("dataset.domain", f"'{domain}' is not one of {sorted(CLASSES)}")
    per_class, size, seed = int(cfg.get("per_class", 60)), int(cfg.get("size", 64)), 0
    if per_class < 10:
        raise ConfigError("dataset.per_class", f"must be >= 10 (got {per_class})")
    folder = cache_root / "synthetic" / f"{domain}-{per_class}x{size}-s{seed}-v{GENERATOR_VERSION}"
    generate(folder, domain, per_class=per_class, size=size, seed=seed)
    return read_site_folder(folder, domain, name=f"synthetic_{domain}", synthetic=True)
