"""``fedscan predict``: classify files with a model package, optionally explain them.

One unreadable file is reported with its reason and the others are still
classified; the exit status says whether every file went through.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from fedscan.common.core.errors import UnreadableImageError
from fedscan.deploy.package import ModelPackage


def predict_files(
    package: ModelPackage, files: Sequence[Path], *, explain_dir: Path | None = None
) -> list[dict[str, Any]]:
    """One result dict per file: ``label`` and ``probabilities``, or ``error``."""
    results: list[dict[str, Any]] = []
    if explain_dir is not None:
        from fedscan.deploy.explain import caption_of, gradcam, overlay

        explain_dir.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(files):
        try:
            image = package.load_file(path)
        except UnreadableImageError as exc:
            results.append({"file": str(path), "error": exc.reason})
            continue
        pred = package.predict(image[None])[0]
        row: dict[str, Any] = {"file": str(path), **pred.as_dict()}
        if explain_dir is not None:
            target = package.classes.index(pred.label)
            out = explain_dir / f"{i:04d}-{Path(path).stem}-gradcam.png"
            caption = caption_of(pred.label, pred.probabilities[pred.label])
            overlay(image, gradcam(package, image, target), caption=caption).save(out)
            row["explanation"] = str(out)
        results.append(row)
    return results


def print_table(results: Sequence[dict[str, Any]], classes: Sequence[str], out: TextIO) -> None:
    width = max([len(Path(r["file"]).name) for r in results] + [4])
    head = f"{'file':<{width}}  {'label':<11}" + "".join(f"{c:>11}" for c in classes)
    print(head, file=out)
    for r in results:
        name = Path(r["file"]).name
        if "error" in r:
            print(f"{name:<{width}}  ERROR: {r['error']}", file=out)
            continue
        probs = "".join(f"{r['probabilities'][c]:>11.4f}" for c in classes)
        print(f"{name:<{width}}  {r['label']:<11}{probs}", file=out)
        if "explanation" in r:
            print(f"{'':<{width}}  Grad-CAM: {r['explanation']}", file=out)


def run_predict(
    model: Path,
    files: Sequence[Path],
    *,
    as_json: bool = False,
    explain_dir: Path | None = None,
    runtime: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Classify ``files`` with the package ``model``; print to ``out`` (default: the
    ``sys.stdout`` of the moment, not of import time, so redirections apply)."""
    out = out if out is not None else sys.stdout
    package = ModelPackage(model, runtime=runtime)
    results = predict_files(package, files, explain_dir=explain_dir)
    if as_json:
        print(json.dumps({"model": package.name, "results": results}, indent=2), file=out)
    else:
        print(f"model: {package.name}", file=out)
        print_table(results, package.classes, out)
    failed = [r for r in results if "error" in r]
    if failed:
        print(f"{len(failed)} of {len(results)} file(s) could not be read", file=sys.stderr)
    return 1 if failed else 0
