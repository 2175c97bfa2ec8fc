"""``fedscan export``: a run folder's global model as a self-describing package.

The package is a folder a hospital can copy to an inference host that has no
training code: the network (ONNX or TorchScript), the class names, the exact
preprocessing the model was trained with, and where it came from (dataset,
split, strategy, rounds, test metrics). ``deploy.package`` reads it with
onnxruntime or ``torch.jit`` alone.

Grad-CAM needs gradients, which ONNX Runtime does not give, so every package
also carries the network as two TorchScript halves split at the last spatial
feature map: ``trunk`` (image -> feature map) and ``head`` (feature map ->
logits). Their composition is the model; the split point is where the
explanation is computed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedscan.common.core.errors import ConfigError, DataError
from fedscan.common.data.dicom import CT_WINDOWS, DOMAIN_CT_WINDOW, MR_PERCENTILES
from fedscan.common.federated.exchange import local_keys
from fedscan.common.learn.models import StagedModel, build_model
from fedscan.common.runs.record import read_run
from fedscan.deploy.package import SPEC_FILE, sha256_file

log = logging.getLogger("fedscan.export")

PACKAGE_FORMAT = "fedscan-model/1"
FORMATS = ("onnx", "torchscript")


def _flatten(module: nn.Module) -> list[nn.Module]:
    if not isinstance(module, nn.Sequential):
        return [module]
    return [leaf for child in module for leaf in _flatten(child)]


def split_for_cam(model: StagedModel, size: int) -> tuple[nn.Sequential, nn.Sequential]:
    """Split after the last module whose output is a spatial [B, C, H, W] map."""
    modules = [leaf for stage in model.stages for leaf in _flatten(stage)]
    x = torch.zeros(1, 1, size, size)
    last = -1
    with torch.no_grad():
        for i, mod in enumerate(modules):
            x = mod(x)
            if x.dim() == 4:
                last = i
    if last < 0:
        raise ConfigError("model.name", f"{model.name} has no spatial feature map for Grad-CAM")
    return nn.Sequential(*modules[: last + 1]), nn.Sequential(*modules[last + 1 :])


def load_run_model(run_dir: Path) -> tuple[StagedModel, dict[str, Any]]:
    """The trained global model of a centralised or federated run, and its provenance."""
    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise DataError(run_dir, "run folder does not exist")
    run = read_run(run_dir)
    cfg = run.cfg
    prov: dict[str, Any] = {
        "run": run_dir.name,
        "dataset": str(cfg.dataset.name),
        "domain": str(cfg.dataset.get("domain", cfg.dataset.name)),
        "split_policy": str(cfg.dataset.split.policy),
        "model": str(cfg.model.name),
        "mode": str(cfg.model.mode),
        "seed": run.seed,
        "synthetic": run.synthetic,
    }
    ckpt = run.checkpoint()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    classes = list(state["classes"])
    model = build_model(state["model"], len(classes))
    if ckpt.name == "model.pt":  # centralised / pooled
        model.load_state_dict(state["state_dict"])
        prov.update(
            kind=run.kind,
            epochs=len(run.history),
            test_metrics={k: _headline(v) for k, v in run.final().items()},
        )
    else:  # federated: best.pt (the sites' validation picked it), else the last round
        lost = [k for k in local_keys(model, list(state["arrays"])) if "num_batches" not in k]
        if lost:  # FedBN: BatchNorm of the trainable stages never left the sites
            log.warning("%d site-local tensors (FedBN) keep their initial values", len(lost))
        model.load_state_dict(state["arrays"], strict=False)
        row = next((r for r in state["rounds"] if r["round"] == state["round"]), None)
        prov.update(
            kind="federated",
            checkpoint=ckpt.name,
            round=int(state["round"]),
            rounds_planned=int(cfg.federation.rounds),
            strategy=run.strategy,
            num_sites=int(cfg.federation.num_sites),
            fedbn=bool(cfg.federation.fedbn),
            test_metrics={k: _headline(v) for k, v in (row or {}).get("global", {}).items()},
        )
    prov["classes"] = classes
    prov["image_size"] = int(cfg.dataset.image_size)
    return model.eval(), prov


def _headline(m: dict[str, Any]) -> dict[str, Any]:
    keep = ("n", "accuracy", "balanced_accuracy", "macro_f1", "loss")
    out = {k: m[k] for k in keep if k in m}
    out["recall"] = {c: v["recall"] for c, v in m.get("per_class", {}).items()}
    return out


def _adapter_stats(model: StagedModel) -> dict[str, list[float]]:
    adapter = model.stages[0]
    return {
        "mean": [float(v) for v in adapter.mean.flatten()],
        "std": [float(v) for v in adapter.std.flatten()],
        "channels": int(adapter.channels),
    }


def export_run(run_dir: Path, out_dir: Path | None = None, *, fmt: str = "onnx") -> Path:
    """Write the package folder of a run (default ``RUN_DIR/export-<fmt>``) and return it."""
    model, prov = load_run_model(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir).expanduser().resolve() / f"export-{fmt}"
    return export_model(model, out, fmt=fmt, provenance=prov)


def export_model(model: StagedModel, out: Path, *, fmt: str, provenance: dict[str, Any]) -> Path:
    """Package ``model``; ``provenance`` needs at least ``classes``, ``image_size``,
    ``domain`` and ``run`` (see :func:`load_run_model` for the full set)."""
    if fmt not in FORMATS:
        raise ConfigError("--format", f"unknown export format '{fmt}'; use one of {FORMATS}")
    prov = provenance
    model = model.eval()
    size = int(prov["image_size"])
    out.mkdir(parents=True, exist_ok=True)

    example = torch.rand(2, 1, size, size)
    trunk, head = split_for_cam(model, size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, torch.jit.TracerWarning))
        reference = model(example)
        trunk_ts = torch.jit.trace(trunk, example)
        head_ts = torch.jit.trace(head, trunk(example))
    trunk_ts.save(str(out / "trunk.pt"))
    head_ts.save(str(out / "head.pt"))
    files = {"trunk": "trunk.pt", "head": "head.pt"}
    if fmt == "onnx":
        _export_onnx(model, example, out / "model.onnx")
        files["onnx"] = "model.onnx"
    with torch.no_grad():  # the halves must compose to the model, or the package is wrong
        got = head_ts(trunk_ts(example))
    if not torch.allclose(got, reference, atol=1e-4):
        raise RuntimeError("exported TorchScript halves disagree with the model")

    domain = prov["domain"]
    window_name = DOMAIN_CT_WINDOW.get(domain, "lung")
    center, width = CT_WINDOWS[window_name]
    spec = {
        "format": PACKAGE_FORMAT,
        "runtime": fmt,
        "files": files,
        "sha256": {k: sha256_file(out / v) for k, v in files.items()},
        "classes": prov["classes"],
        "input": {"name": "image", "shape": ["batch", 1, size, size], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", len(prov["classes"])], "apply": "softmax"},
        "preprocessing": {
            "decode": "grayscale (RGB averaged by ITU-R 601-2 luma; alpha composited on black)",
            "resize": {"size": size, "filter": "bilinear", "library": "PIL"},
            "scale": "uint8 / 255 -> [0, 1]",
            "normalisation_inside_model": _adapter_stats(model),
            "dicom": {
                "ct_window": {"name": window_name, "center": center, "width": width},
                "mr_percentiles": list(MR_PERCENTILES),
                "monochrome1": "inverted",
                "multiframe": "middle frame",
            },
        },
        "provenance": {
            **prov,
            "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fedscan_version": _version("fedscan"),
            "torch_version": torch.__version__,
        },
    }
    (out / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    log.info("exported %s (%s) to %s", prov["run"], fmt, out)
    return out


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"
