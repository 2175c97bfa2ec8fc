"""The paper's CNN: convolution + pooling blocks followed by fully connected layers."""

from __future__ import annotations

from torch import nn

from fedscan.common.core.errors import ConfigError
from fedscan.common.learn.models.registry import MODELS
from fedscan.common.learn.models.staged import InputAdapter, StagedModel

WIDTHS = (32, 64, 128, 256)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


@MODELS.register("paper_cnn")
def paper_cnn(num_classes: int, *, pretrained: bool = False) -> StagedModel:
    if pretrained:
        raise ConfigError(
            "model.pretrained", "paper_cnn has no pretrained weights; use mode=scratch"
        )
    stages: list[tuple[str, nn.Module]] = [("input", InputAdapter(1, [0.5], [0.5]))]
    cin = 1
    for i, w in enumerate(WIDTHS):
        stages.append((f"block{i + 1}", _block(cin, w)))
        cin = w
    stages.append(
        (
            "fc",
            nn.Sequential(
                nn.AdaptiveAvgPool2d(4),
                nn.Flatten(),
                nn.Linear(cin * 16, 256),
                nn.ReLU(),
                nn.Dropout(0.5),
            ),
        )
    )
    stages.append(("classifier", nn.Linear(256, num_classes)))
    return StagedModel("paper_cnn", stages, num_classes)
