"""Scale: peak memory and seconds per round, 10 vs 100 simulated sites, in one run.

    python benchmarks/site_scale.py                # brain MRI when FEDSCAN_DATA is set
    python benchmarks/site_scale.py --sites 10 100 --rounds 3

Each configuration runs ``fedscan simulate`` in a fresh process; a sampler sums
the proportional set size (PSS: shared, memory-mapped cache pages counted once
across processes) of that process and all its descendants (the Ray workers)
every 0.2 s. Sites are partitions served by the same actors, which share one
copy of the decoded-image / feature cache: memory should follow the data, not
the number of sites.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedscan.common.runs.record import read_run

ROOT = Path(__file__).resolve().parents[1]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    return kids


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss(pid: int) -> int:
    """PSS in bytes of ``pid`` and all its descendants (Linux /proc)."""
    kids, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        total += _pss_kib(p)
        todo += kids.get(p, [])
    return total * 1024


def run(sites: int, rounds: int, dataset: str, out: Path) -> dict:
    overrides = [
        f"dataset={dataset}",
        "model.mode=features",
        f"num_sites={sites}",
        f"federation.min_nodes={sites}",
        f"rounds={rounds}",
        "federation.fraction_evaluate=0",
        f"runs_dir={out / f'sites{sites}'}",
        "partition.min_samples=5",
    ]
    cmd = [sys.executable, "-m", "fedscan", "simulate", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_pss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{sites} sites failed:\n{output[-3000:]}")
    run_dir = Path(next(line for line in output.splitlines() if line.startswith("results: "))[9:])
    rounds_ = read_run(run_dir).rounds
    secs = [r["seconds"] for r in rounds_]
    return {
        "sites": sites,
        "peak_pss_mib": peak[0] / 2**20,
        "first_round_s": secs[0],
        "later_round_s": statistics.median(secs[1:]) if len(secs) > 1 else secs[0],
        "wall_s": wall,
        "accuracy": next(iter(rounds_[-1]["global"].values()))["accuracy"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sites", nargs=2, type=int, default=[10, 100])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="/tmp/fedscan-site-scale")
    args = p.parse_args()
    dataset = "brain_mri" if os.environ.get("FEDSCAN_DATA") else "synthetic"
    out = Path(args.out)
    results = [run(n, args.rounds, dataset, out) for n in args.sites]
    print(f"dataset {dataset}, features mode, {args.rounds} rounds, one process tree per run")
    print(f"{'sites':>6} {'peak PSS MiB':>13} {'round 1 s':>10} {'later rounds s':>15} {'acc':>6}")
    for r in results:
        print(
            f"{r['sites']:>6} {r['peak_pss_mib']:>13.0f} {r['first_round_s']:>10.1f} "
            f"{r['later_round_s']:>15.1f} {r['accuracy']:>6.3f}"
        )
    a, b = results
    mem = b["peak_pss_mib"] / a["peak_pss_mib"]
    sec = b["later_round_s"] / a["later_round_s"]
    print(f"ratio {b['sites']}/{a['sites']} sites: memory x{mem:.2f}, seconds per round x{sec:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
