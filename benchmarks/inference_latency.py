"""Inference latency and throughput of an exported package, runtimes side by side.

Single-image latency (p50 / p95) for ONNX Runtime and TorchScript, model only
and end to end (JPEG bytes -> decode -> resize -> model -> probabilities, what
``POST /predict`` does), the same over HTTP against a running ``fedscan
serve``, Grad-CAM, and batch throughput. Without a package argument it exports
a fresh EfficientNet-Lite0 (ImageNet trunk, 4 classes) at 224 px: latency does
not depend on what the weights learned.

    python benchmarks/inference_latency.py [--package DIR] [--repeats 100]
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def timed(fn: Callable[[], object], repeats: int, warmup: int = 5) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(repeats)
    for i in range(repeats):
        t = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t
    return out * 1000.0


def row(name: str, ms: np.ndarray) -> None:
    p50, p95 = np.percentile(ms, [50, 95])
    print(f"  {name:<44} p50 {p50:7.1f} ms   p95 {p95:7.1f} ms")


def fresh_package(size: int) -> Path:
    from fedscan.common.learn.models import build_model
    from fedscan.deploy.export import export_model

    model = build_model({"name": "efficientnet_lite0", "mode": "features"}, 4)
    prov = {
        "run": "benchmark",
        "kind": "untrained",
        "dataset": "none",
        "domain": "brain_mri",
        "model": "efficientnet_lite0",
        "classes": ["glioma", "meningioma", "notumor", "pituitary"],
        "image_size": size,
        "synthetic": True,
    }
    out = Path(tempfile.mkdtemp(prefix="fedscan-latency-")) / "pkg"
    return export_model(model, out, fmt="onnx", provenance=prov)


def http_latency(package: Path, jpeg: bytes, repeats: int) -> np.ndarray:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "fedscan", "serve", str(package), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        with httpx.Client() as client:
            return timed(
                lambda: client.post(f"{url}/predict", files={"file": ("x.jpg", jpeg)}).json(),
                repeats,
            )
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--package", help="a package folder from fedscan export (ONNX format)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()

    import torch

    from fedscan.deploy.explain import gradcam
    from fedscan.deploy.package import ModelPackage

    path = Path(a.package) if a.package else fresh_package(a.size)
    onnx = ModelPackage(path, runtime="onnx")
    ts = ModelPackage(path, runtime="torchscript")
    size = onnx.size
    rng = np.random.default_rng(0)
    scan = rng.integers(0, 256, (512, 512), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(scan).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    one = onnx.prepare(scan)[None]
    batch = np.repeat(one, a.batch, axis=0)

    print(
        f"package {path.name}: {onnx.name}, {size} px | CPU threads: torch "
        f"{torch.get_num_threads()}, onnxruntime default"
    )
    print("single image:")
    t_onnx = timed(lambda: onnx.probabilities(one), a.repeats)
    t_ts = timed(lambda: ts.probabilities(one), a.repeats)
    row("model only, ONNX Runtime", t_onnx)
    row("model only, TorchScript", t_ts)
    row(
        "end to end (512 px JPEG bytes), ONNX Runtime",
        timed(lambda: onnx.predict(onnx.load_bytes(jpeg, "x.jpg")[None]), a.repeats),
    )
    row(
        "end to end (512 px JPEG bytes), TorchScript",
        timed(lambda: ts.predict(ts.load_bytes(jpeg, "x.jpg")[None]), a.repeats),
    )
    row("HTTP POST /predict (fedscan serve, ONNX)", http_latency(path, jpeg, a.repeats))
    row("Grad-CAM (TorchScript halves)", timed(lambda: gradcam(onnx, one[0]), 20, warmup=2))
    ratio = np.median(t_ts) / np.median(t_onnx)
    print(f"  TorchScript / ONNX Runtime p50 ratio: {ratio:.2f}x")

    print(f"batch throughput (batch {a.batch}):")
    for name, pkg in (("ONNX Runtime", onnx), ("TorchScript", ts)):
        ms = timed(lambda p=pkg: p.probabilities(batch), 10, warmup=3)
        print(f"  {name:<44} {a.batch / (np.median(ms) / 1000):7.1f} images/s")


if __name__ == "__main__":
    main()
