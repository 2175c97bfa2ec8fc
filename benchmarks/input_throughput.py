"""Epoch input throughput: decode-once memmap cache vs per-sample PIL decoding.

The baseline is the pipeline of Flower's PyTorch examples: a torchvision
``ImageFolder``-style dataset that opens, decodes, resizes and converts every
image with PIL on every epoch, fed through a ``DataLoader``. fedscan decodes
once into a uint8 memmap and batches from it. Both produce the same float
batches [B, 1, S, S] in [0, 1], with and without the same light augmentation
(flip, pad-and-crop shift, brightness/contrast): per sample with torchvision in
the baseline, per batch with per-sample parameters (kornia) in fedscan.

    python benchmarks/input_throughput.py [--images 2000] [--size 224]

Uses the brain MRI training images under FEDSCAN_DATA, else the synthetic set.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from fedscan.common.core.paths import cache_root, data_root
from fedscan.common.data.cache import PreprocessSpec, build_cache
from fedscan.common.data.datasets import load_dataset
from fedscan.common.data.transforms import Augment
from fedscan.common.learn.training import Batches


class PilFolder(Dataset):
    """What Flower's examples do per sample: PIL open + decode + resize + to tensor."""

    def __init__(self, paths: list[Path], labels: np.ndarray, size: int, augment: bool) -> None:
        self.paths, self.labels = paths, labels
        steps = [
            v2.Grayscale(),
            v2.Resize((size, size)),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
        ]
        # The same "light" preset as fedscan's, drawn per sample by torchvision.
        aug = [
            v2.RandomHorizontalFlip(),
            v2.RandomCrop(size, padding=max(1, round(0.05 * size))),
            v2.ColorJitter(brightness=0.1, contrast=0.1),
        ]
        self.tf = v2.Compose(steps + (aug if augment else []))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as img:
            return self.tf(img.convert("RGB")), int(self.labels[i])


def epoch_seconds(batches) -> float:
    t = time.perf_counter()
    n = 0
    for xb, _ in batches:
        n += xb.shape[0]
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    root = data_root(None)
    tmp = Path(tempfile.mkdtemp(prefix="fedscan-bench-"))
    if root:
        c = load_dataset({"name": "brain_mri"}, data_root=root, cache_root=tmp)
    else:
        c = load_dataset(
            {"name": "synthetic", "per_class": 250, "size": 256},
            data_root=None,
            cache_root=cache_root(None),
        )
    idx = np.random.default_rng(0).permutation(len(c))[: args.images]
    print(
        f"data: {c.name}{' (SYNTHETIC)' if c.synthetic else ''}, {len(idx)} images, "
        f"{args.size}px, batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    t = time.perf_counter()
    cache = build_cache(c, PreprocessSpec(size=args.size), tmp)
    print(f"one-off cache build (all {len(c)} images): {time.perf_counter() - t:.1f} s")

    rows = []
    for augment in (False, True):
        pil = DataLoader(
            PilFolder([c.paths[i] for i in idx], c.labels[idx], args.size, augment),
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=0,
        )
        ours = Batches(
            cache.images,
            c.labels,
            idx,
            batch_size=args.batch_size,
            shuffle=True,
            augment=Augment("light", seed=0) if augment else None,
        )
        epoch_seconds(ours)  # warm the page cache for both sides alike
        t_pil, n = epoch_seconds(pil)
        t_ours, _ = epoch_seconds(ours)
        rows.append((augment, n / t_pil, n / t_ours))
    print(
        f"{'augmentation':<14}{'PIL per-sample img/s':>22}{'decode-once cache img/s':>26}"
        f"{'ratio':>8}"
    )
    for augment, a, b in rows:
        print(f"{'light' if augment else 'none':<14}{a:>22.0f}{b:>26.0f}{b / a:>7.1f}x")


if __name__ == "__main__":
    main()
