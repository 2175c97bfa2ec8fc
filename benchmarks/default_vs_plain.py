"""fedscan's default ``fedscan train`` beside the pipeline a user writes instead.

One run, one machine, one after the other, both from cold caches:

1. ``benchmarks/plain_baseline.py`` (torchvision ImageFolder + per-sample PIL
   decode, ImageNet EfficientNet-Lite0, full fine-tune, 128 px, 3 epochs, AdamW
   one-cycle, batch 32) in a subprocess;
2. ``fedscan train dataset=brain_mri`` (today's defaults, nothing overridden
   but the folders) in a subprocess, with an empty cache folder so that
   decoding, fingerprinting and the frozen-prefix features are paid for.

Both are scored on ``test_official`` (the publisher's ``Testing/``) and
``test_dedup`` (the same minus images pixel-identical to a training image:
fedscan's split, applied to the plain pipeline's per-file predictions).
Prints the table and the wall-time ratio; ``--json`` writes them. ``--seeds`` runs
one pair per seed (the plain pipeline's ``--seed``, fedscan's ``seed=``) and adds
their mean: on one machine the plain pipeline's test accuracy moved by up to 0.8
points between seeds 0-2 and fedscan's default by up to 0.5 (docs/results/default-vs-plain.md).

    python benchmarks/default_vs_plain.py [--data DIR] [--seeds 0 1 2] [--json out.json] \
        [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    """Run ``cmd`` with its output streaming to ours (progress stays visible); seconds."""
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return time.perf_counter() - start


def dedup_files(data_root: Path, cache_dir: Path) -> tuple[set[str], set[str]]:
    """Resolved paths of fedscan's ``test_official`` and ``test_dedup`` images (warm cache)."""
    from fedscan.common.core.config import load_config
    from fedscan.common.data.pipeline import prepare_data

    cfg = load_config(["dataset=brain_mri", f"data_root={data_root}", f"cache_dir={cache_dir}"])
    data = prepare_data(cfg)
    paths = data.collection.paths
    return tuple(  # type: ignore[return-value]
        {str(Path(paths[i]).resolve()) for i in data.splits.tests[name]}
        for name in ("test_official", "test_dedup")
    )


def one_seed(data: Path, seed: int, plain_epochs: int, overrides: list[str]) -> dict:
    """Both pipelines with ``seed``, one after the other, each from cold caches:
    accuracy on both test splits and wall seconds per pipeline."""
    env = {**os.environ, "FEDSCAN_DATA": str(data), "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="fedscan-vs-plain-") as tmp:
        tmp = Path(tmp)
        print(f"== seed {seed}: 1/2 the plain pipeline (benchmarks/plain_baseline.py)", flush=True)
        plain_json = tmp / "plain.json"
        plain_s = _timed(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "plain_baseline.py"),
                f"--data={data / 'brain-tumor-mri'}",
                f"--epochs={plain_epochs}",
                f"--seed={seed}",
                f"--out={plain_json}",
            ],
            env,
        )
        print(f"== seed {seed}: 2/2 fedscan train dataset=brain_mri (cold cache)", flush=True)
        cache, runs = tmp / "cache", tmp / "runs"
        fed_s = _timed(
            [
                sys.executable,
                "-m",
                "fedscan",
                "train",
                "dataset=brain_mri",
                f"seed={seed}",
                f"cache_dir={cache}",
                f"runs_dir={runs}",
                *overrides,
            ],
            env,
        )
        from fedscan.common.runs.record import read_run

        (run_dir,) = [m.parent for m in runs.glob("*/metrics.json")]
        final = read_run(run_dir).final()
        official, dedup = dedup_files(data, cache)
        plain = json.loads(plain_json.read_text())["predictions"]
    rows: dict[str, dict[str, float]] = {"plain": {}, "fedscan": {}}
    for name, files in (("test_official", official), ("test_dedup", dedup)):
        missing = files - set(plain)
        if missing:
            raise SystemExit(f"{len(missing)} {name} files not scored by the plain pipeline")
        hits = [plain[f][0] == plain[f][1] for f in files]
        rows["plain"][name] = 100 * sum(hits) / len(hits)
        rows["fedscan"][name] = 100 * float(final[name]["accuracy"])
    rows["plain"]["seconds"], rows["fedscan"]["seconds"] = plain_s, fed_s
    return rows


LABELS = {
    "plain": "plain torchvision (128 px, full FT, 3 ep.)",
    "fedscan": "fedscan train (defaults)",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/default_vs_plain.py", description=__doc__)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("FEDSCAN_DATA", "")))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plain-epochs", type=int, default=3)
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="one side-by-side pair per seed (both pipelines are seed-sensitive; "
        "the mean over seeds is printed too)",
    )
    p.add_argument("overrides", nargs="*", help="extra fedscan train overrides")
    a = p.parse_args(argv)
    data = a.data.resolve()
    if not (data / "brain-tumor-mri" / "Training").is_dir():
        p.error(f"--data {a.data}: no brain-tumor-mri/Training (set FEDSCAN_DATA or pass --data)")
    by_seed = {s: one_seed(data, s, a.plain_epochs, a.overrides) for s in a.seeds}
    print("\nbrain_mri, centralised, cold caches, one machine, one after the other\n")
    print("| seed | pipeline | test_official acc. % | test_dedup acc. % | wall s |")
    print("|---|---|---|---|---|")
    seeds: list[int | str] = list(a.seeds) + (["mean"] if len(a.seeds) > 1 else [])
    for seed in seeds:
        for k, label in LABELS.items():
            rs = [by_seed[s][k] for s in a.seeds] if seed == "mean" else [by_seed[seed][k]]
            m = {
                c: sum(r[c] for r in rs) / len(rs)
                for c in ("test_official", "test_dedup", "seconds")
            }
            print(
                f"| {seed} | {label} | {m['test_official']:.2f} | {m['test_dedup']:.2f} "
                f"| {m['seconds']:.0f} |"
            )
    ratio = sum(r["fedscan"]["seconds"] for r in by_seed.values()) / sum(
        r["plain"]["seconds"] for r in by_seed.values()
    )
    print(f"\nwall-time ratio fedscan / plain: {ratio:.2f}")
    if a.json:
        payload = {"by_seed": by_seed, "ratio": ratio, "overrides": a.overrides}
        if len(a.seeds) == 1:  # the one-seed layout earlier JSON files have
            payload.update(by_seed[a.seeds[0]])
        a.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
