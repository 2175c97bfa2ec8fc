"""torchvision ResNet-18. torchvision's weights download at run time, which sites
cannot do, so it trains from scratch (grayscale stem)."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18 as tv_resnet18

from fedscan.common.core.errors import ConfigError
from fedscan.common.learn.models.registry import MODELS
from fedscan.common.learn.models.staged import InputAdapter, StagedModel


@MODELS.register("resnet18")
def resnet18(num_classes: int, *, pretrained: bool = False) -> StagedModel:
    if pretrained:
        raise ConfigError(
            "model.pretrained",
            "resnet18 has no offline ImageNet weights (torchvision downloads them); use "
            "mode=scratch, or model=efficientnet_lite0 for a pretrained trunk",
        )
    m = tv_resnet18(weights=None, num_classes=num_classes)
    m.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    stages = [
        ("input", InputAdapter(1, [0.5], [0.5])),
        ("stem", nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)),
        ("layer1", m.layer1),
        ("layer2", m.layer2),
        ("layer3", m.layer3),
        ("layer4", m.layer4),
        ("pool", nn.Sequential(m.avgpool, nn.Flatten())),
        ("classifier", m.fc),
    ]
    return StagedModel("resnet18", stages, num_classes)
