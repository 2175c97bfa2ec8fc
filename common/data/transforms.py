"""Augmentation presets that run on whole batches of tensors after the decode-once cache.

kornia draws random parameters *per sample* but applies them to the batch in one
call, which is what keeps augmentation from becoming the bottleneck once decoding
is gone (per-sample torchvision transforms run at a fifth of the speed on a CPU).
Randomness is drawn inside a forked torch RNG seeded from the augmenter's own
generator, so a run, or one site's local epoch, is reproducible from its seed
whatever else in the process draws random numbers (the MONAI ``Rand*`` habit).
"""

from __future__ import annotations

import kornia.augmentation as K
import torch

from fedscan.common.core.errors import ConfigError
from fedscan.common.core.options import AUGMENT_PRESETS

PRESETS = AUGMENT_PRESETS


def preset_transform(preset: str, size: int) -> K.AugmentationSequential | None:
    """Batch transform for [B, 1, size, size] float images in [0, 1].

    ``light``: left/right flip, shifts of up to 5 % (pad and crop, no
    interpolation), brightness and contrast +-10 %. ``standard``: flip, rotation
    up to 15 degrees, shifts of 8 %, scale 0.9-1.1, brightness and contrast +-20 %.
    Up/down flips are never used: they produce anatomy no scanner does.
    """
    if preset not in PRESETS:
        raise ConfigError("train.augment", f"unknown preset '{preset}'; use one of {PRESETS}")
    if preset == "none":
        return None
    if preset == "light":
        geometry = [
            K.RandomCrop(
                (size, size), padding=max(1, round(0.05 * size)), cropping_mode="slice", p=1.0
            )
        ]
        jitter = 0.1
    else:
        geometry = [K.RandomAffine(degrees=15, translate=(0.08, 0.08), scale=(0.9, 1.1), p=1.0)]
        jitter = 0.2
    return K.AugmentationSequential(
        K.RandomHorizontalFlip(),
        *geometry,
        K.RandomBrightness((1 - jitter, 1 + jitter), p=1.0),
        K.RandomContrast((1 - jitter, 1 + jitter), p=1.0),
    )


class Augment:
    """Seedable batch augmenter: ``Augment("light", seed=3)(batch)``."""

    def __init__(self, preset: str, *, seed: int = 0) -> None:
        preset_transform(preset, 8)  # validate the name now, not at the first batch
        self.preset = preset
        self.gen = torch.Generator().manual_seed(seed)
        self._by_size: dict[int, K.AugmentationSequential | None] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        if size not in self._by_size:
            self._by_size[size] = preset_transform(self.preset, size)
        transform = self._by_size[size]
        if transform is None:
            return x
        seed = int(torch.randint(0, 2**62, (1,), generator=self.gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return transform(x).clamp_(0.0, 1.0)


def to_float(batch_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W] -> float [B, 1, H, W] in [0, 1]; normalisation lives in the model."""
    return batch_uint8.unsqueeze(1).float().div_(255.0)
