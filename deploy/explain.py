"""Grad-CAM heatmaps for a model package, computed by MONAI's ``GradCAM``.

MONAI hooks a named sub-module; TorchScript modules take no hooks, so the
package's two halves are composed around an ``nn.Identity`` placed at the split
(the last spatial feature map), and that identity is the target layer.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from monai.transforms import ScaleIntensity
from monai.visualize import GradCAM
from PIL import Image
from torch import nn

from deploy.package import ModelPackage


class _Composed(nn.Module):
    def __init__(self, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk, self.cam, self.head = trunk, nn.Identity(), head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.cam(self.trunk(x)))


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """Per-map (min, max) -> (0, 1). MONAI's default maps it to (1, 0), which inverts
    the picture (hot where the model did *not* look) if used with a colour map."""
    scale = ScaleIntensity(minv=0.0, maxv=1.0)
    return torch.stack([torch.as_tensor(scale(m)) for m in x.detach().cpu()])


def gradcam(package: ModelPackage, image: np.ndarray, class_index: int | None = None) -> np.ndarray:
    """[1, S, S] prepared image -> [S, S] heatmap in [0, 1] for ``class_index``
    (default: the predicted class)."""
    model = _Composed(*package.torch_halves()).eval()
    cam = GradCAM(nn_module=model, target_layers="cam", postprocessing=_to_unit)
    x = torch.from_numpy(np.ascontiguousarray(image[None], dtype=np.float32))
    # Exported weights may all be frozen (``features`` mode): a graph must exist anyway.
    x.requires_grad_(True)
    with torch.enable_grad():
        heat = cam(x, class_idx=class_index)
    return heat[0, 0].detach().numpy().astype(np.float32)


def overlay(image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.45) -> Image.Image:
    """The grayscale input with the heatmap blended on top (jet colour map)."""
    from matplotlib import colormaps

    gray = np.repeat(image.reshape(image.shape[-2:])[..., None], 3, axis=2)
    colour = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3]
    blended = (1 - alpha) * gray + alpha * colour
    return Image.fromarray((blended * 255).round().astype(np.uint8), mode="RGB")


def overlay_png(image: np.ndarray, heat: np.ndarray) -> bytes:
    buf = io.BytesIO()
    overlay(image, heat).save(buf, format="PNG")
    return buf.getvalue()
