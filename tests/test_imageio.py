from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedscan.common.core.errors import UnreadableImageError
from fedscan.common.data.imageio import read_gray
from tests.conftest import noise, save_gray


def test_rgb_with_equal_channels_equals_gray(tmp_path: Path):
    g = noise(1)
    Image.fromarray(np.stack([g] * 3, -1)).save(tmp_path / "rgb.png")
    save_gray(tmp_path / "g.png", g)
    assert np.array_equal(read_gray(tmp_path / "rgb.png"), read_gray(tmp_path / "g.png"))


def test_16bit_png_uses_full_range(tmp_path: Path):
    arr = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "x16.png")
    out = read_gray(tmp_path / "x16.png")
    assert out.min() == 0 and out.max() == 255


def test_alpha_is_composited_on_black(tmp_path: Path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:4, :, 3] = 255  # top half opaque, bottom transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_gray(tmp_path / "a.png")
    assert out[:4].min() == 200 and out[4:].max() == 0


@pytest.mark.parametrize(
    ("maker", "reason"),
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("hello, I am text"), "not an image"),
        (
            lambda p: p.write_bytes(
                (Path(save_gray(p.with_suffix(".t.jpg"), noise(3, 64))).read_bytes())[:300]
            ),
            "corrupt",
        ),
    ],
)
def test_bad_files_name_the_file_and_reason(tmp_path: Path, maker, reason):
    p = tmp_path / "bad.jpg"
    maker(p)
    with pytest.raises(UnreadableImageError, match=reason) as info:
        read_gray(p)
    assert str(p) in str(info.value)
