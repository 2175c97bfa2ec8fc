"""``fedscan serve`` on a real port: the JSON API, bad uploads, and the page in Chromium."""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(packages: dict[str, Path]) -> Iterator[str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "fedscan", "serve", str(packages["onnx"])]
    cmd += ["--port", str(port), "--max-upload-mb", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            pytest.fail("server did not answer /healthz within 60 s")
        yield url
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def png_bytes(seed: int = 0, size: int = 96) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def post(url: str, name: str, data: bytes, **params: str) -> httpx.Response:
    return httpx.post(f"{url}/predict", files={"file": (name, data)}, params=params, timeout=60)


def test_health_and_model_description(server: str) -> None:
    assert httpx.get(f"{server}/healthz").json()["status"] == "ok"
    info = httpx.get(f"{server}/model").json()
    assert info["classes"] == ["glioma", "meningioma", "notumor", "pituitary"]
    assert info["provenance"]["synthetic"] is True


def test_predict_an_image_and_a_dicom(server: str, packages: dict[str, Path]) -> None:
    from fedscan.deploy.package import ModelPackage

    r = post(server, "scan.png", png_bytes())
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"label", "probabilities", "model"}
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    local = ModelPackage(packages["onnx"])
    expected = local.predict(local.load_bytes(png_bytes(), "scan.png")[None])[0]
    assert body["label"] == expected.label
    for cls, p in expected.probabilities.items():
        assert body["probabilities"][cls] == pytest.approx(p, abs=1e-6)

    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    r = post(server, "slice.dcm", ct, explain="true")
    assert r.status_code == 200, r.text
    png = r.json()["explanation"]
    assert png.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(png.split(",", 1)[1]))).size == (64, 64)


@pytest.mark.parametrize(
    ("name", "data", "status", "message"),
    [
        ("empty.png", b"", 400, "empty upload"),
        ("notes.jpg", b"this is a text file", 415, "not an image PIL can identify"),
        ("cut.png", png_bytes()[:200], 415, "corrupt image data"),
        ("huge.png", b"\0" * (1024 * 1024 + 10), 413, "larger than the limit"),
        ("plan.dcm", Path(get_testdata_file("rtplan.dcm")).read_bytes(), 415, "modality RTPLAN"),
    ],
)
def test_bad_uploads_get_a_4xx_and_the_server_keeps_serving(
    server: str, name: str, data: bytes, status: int, message: str
) -> None:
    r = post(server, name, data)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert post(server, "ok.png", png_bytes(1)).status_code == 200


def test_missing_file_field_is_a_422(server: str) -> None:
    r = httpx.post(f"{server}/predict", data={"other": "x"}, timeout=30)
    assert r.status_code == 422
    assert r.json() == {
        "detail": "no file uploaded: send it as multipart/form-data in the field 'file'"
    }


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="Debian's chromium is not installed"
)
def test_upload_page_in_headless_chromium(server: str, tmp_path: Path) -> None:
    """Upload a scan on the page; the label shown is the API's, and the heatmap is drawn."""
    assert CHROMIUM, "CI must install chromium (see .ci/run)"
    from playwright.sync_api import sync_playwright

    scan = tmp_path / "scan.png"
    scan.write_bytes(png_bytes(7))
    expected = post(server, "scan.png", scan.read_bytes()).json()["label"]
    shot = tmp_path / "page.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.goto(server)
            page.wait_for_function("document.getElementById('model').textContent.includes('SYN')")
            page.set_input_files("#file", str(scan))
            page.click("#submit")
            page.wait_for_selector("body[data-state=done]", timeout=60_000)
            page.wait_for_function("document.getElementById('heatmap').complete")
            label = page.inner_text("#label")
            bars = page.locator("#bars .bar").count()
            page.screenshot(path=str(shot), full_page=True)
            heat_box = page.locator("#heatmap").bounding_box()
        finally:
            browser.close()
    assert label == expected and bars == 4
    # The screenshot shows the heatmap: the jet colour map's reds and blues fill its box.
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert heat_box is not None
    x0, y0 = int(heat_box["x"]), int(heat_box["y"])
    region = img[y0 : y0 + int(heat_box["height"]), x0 : x0 + int(heat_box["width"])]
    saturated = (region.max(axis=2) - region.min(axis=2)) > 80
    assert saturated.mean() > 0.3, "no heatmap colours where the heatmap should be"
    if out := os.environ.get("FEDSCAN_SCREENSHOT"):
        shutil.copy(shot, out)
