"""``prepare_run(cfg)``: from a resolved config to a model and the arrays it trains on.

Every entry point (``fedscan train``, the baselines, the ServerApp, each site, the
study's cache build) needs the same four steps in the same order: pick the device,
read and cache the data, build the model, compute the frozen-trunk features.
Written once here, so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from fedscan.common.data.pipeline import PreparedData, prepare_data
from fedscan.common.learn.features import model_inputs
from fedscan.common.learn.models import StagedModel, build_model
from fedscan.common.learn.training import select_device


@dataclass
class PreparedRun:
    device: torch.device
    data: PreparedData
    model: StagedModel  # freshly built; its frozen stages produced ``x``
    x: np.ndarray  # cached uint8 images, or frozen-trunk features
    start: int  # the first stage that reads ``x``

    @property
    def classes(self) -> list[str]:
        return list(self.data.collection.classes)

    @property
    def labels(self) -> np.ndarray:
        return self.data.collection.labels


def prepare_run(cfg: DictConfig) -> PreparedRun:
    """Device, data, model and model inputs for ``cfg`` (seeded by ``cfg.seed``)."""
    device = select_device(str(cfg.device), cfg.num_threads)
    torch.manual_seed(int(cfg.seed))
    data = prepare_data(cfg)
    model = build_model(cfg.model, len(data.collection.classes))
    x, start = model_inputs(model, data, cfg, device)
    return PreparedRun(device=device, data=data, model=model, x=x, start=start)
