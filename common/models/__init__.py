"""Model registry: ``build_model(cfg, num_classes)`` from the ``model`` config group."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from common.errors import ConfigError
from common.models.staged import (
    MODES,
    StagedModel,
    batchnorm_to_groupnorm,
    cut_index,
    set_trainable,
)
from common.registry import Registry

ModelFactory = Callable[..., StagedModel]
MODELS: Registry[ModelFactory] = Registry("model", "model.name")


def build_model(cfg: Mapping[str, Any], num_classes: int) -> StagedModel:
    """Build, optionally convert to GroupNorm, and freeze according to ``model.mode``."""
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
    model = MODELS.get(str(cfg["name"]))(num_classes, pretrained=pretrained)
    if norm == "group":
        batchnorm_to_groupnorm(model)
    model = set_trainable(model, cut_index(model, mode, int(cfg.get("finetune_blocks", 1))))
    if cfg.get("dp_compatible", False):  # set by privacy=dp_sgd
        from common.privacy import make_dp_compatible

        model = make_dp_compatible(model)
    return model


from common.models import efficientnet_lite, paper_cnn, resnet  # noqa: E402, F401

__all__ = ["MODELS", "StagedModel", "build_model", "cut_index", "set_trainable"]
