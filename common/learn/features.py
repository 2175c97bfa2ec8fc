"""Frozen-trunk features: the frozen stages run once per image, cached on disk.

This is what makes pretrained models practical on a CPU-only hospital server:
each epoch then runs only the trainable stages. The cache file's name carries the
image-cache key and a digest of the frozen weights, so it can never be stale.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from fedscan.common.core.paths import cache_root
from fedscan.common.core.progress import progress
from fedscan.common.data.pipeline import PreparedData
from fedscan.common.data.transforms import to_float
from fedscan.common.learn.models.staged import StagedModel
from fedscan.common.learn.training import (
    FeatureRows,
    MirroredRows,
    place_model,
    prefix_autocast,
    prefix_dtype,
)


def prefix_digest(model: StagedModel, cut: int) -> str:
    """Identity of the frozen stages' weights, part of the feature-cache key."""
    h = hashlib.sha1(model.name.encode() + str(cut).encode())
    for k, v in model.stages[:cut].state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _prefix_batch(
    model: StagedModel, xb: torch.Tensor, cut: int, device: torch.device
) -> torch.Tensor:
    """``stages[:cut]`` of one batch, with channels-last activations on CPUs.

    The input adapter turns one grey channel into three; its output is made
    channels-last here so that every convolution after it takes oneDNN's fast
    path (the model itself is placed channels-last by :func:`place_model`).
    """
    h = model.forward_until(xb, 1)
    if device.type == "cpu":
        h = h.contiguous(memory_format=torch.channels_last)
    for stage in model.stages[1:cut]:
        h = stage(h)
    return h


def cached_features(
    model: StagedModel,
    images: np.ndarray,
    indices: np.ndarray,
    *,
    cut: int,
    cache_file: Path,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    store: type[np.floating] = np.float16,
    batch_size: int = 16,
    what: str = "frozen trunk",
) -> np.ndarray:
    """Outputs of ``stages[:cut]`` for every image in ``indices`` (memmapped).

    The prefix computes in ``dtype`` (:func:`prefix_dtype`) and is stored as ``store``:
    float16 for what trains (half the disk and page cache), float32 where the figures
    must be the exported model's (:func:`exported_features`). Rows outside ``indices``
    are zeros. Reused when ``cache_file`` exists; its name must carry the image-cache
    key, :func:`prefix_digest`, the dtype and a non-default ``store``.
    """
    # on the device, as callers expect, also when the cache is reused; outside
    # inference mode, because the weights train later
    place_model(model, device)
    if cache_file.exists():
        return np.load(cache_file, mmap_mode="r")
    model.eval()
    with torch.inference_mode():
        first = to_float(torch.from_numpy(images[:1].copy())).to(device)
        with prefix_autocast(device, dtype):
            probe = _prefix_batch(model, first, cut, device)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".partial.npy")
        out = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=store, shape=(len(images), *probe.shape[1:])
        )
        idx = np.sort(np.asarray(indices))
        steps = range(0, len(idx), batch_size)
        precision = str(dtype).removeprefix("torch.")
        desc = f"{what} ({model.name}, stages before {model.stage_names[cut]}, {precision})"
        for s in progress(steps, total=len(steps), desc=desc, unit=f"batches of {batch_size}"):
            b = idx[s : s + batch_size]
            xb = to_float(torch.from_numpy(np.ascontiguousarray(images[b]))).to(device)
            with prefix_autocast(device, dtype):
                feats = _prefix_batch(model, xb, cut, device)
            out[b] = feats.float().cpu().numpy().astype(store)
    out.flush()
    del out
    tmp.replace(cache_file)
    return np.load(cache_file, mmap_mode="r")


def _feature_file(
    cfg: DictConfig,
    data: PreparedData,
    model: StagedModel,
    cut: int,
    dtype: torch.dtype,
    suffix: str,
) -> Path:
    """The cache file of ``stages[:cut]`` over ``data``'s images, computed in ``dtype``."""
    tag = "" if dtype == torch.float32 else "-" + str(dtype).removeprefix("torch.")
    name = f"{data.cache.key}-{model.name}-cut{cut}-{prefix_digest(model, cut)}{tag}{suffix}"
    return cache_root(cfg.cache_dir) / "features" / name


def model_inputs(
    model: StagedModel, data: PreparedData, cfg: DictConfig, device: torch.device
) -> tuple[np.ndarray, int]:
    """The array the trainable stages read, and the stage they start at.

    With ``model.feature_cache`` and a frozen trunk this is the trunk's cached
    output (image augmentation cannot apply to it; :func:`mirrored_features` adds
    flips); otherwise the cached uint8 images.
    """
    cut = model.frozen_until
    if not (cfg.model.get("feature_cache", False) and cut > 0):
        return data.cache.images, 0
    # Every readable image, not just this split's: the cache key does not depend on
    # the split, so a later run with another seed or fold must find its rows filled.
    needed = np.flatnonzero(data.cache.ok)
    dtype = prefix_dtype(device, str(cfg.model.get("prefix_precision", "auto")))
    feats = cached_features(
        model,
        data.cache.images,
        needed,
        cut=cut,
        cache_file=_feature_file(cfg, data, model, cut, dtype, ".npy"),
        device=device,
        dtype=dtype,
    )
    return feats, cut


def mirrored_features(
    model: StagedModel,
    data: PreparedData,
    cfg: DictConfig,
    device: torch.device,
    rows: np.ndarray,
) -> MirroredRows | None:
    """The cached prefix over left/right-mirrored copies of the images ``rows``.

    ``train.cached_flips``: where the trainable stages read a cached frozen prefix no
    image augmentation can reach them, so the prefix also runs once over the mirrored
    training images and each epoch draws one of the two views per image
    (:class:`~common.learn.training.Batches`). None when the inputs are not cached
    prefix features or the setting is off. The file's name carries the rows' digest
    as well as the prefix cache's key: a site's rows, or another seed's, get their own.
    """
    cut = model.frozen_until
    on = cfg.train.get("cached_flips", False) and cfg.model.get("feature_cache", False)
    if not on or cut == 0:
        return None
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    dtype = prefix_dtype(device, str(cfg.model.get("prefix_precision", "auto")))
    which = hashlib.sha1(rows.tobytes()).hexdigest()[:16]
    file = _feature_file(cfg, data, model, cut, dtype, f"-mirrored-{which}.npy")
    # only the rows' images, mirrored along their width ([N, H, W]); skipped when cached
    images = np.zeros((0,), np.uint8) if file.exists() else data.cache.images[rows][:, :, ::-1]
    feats = cached_features(
        model,
        np.ascontiguousarray(images),
        np.arange(len(rows)),
        cut=cut,
        cache_file=file,
        device=device,
        dtype=dtype,
        what=f"frozen trunk, {len(rows)} mirrored training images",
    )
    return MirroredRows(features=feats, rows=rows)


def exported_features(
    model: StagedModel,
    data: PreparedData,
    cfg: DictConfig,
    device: torch.device,
    rows: np.ndarray,
) -> FeatureRows:
    """``stages[:model.frozen_until]`` over the images ``rows`` as the exported model
    computes it: float32 arithmetic and float32 storage, whatever
    ``model.prefix_precision`` the training features use.

    The file's name carries the rows' digest (another seed's or fold's test split gets
    its own) and ``-exported``, so it never meets the training cache, which stores
    float16 even where it computes float32.
    """
    cut = model.frozen_until
    if cut == 0:
        raise ValueError("exported_features needs a frozen prefix (model.frozen_until > 0)")
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    which = hashlib.sha1(rows.tobytes()).hexdigest()[:16]
    file = _feature_file(cfg, data, model, cut, torch.float32, f"-exported-{which}.npy")
    images = np.zeros((0,), np.uint8) if file.exists() else data.cache.images[rows]
    feats = cached_features(
        model,
        np.ascontiguousarray(images),
        np.arange(len(rows)),
        cut=cut,
        cache_file=file,
        device=device,
        dtype=torch.float32,
        store=np.float32,
        what=f"frozen trunk, {len(rows)} test images as exported",
    )
    return FeatureRows(features=feats, rows=rows)
