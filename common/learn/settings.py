"""The ``train`` config group as a validated, typed object.

No field has a default: the values come from ``configs/train/*.yaml`` through
:func:`train_settings`, so the config tree is the one source of defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from fedscan.common.core.errors import ConfigError
from fedscan.common.core.options import AUGMENT_PRESETS as PRESETS
from fedscan.common.core.settings import from_section


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Optimisation settings shared by the centralised baseline and every site."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    optimizer: str  # adamw | sgd
    loss: str  # cross_entropy | balanced_softmax
    class_weighting: str  # none | balanced
    sampler: str  # random | balanced
    augment: str  # none | light | standard
    cached_flips: bool  # left/right flips through a second, mirrored cached prefix
    label_smoothing: float
    select_best: bool
    best_metric: str  # val_macro_f1 | val_accuracy | val_loss
    seed: int

    def __post_init__(self) -> None:
        checks = [
            ("train.epochs", self.epochs >= 1, "must be >= 1"),
            ("train.batch_size", self.batch_size >= 1, "must be >= 1"),
            ("train.lr", self.lr > 0, "must be > 0"),
            ("train.weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("train.optimizer", self.optimizer in ("adamw", "sgd"), "use adamw or sgd"),
            (
                "train.class_weighting",
                self.class_weighting in ("none", "balanced"),
                "use none or balanced",
            ),
            (
                "train.loss",
                self.loss in ("cross_entropy", "balanced_softmax"),
                "use cross_entropy or balanced_softmax",
            ),
            ("train.sampler", self.sampler in ("random", "balanced"), "use random or balanced"),
            ("train.augment", self.augment in PRESETS, f"use one of {PRESETS}"),
            ("train.label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
            (
                "train.best_metric",
                self.best_metric in ("val_macro_f1", "val_accuracy", "val_loss"),
                "use val_macro_f1, val_accuracy or val_loss",
            ),
        ]
        if self.loss == "balanced_softmax":
            checks += [
                (
                    "train.label_smoothing",
                    self.label_smoothing == 0,
                    "must be 0 with train.loss=balanced_softmax (a smoothed target puts "
                    "mass on classes the training split does not hold): add "
                    "train.label_smoothing=0",
                ),
                (
                    "train.class_weighting",
                    self.class_weighting == "none",
                    "must be none with train.loss=balanced_softmax, which already corrects "
                    "for the class frequencies",
                ),
                (
                    "train.sampler",
                    self.sampler == "random",
                    "must be random with train.loss=balanced_softmax, which already corrects "
                    "for the class frequencies",
                ),
            ]
        for key, ok, msg in checks:
            if not ok:
                raise ConfigError(key, f"{msg} (got {getattr(self, key.split('.')[1])!r})")


def train_settings(cfg: DictConfig) -> TrainSettings:
    """The ``train`` group of ``cfg`` (and its ``seed``), typed and validated."""
    return from_section(TrainSettings, cfg.train, "train", seed=int(cfg.seed))
