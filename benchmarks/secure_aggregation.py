"""What secure aggregation costs: round time and bytes with and without SecAgg+.

For each model mode (``features``: frozen trunk, cached features, the head trains;
``finetune``: the last blocks train too, ``model.finetune_blocks=2`` unless
overridden), one FedAvg run without and one with ``secure_aggregation=secaggplus``,
same sites, rounds and seed, side by side in one process. Reports per run: the
steady-state seconds per round (rounds 2.., without the first round's cache
loading), the bytes a site sends and receives per round (serialised Flower
messages, every protocol stage counted), the final test accuracy, and the
difference of the two runs' final global weights (how far quantisation moved the
model).

    python benchmarks/secure_aggregation.py --dataset brain_mri --sites 5 --rounds 3 \
        --modes features finetune [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.common.serde import message_to_proto

from fedscan.common.runs.record import read_run
from fedscan.simulations.federated import run_federated
from fedscan.simulations.harness import merged


def _metered(counts: dict[str, int]):
    """An outermost site mod: bytes of every message in and out, as serialised."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        counts["in"] += message_to_proto(msg).ByteSize()
        out = call_next(msg, context)
        counts["out"] += message_to_proto(out).ByteSize()
        counts["messages"] += 1
        return out

    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="brain_mri")
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["features", "finetune"])
    ap.add_argument("--blocks", type=int, default=2, help="model.finetune_blocks in finetune mode")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedscan-secagg-"))
    rows = []
    for mode in a.modes:
        base = [
            f"dataset={a.dataset}",
            f"model.mode={mode}",
            f"num_sites={a.sites}",
            f"federation.min_nodes={a.sites}",
            f"rounds={a.rounds}",
            "federation.fraction_evaluate=0",
            "tracking=none",
            f"runs_dir={tmp / mode}",
            *([f"model.finetune_blocks={a.blocks}"] if mode == "finetune" else []),
            *a.overrides,
        ]
        # Warm every cache (decode, fingerprints, frozen features) outside the timing.
        run_federated(merged(base, ["rounds=1", f"runs_dir={tmp / 'warm'}"]))
        finals = {}
        for secure in ("off", "secaggplus"):
            counts: dict[str, int] = defaultdict(int)
            run = run_federated(
                merged(base, [f"secure_aggregation={secure}"]), client_mods=[_metered(counts)]
            )
            rounds = read_run(run).rounds
            steady = [r["seconds"] for r in rounds[1:]] or [rounds[0]["seconds"]]
            final = rounds[-1]["global"]
            finals[secure] = torch.load(run / "last.pt", weights_only=False)["arrays"]
            row = {
                "mode": mode,
                "secure": secure,
                "round_s": sum(steady) / len(steady),
                "sent_per_site_round": counts["out"] / (a.sites * a.rounds),
                "received_per_site_round": counts["in"] / (a.sites * a.rounds),
                "messages_per_site_round": counts["messages"] / (a.sites * a.rounds),
                **{f"{k}_accuracy": v["accuracy"] for k, v in final.items()},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        drift = max(
            float((finals["off"][k].double() - finals["secaggplus"][k].double()).abs().max())
            for k in finals["off"]
        )
        rows[-1]["weight_drift"] = drift
        print(json.dumps({"mode": mode, "max_weight_difference": drift}), flush=True)

    tests = [k[: -len("_accuracy")] for k in rows[0] if k.endswith("_accuracy")]
    print(f"\n{a.dataset}, {a.sites} sites, {a.rounds} rounds, FedAvg\n")
    print(
        "| mode | SecAgg+ | s per round | ratio | KiB sent per site and round | ratio | "
        "KiB received | messages | "
        + " | ".join(f"{t} acc" for t in tests)
        + " | max weight difference |"
    )
    print("|" + "---|" * (9 + len(tests)))
    base_row = {}
    for r in rows:
        ref = base_row.setdefault(r["mode"], r)
        cells = " | ".join(f"{100 * r[f'{t}_accuracy']:.2f}" for t in tests)
        drift = f"{r['weight_drift']:.2e}" if "weight_drift" in r else "-"
        print(
            f"| {r['mode']} | {r['secure']} | {r['round_s']:.1f} | "
            f"{r['round_s'] / ref['round_s']:.2f}x | {r['sent_per_site_round'] / 1024:.1f} | "
            f"{r['sent_per_site_round'] / ref['sent_per_site_round']:.2f}x | "
            f"{r['received_per_site_round'] / 1024:.1f} | {r['messages_per_site_round']:.0f} | "
            f"{cells} | {drift} |"
        )


if __name__ == "__main__":
    main()
