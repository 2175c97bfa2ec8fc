"""The dataset registry: each reader module registers its loader here by name."""

from __future__ import annotations

from collections.abc import Callable

from fedscan.common.core.registry import Registry
from fedscan.common.data.datasets.base import ImageCollection

DatasetLoader = Callable[..., ImageCollection]
DATASETS: Registry[DatasetLoader] = Registry("dataset", "dataset.name")
