"""Does longer federated training close the gap to pooled at the hardest skew?

    python -m fedscan.simulations.horizon             # brain_mri, Dirichlet alpha 0.1, seed 0

The headline study stops at 10 rounds, where FedAvg and FedProx at alpha 0.1 sit
20 points below pooled. That table alone cannot say whether the gap is a budget
effect (too few rounds) or a property of the skew. This driver answers it on the
same sites: one long FedAvg run and one long FedProx run, evaluated every few
rounds, so their accuracy is read at each checkpoint from a single trajectory;
pooled is trained once per checkpoint with the *same number of epochs*, because
its cosine schedule depends on the budget and a 100-epoch pooled model is a
stronger reference than a 10-epoch one. The page goes to ``docs/results/horizon.md``,
its figures beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedscan.common.commands.report import load_run
from fedscan.common.runs.record import read_run
from fedscan.simulations.harness import driver_args, run_one, smoothing_text, validate_overrides

log = logging.getLogger("fedscan.horizon")
ROOT = Path(__file__).resolve().parents[1]
# The page (--docs); its figures are written beside it and linked relative to it.
PAGE = ROOT / "docs" / "results" / "horizon.md"


def horizon_rows(
    runs: Sequence[Path], checkpoints: Sequence[int], split: str
) -> list[dict[str, Any]]:
    """Test ``split`` accuracy per checkpoint: one row per checkpoint, one column per method.

    Federated methods are read from their trajectory at exactly that round (a checkpoint
    that was not evaluated is an error, not a silent neighbour); pooled from the pooled
    run whose epoch budget equals the checkpoint. ``gap_<method>`` is pooled minus it.
    """
    curves: dict[str, dict[int, float]] = {}
    pooled: dict[int, float] = {}
    for run in runs:
        for row in load_run(run, figures="last"):
            if row["split"] != split:
                continue
            if row["method"] == "pooled":
                pooled[read_run(run).epoch_budget] = row["accuracy"]
            elif row["curve"] is not None:
                curves[row["method"]] = {r: acc for r, acc, _ in row["curve"]}
    table = []
    for c in checkpoints:
        entry: dict[str, Any] = {"round": c, "pooled": pooled.get(c)}
        for method, curve in sorted(curves.items()):
            if c not in curve:
                raise ValueError(f"{method} has no {split} evaluation at round {c}")
            entry[method] = curve[c]
            if entry["pooled"] is not None:
                entry[f"gap_{method}"] = entry["pooled"] - curve[c]
        table.append(entry)
    return table


def to_markdown(table: Sequence[dict[str, Any]]) -> str:
    methods = [k for k in table[0] if k not in ("round", "pooled") and not k.startswith("gap_")]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    head = [
        "rounds (= pooled epochs)",
        "pooled",
        *methods,
        *(f"gap to pooled, {m}" for m in methods),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [str(r["round"]), pct(r["pooled"]), *(pct(r[m]) for m in methods)]
        cells += [pct(r.get(f"gap_{m}")) for m in methods]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_horizon(runs: Sequence[Path], split: str, path: Path, *, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for run in runs:
        for row in load_run(run, figures="last"):
            if row["split"] != split:
                continue
            if row["curve"] is not None:
                xs, ys, _ = zip(*row["curve"], strict=True)
                ax.plot(xs, [100 * y for y in ys], marker=".", label=row["method"])
            elif row["method"] == "pooled":
                ax.scatter(
                    [read_run(run).epoch_budget],
                    [100 * row["accuracy"]],
                    color="k",
                    marker="*",
                    s=80,
                )
    ax.scatter([], [], color="k", marker="*", label="pooled (same epochs)")
    ax.set(xlabel="round", ylabel=f"{split} accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_horizon(
    *,
    dataset: str,
    alpha: float,
    seed: int,
    mu: float,
    sites: int,
    checkpoints: Sequence[int],
    every: int,
    out: Path,
    extra: Sequence[str] = (),
) -> list[Path]:
    """Train the two long federated runs and one pooled run per checkpoint into ``out``."""
    horizon = max(checkpoints)
    if any(c % every for c in checkpoints):
        raise ValueError(f"--checkpoints: each must be a multiple of --every ({every})")
    base = [
        f"dataset={dataset}",
        "model.mode=features",
        f"num_sites={sites}",
        f"federation.min_nodes={sites}",
        "federation.local_epochs=1",
        "partition=dirichlet",
        f"partition.alpha={alpha}",
        f"seed={seed}",
        f"runs_dir={out}",
        *extra,
    ]
    fed = [f"rounds={horizon}", f"federation.evaluate_every={every}"]
    plans = [
        [*base, *fed, "strategy=fedavg"],
        [*base, *fed, "strategy=fedprox", f"strategy.mu={mu}"],
        *([*base, "method=pooled", f"rounds={c}"] for c in checkpoints),
    ]
    for p in plans:  # every override checked before the first run trains
        validate_overrides(p)
    return [run_one(p) for p in plans]


def write_page(runs: Sequence[Path], args: argparse.Namespace, docs: Path) -> str:
    first = load_run(runs[0], figures="last")
    dataset = first[0]["dataset"]
    splits = [r["split"] for r in first]
    figures = docs.parent  # beside the page: its links are the bare file names
    figures.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Longer training at the hardest skew ({dataset}, Dirichlet alpha = {args.alpha:g})",
        "",
        "Regenerate from a clean checkout (with `FEDSCAN_DATA` pointing at the datasets):",
        "",
        "```bash",
        ".venv/bin/python -m fedscan.simulations.horizon",
        "```",
        "",
        f"Setting: the headline study's sites ({args.sites} sites, seed {args.seed}, feature "
        f"mode, {args.image_size} px, {smoothing_text(args)}), 1 local epoch per round. "
        "FedAvg and FedProx each ran "
        "once to the last "
        f"checkpoint with a test evaluation every {args.every} rounds; pooled was trained "
        "once per checkpoint for that many epochs. Values in %, one seed.",
        "",
    ]
    part = next((r / "partition.csv" for r in runs if (r / "partition.csv").exists()), None)
    if part is not None:  # the sites' training classes: why the gap exists
        rows = list(csv.reader(part.read_text().splitlines()))
        lines += ["Sites' training images per class:", ""]
        lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]] + [""]
    for split in splits:
        table = horizon_rows(runs, args.checkpoints, split)
        lines += [f"### test split `{split}`", "", to_markdown(table), ""]
        first, last = table[0], table[-1]
        for m in [k[4:] for k in first if k.startswith("gap_")]:
            if f"gap_{m}" in last:
                lines.append(
                    f"- {m}: {100 * first[f'gap_{m}']:.1f} points below pooled at round "
                    f"{first['round']}, {100 * last[f'gap_{m}']:.1f} at round {last['round']}."
                )
        lines.append("")
        png = plot_horizon(
            runs, split, figures / f"horizon_{dataset}_{split}.png", title=f"{dataset}: {split}"
        )
        lines += [f"![horizon {split}]({png.name})", ""]
    docs.write_text("\n".join(lines))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedscan.simulations.horizon", description=__doc__)
    p.add_argument("--dataset", default="brain_mri")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mu", type=float, default=1.0, help="FedProx mu (the study's tuned value)")
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--checkpoints", nargs="+", type=int, default=[10, 30, 100])
    p.add_argument("--every", type=int, default=5, help="test evaluation every N rounds")
    args = driver_args(p, argv, out="runs/horizon", docs=PAGE)
    out = Path(args.out).resolve()
    if args.report_only:
        runs = sorted(d.parent for d in out.glob("*/metrics.json"))
    else:
        runs = run_horizon(
            dataset=args.dataset,
            alpha=args.alpha,
            seed=args.seed,
            mu=args.mu,
            sites=args.sites,
            checkpoints=args.checkpoints,
            every=args.every,
            out=out,
            extra=args.overrides,
        )
    (out / "horizon.json").write_text(json.dumps({"runs": [str(r) for r in runs]}, indent=2))
    write_page(runs, args, Path(args.docs))
    print(f"horizon: {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
