"""Model registry: ``build_model(cfg, num_classes)`` from the ``model`` config group."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedscan.common.core.errors import ConfigError
from fedscan.common.learn.models.dp import DP_BATCHNORMS, make_dp_compatible
from fedscan.common.learn.models.registry import MODELS
from fedscan.common.learn.models.staged import (
    FEATURE_NORMS,
    MODES,
    StagedModel,
    batchnorm_to_groupnorm,
    cut_index,
    normalise_classifier_input,
    set_trainable,
)

# model.prefix_precision: the dtype the frozen prefix computes in (auto: the hardware's
# fast one; common.learn.training.prefix_dtype)
PREFIX_PRECISIONS = ("auto", "float32", "bfloat16")


def check_model_config(cfg: Mapping[str, Any]) -> None:
    """The ``model`` group's checks that need no weights: name, mode, norms, precision."""
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
    feature_norm = str(cfg.get("feature_norm", "none"))
    if feature_norm not in FEATURE_NORMS:
        raise ConfigError("model.feature_norm", f"use one of {FEATURE_NORMS}, got '{feature_norm}'")
    precision = str(cfg.get("prefix_precision", "auto"))
    if precision not in PREFIX_PRECISIONS:
        raise ConfigError(
            "model.prefix_precision", f"use one of {PREFIX_PRECISIONS}, got '{precision}'"
        )
    if cfg.get("dp_compatible", False):  # privacy=dp_sgd: its BatchNorm route
        route = str(cfg.get("dp_batchnorm", "group"))  # runs before the key: group
        if route not in DP_BATCHNORMS:
            raise ConfigError("privacy.batchnorm", f"use one of {DP_BATCHNORMS}, got '{route}'")
        if route == "frozen" and not pretrained:
            raise ConfigError(
                "privacy.batchnorm",
                "frozen needs pretrained BatchNorm statistics (model.mode=features or "
                "finetune); a model trained from scratch has none to keep: use group",
            )


def build_model(cfg: Mapping[str, Any], num_classes: int) -> StagedModel:
    """Build, optionally convert to GroupNorm, normalise the classifier's input, and
    freeze according to ``model.mode``."""
    check_model_config(cfg)
    mode = str(cfg.get("mode", "scratch"))
    pretrained = bool(cfg.get("pretrained", mode != "scratch"))
    model = MODELS.get(str(cfg["name"]))(num_classes, pretrained=pretrained)
    if str(cfg.get("norm", "batch")) == "group":
        batchnorm_to_groupnorm(model)
    feature_norm = str(cfg.get("feature_norm", "none"))
    if feature_norm != "none":
        normalise_classifier_input(model, centred=feature_norm == "centred")
    model = set_trainable(model, cut_index(model, mode, int(cfg.get("finetune_blocks", 1))))
    if cfg.get("dp_compatible", False):  # set by privacy=dp_sgd
        # privacy.batchnorm=frozen: BatchNorm in inference mode instead of GroupNorm
        frozen = str(cfg.get("dp_batchnorm", "group")) == "frozen"
        model.bn_frozen = frozen and str(cfg.get("norm", "batch")) != "group"
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
