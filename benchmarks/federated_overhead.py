"""Federated overhead: wall time per sample-step, federated vs centralised, one run.

Both sides train the same model on the same cached inputs. Centralised: E
epochs over the pooled training split. Federated: E rounds x 1 local epoch at
N simulated sites (in-process Flower simulation, Ray) whose training sets
partition the same pool. Sample-steps differ slightly (each site holds out its
own validation split), so the ratio is of seconds per trained sample:

    overhead = (federated s / federated samples) / (centralised s / centralised samples)

reported for the whole run (Ray start-up included) and for the steady-state
rounds against the centralised epochs. Steady state: after round 1 (which pays
for actor start and site preparation) and without the rounds in which the
server scored the test sets, because the centralised fit time it is compared
with excludes its own final test evaluation; both sides include their
per-epoch / per-round validation.

    python benchmarks/federated_overhead.py [--dataset brain_mri] [--sites 5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fedscan.common.core.config import load_config
from fedscan.common.federated.wire import NUM_EXAMPLES
from fedscan.common.runs.record import read_run
from fedscan.simulations.centralised import run_centralised
from fedscan.simulations.federated import run_federated


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedscan-overhead-"))
    common = [f"dataset={a.dataset}", *a.overrides]
    if a.dataset == "synthetic":
        common += ["dataset.per_class=200"]

    # Warm every cache (decode, fingerprints, frozen-trunk features) outside the timing.
    run_centralised(load_config([*common, "train.epochs=1", f"runs_dir={tmp / 'warm'}"]))

    t = time.perf_counter()
    cent = run_centralised(
        load_config([*common, f"train.epochs={a.rounds}", f"runs_dir={tmp / 'cent'}"])
    )
    t_cent = time.perf_counter() - t
    m = read_run(cent).doc
    cent_samples = m["splits"]["train"]["total"] * a.rounds
    cent_fit = m["fit_time_s"]

    cent_rate = t_cent / cent_samples
    val_fraction = float(load_config(common).dataset.split.val_fraction)
    print(
        f"dataset {a.dataset}, model {m['model']} ({m['mode']}), {a.sites} sites, "
        f"{a.rounds} rounds x 1 local epoch vs {a.rounds} epochs"
    )
    print(
        f"centralised: {t_cent:7.1f} s wall ({cent_fit:.1f} s fit) for {cent_samples} "
        f"sample-steps (val each epoch, tests at the end)"
    )

    variants = {
        # what a federated run does by default: every round the server scores the
        # global test sets and every site scores its validation split
        "per-round monitoring": [],
        # the same evaluation work as the centralised run: tests once at the end, and
        # each site validates on the same fraction the centralised run holds out
        "matched evaluation": [
            f"federation.evaluate_every={a.rounds}",
            "federation.fraction_evaluate=0",
            f"federation.site_val_fraction={val_fraction}",
        ],
    }
    for name, extra in variants.items():
        t = time.perf_counter()
        fed = run_federated(
            [
                *common,
                f"federation.num_sites={a.sites}",
                f"federation.min_nodes={a.sites}",
                f"federation.rounds={a.rounds}",
                f"runs_dir={tmp / name.replace(' ', '-')}",
                *extra,
            ]
        )
        t_fed = time.perf_counter() - t
        rounds = read_run(fed).rounds
        per_round = sum(s[NUM_EXAMPLES] for s in rounds[-1]["sites"]["train"])
        fed_samples = per_round * a.rounds
        quiet = [r["seconds"] for r in rounds[1:] if not r["global"]] or [
            r["seconds"] for r in rounds[1:]
        ]
        steady = sum(quiet) / len(quiet)
        print(
            f"federated, {name}: {t_fed:7.1f} s wall for {fed_samples} sample-steps "
            f"(round 1 {rounds[0]['seconds']:.1f} s, steady rounds {steady:.1f} s: "
            f"{', '.join(str(q) for q in quiet)})"
        )
        print(
            f"  overhead, whole run (incl. Ray start):   {(t_fed / fed_samples) / cent_rate:5.2f}x"
        )
        print(
            f"  overhead, steady-state rounds vs epochs: "
            f"{(steady / per_round) / (cent_fit / cent_samples):5.2f}x"
        )


if __name__ == "__main__":
    main()
