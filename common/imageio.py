"""Decoding one image file into a grayscale uint8 array, with errors that say why.

MRI and CT are single-channel modalities; JPEGs of them often arrive as RGB with
three equal channels. Decoding to one channel keeps caches 3x smaller and makes a
site's RGB export and another site's grayscale export identical to the model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.errors import UnreadableImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
# A CT slice is 512x512; anything this large is a mistake or a decompression bomb.
MAX_PIXELS = 8192 * 8192


def _to_gray(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit PNG: scale the full range into 8 bits rather than clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return scaled.round().astype(np.uint8)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become black, the background of every scan.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("L"), dtype=np.uint8)


def read_gray(path: str | Path) -> np.ndarray:
    """Decode ``path`` to a 2-D uint8 array at its native resolution.

    Raises :class:`UnreadableImageError` naming the file and the reason, so that
    one corrupt file in a hospital folder is reported rather than crashing a run.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise UnreadableImageError(path, f"image too large ({img.width}x{img.height})")
                img.load()
                arr = _to_gray(img)
    except UnreadableImageError:
        raise
    except FileNotFoundError:
        raise UnreadableImageError(path, "file not found") from None
    except PermissionError:
        raise UnreadableImageError(path, "permission denied") from None
    except IsADirectoryError:
        raise UnreadableImageError(path, "is a directory") from None
    except UnidentifiedImageError:
        size = path.stat().st_size if path.exists() else 0
        reason = "empty file" if size == 0 else "not an image PIL can identify"
        raise UnreadableImageError(path, reason) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImageError(path, "image too large (decompression bomb)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise UnreadableImageError(path, f"corrupt image data: {exc}") from None
    if arr.ndim != 2 or arr.size == 0:
        raise UnreadableImageError(path, f"unexpected decoded shape {arr.shape}")
    return arr


def resize_gray(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` with antialiasing (PIL's bilinear filter)."""
    if arr.shape == (size, size):
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR), dtype=np.uint8)
