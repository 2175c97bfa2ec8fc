"""The model registry: each architecture module registers its factory here by name."""

from __future__ import annotations

from collections.abc import Callable

from fedscan.common.core.registry import Registry
from fedscan.common.learn.models.staged import StagedModel

ModelFactory = Callable[..., StagedModel]
MODELS: Registry[ModelFactory] = Registry("model", "model.name")
