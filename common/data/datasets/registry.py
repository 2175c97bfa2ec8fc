"""The dataset registry: each reader module registers its loader here by name."""

from __future__ import annotations

from collections.abc import Callable

from common.core.registry import Registry
from common.data.datasets.base import ImageCollection

DatasetLoader = Callable[..., ImageCollection]
DATASETS: Registry[DatasetLoader] = Registry("dataset", "dataset.name")
