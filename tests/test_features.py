"""The frozen-prefix feature cache: its precision, its layout and its file name."""

from pathlib import Path

import numpy as np
import pytest
import torch

from common.core.errors import ConfigError
from common.learn import training
from common.learn.features import cached_features
from common.learn.models import build_model, check_model_config
from common.learn.training import prefix_dtype

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

    from common.learn import features

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
