"""Loading an exported model package and classifying images with it.

Deliberately free of fedscan's training code (no model registry, no timm, no
Flower): an inference host needs the package folder, onnxruntime or torch, and
the decoders in ``common.data.imageio`` / ``common.data.dicom`` so that a JPEG or a DICOM
becomes exactly the pixels the model was trained on.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from fedscan.common.core.errors import DataError
from fedscan.common.data.imageio import decode_gray, read_resized, resize_gray

SPEC_FILE = "fedscan-model.json"
SUPPORTED_FORMATS = ("fedscan-model/1",)


def sha256_file(path: Path) -> str:
    """The checksum a package records for each of its files."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_input(gray: np.ndarray) -> np.ndarray:
    """Uint8 [S, S] -> the network's float32 [1, S, S] input in [0, 1].

    Bit for bit ``common.data.transforms.to_float``, which training and the test figures
    use (tests/test_deploy.py checks all 256 values); here without torch, which an ONNX
    inference host need not have."""
    return (gray.astype(np.float32) / 255.0)[None]


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "probabilities": self.probabilities}


class ModelPackage:
    """A package folder written by ``fedscan export``; ``runtime`` picks the engine."""

    def __init__(self, path: Path, *, runtime: str | None = None, verify: bool = True) -> None:
        self.path = Path(path).expanduser().resolve()
        spec_file = self.path / SPEC_FILE
        if not spec_file.exists():
            raise DataError(self.path, f"not a fedscan model package (no {SPEC_FILE})")
        try:
            self.spec: dict[str, Any] = json.loads(spec_file.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(spec_file, f"invalid JSON: {exc}") from None
        if self.spec.get("format") not in SUPPORTED_FORMATS:
            raise DataError(spec_file, f"unsupported package format {self.spec.get('format')!r}")
        self.classes: list[str] = list(self.spec["classes"])
        self.size: int = int(self.spec["preprocessing"]["resize"]["size"])
        window = self.spec["preprocessing"]["dicom"]["ct_window"]
        self.ct_window = (float(window["center"]), float(window["width"]))
        self.runtime = runtime or self.spec["runtime"]
        files = self.spec["files"]
        if verify:
            for key, name in files.items():
                if sha256_file(self.path / name) != self.spec["sha256"][key]:
                    raise DataError(self.path / name, "checksum mismatch: the package was altered")
        if self.runtime == "onnx":
            if "onnx" not in files:
                raise DataError(self.path, "this package has no ONNX model (exported torchscript)")
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self._session = ort.InferenceSession(
                str(self.path / files["onnx"]), opts, providers=["CPUExecutionProvider"]
            )
        elif self.runtime == "torchscript":
            self._session = None
        else:
            raise DataError(self.path, f"unknown runtime '{self.runtime}'")
        self._halves: tuple[Any, Any] | None = None

    # ------------------------------------------------------------------ model
    @property
    def name(self) -> str:
        p = self.spec["provenance"]
        return f"{p['model']} {p['kind']} {p['dataset']} ({p['run']})"

    def torch_halves(self) -> tuple[Any, Any]:
        """The TorchScript trunk and head (loaded once), for torch inference and Grad-CAM."""
        if self._halves is None:
            import torch

            files = self.spec["files"]
            with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format
                warnings.simplefilter("ignore", FutureWarning)
                self._halves = tuple(
                    torch.jit.load(str(self.path / files[k]), map_location="cpu").eval()
                    for k in ("trunk", "head")
                )
        return self._halves

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """[B, 1, S, S] float32 in [0, 1] -> [B, num_classes] logits."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self._session is not None:
            return self._session.run(None, {"image": batch})[0]
        import torch

        trunk, head = self.torch_halves()
        with torch.inference_mode():
            return head(trunk(torch.from_numpy(batch))).numpy()

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return softmax(self.logits(batch).astype(np.float64), axis=1)

    # ---------------------------------------------------------- preprocessing
    def prepare(self, gray: np.ndarray) -> np.ndarray:
        """A decoded uint8 image -> the model's [1, S, S] float input (as in training)."""
        return model_input(resize_gray(gray, self.size))

    def load_file(self, path: str | Path) -> np.ndarray:
        """A file as the model sees it: decoded and resized by the image cache's own
        function (:func:`~common.data.imageio.read_resized`), then scaled."""
        return model_input(read_resized(path, self.size, ct_window=self.ct_window))

    def load_bytes(self, data: bytes, name: str) -> np.ndarray:
        return self.prepare(decode_gray(data, name=name, ct_window=self.ct_window))

    # ------------------------------------------------------------- prediction
    def predict(self, images: np.ndarray) -> list[Prediction]:
        """[B, 1, S, S] prepared images -> one :class:`Prediction` each."""
        probs = self.probabilities(images)
        return [
            Prediction(
                label=self.classes[int(p.argmax())],
                probabilities={c: round(float(v), 6) for c, v in zip(self.classes, p, strict=True)},
            )
            for p in probs
        ]
