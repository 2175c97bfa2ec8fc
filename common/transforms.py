"""Augmentation presets (torchvision v2) that run on tensors after the decode-once cache.

Randomness is drawn inside a forked torch RNG seeded from the augmenter's own
generator, so a run, or one site's local epoch, is reproducible from its seed
whatever else in the process draws random numbers (the MONAI ``Rand*`` habit).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from common.errors import ConfigError

PRESETS = ("none", "light", "standard")


def preset_transform(preset: str) -> v2.Transform | None:
    """Per-sample train transform for [1, H, W] float images in [0, 1].

    Flips are left/right only: an up/down flip produces anatomy no scanner does.
    """
    if preset not in PRESETS:
        raise ConfigError("train.augment", f"unknown preset '{preset}'; use one of {PRESETS}")
    if preset == "none":
        return None
    rot, shift, scale, jitter = {"light": (10, 0.05, 0.05, 0.1), "standard": (20, 0.1, 0.15, 0.2)}[
        preset
    ]
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomAffine(degrees=rot, translate=(shift, shift), scale=(1 - scale, 1 + scale)),
            v2.ColorJitter(brightness=jitter, contrast=jitter),
        ]
    )


class Augment:
    """Seedable batch augmenter: ``Augment("light", seed=3)(batch)``."""

    def __init__(self, preset: str, *, seed: int = 0) -> None:
        self.transform = preset_transform(preset)
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is None:
            return x
        seed = int(torch.randint(0, 2**62, (1,), generator=self.gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.stack([self.transform(img) for img in x])


def to_float(batch_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W] -> float [B, 1, H, W] in [0, 1]; normalisation lives in the model."""
    return batch_uint8.unsqueeze(1).float().div_(255.0)
