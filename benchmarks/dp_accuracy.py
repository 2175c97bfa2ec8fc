"""Accuracy vs privacy: DP-SGD at every site against the same federation without DP.

For each model mode (``features``: frozen trunk, cached features, a private
linear head; ``finetune``: the last blocks trained privately too), one
non-private FedAvg run and one per target epsilon, same sites, rounds, seed and
settings, side by side in one run. Reports, per run: the server's test accuracy
and macro-F1 (official and de-duplicated brain test), the largest epsilon any
site spent (delta = 0.1 / site samples), wall time and the slowdown against
the non-private run of the same mode.

    python benchmarks/dp_accuracy.py --dataset brain_mri --sites 5 --rounds 10 \
        --epsilons 1 3 8 --modes features finetune [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedscan.common.runs.record import read_run
from fedscan.simulations.federated import run_federated
from fedscan.simulations.harness import merged


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="brain_mri")
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--modes", nargs="+", default=["features", "finetune"])
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedscan-dp-"))
    rows = []
    for mode in a.modes:
        base = [
            f"dataset={a.dataset}",
            f"model.mode={mode}",
            f"federation.num_sites={a.sites}",
            f"federation.min_nodes={a.sites}",
            f"federation.rounds={a.rounds}",
            f"federation.evaluate_every={a.rounds}",
            "federation.fraction_evaluate=0",
            f"runs_dir={tmp / mode}",
            *a.overrides,
        ]
        # Warm every cache (decode, fingerprints, frozen-trunk features) outside the timing.
        run_federated(merged(base, ["federation.rounds=1", f"runs_dir={tmp / 'warm'}"]))
        reference = None
        for eps in [None, *a.epsilons]:
            extra = [] if eps is None else ["privacy=dp_sgd", f"privacy.target_epsilon={eps}"]
            t = time.perf_counter()
            run = run_federated(merged(base, extra))
            wall = time.perf_counter() - t
            rounds = read_run(run).rounds
            final = rounds[-1]["global"]
            spent = [s.get("dp_epsilon", 0.0) for r in rounds for s in r["sites"]["train"]]
            row = {
                "mode": mode,
                "epsilon": "off" if eps is None else f"{eps:g}",
                "spent": max(spent) if eps is not None else None,
                "wall": wall,
                **{f"{k}_{m}": v[m] for k, v in final.items() for m in ("accuracy", "macro_f1")},
            }
            reference = reference or row
            row["slowdown"] = wall / reference["wall"]
            rows.append(row)
            print(json.dumps(row), flush=True)

    tests = [k[: -len("_accuracy")] for k in rows[0] if k.endswith("_accuracy")]
    head = "| mode | epsilon (target) | max site epsilon | " + " | ".join(
        f"{t} acc | {t} macro-F1" for t in tests
    )
    print(f"\n{a.dataset}, {a.sites} sites, {a.rounds} rounds, FedAvg\n")
    print(head + " | wall s | slowdown |")
    print("|" + "---|" * (head.count("|") + 2))
    for r in rows:
        spent = "-" if r["spent"] is None else f"{r['spent']:.2f}"
        cells = " | ".join(
            f"{100 * r[f'{t}_accuracy']:.2f} | {r[f'{t}_macro_f1']:.4f}" for t in tests
        )
        print(
            f"| {r['mode']} | {r['epsilon']} | {spent} | {cells} | {r['wall']:.0f} | "
            f"{r['slowdown']:.2f}x |"
        )


if __name__ == "__main__":
    main()
