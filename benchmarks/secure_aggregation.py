"""What secure aggregation costs: round time and bytes with and without SecAgg+.

For each model mode (``features``: frozen trunk, cached features, the head trains;
``finetune``: the last blocks train too, ``model.finetune_blocks=2`` unless
overridden), one FedAvg run without and one with ``secure_aggregation=secaggplus``,
same sites, rounds and seed, side by side in one process; the SecAgg+ run once
per mask generator in ``--generators``: ``shake256`` (fedscan's, what every
SecAgg+ run uses: ``common/federated/masks.py``) and ``flower`` (Flower 1.42's own
32-bit-seeded Mersenne Twister, flwr issue 7522, swapped in for that run only, here
and nowhere else, to measure what the secure generator costs). Reports per run:
the steady-state seconds per round (rounds 2.., without the first round's cache
loading), the bytes a site sends and receives per round (serialised Flower
messages, every protocol stage counted), the final test accuracy, and the
difference of its final global weights from the plain run's (how far quantisation
moved the model); then, per mode, shake256's seconds per round over flower's.
``--repeats N`` runs each SecAgg+ generator N times, interleaved, and reports the
mean (the machine may be shared).

    python benchmarks/secure_aggregation.py --dataset brain_mri --sites 5 --rounds 10 \
        --modes features --generators flower shake256 [overrides ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.common.serde import message_to_proto

from fedscan.common.federated import masks
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


@contextlib.contextmanager
def generator(name: str) -> Iterator[None]:
    """While open, SecAgg+ masks with ``name``: ``shake256`` is fedscan's own; ``flower``
    puts Flower's ``pseudo_rand_gen`` where fedscan's patch installs its generator from
    (``masks.generate``; the patch is installed on both sides every round). Sites and
    server must run in this process for that: ``federation.engine=inprocess``."""
    if name == "shake256":
        yield
        return
    calls: list[int] = []

    def flower(seed: bytes, num_range: int, dimensions_list: list) -> list:
        calls.append(1)
        return pseudo_rand_gen(seed, num_range, dimensions_list)

    original = masks.generate
    masks.generate = flower  # the benchmark's baseline only
    try:
        yield
    finally:
        masks.generate = original
    if not calls:
        raise RuntimeError("the flower generator was never called: the swap did not take effect")


def _run(base: list[str], secure: str, counts: dict[str, int]) -> tuple[Path, float]:
    run = run_federated(
        merged(base, [f"secure_aggregation={secure}"]), client_mods=[_metered(counts)]
    )
    rounds = read_run(run).rounds
    steady = [r["seconds"] for r in rounds[1:]] or [rounds[0]["seconds"]]
    return run, sum(steady) / len(steady)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="brain_mri")
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["features", "finetune"])
    ap.add_argument("--blocks", type=int, default=2, help="model.finetune_blocks in finetune mode")
    ap.add_argument(
        "--generators",
        nargs="+",
        choices=["flower", "shake256"],
        default=["flower", "shake256"],
        help="SecAgg+ mask generators, one SecAgg+ run each",
    )
    ap.add_argument("--repeats", type=int, default=1, help="SecAgg+ runs per generator")
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
            # the flower generator is swapped in this process only (see generator())
            *(["federation.engine=inprocess"] if "flower" in a.generators else []),
        ]
        # Warm every cache (decode, fingerprints, frozen features) outside the timing.
        run_federated(merged(base, ["rounds=1", f"runs_dir={tmp / 'warm'}"]))
        runs = [("off", "-")] + [("secaggplus", g) for g in a.generators] * a.repeats
        finals = {}
        for secure, gen in runs:
            counts: dict[str, int] = defaultdict(int)
            with generator(gen) if secure != "off" else contextlib.nullcontext():
                run, round_s = _run(base, secure, counts)
            final = read_run(run).rounds[-1]["global"]
            arrays = torch.load(run / "last.pt", weights_only=False)["arrays"]
            finals.setdefault("off", arrays)
            drift = max(
                float((finals["off"][k].double() - arrays[k].double()).abs().max()) for k in arrays
            )
            row = {
                "mode": mode,
                "secure": secure,
                "generator": gen,
                "round_s": round_s,
                "sent_per_site_round": counts["out"] / (a.sites * a.rounds),
                "received_per_site_round": counts["in"] / (a.sites * a.rounds),
                "messages_per_site_round": counts["messages"] / (a.sites * a.rounds),
                **{f"{k}_accuracy": v["accuracy"] for k, v in final.items()},
                **({"weight_drift": drift} if secure != "off" else {}),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)

    _table(a, _averaged(rows))


def _averaged(rows: list[dict]) -> list[dict]:
    """One row per (mode, secure, generator): the mean of its repeats."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["mode"], r["secure"], r["generator"])].append(r)
    out = []
    for group in groups.values():
        row = dict(group[0])
        for k, v in row.items():
            if isinstance(v, float):
                row[k] = sum(g[k] for g in group) / len(group)
        row["runs"] = len(group)
        out.append(row)
    return out


def _table(a: argparse.Namespace, rows: list[dict]) -> None:
    tests = [k[: -len("_accuracy")] for k in rows[0] if k.endswith("_accuracy")]
    print(f"\n{a.dataset}, {a.sites} sites, {a.rounds} rounds, FedAvg\n")
    print(
        "| mode | SecAgg+ | masks | runs | s per round | ratio | KiB sent per site and round | "
        "ratio | KiB received | messages | "
        + " | ".join(f"{t} acc" for t in tests)
        + " | max weight difference |"
    )
    print("|" + "---|" * (11 + len(tests)))
    base_row = {}
    for r in rows:
        ref = base_row.setdefault(r["mode"], r)
        cells = " | ".join(f"{100 * r[f'{t}_accuracy']:.2f}" for t in tests)
        drift = f"{r['weight_drift']:.2e}" if "weight_drift" in r else "-"
        print(
            f"| {r['mode']} | {r['secure']} | {r['generator']} | {r['runs']} | "
            f"{r['round_s']:.2f} | {r['round_s'] / ref['round_s']:.2f}x | "
            f"{r['sent_per_site_round'] / 1024:.1f} | "
            f"{r['sent_per_site_round'] / ref['sent_per_site_round']:.2f}x | "
            f"{r['received_per_site_round'] / 1024:.1f} | {r['messages_per_site_round']:.0f} | "
            f"{cells} | {drift} |"
        )
    print()
    for mode in dict.fromkeys(r["mode"] for r in rows):
        by = {r["generator"]: r["round_s"] for r in rows if r["mode"] == mode}
        if "flower" in by and "shake256" in by:
            print(
                f"{mode}: SecAgg+ s per round, shake256 {by['shake256']:.2f} / flower "
                f"{by['flower']:.2f} = {by['shake256'] / by['flower']:.3f}x"
            )


if __name__ == "__main__":
    main()
