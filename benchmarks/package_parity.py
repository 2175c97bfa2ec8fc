"""A run's recorded test figures against its exported package's, image by image.

For each test split of a centralised / pooled run, every image file is classified
by the package as ``fedscan predict`` does (decoded from disk by the package), and
the package's confusion matrix, correct count and mean cross-entropy are printed
beside ``metrics.json``'s. With ``--predictions`` the labels come from a saved
``fedscan predict --json`` output instead (e.g. one made by an older fedscan), and
only the confusion matrix and correct count are compared.

    python benchmarks/package_parity.py RUN_DIR [--package DIR] [--runtime onnx]
        [--predictions FILE.json] [--json OUT]

Exit status 0 when every split's confusion matrix is the recorded one, else 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from fedscan.common.data.pipeline import prepare_data
from fedscan.common.runs.record import read_run
from fedscan.deploy.package import ModelPackage


def package_probabilities(package: ModelPackage, files: list[Path]) -> np.ndarray:
    """[N, C] probabilities of ``files``, decoded and resized by the package, 64 at a time."""
    out = []
    for s in range(0, len(files), 64):
        out.append(
            package.probabilities(np.stack([package.load_file(f) for f in files[s : s + 64]]))
        )
        if s and s % 640 == 0:
            print(f"  {s}/{len(files)} images", flush=True)
    return np.concatenate(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--package", type=Path, help="default: RUN_DIR/export-onnx")
    ap.add_argument("--runtime", choices=("onnx", "torchscript"))
    ap.add_argument("--predictions", type=Path, help="a `fedscan predict --json` output")
    ap.add_argument("--json", type=Path, help="write the comparison here")
    a = ap.parse_args()

    run = read_run(a.run_dir)
    recorded = run.final()
    data = prepare_data(run.cfg)  # the run's own splits and files (warm cache)
    c = data.collection
    saved, package = None, None
    if a.predictions:
        doc = json.loads(a.predictions.read_text())
        saved = {str(Path(r["file"]).resolve()): r.get("label") for r in doc["results"]}
    else:
        package = ModelPackage(a.package or a.run_dir / "export-onnx", runtime=a.runtime)
    report, same = {}, True
    for name, idx in data.splits.tests.items():
        files = [Path(c.paths[i]) for i in idx]
        labels = c.labels[idx]
        t0 = time.perf_counter()
        loss = None
        if saved is not None:
            missing = [f for f in files if str(f.resolve()) not in saved]
            if missing:
                more = len(missing) - 1
                raise SystemExit(f"{a.predictions}: no prediction for {missing[0]} (+{more})")
            predicted = np.array([c.classes.index(saved[str(f.resolve())]) for f in files])
        else:
            assert package is not None
            probs = package_probabilities(package, files)
            predicted = probs.argmax(1)
            loss = float(-np.log(probs[np.arange(len(labels)), labels]).mean())
        k = len(c.classes)
        confusion = np.zeros((k, k), int)
        np.add.at(confusion, (labels, predicted), 1)
        rec = recorded[name]
        rec_cm = np.asarray(rec["confusion_matrix"])
        row = {
            "n": len(files),
            "recorded_correct": int(np.trace(rec_cm)),
            "package_correct": int(np.trace(confusion)),
            "recorded_accuracy": rec["accuracy"],
            "package_accuracy": float(np.trace(confusion) / len(files)),
            "recorded_loss": rec.get("loss"),
            "package_loss": loss,
            "confusion_equal": bool(np.array_equal(confusion, rec_cm)),
            "package_confusion_matrix": confusion.tolist(),
            "recorded_confusion_matrix": rec_cm.tolist(),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        same &= row["confusion_equal"]
        report[name] = row
        print(
            f"{name:<16} n={row['n']:<5} metrics.json {row['recorded_correct']} correct "
            f"({row['recorded_accuracy']:.4%})  package {row['package_correct']} correct "
            f"({row['package_accuracy']:.4%})  confusion matrices "
            f"{'equal' if row['confusion_equal'] else 'DIFFER'}"
            + (f"  loss {row['recorded_loss']:.6f} vs {loss:.6f}" if loss is not None else "")
            + f"  ({row['seconds']} s)",
            flush=True,
        )
    if a.json:
        a.json.write_text(json.dumps({"run": str(a.run_dir), "splits": report}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
