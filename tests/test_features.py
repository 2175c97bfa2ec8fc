"""The frozen-prefix feature cache: its precision, its layout and its file name."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedscan.common.core.errors import ConfigError
from fedscan.common.learn import training
from fedscan.common.learn.features import cached_features
from fedscan.common.learn.models import build_model, check_model_config
from fedscan.common.learn.training import prefix_dtype

CFG = {"name": "efficientnet_lite0", "mode": "finetune", "finetune_blocks": 4}


def _images(n: int = 6, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)


def test_prefix_dtype_follows_the_setting_and_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert prefix_dtype(cpu, "float32") == torch.float32
    assert prefix_dtype(cpu, "bfloat16") == torch.bfloat16
    monkeypatch.setattr(training, "cpu_computes_bf16", lambda: True)
    assert prefix_dtype(cpu, "auto") == torch.bfloat16
    monkeypatch.setattr(training, "cpu_computes_bf16", lambda: False)
    assert prefix_dtype(cpu, "auto") == torch.float32  # emulated bfloat16 would be slower
    with pytest.raises(ConfigError, match=r"model\.prefix_precision"):
        prefix_dtype(cpu, "half")
    with pytest.raises(ConfigError, match=r"model\.prefix_precision"):
        check_model_config({**CFG, "prefix_precision": "fp16"})


def test_float32_cache_equals_the_plain_forward_and_the_model_still_trains(tmp_path: Path):
    torch.manual_seed(0)
    model = build_model(CFG, 4)
    cut = model.frozen_until
    images = _images()
    feats = cached_features(
        model,
        images,
        np.arange(len(images)),
        cut=cut,
        cache_file=tmp_path / "f.npy",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    assert feats.dtype == np.float16 and len(feats) == len(images)
    with torch.no_grad():
        x = torch.from_numpy(images).unsqueeze(1).float() / 255.0
        ref = model.eval().forward_until(x, cut).numpy()
    np.testing.assert_allclose(feats, ref, rtol=2e-3, atol=2e-3)  # float16 storage
    # placed channels-last for the CPU's fast convolutions, outside inference mode:
    # the trainable stages still take gradients afterwards
    assert model.stages[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    model.train()
    loss = model.forward_from(torch.from_numpy(np.array(feats[:2], np.float32)), cut).sum()
    loss.backward()
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bfloat16_cache_is_close_to_float32_and_not_identical(tmp_path: Path):
    model = build_model(CFG, 4)
    cut, images, idx = model.frozen_until, _images(), np.arange(6)
    cpu = torch.device("cpu")
    f32 = cached_features(
        model, images, idx, cut=cut, cache_file=tmp_path / "a.npy", device=cpu
    ).astype(np.float32)
    bf = cached_features(
        model,
        images,
        idx,
        cut=cut,
        cache_file=tmp_path / "b.npy",
        device=cpu,
        dtype=torch.bfloat16,
    ).astype(np.float32)
    rel = np.linalg.norm(bf - f32) / np.linalg.norm(f32)
    assert 0 < rel < 0.05, rel


def test_the_cache_file_names_its_precision(tmp_path: Path, monkeypatch):
    from omegaconf import OmegaConf

    from fedscan.common.learn import features

    seen: list[Path] = []

    def fake(model, images, indices, *, cut, cache_file, device, dtype):
        seen.append(cache_file)
        return np.zeros(1)

    monkeypatch.setattr(features, "cached_features", fake)

    class Cache:
        key, images, ok = "k", np.zeros((2, 8, 8), np.uint8), np.ones(2, bool)

    class Data:
        cache = Cache()

    model = build_model(CFG, 4)
    for precision in ("float32", "bfloat16"):
        cfg = OmegaConf.create(
            {
                "cache_dir": str(tmp_path),
                "model": {**CFG, "feature_cache": True, "prefix_precision": precision},
            }
        )
        features.model_inputs(model, Data(), cfg, torch.device("cpu"))
    assert not seen[0].name.endswith("bfloat16.npy") and seen[1].name.endswith("-bfloat16.npy")
    assert seen[0].name == seen[1].name.replace("-bfloat16", "")  # float32 keeps the old name


def _flip_cfg(tmp_path: Path, on: bool = True, precision: str = "float32"):
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "cache_dir": str(tmp_path),
            "model": {**CFG, "feature_cache": True, "prefix_precision": precision},
            "train": {"cached_flips": on},
        }
    )


def _data(images: np.ndarray, key: str = "k"):
    class Cache:
        pass

    class Data:
        cache = Cache()

    Data.cache.key, Data.cache.images = key, images
    Data.cache.ok = np.ones(len(images), bool)
    return Data()


def test_mirrored_features_are_the_prefix_of_mirrored_images_for_the_rows_asked(tmp_path):
    from fedscan.common.learn.features import mirrored_features

    model = build_model(CFG, 4)
    cut, images, cpu = model.frozen_until, _images(), torch.device("cpu")
    data = _data(images)
    assert mirrored_features(model, data, _flip_cfg(tmp_path, on=False), cpu, [1, 2]) is None
    got = mirrored_features(model, data, _flip_cfg(tmp_path), cpu, np.array([4, 1, 3]))
    assert got is not None and got.rows.tolist() == [1, 3, 4]
    assert len(got.features) == 3  # compact: no row for an image not asked for
    with torch.no_grad():
        x = torch.from_numpy(images[[3, 4]][:, :, ::-1].copy()).unsqueeze(1).float() / 255.0
        ref = model.eval().forward_until(x, cut).numpy()
    np.testing.assert_allclose(got.take(np.array([3, 4])), ref, rtol=2e-3, atol=2e-3)
    plain = cached_features(
        model, images, np.arange(6), cut=cut, cache_file=tmp_path / "p.npy", device=cpu
    )
    assert not np.allclose(got.take(np.array([3])), plain[[3]], atol=1e-2)  # really mirrored
    with pytest.raises(KeyError, match=r"\[2\]"):
        got.take(np.array([1, 2]))
    # one file per row set, reused: a second call reads it (the images are not touched)
    files = sorted((tmp_path / "features").glob("*-mirrored-*.npy"))
    assert len(files) == 1
    again = mirrored_features(model, _data(images * 0), _flip_cfg(tmp_path), cpu, [1, 3, 4])
    np.testing.assert_array_equal(again.features, got.features)
    mirrored_features(model, data, _flip_cfg(tmp_path), cpu, [1, 3])
    assert len(list((tmp_path / "features").glob("*-mirrored-*.npy"))) == 2


def test_batches_draw_one_view_per_sample_each_epoch_and_keep_the_order():
    from fedscan.common.learn.training import Batches, MirroredRows

    x = np.arange(1, 41, dtype=np.float16).reshape(20, 2)
    y = np.arange(20) % 3
    train = np.arange(2, 20)
    mirrored = MirroredRows(features=-x[train], rows=train)
    plain = Batches(x, y, train, batch_size=4, shuffle=True, seed=5)
    flipped = Batches(x, y, train, batch_size=4, shuffle=True, seed=5, mirrored=mirrored)
    again = Batches(x, y, train, batch_size=4, shuffle=True, seed=5, mirrored=mirrored)
    views = []
    for _ in range(3):
        epoch = []
        for (xp, yp), (xf, yf), (xa, _) in zip(plain, flipped, again, strict=True):
            assert torch.equal(yp, yf) and torch.equal(xf, xa)  # same order, reproducible
            assert torch.equal(xf.abs(), xp)  # each sample is itself or its mirror image
            epoch += (xf[:, 0] < 0).tolist()
        views.append(epoch)
    assert all(0 < sum(e) < len(e) for e in views)  # both views, in every epoch
    assert views[0] != views[1]  # drawn again each epoch
    assert (x > 0).all()  # the cached array is never written to


def test_exported_features_are_float32_whatever_the_training_precision(tmp_path):
    """The test splits' prefix is computed and stored in float32 (what the exported model
    computes), also where training uses bfloat16, and only for the rows asked."""
    from fedscan.common.learn.features import exported_features

    model = build_model(CFG, 4)
    cut, images, cpu = model.frozen_until, _images(), torch.device("cpu")
    cfg = _flip_cfg(tmp_path, precision="bfloat16")
    got = exported_features(model, _data(images), cfg, cpu, np.array([4, 1, 3]))
    assert got.dtype == np.float32 and got.rows.tolist() == [1, 3, 4] and len(got.features) == 3
    with torch.no_grad():
        x = torch.from_numpy(images[[1, 3, 4]]).unsqueeze(1).float() / 255.0
        ref = model.eval().forward_until(x, cut).numpy()
    np.testing.assert_allclose(got[np.array([1, 3, 4])], ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(KeyError, match=r"\[0\]"):
        got[np.array([0, 1])]  # never a row of zeros for an image it does not hold
    (file,) = (tmp_path / "features").glob("*.npy")
    assert "-exported-" in file.name and "bfloat16" not in file.name


def test_shipped_inputs_cover_the_test_splits_or_are_the_images(tmp_path):
    from types import SimpleNamespace

    from fedscan.common.learn.prepare import PreparedRun
    from fedscan.common.learn.shipped import shipped_inputs

    model, images, cpu = build_model(CFG, 4), _images(), torch.device("cpu")
    data = _data(images)
    data.splits = SimpleNamespace(tests={"test_a": np.array([5, 2]), "test_b": np.array([2])})
    cfg = _flip_cfg(tmp_path, precision="bfloat16")
    cut = model.frozen_until
    cached = PreparedRun(device=cpu, data=data, model=model, x=np.zeros(1), start=cut)
    got = shipped_inputs(cached, cfg)
    assert got.rows.tolist() == [2, 5] and got.dtype == np.float32
    # no cached prefix (images in, e.g. the paper CNN): the images are already what ships
    raw = PreparedRun(device=cpu, data=data, model=model, x=images, start=0)
    assert shipped_inputs(raw, cfg) is images
