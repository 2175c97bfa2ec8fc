"""The federated headline on the model we recommend: fine-tuned blocks, not a frozen trunk.

    python -m fedscan.simulations.finetune            # brain and lung (fold 0), seed 0

The headline study (``simulations.study``) runs in feature mode so that three
seeds of every method fit a 2-core CPU. This driver answers what it cannot: on
the recommended configuration (``model.finetune_blocks=4``: the last blocks and
the head train, the frozen trunk before them computed once per image and
cached), how close do FedAvg and Fed3R + FedAvg come to centralised training,
at IID and at Dirichlet alpha = 0.1? One seed; the server scores both test
splits after every round, and the page gives accuracy per round with each
round's wall time. The centralised reference is the harness's pooled run (all
sites' training data, ``rounds x local epochs`` epochs, the same cached inputs).
The page goes to ``docs/results/finetune.md``, its figures to ``finetune/`` beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedscan.common.core.config import load_config
from fedscan.common.federated.settings import federation_settings
from fedscan.common.runs.record import read_run
from fedscan.simulations.harness import (
    driver_args,
    merged,
    run_one,
    smoothing_text,
    validate_overrides,
)

log = logging.getLogger("fedscan.finetune")
ROOT = Path(__file__).resolve().parents[1]
# The page (--docs); its figures go to finetune/ beside it, linked relative to it.
PAGE = ROOT / "docs" / "results" / "finetune.md"

DATASETS = {"brain_mri": [], "lung_ct": ["dataset.split.fold=0"], "synthetic": []}
METHODS = {
    "fedavg": ["strategy=fedavg"],
    "fedavg+bsm": ["strategy=fedavg", "train.loss=balanced_softmax"],
    # FedAvg, then the head re-solved from the sites' Fed3R sums of the final features;
    # ridge 0.01 chosen on the sites' validation splits from {0.001, 0.01, 0.1, 1}
    # (brain, Dirichlet 0.1; docs/results/skew.md): fine-tuned features are small (norm ~3)
    "fedavg+refit": [
        "strategy=fedavg",
        "federation.head_refit=fed3r",
        "federation.head_ridge=0.01",
    ],
    # + the BatchNorm statistics of the final model re-estimated at the sites first
    # (federation.bn_refit): FedAvg's are its drifted local models' (docs/results/skew.md)
    "fedavg+bnrefit": [
        "strategy=fedavg",
        "federation.bn_refit=true",
        "federation.head_refit=fed3r",
        "federation.head_ridge=0.01",
    ],
    # the head before FedAvg: measured at the ridge default of the time, 1.0 (today's
    # default in fine-tune mode is 0.01, model.head_ridge), pinned so the page reproduces
    "fed3r+fedavg": [
        "strategy=fedavg",
        "federation.head_init=fed3r",
        "federation.head_ridge=1.0",
    ],
    # + the balanced softmax at each site (train.loss): the fine-tuned blocks drift
    # under skew because each site's loss pushes down the classes it lacks
    "fed3r+fedavg+bsm": [
        "strategy=fedavg",
        "federation.head_init=fed3r",
        "federation.head_ridge=1.0",
        "train.loss=balanced_softmax",
    ],
    # (the cells with BatchNorm held at its ImageNet statistics, fedavg+fbn and
    # fed3r+fedavg+fhead+fbn, went with model.freeze_bn in 0.2.0: CHANGELOG.md)
}


def cells(
    datasets: Sequence[str],
    alphas: Sequence[float],
    base: Sequence[str],
    methods: Sequence[str] = tuple(METHODS),
) -> list[tuple[str, str, list[str]]]:
    """``(dataset, run name, overrides)`` of every run, pooled first.

    The run name is fixed (``<dataset>-<method>-<partition>``), so a later call finds
    the runs an earlier one finished or left half-way (see :func:`run_cell`).
    """
    out = []
    for ds in datasets:
        ds_base = merged(base, [f"dataset={ds}", *DATASETS[ds]])
        out.append((ds, f"{ds}-centralised", merged(ds_base, ["method=pooled"])))
        for alpha in alphas:
            part = (
                ["partition=iid"]
                if alpha <= 0
                else ["partition=dirichlet", f"partition.alpha={alpha:g}"]
            )
            label = "iid" if alpha <= 0 else f"dirichlet{alpha:g}"
            for name in methods:
                extra = METHODS[name]
                out.append((ds, f"{ds}-{name}-{label}", merged(ds_base, [*part, *extra])))
    return out


def run_cell(folder: Path, overrides: list[str]) -> Path:
    """Train one cell into ``folder`` (its fixed name), or reuse what is there.

    A finished run is kept; a federated run stopped part-way resumes from its last
    checkpoint (``federation.resume``); anything else left there is trained again.
    On a 2-core CPU this driver takes hours, so it must survive being stopped.
    """
    metrics = folder / "metrics.json"
    if metrics.exists():
        try:
            rec = read_run(folder)
            # the cell's own settings, not the folder's: a FedAvg cell's folder copied to a
            # refit cell's name resumes with the refit (nothing else trained again)
            refits = federation_settings(load_config(overrides)).refits
            if rec.kind != "federated" or (
                rec.rounds
                and rec.rounds[-1]["round"] >= int(rec.cfg.rounds)
                # a refit still due after the last round: resumed, it runs
                and (not refits or "before_refit" in rec.rounds[-1])
            ):
                log.info("finetune: %s is done, reused", folder.name)
                return folder
            if (folder / "last.pt").exists():
                log.info(
                    "finetune: %s stopped at round %d, resumed",
                    folder.name,
                    rec.rounds[-1]["round"],
                )
                return run_one(merged(overrides, [f"federation.resume={folder}"]))
        except Exception as exc:  # an unreadable leftover: train it again
            log.warning("finetune: %s unreadable (%s), trained again", folder.name, exc)
    if folder.exists():
        shutil.rmtree(folder)
    return run_one(merged(overrides, [f"runs_dir={folder.parent}", f"run_name={folder.name}"]))


def curves(run: Path) -> dict[str, Any]:
    """Per evaluated round: accuracy on each test split and the round's wall seconds."""
    rec = read_run(run)
    return {
        "label": rec.method,
        "partition": rec.partition,
        "rounds": [
            {
                "round": r["round"],
                "seconds": r.get("seconds"),
                **{s: 100 * float(m["accuracy"]) for s, m in r["global"].items()},
                # federation.head_refit: the same round's model before its head was re-solved
                "before_refit": {
                    s: 100 * float(m["accuracy"]) for s, m in r.get("before_refit", {}).items()
                },
            }
            for r in rec.evaluated_rounds
        ],
    }


def _method(folder: Path, ds: str) -> str:
    """The cell's method name (a key of :data:`METHODS`, or ``centralised``), from the
    run's fixed folder name: the run's own config does not name the loss."""
    name = folder.name.removeprefix(f"{ds}-")
    return name if name == "centralised" else name.rsplit("-", 1)[0]


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def write_page(
    runs: dict[str, list[Path]],
    args: argparse.Namespace,
    docs: Path,
    missing: Sequence[str] = (),
) -> None:
    figures = docs.parent / "finetune"
    figures.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Federated fine-tuning on the recommended model",
        "",
        "Regenerate (with `FEDSCAN_DATA` pointing at the datasets):",
        "",
        "```bash",
        "python -m fedscan.simulations.finetune" + "".join(f" {o}" for o in args.typed),
        "```",
        "",
        f"Setting: {args.sites} sites, {args.rounds} rounds x {args.local_epochs} local "
        f"epoch(s), seed {args.seed}, {args.image_size} px, {smoothing_text(args)}, "
        "EfficientNet-Lite0 (ImageNet "
        "weights) with "
        f"`model.finetune_blocks={args.blocks}` (the last blocks and the head train; the "
        "frozen trunk before them computed once per image and cached). Centralised = the "
        "harness's pooled run: all sites' training data, the same cached inputs, "
        f"{args.rounds * args.local_epochs} epochs. The server scores both test splits "
        "after every round; `s` is the round's wall time (training, the sites' validation "
        "and the server's test evaluation) on this machine (2 CPU cores, no GPU). Round 0 "
        "of Fed3R + FedAvg is the one-shot head on the pretrained blocks; `+bsm`: each site "
        "trains with the balanced softmax (`train.loss=balanced_softmax`); `+refit`: "
        "after the last round the head is re-solved from the sites' Fed3R sums of the final "
        "model's features (`federation.head_refit=fed3r`; the last round's row is the "
        "refitted model, the row before it the same model before the refit); `+bnrefit`: "
        "the same, after the sites first re-estimate the final model's BatchNorm "
        "statistics (`federation.bn_refit=true`). Lung: fold "
        "0 of the scan-grouped split. Values in %.",
        "",
    ]
    if missing:
        lines += [
            "Not run yet (the command above trains them; finished cells are reused): "
            + ", ".join(f"`{m}`" for m in missing)
            + ".",
            "",
        ]
    for ds, folders in runs.items():
        recs = [read_run(r) for r in folders]
        splits = list(recs[0].final())
        lines += [f"## {ds}", "", "| method | partition | " + " | ".join(splits) + " |"]
        lines.append("|---|---|" + "---|" * len(splits))
        for rec in recs:
            fin = rec.final()
            vals = " | ".join(_fmt(100 * float(fin[s]["accuracy"])) for s in splits)
            name = _method(rec.dir, ds)
            if rec.kind == "federated" and rec.rounds[-1]["round"] < int(rec.cfg.rounds):
                name += f" (stopped after round {rec.rounds[-1]['round']} of {rec.cfg.rounds})"
            lines.append(f"| {name} | {rec.partition} | {vals} |")
        lines.append("")
        fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), squeeze=False)
        for rec in recs:
            if rec.kind != "federated":
                for ax, s in zip(axes[0], splits, strict=True):
                    ax.axhline(100 * float(rec.final()[s]["accuracy"]), ls="--", c="k", lw=1)
                continue
            c = curves(rec.dir)
            c["label"] = _method(rec.dir, ds)
            lines += [
                f"**{c['label']}, {c['partition']}**, per round:",
                "",
                "| round | " + " | ".join(splits) + " | s |",
                "|---|" + "---|" * (len(splits) + 1),
            ]
            for r in c["rounds"]:
                if r["before_refit"]:
                    vals = " | ".join(_fmt(r["before_refit"].get(s)) for s in splits)
                    lines.append(f"| {r['round']}, before the refit | {vals} | |")
                vals = " | ".join(_fmt(r.get(s)) for s in splits)
                lines.append(f"| {r['round']} | {vals} | {_fmt(r['seconds'])} |")
            lines.append("")
            for ax, s in zip(axes[0], splits, strict=True):
                xs = [r["round"] for r in c["rounds"]]
                ax.plot(
                    xs,
                    [r[s] for r in c["rounds"]],
                    marker="o",
                    label=f"{c['label']} {c['partition']}",
                )
        for ax, s in zip(axes[0], splits, strict=True):
            ax.set_title(f"{ds} {s} (dashed: centralised)")
            ax.set_xlabel("round")
            ax.set_ylabel("accuracy %")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        png = figures / f"curves_{ds}.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        lines += [f"![{ds}]({figures.name}/{png.name})", ""]
    docs.write_text("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedscan.simulations.finetune", description=__doc__)
    p.add_argument(
        "--datasets", nargs="+", default=["brain_mri", "lung_ct"], choices=list(DATASETS)
    )
    p.add_argument(
        "--alphas", nargs="+", type=float, default=[0.0, 0.1], help="Dirichlet alphas; 0 = IID"
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = driver_args(p, argv, out="runs/finetune", docs=PAGE)
    out = Path(args.out).resolve()
    base = [
        "model.mode=finetune",
        f"model.finetune_blocks={args.blocks}",
        f"num_sites={args.sites}",
        f"federation.min_nodes={args.sites}",
        f"rounds={args.rounds}",
        f"federation.local_epochs={args.local_epochs}",
        f"seed={args.seed}",
        *args.overrides,
    ]
    plan = cells(args.datasets, args.alphas, base, args.methods)
    runs: dict[str, list[Path]] = {ds: [] for ds in args.datasets}
    missing: list[str] = []
    if args.report_only:
        for ds, name, _ in plan:
            if (out / ds / name / "metrics.json").exists():
                runs[ds].append(out / ds / name)
            else:
                missing.append(name)
    else:
        for _, _, ov in plan:  # every run checked before the first one trains
            validate_overrides(merged(ov, [f"runs_dir={out}"]))
        for i, (ds, name, ov) in enumerate(plan, 1):
            log.info("finetune run %d/%d: %s", i, len(plan), name)
            runs[ds].append(run_cell(out / ds / name, ov))
    (out / "finetune.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "finetune.json").write_text(
        json.dumps({ds: [str(r) for r in rs] for ds, rs in runs.items()}, indent=2)
    )
    write_page({ds: rs for ds, rs in runs.items() if rs}, args, Path(args.docs), missing)
    print(f"results: {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
