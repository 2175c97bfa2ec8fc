"""Model registry: ``build_model(cfg, num_classes)`` from the ``model`` config group."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedscan.common.core.errors import ConfigError
from fedscan.common.learn.models.dp import make_dp_compatible
from fedscan.common.learn.models.registry import MODELS
from fedscan.common.learn.models.staged import (
    MODES,
    StagedModel,
    batchnorm_to_groupnorm,
    cut_index,
    set_trainable,
)

# model.prefix_precision: the dtype the frozen prefix computes in (auto: the hardware's
# fast one; common.learn.training.prefix_dtype)
PREFIX_PRECISIONS = ("auto", "float32", "bfloat16")


def check_model_config(cfg: Mapping[str, Any]) -> None:
    """The ``model`` group's checks that need no weights: name, mode, norm, precision."""
    MODELS.get(str(cfg["name"]))
    mode = str(cfg.get("mode", "scratch"))
    if mode not in MODES:
        raise ConfigError("model.mode", f"unknown mode '{mode}'; use one of {MODES}")
    pretrained = bool(cfg.get("pretrained", mode != "scratch"))
    if mode != "scratch" and not pretrained:
        raise ConfigError(
            "model.mode", f"mode '{mode}' needs pretrained weights (model.pretrained)"
        )
    norm = str(cfg.get("norm", "batch"))
    if norm not in ("batch", "group"):
        raise ConfigError("model.norm", f"use 'batch' or 'group', got '{norm}'")
    precision = str(cfg.get("prefix_precision", "auto"))
    if precision not in PREFIX_PRECISIONS:
        raise ConfigError(
            "model.prefix_precision", f"use one of {PREFIX_PRECISIONS}, got '{precision}'"
        )


def build_model(cfg: Mapping[str, Any], num_classes: int) -> StagedModel:
    """Build, optionally convert to GroupNorm, and freeze according to ``model.mode``."""
    check_model_config(cfg)
    mode = str(cfg.get("mode", "scratch"))
    pretrained = bool(cfg.get("pretrained", mode != "scratch"))
    model = MODELS.get(str(cfg["name"]))(num_classes, pretrained=pretrained)
    if str(cfg.get("norm", "batch")) == "group":
        batchnorm_to_groupnorm(model)
    model = set_trainable(model, cut_index(model, mode, int(cfg.get("finetune_blocks", 1))))
    if cfg.get("dp_compatible", False):  # set by privacy=dp_sgd
        model = make_dp_compatible(model)
    return model


# Registration side effects; keep at the bottom.
from fedscan.common.learn.models import efficientnet_lite, paper_cnn, resnet  # noqa: E402, F401

__all__ = [
    "MODELS",
    "StagedModel",
    "build_model",
    "check_model_config",
    "cut_index",
    "make_dp_compatible",
    "set_trainable",
]
