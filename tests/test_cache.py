import os
from pathlib import Path

import numpy as np

from fedscan.common.data.cache import PreprocessSpec, build_cache, cache_key
from fedscan.common.data.datasets.site_folder import read_site_folder
from tests.conftest import noise, save_gray


def _site(root: Path) -> Path:
    for k, cls in enumerate(["glioma", "notumor"]):
        for i in range(4):
            save_gray(root / cls / f"{i}.png", noise(10 * k + i, 40))
    return root


def test_cache_matches_decode_and_is_reused(tmp_path: Path):
    c = read_site_folder(_site(tmp_path / "s"), "brain_mri")
    a = build_cache(c, PreprocessSpec(size=20), tmp_path / "cache")
    assert a.images.shape == (8, 20, 20) and a.images.dtype == np.uint8 and a.ok.all()
    mtime = a.path.stat().st_mtime_ns
    b = build_cache(c, PreprocessSpec(size=20), tmp_path / "cache")
    assert b.path == a.path and b.path.stat().st_mtime_ns == mtime
    assert isinstance(b.images, np.memmap)


def test_changed_file_size_or_preprocessing_invalidates(tmp_path: Path):
    root = _site(tmp_path / "s")
    c = read_site_folder(root, "brain_mri")
    k0 = cache_key(c, PreprocessSpec(size=20))
    assert cache_key(c, PreprocessSpec(size=24)) != k0
    assert cache_key(c, PreprocessSpec(size=20, resample="nearest")) != k0
    before = build_cache(c, PreprocessSpec(size=20), tmp_path / "cache").images[0].copy()
    target = c.paths[0]
    save_gray(target, 255 - noise(0, 40))
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    c2 = read_site_folder(root, "brain_mri")
    assert cache_key(c2, PreprocessSpec(size=20)) != k0
    after = build_cache(c2, PreprocessSpec(size=20), tmp_path / "cache").images[0]
    assert not np.array_equal(before, after)


def test_two_spellings_of_one_folder_share_a_key(tmp_path: Path, monkeypatch):
    root = _site(tmp_path / "s")
    absolute = cache_key(read_site_folder(root, "brain_mri"), PreprocessSpec(size=20))
    monkeypatch.chdir(tmp_path / "s" / "glioma")
    relative = read_site_folder(Path("../../s"), "brain_mri")
    assert cache_key(relative, PreprocessSpec(size=20)) == absolute
    moved = tmp_path / "t"
    root.rename(moved)
    assert cache_key(read_site_folder(moved, "brain_mri"), PreprocessSpec(size=20)) != absolute


def test_unreadable_file_is_flagged_not_fatal(tmp_path: Path):
    root = _site(tmp_path / "s")
    (root / "glioma" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    c = read_site_folder(root, "brain_mri")
    cache = build_cache(c, PreprocessSpec(size=16), tmp_path / "cache")
    bad = next(i for i, p in enumerate(c.paths) if p.name == "broken.png")
    assert not cache.ok[bad] and cache.ok.sum() == 8
    assert "corrupt" in cache.errors[bad] or "identify" in cache.errors[bad]


def test_fingerprints_are_reused_from_disk_and_only_changed_files_decoded(tmp_path, monkeypatch):
    from fedscan.common.data import fingerprint

    c = read_site_folder(_site(tmp_path / "s"), "brain_mri")
    decoded: list[str] = []
    real = fingerprint.read_gray

    def counting(path, **kw):
        decoded.append(Path(path).name)
        return real(path, **kw)

    monkeypatch.setattr(fingerprint, "read_gray", counting)
    fresh = fingerprint.compute_fingerprints(c, tmp_path / "cache")
    assert len(decoded) == 8
    decoded.clear()
    again = fingerprint.compute_fingerprints(c, tmp_path / "cache")
    assert decoded == []  # every row came from the store on disk
    for field in ("pixel_hash", "phash", "height", "width", "thumbs", "error"):
        assert np.array_equal(getattr(fresh, field), getattr(again, field)), field
    # one changed file: exactly that one is decoded again
    target = c.paths[3]
    save_gray(target, 255 - noise(3, 40))
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = fingerprint.compute_fingerprints(
        read_site_folder(tmp_path / "s", "brain_mri"), tmp_path / "cache"
    )
    assert decoded == [target.name]
    assert changed.pixel_hash[3] != fresh.pixel_hash[3]
