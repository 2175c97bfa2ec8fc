"""Decoding one image file into a grayscale uint8 array, with errors that say why.

MRI and CT are single-channel modalities; JPEGs of them often arrive as RGB with
three equal channels. Decoding to one channel keeps caches 3x smaller and makes a
site's RGB export and another site's grayscale export identical to the model.
"""

from __future__ import annotations

import io
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedscan.common.core.errors import UnreadableImageError
from fedscan.common.data.dicom import CT_WINDOWS, decode_dicom, looks_like_dicom

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
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


def read_gray(
    path: str | Path, *, ct_window: tuple[float, float] = CT_WINDOWS["lung"]
) -> np.ndarray:
    """Decode ``path`` (JPEG, PNG or DICOM) to a 2-D uint8 array at native resolution.

    Raises :class:`UnreadableImageError` naming the file and the reason, so that
    one corrupt file in a hospital folder is reported rather than crashing a run.
    ``ct_window`` applies to CT DICOMs only (see :mod:`common.data.dicom`).
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        reason = "broken symbolic link" if path.is_symlink() else "file not found"
        raise UnreadableImageError(path, reason) from None
    except OSError as exc:  # e.g. a symlink loop
        raise UnreadableImageError(path, f"cannot open: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        # A FIFO or device named .jpg would block or stream forever if opened.
        raise UnreadableImageError(path, "not a regular file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except FileNotFoundError:
        raise UnreadableImageError(path, "file not found") from None
    except PermissionError:
        raise UnreadableImageError(path, "permission denied") from None
    except IsADirectoryError:
        raise UnreadableImageError(path, "is a directory") from None
    except OSError as exc:  # e.g. a symlink loop
        raise UnreadableImageError(path, f"cannot open: {exc.strerror or exc}") from None
    if looks_like_dicom(head, path.name):
        return decode_dicom(path, label=path, window=ct_window)
    return _decode_pil(path, path)


def decode_gray(
    data: bytes, *, name: str, ct_window: tuple[float, float] = CT_WINDOWS["lung"]
) -> np.ndarray:
    """Like :func:`read_gray` for bytes in memory (an HTTP upload); ``name`` labels errors."""
    if not data:
        raise UnreadableImageError(name, "empty file")
    if looks_like_dicom(data[:132], name):
        return decode_dicom(data, label=name, window=ct_window)
    return _decode_pil(io.BytesIO(data), name)


def _decode_pil(source: Path | io.BytesIO, label: str | Path) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise UnreadableImageError(label, f"image too large ({img.width}x{img.height})")
                img.load()
                arr = _to_gray(img)
    except UnreadableImageError:
        raise
    except FileNotFoundError:
        raise UnreadableImageError(label, "file not found") from None
    except PermissionError:
        raise UnreadableImageError(label, "permission denied") from None
    except UnidentifiedImageError:
        empty = isinstance(source, Path) and source.stat().st_size == 0
        reason = "empty file" if empty else "not an image PIL can identify"
        raise UnreadableImageError(label, reason) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImageError(label, "image too large (decompression bomb)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise UnreadableImageError(label, f"corrupt image data: {exc}") from None
    if arr.ndim != 2 or arr.size == 0:
        raise UnreadableImageError(label, f"unexpected decoded shape {arr.shape}")
    return arr


def resize_gray(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` with antialiasing (PIL's bilinear filter)."""
    if arr.shape == (size, size):
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def read_resized(
    path: str | Path, size: int, *, ct_window: tuple[float, float] = CT_WINDOWS["lung"]
) -> np.ndarray:
    """:func:`read_gray` then :func:`resize_gray`: the uint8 pixels the decode-once cache
    stores for a file (``common.data.cache``) and the pixels an exported package feeds
    its network (``deploy.package``). One function, so that what a model was scored on
    and what it is given in deployment cannot drift apart."""
    return resize_gray(read_gray(path, ct_window=ct_window), size)
