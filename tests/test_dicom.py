"""DICOM decoding: HU windowing, MR percentiles, MONOCHROME1, multi-frame, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from fedscan.common.core.errors import UnreadableImageError
from fedscan.common.data.dicom import CT_WINDOWS
from fedscan.common.data.imageio import decode_gray, read_gray

PATIENT = "DOE^JANE"


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    photometric: str = "MONOCHROME2",
    with_pixels: bool = True,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT, "ID-4711", "19700101"
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if with_pixels:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_ct_is_converted_to_hounsfield_units_and_windowed(tmp_path: Path) -> None:
    # stored 0 / 424 / 1174 / 2524 -> HU -1024 / -600 / 150 / 1500 with intercept -1024
    stored = np.array([[0, 424], [1174, 2524]])
    f = write_dicom(tmp_path / "ct.dcm", stored)
    got = read_gray(f, ct_window=CT_WINDOWS["lung"])  # center -600, width 1500: [-1350, 150]
    expected = np.round((np.clip([[-1024, -600], [150, 1500]], -1350, 150) + 1350) / 1500 * 255)
    np.testing.assert_array_equal(got, expected.astype(np.uint8))
    brain = read_gray(f, ct_window=CT_WINDOWS["brain"])  # [0, 80] HU
    np.testing.assert_array_equal(brain, [[0, 0], [255, 255]])


def test_rescale_slope_is_applied(tmp_path: Path) -> None:
    f = write_dicom(tmp_path / "ct.dcm", np.array([[0, 100]]), slope=2.0, intercept=-100.0)
    # HU -100 and 100 in the soft-tissue window [-150, 250]
    got = read_gray(f, ct_window=CT_WINDOWS["soft_tissue"])
    np.testing.assert_array_equal(got, [[round(50 / 400 * 255), round(250 / 400 * 255)]])


def test_mr_is_stretched_between_percentiles_and_monochrome1_inverted(tmp_path: Path) -> None:
    ramp = np.arange(1000, dtype=np.uint16).reshape(20, 50) * 3
    mr = read_gray(write_dicom(tmp_path / "mr.dcm", ramp, modality="MR"))
    assert mr.min() == 0 and mr.max() == 255 and mr[0, 0] == 0 and mr[-1, -1] == 255
    inv = read_gray(
        write_dicom(tmp_path / "m1.dcm", ramp, modality="MR", photometric="MONOCHROME1")
    )
    np.testing.assert_array_equal(inv, 255 - mr)


def test_multiframe_gives_the_middle_frame(tmp_path: Path) -> None:
    frames = np.stack([np.full((8, 8), v) for v in (0, 1500, 3000)])
    got = read_gray(write_dicom(tmp_path / "mf.dcm", frames))  # middle: HU 476 -> white
    assert got.shape == (8, 8) and (got == 255).all()


def test_pydicom_bundled_ct_and_mr_decode() -> None:
    ct = read_gray(get_testdata_file("CT_small.dcm"))
    mr = read_gray(get_testdata_file("MR_small.dcm"))
    assert ct.shape == (128, 128) and ct.dtype == np.uint8 and ct.std() > 5
    assert mr.shape == (64, 64) and mr.std() > 5


def test_bytes_and_path_decode_identically() -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    np.testing.assert_array_equal(decode_gray(path.read_bytes(), name="x.dcm"), read_gray(path))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: write_dicom(d / "us.dcm", np.zeros((4, 4)), modality="US"), "modality US"),
        (lambda d: write_dicom(d / "np.dcm", np.zeros((4, 4)), with_pixels=False), "no pixel data"),
        (lambda d: Path(get_testdata_file("rtplan.dcm")), "modality RTPLAN"),
    ],
)
def test_unusable_dicoms_are_named_without_patient_tags(tmp_path: Path, make, reason) -> None:
    path = make(tmp_path)
    with pytest.raises(UnreadableImageError, match=reason) as err:
        read_gray(path)
    assert str(path) in str(err.value)
    assert PATIENT not in str(err.value) and "ID-4711" not in str(err.value)


def test_truncated_dicom_is_a_clear_error(tmp_path: Path) -> None:
    src = write_dicom(tmp_path / "ok.dcm", np.zeros((64, 64)))
    raw = src.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UnreadableImageError, match=r"cut\.dcm"):
        read_gray(tmp_path / "cut.dcm")


def test_compressed_syntax_without_a_decoder_says_what_to_install(tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_dicom(tmp_path / "ct.dcm", np.zeros((8, 8))))
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8 not really JPEG-LS"])
    ds.save_as(tmp_path / "jls.dcm")
    try:
        pydicom.dcmread(tmp_path / "jls.dcm").pixel_array  # noqa: B018
        pytest.fail("expected pydicom to have no JPEG-LS decoder here")
    except Exception as exc:
        if "pyjpegls" not in str(exc) and "pylibjpeg" not in str(exc):
            pytest.skip(f"a JPEG-LS decoder is installed here: {exc}")
    with pytest.raises(UnreadableImageError, match=r"JPEG-LS.*cannot be decoded here.*pylibjpeg"):
        read_gray(tmp_path / "jls.dcm")


def test_a_dicom_site_folder_trains_through_the_cache_without_patient_tags(
    tmp_path: Path,
) -> None:
    """CT DICOMs per class (one without a suffix, as PACS exports them) are listed,
    windowed for the domain, cached, and no patient tag reaches any cache file."""
    from omegaconf import OmegaConf

    from fedscan.common.core.config import load_config
    from fedscan.common.data.pipeline import prepare_data

    site = tmp_path / "site"
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("normal", "benign", "malignant")):
        for i in range(6):
            stored = rng.integers(0, 400, (40, 40)) + 300 * c  # HU -1024.. per class
            name = f"slice{i}" if i == 0 else f"slice{i}.dcm"
            write_dicom(site / cls / name, stored.astype(np.uint16))
    (site / "normal" / "notes.txt").write_text("not a scan")
    cache = tmp_path / "cache"
    cfg = load_config(
        [
            "dataset=synthetic",
            "dataset.image_size=32",
            f"cache_dir={cache}",
            f"data_root={tmp_path}",
        ]
    )
    cfg = OmegaConf.merge(
        cfg, {"dataset": {"name": "site", "path": str(site), "domain": "lung_ct"}}
    )
    data = prepare_data(cfg)
    c = data.collection
    assert len(c) == 18 and c.class_counts() == {"normal": 6, "benign": 6, "malignant": 6}
    assert any(p.name == "slice0" for p in c.paths)
    i = next(i for i, p in enumerate(c.paths) if p.name == "slice0")
    from fedscan.common.data.imageio import resize_gray

    expected = resize_gray(read_gray(c.paths[i], ct_window=CT_WINDOWS["lung"]), 32)
    np.testing.assert_array_equal(data.cache.images[i], expected)
    for f in cache.rglob("*"):
        if f.is_file():
            blob = f.read_bytes()
            assert PATIENT.encode() not in blob and b"ID-4711" not in blob, f
