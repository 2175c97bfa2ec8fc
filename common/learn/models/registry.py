"""The model registry: each architecture module registers its factory here by name."""

from __future__ import annotations

from collections.abc import Callable

from common.core.registry import Registry
from common.learn.models.staged import StagedModel

ModelFactory = Callable[..., StagedModel]
MODELS: Registry[ModelFactory] = Registry("model", "model.name")
