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
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from fedscan.common.core.config import ALIASES
from fedscan.common.core.errors import DataError
from fedscan.common.runs import cross_site
from fedscan.common.runs.plots import plot_confusion, plot_site_histogram
from fedscan.common.runs.record import ADDED_LATER, read_run

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


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def compared_config(cfg: Any) -> dict[str, str]:
    """The config as flat ``key -> value`` text, minus :data:`NOT_COMPARED` and the
    ``federation.*`` aliases of top-level keys (a difference is named once, at its key)."""
    tree = OmegaConf.to_container(cfg, resolve=True) if cfg is not None else {}
    flat = _flat(tree)
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


def load_run(run_dir: Path) -> list[dict[str, Any]]:
    """One row per test split of the run in ``run_dir`` (read through :func:`read_run`)."""
    run = read_run(run_dir)
    base = {
        "dataset": run.dataset,
        "method": run.method,
        "partition": run.partition,
        "seed": run.seed,
        "synthetic": run.synthetic,
        "run": str(run.dir),
        "config": compared_config(run.cfg),
        "rounds": int(run.cfg.get("rounds", 0)),
    }
    if base["method"].endswith(" one-shot"):
        base["config"] = one_shot_config(base["config"])
    rows = []
    if run.kind == "federated" and run.head_init != "none" and base["rounds"] > 0:
        rows += _one_shot_rows(run, base)
    if run.kind == "federated":
        site_acc = [s["val_accuracy"] for s in run.site_rows("evaluate")]
        evaluated = run.evaluated_rounds
        for split, m in with_scans(run.final()).items():
            rows.append(
                {
                    **base,
                    "split": split,
                    **_summary(m),
                    "worst_site_accuracy": min(site_acc) if site_acc else None,
                    "confusion_matrix": m["confusion_matrix"],
                    "curve": None
                    if split.endswith(PER_SCAN)
                    else [
                        (r["round"], r["global"][split]["accuracy"], r["global"][split]["loss"])
                        for r in evaluated
                    ],
                }
            )
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
                    "split": split,
                    **mean,
                    "worst_site_accuracy": min(p["accuracy"] for p in per_site),
                    "confusion_matrix": cms.tolist(),
                    "curve": None,
                }
            )
    else:  # pooled / centralised
        for split, m in with_scans(run.final()).items():
            rows.append(
                {
                    **base,
                    "split": split,
                    **_summary(m),
                    "worst_site_accuracy": None,
                    "confusion_matrix": m["confusion_matrix"],
                    "curve": None,
                }
            )
    return rows


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
        }
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
        head = ["method", "partition", "seeds", "accuracy", "bal. acc.", "macro P", "macro R"]
        head += ["macro F1", *[f"recall {c}" for c in recalls], "worst site acc."]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in rows:
            cells = [r["method"], r["partition"], str(r["seeds"])]
            cells += [_pm(r, k) for k in METRICS]
            cells += [_pm(r, f"recall_{c}") for c in recalls]
            cells.append(_pm(r, "worst_site_accuracy"))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write_report(run_dirs: Sequence[Path], out: Path) -> dict[str, Path]:
    """``report.md``, ``report.csv`` and the plots for ``run_dirs`` into ``out``."""
    rows = distinguish(_without_duplicates([row for d in run_dirs for row in load_run(d)]))
    if not rows:
        raise DataError(out, "no runs to report")
    table = aggregate(rows)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "report.md", "csv": out / "report.csv"}
    files["markdown"].write_text("# fedscan report\n\n" + to_markdown(table))
    columns = sorted({k for r in table for k in r}, key=lambda k: (k not in _FIRST, k))
    with open(files["csv"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=sorted(columns, key=_csv_order))
        w.writeheader()
        w.writerows(table)
    files.update(_plots(rows, out))
    return files


_FIRST = ("dataset", "split", "method", "partition", "seeds", "synthetic")


def _csv_order(k: str) -> tuple:
    return (_FIRST.index(k) if k in _FIRST else len(_FIRST), k)


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)


def _plots(rows: list[dict], out: Path) -> dict[str, Path]:
    """Per dataset and first test split: accuracy/loss per round for every federated
    method x partition (mean over seeds, pooled as a reference line), confusion
    matrices summed over seeds, and the first seed's per-site class histogram."""
    import matplotlib.pyplot as plt

    files: dict[str, Path] = {}
    datasets = sorted({r["dataset"] for r in rows})
    for ds in datasets:
        mine = [r for r in rows if r["dataset"] == ds]
        split = sorted({r["split"] for r in mine})[0]
        mine = [r for r in mine if r["split"] == split]
        fig, (ax_a, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
        curves: dict[tuple, list] = defaultdict(list)
        for r in mine:
            if r["curve"]:
                curves[(r["method"], r["partition"])].append(r["curve"])
        for (method, part), cs in sorted(curves.items()):
            # Same config but for the seed, yet unequal lengths (a run stopped early):
            # the mean covers the common rounds and the legend says so.
            n = min(len(c) for c in cs)
            note = "" if n == max(len(c) for c in cs) else f" (first {n} rounds of every seed)"
            xs = [c[0] for c in cs[0][:n]]
            acc = np.mean([[p[1] for p in c[:n]] for c in cs], axis=0)
            loss = np.mean([[p[2] for p in c[:n]] for c in cs], axis=0)
            ax_a.plot(xs, acc, "-o", ms=3, label=f"{method} {part}{note}")
            ax_l.plot(xs, loss, "-o", ms=3, label=f"{method} {part}{note}")
        pooled = [r["accuracy"] for r in mine if r["method"] in ("pooled", "centralised")]
        if pooled:
            ax_a.axhline(float(np.mean(pooled)), ls="--", c="k", label="pooled")
        ax_a.set(xlabel="round", ylabel="accuracy", title=f"{ds}: global accuracy ({split})")
        ax_l.set(xlabel="round", ylabel="loss", title=f"{ds}: global loss ({split})")
        for ax in (ax_a, ax_l):
            ax.grid(alpha=0.3)
        ax_a.legend(fontsize=7)
        fig.tight_layout()
        files[f"curves_{ds}"] = out / f"curves_{_slug(ds)}.png"
        fig.savefig(files[f"curves_{ds}"], dpi=110)
        plt.close(fig)

        cms: dict[str, np.ndarray] = {}
        for r in mine:
            key = f"{r['method']} {r['partition']}".replace(" -", "")
            cms[key] = cms.get(key, 0) + np.asarray(r["confusion_matrix"])
        classes = [k[7:] for k in mine[0] if k.startswith("recall_") and not k.endswith("_ci")]
        for start in range(0, len(cms), 4):
            chunk = dict(sorted(cms.items())[start : start + 4])
            path = out / f"confusion_{_slug(ds)}_{start // 4}.png"
            plot_confusion(chunk, classes, path, title=f"{ds} ({split}), summed over seeds")
            files[f"confusion_{ds}_{start // 4}"] = path

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
