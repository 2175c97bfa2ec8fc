"""``fedscan report RUN_DIR...``: the paper's table over many run folders.

Reads every run folder the harness writes (federated, local, pooled, and the
centralised ``fedscan train``), one row per (run, test split), then groups rows
whose resolved configs are equal but for the seed and reports mean +- std over
the seeds. Runs that share a method and partition label but differ in anything
else (site count, rounds, learning rate, ...) get separate rows, their label
naming what differs. Nothing is re-evaluated: the numbers are the ones the runs
recorded.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from fedscan.common.core.config import ALIASES, flat_keys
from fedscan.common.core.errors import DataError
from fedscan.common.runs import cross_site
from fedscan.common.runs.plots import plot_confusion, plot_site_histogram
from fedscan.common.runs.record import ADDED_LATER, read_run

log = logging.getLogger("fedscan.report")

METRICS = ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1")
CI_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")  # with a bootstrap interval
# references first (pooled and its closed-form heads), then local, then federated
ORDER = {"pooled": 0, "centralised": 0, "local": 1}
# Config keys that do not change what a run measures (where it ran, what it is
# called, how long it waited): runs differing only in these, and the seed, are one row.
NOT_COMPARED = (
    "seed",
    "runs_dir",
    "run_name",
    "data_root",
    "cache_dir",
    "device",
    "num_threads",
    "bootstrap",  # how the intervals are computed, not what was trained
    "tracking",  # where the run is logged, not what was trained
    "federation.resume",
    "federation.cpus_per_site",
    "federation.engine",
    "federation.round_timeout_s",
    "federation.wait_for_nodes_s",
    # how many sites a round waits for; it follows num_sites unless set, and a fraction
    # of the sites needs it at or below that fraction (validate), so it never changes
    # which sites train in a simulation
    "federation.min_nodes",
    # the dataset's default for train.label_smoothing, which is compared (and which
    # folders from before this key hold without it)
    "dataset.label_smoothing",
    "dataset.cached_flips",  # likewise for train.cached_flips
    "model.head_ridge",  # likewise for federation.head_ridge (the model's value by mode)
    # the recipe's name: a recipe's run and the same keys set one by one are one row
    "recipe",
    # SecAgg+'s masks cancel exactly: which generator drew them changes what a site's masked
    # vector reveals, not the aggregate (folders from before it used Flower's)
    "secure_aggregation.mask_generator",
)


def compared_config(cfg: Any) -> dict[str, str]:
    """The config as flat ``key -> value`` text, minus :data:`NOT_COMPARED` and the
    ``federation.*`` aliases of top-level keys (a difference is named once, at its key)."""
    tree = OmegaConf.to_container(cfg, resolve=True) if cfg is not None else {}
    flat = flat_keys(tree)
    if flat:
        for k, v in ADDED_LATER.items():
            flat.setdefault(k, v)
    return {
        k: str(v)
        for k, v in flat.items()
        if k not in ALIASES and not any(k == n or k.startswith(n + ".") for n in NOT_COMPARED)
    }


def distinguish(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose method and partition agree but whose configs differ get labels that
    say how (``fedavg [num_sites=3, rounds=2]``), so they are never averaged together."""
    by_cell: dict[tuple, dict[str, dict[str, str]]] = defaultdict(dict)
    for r in rows:
        cfg = r.get("config") or {}
        key = tuple(sorted(cfg.items()))
        by_cell[(r["dataset"], r["method"], r["partition"])][str(hash(key))] = cfg
    out = []
    for r in rows:
        variants = by_cell[(r["dataset"], r["method"], r["partition"])]
        if len(variants) > 1:
            cfgs = list(variants.values())
            keys = sorted({k for c in cfgs for k in c})
            differ = [k for k in keys if len({c.get(k) for c in cfgs}) > 1]
            mine = r.get("config") or {}
            shown = ", ".join(f"{k}={mine.get(k, '-')}" for k in differ[:4])
            more = f", +{len(differ) - 4} more" if len(differ) > 4 else ""
            r = {**r, "method": f"{r['method']} [{shown}{more}]"}
        out.append(r)
    return out


def _summary(m: dict) -> dict[str, Any]:
    """The table's figures of one split, with ``<figure>_ci`` ([low, high]) where the
    run recorded intervals (``ci``: runs from before them have none)."""
    row: dict[str, Any] = {k: float(m[k]) for k in METRICS}
    row.update({f"recall_{c}": float(v["recall"]) for c, v in m["per_class"].items()})
    ci = m.get("ci") or {}
    for k in CI_METRICS:
        if ci.get(k):
            row[f"{k}_ci"] = list(ci[k])
    for c, ends in (ci.get("recall") or {}).items():
        if ends:
            row[f"recall_{c}_ci"] = list(ends)
    return row


# What a one-shot head does not depend on: the fine-tuning that may follow it.
ONE_SHOT_IGNORES = ("strategy.", "federation.local_epochs", "federation.head_freeze")
ONE_SHOT_IGNORES += ("federation.head_scale", "federation.fraction_", "train.")


def one_shot_config(cfg: dict[str, str]) -> dict[str, str]:
    """The compared config of a one-shot head: fine-tuning keys dropped, ``rounds=0``."""
    out = {k: v for k, v in cfg.items() if not k.startswith(ONE_SHOT_IGNORES)}
    return {**out, "rounds": "0"}


def _one_shot_rows(run: Any, base: dict[str, Any]) -> list[dict[str, Any]]:
    """Round 0 of a run that fine-tuned a one-shot head *is* the one-shot model: its
    rows, labelled ``<head> one-shot`` (a ``rounds=0`` run of the same seed gives the
    same model; :func:`aggregate` keeps one of the two)."""
    zero = next((r for r in run.rounds if r["round"] == 0 and r["global"]), None)
    if zero is None:
        return []
    one_shot = {
        **base,
        "method": f"{run.head_init} one-shot",
        "config": one_shot_config(base["config"]),
        "from_round_0": True,
        "model": "round 0 (one-shot head)",
        "rounds": 0,
        "refit_point": None,
    }
    return [
        {
            **one_shot,
            "split": split,
            **_summary(m),
            "worst_site_accuracy": None,
            "confusion_matrix": m["confusion_matrix"],
            "curve": None,
        }
        for split, m in with_scans(zero["global"]).items()
    ]


PER_SCAN = ", per scan"


def with_scans(final: dict[str, dict]) -> dict[str, dict]:
    """The test splits' metrics, each followed by its per-scan metrics where the run
    recorded them (lung: ``<split>, per scan``, see ``common/learn/scans.py``)."""
    out: dict[str, dict] = {}
    for split, m in final.items():
        out[split] = m
        if m.get("per_scan"):
            out[split + PER_SCAN] = m["per_scan"]
    return out


FIGURES = ("shipped", "last")  # which model a federated row shows (see load_run)


def load_run(run_dir: Path, *, figures: str = "shipped") -> list[dict[str, Any]]:
    """One row per test split of the run in ``run_dir`` (read through :func:`read_run`).

    ``figures="shipped"`` (``fedscan report``): a federated row shows the model
    ``fedscan export`` ships (``best.pt``'s round, see :meth:`RunRecord.shipped`), and an
    unfinished run (running, interrupted) or one without a shipped model is a
    :class:`DataError`. ``"last"`` (the study drivers, whose pages compare methods after
    the same number of rounds): the last evaluated round, whatever has been recorded.
    Every row names its model (``model``), the sites and rounds it used.
    """
    if figures not in FIGURES:
        raise ValueError(f"figures must be one of {FIGURES}, not {figures!r}")
    run = read_run(run_dir)
    if figures == "shipped" and (why := run.unfinished()):
        raise DataError(run.dir, why)
    base = {
        "dataset": run.dataset,
        "method": run.method,
        "partition": run.partition,
        "seed": run.seed,
        "synthetic": run.synthetic,
        "run": str(run.dir),
        "config": compared_config(run.cfg),
        "sites": run.used_sites(),
        **_budget(run),
    }
    if base["method"].endswith(" one-shot"):
        base["config"] = one_shot_config(base["config"])
    rows = []
    if run.kind == "federated" and run.head_init != "none" and int(run.cfg.rounds) > 0:
        rows += _one_shot_rows(run, base)
    if run.kind == "federated":
        rows += _federated_rows(run, base, figures)
    elif run.kind == "local":  # the average site, and the worst one
        finals = [with_scans(s["final"]) for s in run.sites]
        for split in finals[0]:
            per_site = [_summary(f[split]) for f in finals]
            mean = {
                k: float(np.mean([p[k] for p in per_site]))
                for k in per_site[0]
                if not k.endswith("_ci")  # a site's interval is not the mean site's
            }
            cms = np.sum([f[split]["confusion_matrix"] for f in finals], axis=0)
            rows.append(
                {
                    **base,
                    "model": "one per site (none shipped)",
                    "split": split,
                    **mean,
                    "worst_site_accuracy": min(p["accuracy"] for p in per_site),
                    "confusion_matrix": cms.tolist(),
                    "curve": None,
                }
            )
    else:  # pooled / centralised
        model = run.shipped().label if figures == "shipped" else "final"
        for split, m in with_scans(run.final()).items():
            rows.append(
                {
                    **base,
                    "model": model,
                    "split": split,
                    **_summary(m),
                    "worst_site_accuracy": None,
                    "confusion_matrix": m["confusion_matrix"],
                    "curve": None,
                }
            )
    return rows


def _budget(run: Any) -> dict[str, int | None]:
    """``rounds`` a federated run recorded (round 0, a one-shot head, not counted) or the
    ``epochs`` a baseline trained (a local site: rounds x local epochs, each)."""
    if run.kind == "federated":
        return {"rounds": max((r["round"] for r in run.rounds), default=0), "epochs": None}
    if run.kind == "local":
        return {"rounds": None, "epochs": run.epoch_budget}
    history = run.doc.get("history")  # the epochs trained, else the configured ones
    planned = run.epoch_budget if run.kind == "pooled" else int(run.cfg.train.epochs)
    return {"rounds": None, "epochs": len(history) if history else planned}


def _federated_rows(run: Any, base: dict[str, Any], figures: str) -> list[dict[str, Any]]:
    """A federated run's rows: the figures of the shipped (or the last evaluated) model,
    the accuracy / loss curve over the rounds (before any refit) and the refit apart."""
    if figures == "shipped":
        shipped = run.shipped()
        tests, model = shipped.tests, shipped.label
    else:
        tests = run.final()
        model = f"round {run.evaluated_rounds[-1]['round']}"
    site_acc = [s["val_accuracy"] for s in run.site_rows("evaluate") if "val_accuracy" in s]
    rows = []
    for split, m in with_scans(tests).items():
        curve, refit = (None, None) if split.endswith(PER_SCAN) else _curve(run, split)
        rows.append(
            {
                **base,
                "model": model,
                "split": split,
                **_summary(m),
                "worst_site_accuracy": min(site_acc) if site_acc else None,
                "confusion_matrix": m["confusion_matrix"],
                "curve": curve,
                "refit_point": refit,
            }
        )
    return rows


def _curve(run: Any, split: str) -> tuple[list[tuple], tuple | None]:
    """(round, accuracy, loss) of ``split`` per evaluated round, the refitted round at its
    value *before* the refit; and the refit's own point (or None). A refit is no training
    step: drawn on the line it would read as one from the last round."""
    points, refit = [], None
    for r in run.evaluated_rounds:
        before = r.get("before_refit")
        g = before if before else r["global"]
        if split in g:
            points.append((r["round"], g[split]["accuracy"], g[split]["loss"]))
        if before and split in r["global"]:
            refit = (r["round"], r["global"][split]["accuracy"], r["global"][split]["loss"])
    return points, refit


def _without_duplicates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, split, method, partition, seed, config): a round-0 row is
    dropped where a ``rounds=0`` run of the same seed measured the same model."""

    def key(r: dict) -> tuple:
        cfg = tuple(sorted((r.get("config") or {}).items()))
        return (r["dataset"], r["split"], r["method"], r["partition"], r["seed"], cfg)

    real = {key(r) for r in rows if not r.get("from_round_0")}
    seen: set[tuple] = set()
    out = []
    for r in rows:
        k = key(r)
        if r.get("from_round_0") and (k in real or k in seen):
            continue
        seen.add(k)
        out.append(r)
    return out


def aggregate(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per (dataset, split, method, partition)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in distinguish(_without_duplicates(list(rows))):
        groups[(r["dataset"], r["split"], r["method"], r["partition"])].append(r)
    out = []
    for (dataset, split, method, part), rs in groups.items():
        keys = [
            k
            for k in rs[0]
            if (k in METRICS or k.startswith("recall_") or k == "worst_site_accuracy")
            and not k.endswith("_ci")  # intervals are averaged below, beside their figure
        ]
        row: dict[str, Any] = {
            "dataset": dataset,
            "split": split,
            "method": method,
            "partition": part,
            "seeds": len(rs),
            "synthetic": any(r["synthetic"] for r in rs),
            "training": _joined(_training(r) for r in rs),
            "model": _joined(r.get("model", "-") for r in rs),
        }
        for k in ("sites", "rounds", "epochs"):  # one value, or each seed's
            row[k] = (
                _joined(r.get(k) for r in rs) if any(r.get(k) is not None for r in rs) else None
            )
            if isinstance(row[k], str) and row[k].isdigit():
                row[k] = int(row[k])
        for k in keys:
            vals = [r[k] for r in rs if r.get(k) is not None]
            row[f"{k}_mean"] = float(np.mean(vals)) if vals else None
            row[f"{k}_std"] = float(np.std(vals)) if vals else None
            ends = [r.get(f"{k}_ci") for r in rs]
            if all(ends):  # one seed: its interval; several: their ends averaged
                row[f"{k}_ci_low"], row[f"{k}_ci_high"] = np.mean(ends, axis=0).tolist()
        out.append(row)
    out.sort(
        key=lambda r: (
            r["dataset"],
            r["split"],
            r["partition"] != "-",
            _partition_order(r["partition"]),
            ORDER.get(r["method"].split("+")[0].split(" ")[0], 2),
            r["method"],
        )
    )
    return out


def _joined(values: Iterable[Any]) -> str:
    """One value, or every seed's in seed order: ``best.pt, round 7 | best.pt, round 8``."""
    vals = ["-" if v is None else str(v) for v in values]
    return vals[0] if len(set(vals)) == 1 else " | ".join(vals)


def _training(r: dict[str, Any]) -> str:
    """What a row's run trained with: ``5 sites, 10 rounds``, ``5 sites alone, 20 epochs
    each``, ``20 epochs`` (one model on all the data)."""
    sites, rounds, epochs = r.get("sites"), r.get("rounds"), r.get("epochs")
    if rounds is not None:
        return f"{sites} sites, {rounds} rounds"
    if sites is not None:
        return f"{sites} sites alone, {epochs} epochs each"
    return f"{epochs} epochs" if epochs is not None else "-"


def _partition_order(label: str) -> tuple:
    """iid first, then Dirichlet from mild to severe (large alpha to small)."""
    if label.startswith("iid") or label == "-":
        return (0, 0.0)
    if label.startswith("dirichlet(alpha="):
        return (1, -float(label.split("=")[1].rstrip(")")))
    return (2, label)


def _pm(row: dict, key: str, pct: bool = True) -> str:
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    if mean is None:
        return "-"
    scale = 100.0 if pct else 1.0
    text = f"{mean * scale:.1f} ± {std * scale:.1f}" if row["seeds"] > 1 else f"{mean * scale:.1f}"
    lo, hi = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    if lo is not None and hi is not None:
        text += f" [{lo * scale:.1f}, {hi * scale:.1f}]"
    return text


MODEL_NOTE = (
    "`model`: the model each figure is of, the one `fedscan export` ships from the run "
    "folder: `model.pt` (centralised, pooled), `best.pt, round N` (federated: the round "
    "the sites' validation picked, `federation.best_metric`; `(refitted)` after "
    "`federation.bn_refit` / `head_refit`), `last.pt, round N` (no best.pt). With "
    "several seeds, each seed's."
)
LAST_NOTE = (
    "`model`: federated rows show the last evaluated round (`round N`), so that methods "
    "compare after the same number of rounds; `fedscan report` shows the model "
    "`fedscan export` ships instead."
)
INTERVALS_NOTE = (
    "`[low, high]`: the 95 % interval of the figure from a bootstrap over the test "
    "split's leakage groups (duplicate groups, scan groups; `bootstrap.*`), so it says "
    "how many independent cases the figure rests on. With several seeds, `mean ± std` is "
    "over the seeds and the interval is the seeds' interval ends averaged (the interval "
    "one run has). Local rows (each site alone) carry no interval."
)


def to_markdown(table: Sequence[dict[str, Any]]) -> str:
    """One markdown table per (dataset, test split), percentages as mean ± std."""
    out = []
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in table:
        by[(r["dataset"], r["split"])].append(r)
    models = " ".join(str(r.get("model", "")) for r in table)
    if ".pt" in models:
        out.append(MODEL_NOTE + "\n")
    elif "round " in models:
        out.append(LAST_NOTE + "\n")
    if any(k.endswith("_ci_low") for r in table for k in r):
        out.append(INTERVALS_NOTE + "\n")
    for (dataset, split), rows in by.items():
        recalls = list(  # class order, as the runs recorded it
            dict.fromkeys(
                k[7:-5] for r in rows for k in r if k.startswith("recall_") and k.endswith("_mean")
            )
        )
        synthetic = " (SYNTHETIC data)" if any(r["synthetic"] for r in rows) else ""
        out.append(f"### {dataset}, test split `{split}`{synthetic}\n")
        head = ["method", "partition", "seeds", "training", "model", "accuracy", "bal. acc."]
        head += ["macro P", "macro R", "macro F1", *[f"recall {c}" for c in recalls]]
        head.append("worst site acc.")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in rows:
            cells = [r["method"], r["partition"], str(r["seeds"]), r["training"], r["model"]]
            cells += [_pm(r, k) for k in METRICS]
            cells += [_pm(r, f"recall_{c}") for c in recalls]
            cells.append(_pm(r, "worst_site_accuracy"))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write_report(
    run_dirs: Sequence[Path], out: Path, *, figures: str = "shipped"
) -> dict[str, Path]:
    """``report.md``, ``report.csv`` and the plots for ``run_dirs`` into ``out``.

    A folder that is no finished run (no ``metrics.json`` or ``config.yaml`` yet, a
    federation still running or interrupted, no evaluated round, no shipped model) is
    skipped with one warning line naming it and why, and listed in ``report.md``:
    ``fedscan report runs/*/`` reports the finished runs while others still run. Fails
    only when no folder is left.
    """
    rows, skipped = [], []
    for d in run_dirs:
        try:
            rows += load_run(d, figures=figures)
        except DataError as exc:
            skipped.append(f"{d}: {_reason(exc, d)}")
            log.warning("report: skipped %s", skipped[-1])
    if not rows:
        listing = "; ".join(skipped) or "none given"
        raise DataError(out, f"no finished run folder to report ({listing})")
    rows = distinguish(_without_duplicates(rows))
    table = aggregate(rows)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "report.md", "csv": out / "report.csv"}
    text = "# fedscan report\n\n" + to_markdown(table)
    if skipped:
        text += "\nSkipped (not finished runs):\n\n" + "".join(f"- {s}\n" for s in skipped)
    files["markdown"].write_text(text)
    columns = sorted({k for r in table for k in r}, key=lambda k: (k not in _FIRST, k))
    with open(files["csv"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=sorted(columns, key=_csv_order))
        w.writeheader()
        w.writerows(table)
    files.update(_plots(rows, out))
    return files


def _reason(exc: DataError, run_dir: Path) -> str:
    """The error without the folder's name when it is the folder (said once already)."""
    text = str(exc)
    for prefix in (f"{Path(run_dir).expanduser().resolve()}: ", f"{run_dir}: "):
        text = text.removeprefix(prefix)
    return text


_FIRST = ("dataset", "split", "method", "partition", "seeds", "synthetic", "training", "model")


def _csv_order(k: str) -> tuple:
    return (_FIRST.index(k) if k in _FIRST else len(_FIRST), k)


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)


REFERENCES = ("pooled", "centralised")  # one model on all the data: drawn as levels


def _is_reference(method: str) -> bool:
    return method.split("+")[0].split(" ")[0] in REFERENCES


def _curve_panels(mine: list[dict], splits: list[str], ds: str, path: Path) -> Path:
    """Accuracy and loss per round, one row of two panels per test split: each federated
    method x partition (mean over seeds), its refit as a marker of its own at the last
    round (no training step), each reference (centralised, pooled) as a level."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(splits), 2, figsize=(11, 3.6 * len(splits)), squeeze=False)
    for (ax_a, ax_l), split in zip(axes, splits, strict=True):
        here = [r for r in mine if r["split"] == split]
        curves: dict[tuple, list] = defaultdict(list)
        refits: dict[tuple, list] = defaultdict(list)
        for r in here:
            if r["curve"]:
                curves[(r["method"], r["partition"])].append(r["curve"])
            if r.get("refit_point"):
                refits[(r["method"], r["partition"])].append(r["refit_point"])
        for (method, part), cs in sorted(curves.items()):
            # Same config but for the seed, yet unequal lengths (a run stopped early):
            # the mean covers the common rounds and the legend says so.
            n = min(len(c) for c in cs)
            note = "" if n == max(len(c) for c in cs) else f" (first {n} rounds of every seed)"
            xs = [c[0] for c in cs[0][:n]]
            acc = np.mean([[p[1] for p in c[:n]] for c in cs], axis=0)
            loss = np.mean([[p[2] for p in c[:n]] for c in cs], axis=0)
            label = f"{method} {part}{note}".replace(" -", "")
            (line,) = ax_a.plot(xs, acc, "-o", ms=3, label=label)
            ax_l.plot(xs, loss, "-o", ms=3, color=line.get_color())
            points = refits.get((method, part))
            if points:
                x = points[0][0]
                style = {"marker": "*", "s": 110, "color": line.get_color(), "zorder": 3}
                ax_a.scatter(
                    [x], [np.mean([p[1] for p in points])], label=f"{label}: refit", **style
                )
                ax_l.scatter([x], [np.mean([p[2] for p in points])], **style)
        levels: dict[str, list[float]] = defaultdict(list)
        for r in here:
            if _is_reference(r["method"]) and not r["curve"]:
                levels[r["method"]].append(r["accuracy"])
        for k, (method, accs) in enumerate(sorted(levels.items())):
            seeds = f", mean of {len(accs)} seeds" if len(accs) > 1 else ""
            ax_a.axhline(
                float(np.mean(accs)),
                ls=("--", ":", "-.")[k % 3],
                c="k",
                lw=1,
                label=f"{method} (one model on all data{seeds})",
            )
        ax_a.set(xlabel="round", ylabel="accuracy", title=f"accuracy on {split}")
        ax_l.set(xlabel="round", ylabel="loss", title=f"loss on {split}")
        for ax in (ax_a, ax_l):
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles, labels = ax_a.get_legend_handles_labels()
        if handles:  # beside the panels, never over a curve
            ax_l.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{ds}: the global model per round (federated: mean over seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _plots(rows: list[dict], out: Path) -> dict[str, Path]:
    """Per dataset: accuracy/loss per round for every test split (federated methods as
    curves, mean over seeds; references as levels), confusion matrices per test split
    summed over seeds, the first seed's per-site class histogram, cross-site maps."""
    files: dict[str, Path] = {}
    datasets = sorted({r["dataset"] for r in rows})
    for ds in datasets:
        every = [r for r in rows if r["dataset"] == ds]
        splits = sorted({r["split"] for r in every})
        curve_splits = [s for s in splits if not s.endswith(PER_SCAN)] or splits
        files[f"curves_{ds}"] = _curve_panels(
            every, curve_splits, ds, out / f"curves_{_slug(ds)}.png"
        )
        for split in splits:
            mine = [r for r in every if r["split"] == split]
            cms: dict[str, np.ndarray] = {}
            for r in mine:
                key = f"{r['method']} {r['partition']}".replace(" -", "")
                cms[key] = cms.get(key, 0) + np.asarray(r["confusion_matrix"])
            classes = [k[7:] for k in mine[0] if k.startswith("recall_") and not k.endswith("_ci")]
            for start in range(0, len(cms), 4):
                chunk = dict(sorted(cms.items())[start : start + 4])
                name = f"confusion_{_slug(ds)}_{_slug(split)}_{start // 4}"
                plot_confusion(
                    chunk, classes, out / f"{name}.png", title=f"{ds} ({split}), summed over seeds"
                )
                files[name] = out / f"{name}.png"

        mine = [r for r in every if r["split"] == splits[0]]
        seen = set()
        for r in sorted(mine, key=lambda r: r["seed"]):
            part_csv = Path(r["run"]) / "partition.csv"
            if r["partition"] in seen or not part_csv.exists():
                continue
            seen.add(r["partition"])
            with open(part_csv) as fh:
                table = list(csv.reader(fh))
            header, body = table[0], table[1:]
            counts = np.array([[int(v) for v in row[1:-1]] for row in body])
            path = out / f"partition_{_slug(ds)}_{_slug(r['partition'])}.png"
            plot_site_histogram(
                counts,
                header[1:-1],
                path,
                title=f"{ds}: {r['partition']}, seed {r['seed']}",
                sites=[row[0] for row in body],
            )
            files[f"partition_{ds}_{r['partition']}"] = path

        done = set()  # one cross-site heatmap per method x partition: its first seed's
        for r in sorted(mine, key=lambda r: r["seed"]):
            key = (r["method"], r["partition"])
            if key in done:  # read a run folder only while its cell still needs a map
                continue
            cm = read_run(Path(r["run"])).doc.get("cross_site")
            if not cm:
                continue
            done.add(key)
            name = f"cross_site_{_slug(ds)}_{_slug(r['method'])}_{_slug(r['partition'])}"
            files[name] = cross_site.plot(
                cm,
                out / f"{name}.png",
                title=f"{ds}: {r['method']}, {r['partition']}, seed {r['seed']} | accuracy",
            )
    return files
