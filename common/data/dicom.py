"""DICOM to the grayscale uint8 array every fedscan model reads, modality-aware.

A JPEG export of a scan is already windowed by whoever exported it; a DICOM
holds raw scanner values, so the same model needs the same windowing to see the
same picture: CT becomes Hounsfield units (RescaleSlope / RescaleIntercept) and
is clipped to a window (lung or brain), MR has no absolute scale and is
stretched between per-image percentiles. MONOCHROME1 (white = low) is inverted.

Privacy: nothing here reads, returns or puts into an error message any patient
tag (name, id, birth date, UIDs); errors name the file and the technical reason.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedscan.common.core.errors import UnreadableImageError

# (center, width) in Hounsfield units.
CT_WINDOWS: Mapping[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "brain": (40.0, 80.0),
    "soft_tissue": (50.0, 400.0),
}
# Which window a domain's CT is read with unless a model package says otherwise.
DOMAIN_CT_WINDOW = {"lung_ct": "lung", "brain_mri": "brain"}
MR_PERCENTILES = (0.5, 99.5)
MODALITIES = frozenset({"CT", "MR"})


def domain_window(domain: str) -> tuple[float, float]:
    """The CT window a domain's DICOMs are read with (lung for lung CT, brain for brain)."""
    return CT_WINDOWS[DOMAIN_CT_WINDOW.get(domain, "lung")]


def looks_like_dicom(head: bytes, name: str = "") -> bool:
    """Part 10 files carry ``DICM`` at byte 128; bare ``.dcm`` files are trusted by name."""
    return head[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


def ct_window(name_or_pair: str | tuple[float, float] | list[float]) -> tuple[float, float]:
    """A named window (``lung``, ``brain``, ``soft_tissue``) or an explicit (center, width)."""
    if isinstance(name_or_pair, str):
        if name_or_pair not in CT_WINDOWS:
            raise ValueError(f"unknown CT window '{name_or_pair}'; use one of {sorted(CT_WINDOWS)}")
        return CT_WINDOWS[name_or_pair]
    center, width = (float(v) for v in name_or_pair)
    if width <= 0:
        raise ValueError(f"CT window width must be > 0, got {width}")
    return center, width


def _to_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (np.clip(arr, lo, hi) - lo) / (hi - lo) * 255.0
    return scaled.round().astype(np.uint8)


def _expected_pixel_bytes(ds: Any) -> int | None:
    """Uncompressed pixel data size from the header, or ``None`` when it cannot say."""
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        return int(ds.Rows) * int(ds.Columns) * frames * samples * int(ds.BitsAllocated) // 8
    except (AttributeError, TypeError, ValueError):
        return None


def decode_dicom(
    data: bytes | Path,
    *,
    label: str | Path,
    window: tuple[float, float] = CT_WINDOWS["lung"],
    percentiles: tuple[float, float] = MR_PERCENTILES,
    modalities: frozenset[str] = MODALITIES,
) -> np.ndarray:
    """One DICOM (file path or bytes) -> 2-D uint8; ``label`` names it in errors.

    Multi-frame files give their middle frame: fedscan classifies single slices,
    and the middle of a stack is the slice most likely to show the organ.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        ds = pydicom.dcmread(source, force=False)
    except InvalidDicomError:
        raise UnreadableImageError(label, "not a DICOM file (no DICM preamble)") from None
    except Exception as exc:  # truncated / malformed data elements
        raise UnreadableImageError(label, f"corrupt DICOM: {type(exc).__name__}") from None
    modality = str(ds.get("Modality", "")).upper() or "missing"
    if modality == "missing" and "PixelData" not in ds and "FloatPixelData" not in ds:
        # pydicom stops quietly at the end of a cut-off file: say what the file is
        raise UnreadableImageError(
            label, "truncated or incomplete DICOM (it ends before its Modality and pixel data)"
        )
    if modality not in modalities:
        raise UnreadableImageError(
            label, f"DICOM modality {modality} is not supported (expected {sorted(modalities)})"
        )
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise UnreadableImageError(label, "DICOM has no pixel data")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        name = getattr(syntax, "name", str(syntax)) if syntax is not None else "unknown"
        if syntax is not None and getattr(syntax, "is_compressed", False):
            raise UnreadableImageError(
                label,
                f"compressed transfer syntax '{name}' cannot be decoded here "
                "(install pylibjpeg / pylibjpeg-libjpeg or python-gdcm)",
            ) from None
        expected = _expected_pixel_bytes(ds)
        got = len(ds.PixelData) if "PixelData" in ds else None
        if expected and got is not None and got < expected:
            raise UnreadableImageError(
                label, f"truncated DICOM: {got} of {expected} bytes of pixel data"
            ) from None
        raise UnreadableImageError(
            label, f"cannot decode pixel data: {type(exc).__name__}"
        ) from None
    arr = np.asarray(pixels)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") or (arr.ndim == 3 and arr.shape[-1] == 3):
        raise UnreadableImageError(label, f"colour DICOM ({photometric}) is not a CT or MR slice")
    if frames > 1 or arr.ndim == 3:
        arr = arr[arr.shape[0] // 2]
    if arr.ndim != 2 or arr.size == 0:
        raise UnreadableImageError(label, f"unexpected DICOM pixel shape {arr.shape}")
    arr = arr.astype(np.float64)
    if modality == "CT":
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        hu = arr * slope + intercept
        center, width = window
        out = _to_uint8(hu, center - width / 2, center + width / 2)
    else:
        lo, hi = np.percentile(arr, percentiles)
        out = _to_uint8(arr, float(lo), float(hi))
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out
