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

from fedscan.deploy.package import ModelPackage


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


def overlay(
    image: np.ndarray, heat: np.ndarray, *, caption: str | None = None, alpha: float = 0.45
) -> Image.Image:
    """The grayscale input with the heatmap blended on top (jet colour map).

    With ``caption`` (the predicted label and its probability), a band below the
    image says what the picture shows and carries the colour scale, so a PNG read
    on its own is not a bare rainbow: blue = low, red = high Grad-CAM attention.
    """
    from matplotlib import colormaps
    from PIL import ImageDraw

    gray = np.repeat(image.reshape(image.shape[-2:])[..., None], 3, axis=2)
    jet = colormaps["jet"]
    colour = jet(np.clip(heat, 0.0, 1.0))[..., :3]
    blended = (1 - alpha) * gray + alpha * colour
    picture = Image.fromarray((blended * 255).round().astype(np.uint8), mode="RGB")
    if caption is None:
        return picture
    w, h = picture.size
    band = 40
    w = max(w, 240)  # room for the caption and the scale beside a small image
    canvas = Image.new("RGB", (w, h + band), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, h + 2), caption, fill="black")
    bar_left, bar_right = 30, max(31, w - 30)
    ramp = (jet(np.linspace(0, 1, bar_right - bar_left))[:, :3] * 255).astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(ramp[None], 8, axis=0), mode="RGB"), (bar_left, h + 18))
    draw.text((2, h + 16), "low", fill="black")
    draw.text((bar_right + 2, h + 16), "high", fill="black")
    draw.text((bar_left, h + 27), "Grad-CAM attention", fill="black")
    return canvas


def overlay_png(image: np.ndarray, heat: np.ndarray, *, caption: str | None = None) -> bytes:
    buf = io.BytesIO()
    overlay(image, heat, caption=caption).save(buf, format="PNG")
    return buf.getvalue()


def caption_of(label: str, probability: float) -> str:
    """The line under a Grad-CAM picture: what the model called it, how sure it was."""
    return f"predicted: {label} (p = {probability:.2f})"
