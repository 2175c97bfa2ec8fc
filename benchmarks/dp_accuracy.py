"""Accuracy vs privacy: DP-SGD at every site against the same federation without DP.

For each partition (IID, Dirichlet) and model mode (``features``: frozen trunk,
cached features, a private linear head; ``finetune``: the last blocks trained
privately too), one non-private FedAvg run (the twin) and one per target epsilon,
same sites, rounds, seed and settings. Per run: the server's test accuracy with its
95 % group-bootstrap interval (official and de-duplicated brain test), macro-F1,
the sites' validation accuracy (example-weighted, final round), the largest
epsilon any site spent (delta = 0.1 / the site's training samples), wall time and
the slowdown against the twin. The table, its command and date are written as a
self-contained markdown page (``--page``)::

    python benchmarks/dp_accuracy.py --partitions iid dirichlet --epsilons 1 3 8 \\
        --modes features --out runs/dp-table recipe=dp

``--tune`` chooses settings on validation only: every combination of the sweep
overrides (``train.lr=0.5,1,2 privacy.max_grad_norm=0.5,1``) at every epsilon on
the first partition, scored by the sites' validation accuracy; no test figure is
printed or written. Every cell is a run folder under ``--out``; a finished one is
reused, so a stopped benchmark continues where it stopped (``--report-only``
writes the page from the folders without training).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shlex
import shutil
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedscan.common.core.config import expand_sweep, load_config
from fedscan.common.core.errors import DataError
from fedscan.common.runs.record import read_run
from fedscan.simulations.federated import run_federated
from fedscan.simulations.harness import merged


def cell_dir(out: Path, *parts: str) -> Path:
    """A cell's folder; a mode token's overrides become a plain name."""
    return out.joinpath(*(p.replace(":", "-").replace(",", "-").replace("=", "") for p in parts))


def finished(cell: Path, rounds: int) -> Path | None:
    """The cell's run folder if its run reached ``rounds`` (a stopped one is redone)."""
    run = cell / "run"
    try:
        rec = read_run(run)
        return run if rec.rounds and rec.rounds[-1]["round"] >= rounds else None
    except (DataError, KeyError, IndexError):  # missing or partial: run it (again)
        return None


# What makes two runs the same experiment (paths, thread counts and resume left out).
SAME = ("dataset", "model", "train", "strategy", "privacy", "partition", "seed")
SAME_FEDERATION = ("num_sites", "rounds", "local_epochs", "fraction_train", "evaluate_every")


def experiment(cfg: DictConfig) -> dict[str, Any]:
    c = OmegaConf.to_container(cfg, resolve=True)
    return {
        **{k: c.get(k) for k in SAME},
        **{f"federation.{k}": c["federation"].get(k) for k in SAME_FEDERATION},
    }


def twin_of(out: Path, overrides: list[str], rounds: int) -> Path | None:
    """A finished run under ``out/tune`` of exactly this experiment (the validation grid
    already ran the chosen settings): reused instead of run again."""
    want = experiment(load_config(overrides))
    for wall in sorted((out / "tune").glob("**/wall.json")):
        run = finished(wall.parent, rounds)
        if run is not None and experiment(read_run(run).cfg) == want:
            return run
    return None


def run_cell(
    cell: Path, overrides: list[str], rounds: int, *, train: bool, reuse: Path | None = None
) -> Path | None:
    """Run one cell (or reuse it, or the identical run of the validation grid under
    ``reuse``); its wall time is kept beside the run folder."""
    done = finished(cell, rounds)
    if done is None and reuse is not None:
        done = twin_of(reuse, overrides, rounds)
    if done is not None or not train:
        return done
    if (cell / "run").exists():  # an interrupted run: start it again from scratch
        shutil.rmtree(cell / "run")
    t = time.perf_counter()
    run = run_federated(merged(overrides, [f"runs_dir={cell}", "run_name=run"]))
    (cell / "wall.json").write_text(json.dumps({"wall_s": time.perf_counter() - t}))
    return run


def row_of(run: Path, **labels: Any) -> dict[str, Any]:
    """What the table shows of one run folder."""
    rec = read_run(run)
    final = rec.rounds[-1]
    spent = [s.get("dp_epsilon") for r in rec.rounds for s in r["sites"].get("train", [])]
    spent = [e for e in spent if e is not None]
    wall = json.loads((run.parent / "wall.json").read_text())["wall_s"]
    row: dict[str, Any] = {
        **labels,
        "spent": max(spent) if spent else None,
        "val": rec.mean_site_val_accuracy() if final["sites"].get("evaluate") else None,
        "wall": wall,
        "rounds": len(rec.rounds),
    }
    for split, m in (final.get("global") or {}).items():
        ci = (m.get("ci") or {}).get("accuracy")
        row[split] = {"acc": m["accuracy"], "f1": m["macro_f1"], "ci": ci}
    row["splits"] = list(final.get("global") or {})
    return row


def test_splits(rows: list[dict[str, Any]]) -> list[str]:
    """The test splits the runs were scored on, in their order (brain: official, dedup)."""
    return list(dict.fromkeys(s for r in rows for s in r.get("splits", [])))


def mode_overrides(token: str) -> list[str]:
    """``--modes`` token: ``features`` or ``finetune``, optionally with overrides of its
    own after a colon (``finetune:privacy.batchnorm=group``, comma-separated)."""
    mode, _, extra = token.partition(":")
    return [f"model.mode={mode}", *[x for x in extra.split(",") if x]]


def base_overrides(a: argparse.Namespace, mode: str, partition: str) -> list[str]:
    part = ["partition=iid"]
    if partition == "dirichlet":
        part = ["partition=dirichlet", f"partition.alpha={a.alpha:g}"]
    return merged(
        [
            f"dataset={a.dataset}",
            f"federation.num_sites={a.sites}",
            f"federation.min_nodes={a.sites}",
            f"federation.rounds={a.rounds}",
            f"federation.evaluate_every={a.rounds}",
            "tracking=none",
            *part,
        ],
        a.overrides,
        mode_overrides(mode),
    )


def private(eps: float | None) -> list[str]:
    """A cell's privacy: off (the twin, also where the overrides chose a private
    recipe) or DP-SGD at ``eps``, its noise seeded from the run's seed so that a rerun
    repeats the figures (``privacy.noise_seed=run``; deployments keep ``secret``)."""
    if eps is None:
        return ["privacy=off"]
    return ["privacy=dp_sgd", f"privacy.target_epsilon={eps:g}", "privacy.noise_seed=run"]


def eps_label(eps: float | None) -> str:
    return "off" if eps is None else f"{eps:g}"


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def acc_cell(m: dict[str, Any] | None) -> str:
    if not m:
        return "-"
    ci = m.get("ci")
    return pct(m["acc"]) + (f" [{pct(ci[0])}, {pct(ci[1])}]" if ci else "")


# ---------------------------------------------------------------------- the table
def table(a: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    warmed = False
    for partition, mode in itertools.product(a.partitions, a.modes):
        base = base_overrides(a, mode, partition)
        for eps in [None, *a.epsilons]:
            cell = cell_dir(out, partition, mode, eps_label(eps))
            own = a.twin if eps is None else a.per_eps.get(eps_label(eps), [])
            overrides = merged(base, private(eps) + own)
            need = not a.report_only and finished(cell, a.rounds) is None
            need = need and twin_of(out, overrides, a.rounds) is None
            if need and not warmed:  # decode, fingerprints, frozen-trunk features: untimed
                run_federated(merged(base, ["federation.rounds=1", f"runs_dir={out / 'warm'}"]))
                warmed = True
            run = run_cell(cell, overrides, a.rounds, train=not a.report_only, reuse=out)
            if run is None:
                continue
            row = row_of(run, partition=partition, mode=mode, epsilon=eps_label(eps))
            rows.append(row)
            print(json.dumps(row), flush=True)
    for r in rows:  # slowdown against the twin of the same partition and mode
        twin = next(
            t
            for t in rows
            if (t["partition"], t["mode"], t["epsilon"]) == (r["partition"], r["mode"], "off")
        )
        r["slowdown"] = r["wall"] / twin["wall"]
    return rows


def table_markdown(rows: list[dict[str, Any]]) -> list[str]:
    splits = test_splits(rows)
    head = (
        "| partition | mode | epsilon (target) | max site epsilon | "
        + " | ".join(f"`{s}` acc [95 % CI] | `{s}` macro-F1" for s in splits)
        + " | sites' validation acc | wall s | slowdown |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        spent = "-" if r["spent"] is None else f"{r['spent']:.2f}"
        cells = " | ".join(
            f"{acc_cell(r.get(s))} | {r[s]['f1']:.4f}" if r.get(s) else "- | -" for s in splits
        )
        val = "-" if r["val"] is None else pct(r["val"])
        lines.append(
            f"| {r['partition']} | {r['mode']} | {r['epsilon']} | {spent} | {cells} | {val} | "
            f"{r['wall']:.0f} | {r['slowdown']:.2f}x |"
        )
    return lines


def gaps(rows: list[dict[str, Any]], eps: list[float]) -> list[str]:
    """Each epsilon against its twin, and Dirichlet against IID, in points."""
    by = {(r["partition"], r["mode"], r["epsilon"]): r for r in rows}
    splits = test_splits(rows)
    lines = []
    for (part, mode, e), r in by.items():
        twin = by.get((part, mode, "off"))
        if e == "off" or twin is None or not splits:
            continue
        d = [100 * (twin[s]["acc"] - r[s]["acc"]) for s in splits if r.get(s) and twin.get(s)]
        lines.append(
            f"- {part}, {mode}, epsilon {e}: "
            + " / ".join(f"{x:.2f}" for x in d)
            + " points below its non-private twin ("
            + " / ".join(f"`{s}`" for s in splits)
            + ")"
        )
    for (part, mode, e), r in by.items():
        iid = by.get(("iid", mode, e))
        if part == "iid" or iid is None or not splits:
            continue
        d = [100 * (iid[s]["acc"] - r[s]["acc"]) for s in splits if r.get(s) and iid.get(s)]
        lines.append(
            f"- {part} vs IID, {mode}, epsilon {e}: "
            + " / ".join(f"{x:.2f}" for x in d)
            + " points below IID"
        )
    return lines


def setting_text(run: Path) -> str:
    """The recipe's settings as the first private run resolved them."""
    cfg = read_run(run).cfg
    p, t, m, f = cfg.privacy, cfg.train, cfg.model, cfg.federation
    private_part = (
        f"DP-SGD at every site: clip norm {p.max_grad_norm:g}, accountant {p.accountant}, "
        f"`privacy.batchnorm={p.get('batchnorm', 'group')}`, "
        f"delta {p.delta if p.delta is not None else '0.1 / (site training samples)'}, "
        "Poisson sampling; "
        if str(p.name) == "dp_sgd"
        else ""
    )
    return (
        f"{cfg.dataset.name} at {cfg.dataset.image_size} px, {f.num_sites} sites, FedAvg, "
        f"{f.rounds} rounds x {f.local_epochs} local epochs, seed {cfg.seed}; "
        f"{m.name} `model.mode={m.mode}`"
        + (f" (`finetune_blocks={m.finetune_blocks}`)" if str(m.mode) == "finetune" else "")
        + f", `model.feature_norm={m.get('feature_norm', 'none')}`; {t.optimizer}, lr {t.lr:g}, "
        f"batch {t.batch_size}, weight decay {t.weight_decay:g}, label smoothing "
        f"{t.label_smoothing:g}; {private_part}"
        f"test figures from the last round's global model."
    )


def write_page(a: argparse.Namespace, rows: list[dict[str, Any]], out: Path) -> str:
    private_cells = [
        c / "run"
        for c in sorted(out.glob("*/*/*"))
        if (c / "run" / "config.yaml").exists() and c.name != "off"
    ]
    # the setting line describes a private cell on the shared overrides, not --per-epsilon's
    first = next(
        (r for r in private_cells if r.parent.name not in a.per_eps),
        private_cells[0] if private_cells else None,
    )
    lines = [
        "# Differential privacy: accuracy against epsilon",
        "",
        "Generated by `benchmarks/dp_accuracy.py` on "
        f"{a.date}. Regenerate (with `FEDSCAN_DATA` pointing at the datasets):",
        "",
        "```bash",
        a.command,
        "```",
        "",
    ]
    if first is not None:
        lines += [f"Setting: {setting_text(first)}", ""]
    if a.note:
        lines += [f"Machine: {a.note}", ""]
    lines += [
        "Per-site DP: each site's epsilon covers its own training images over the whole run "
        "(`dp_epsilon` in every round of `metrics.json`); delta is 0.1 / that site's training "
        "images, below 1/N. Intervals: 95 % bootstrap over the test split's leakage groups "
        "(the run folders' `ci`). Under Dirichlet label skew the sites differ in size, so "
        "their noise differs too.",
        "",
        *table_markdown(rows),
        "",
        *gaps(rows, a.epsilons),
        "",
    ]
    for e, extra in a.per_eps.items():
        lines += [
            f"At epsilon {e} the private runs used `{' '.join(extra)}` (chosen on validation).",
            "",
        ]
    if a.twin:
        lines += [
            f"The non-private twin (`off`) ran with `{' '.join(a.twin)}` on top of the same "
            "settings: its own choice on the sites' validation splits (the private runs' "
            "learning rate is tuned for clipped, noisy gradients).",
            "",
        ]
    if a.append:  # what no finished cell shows (runs stopped, and why), written by hand
        lines += [Path(a.append).read_text().strip(), ""]
    grid = grid_markdown(out, a.rounds)
    if grid:
        lines += ["## The settings, chosen on the sites' validation splits", "", *grid]
    text = "\n".join(lines)
    page = Path(a.page)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)
    return text


# ---------------------------------------------------------------- the validation grid
def tune(a: argparse.Namespace, out: Path) -> str:
    """Every combination of the sweep overrides at every epsilon, scored on the sites'
    validation splits only (no test figure is read)."""
    partition, mode = a.partitions[0], a.modes[0]
    combos = expand_sweep(a.overrides)
    for c in combos:  # every combination checked before the first one trains
        load_config(c)
    swept = [o.split("=", 1)[0] for o in a.overrides if "," in o.split("=", 1)[1]]
    lines = [
        "| epsilon | " + " | ".join(f"`{k}`" for k in swept) + " | sites' validation acc |",
        "|" + "---|" * (len(swept) + 2),
    ]
    best: dict[str, tuple[float, str]] = {}
    for eps in [None, *a.epsilons] if a.tune_off else a.epsilons:
        for c in combos:
            a_c = argparse.Namespace(**{**vars(a), "overrides": c})
            base = base_overrides(a_c, mode, partition)
            values = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in c}
            name = "-".join(f"{k.split('.')[-1]}{values[k]}" for k in swept) or "as-given"
            cell = cell_dir(out, "tune", partition, mode, eps_label(eps), name)
            run = run_cell(cell, merged(base, private(eps)), a.rounds, train=not a.report_only)
            if run is None:
                continue
            val = read_run(run).mean_site_val_accuracy()
            label = ", ".join(f"{k}={values[k]}" for k in swept)
            print(json.dumps({"epsilon": eps_label(eps), **values, "val": val}), flush=True)
            lines.append(
                f"| {eps_label(eps)} | " + " | ".join(values[k] for k in swept) + f" | {pct(val)} |"
            )
            if val > best.get(eps_label(eps), (-1.0, ""))[0]:
                best[eps_label(eps)] = (val, label)
    lines += ["", *[f"- epsilon {e}: best {lab} ({pct(v)} %)" for e, (v, lab) in best.items()]]
    return "\n".join(lines)


# The recipe's knobs, as the grid's columns.
KNOBS = (
    "train.lr",
    "privacy.max_grad_norm",
    "train.batch_size",
    "federation.local_epochs",
    "privacy.accountant",
)


def grid_markdown(out: Path, rounds: int) -> list[str]:
    """Every finished cell of the validation grid (``--tune``) under ``out``: its
    epsilon, the recipe's knobs and the sites' validation accuracy, the best per
    epsilon marked; the commands that ran them from ``out/tune/commands.txt``."""
    rows = []
    for wall in sorted((out / "tune").glob("**/wall.json")):
        run = finished(wall.parent, rounds)
        if run is None:
            continue
        rec = read_run(run)
        private = str(rec.cfg.privacy.name) == "dp_sgd"
        eps = f"{float(rec.cfg.privacy.target_epsilon):g}" if private else "off"
        knobs = [
            str(OmegaConf.select(rec.cfg, k)) if private or k.startswith(("train", "fed")) else "-"
            for k in KNOBS
        ]
        rows.append((eps, knobs, rec.mean_site_val_accuracy(), rec.partition))
    if not rows:
        return []
    rows.sort(key=lambda r: (-1.0 if r[0] == "off" else float(r[0]), float(r[1][0])))
    best = {e: max(v for e2, _, v, _ in rows if e2 == e) for e, _, _, _ in rows}
    commands = out / "tune" / "commands.txt"
    lines = []
    if commands.exists():
        lines += ["```bash", *commands.read_text().splitlines(), "```", ""]
    lines += [
        f"{rows[0][3]}, {rounds} rounds; the score is the sites' validation accuracy of the "
        "final global model, example-weighted (`metrics.json`, `sites.evaluate` rows); no "
        "test split was read. The best per epsilon in bold.",
        "",
        "| epsilon | " + " | ".join(f"`{k}`" for k in KNOBS) + " | sites' validation acc |",
        "|" + "---|" * (len(KNOBS) + 2),
    ]
    for eps, knobs, val, _ in rows:
        score = f"**{pct(val)}**" if val == best[eps] else pct(val)
        lines.append(f"| {eps} | " + " | ".join(knobs) + f" | {score} |")
    return [*lines, ""]


def as_reader_runs(args: list[str]) -> list[str]:
    """The command line as a reader re-runs it: ``--note`` and ``--out`` describe this
    machine only, and ``--report-only`` a page written from cells already trained."""
    out, skip = [], False
    for x in args:
        if skip or x.startswith(("--note=", "--out=")) or x == "--report-only":
            skip = False
            continue
        if x in ("--note", "--out"):
            skip = True
            continue
        out.append(x)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="brain_mri")
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--partitions", nargs="+", default=["iid"], choices=["iid", "dirichlet"])
    ap.add_argument("--alpha", type=float, default=0.1, help="Dirichlet alpha")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["features"],
        help="features | finetune, each optionally MODE:key=value,... (its own overrides)",
    )
    ap.add_argument("--out", default="runs/dp-accuracy")
    ap.add_argument("--page", default=None, help="markdown page to write (default: none)")
    ap.add_argument("--note", default="", help="what the machine was doing, for the page")
    ap.add_argument(
        "--append",
        default=None,
        help="a markdown file added to the page before the grid (runs no cell shows)",
    )
    ap.add_argument(
        "--twin",
        type=str.split,
        default=[],
        help="'key=value ...': overrides for the non-private runs only (their own "
        "choice on validation)",
    )
    ap.add_argument(
        "--per-epsilon",
        nargs="*",
        default=[],
        metavar="EPS:key=value,...",
        help="overrides for the private runs at one epsilon (their choice on validation)",
    )
    ap.add_argument("--tune", action="store_true", help="the validation grid (sweep overrides)")
    ap.add_argument("--tune-off", action="store_true", help="--tune: also without DP")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    a.per_eps = {}
    for item in a.per_epsilon:
        eps, _, extra = item.partition(":")
        a.per_eps[f"{float(eps):g}"] = [x for x in extra.split(",") if x]
    a.command = "python benchmarks/dp_accuracy.py " + " ".join(
        shlex.quote(x) for x in as_reader_runs(argv if argv is not None else sys.argv[1:])
    )
    a.date = date.today().isoformat()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = Path(a.out).expanduser().resolve()
    if a.tune:  # the table's page shows every finished grid cell, and these commands
        (out / "tune").mkdir(parents=True, exist_ok=True)
        with (out / "tune" / "commands.txt").open("a") as f:
            f.write(f"{a.command}  # {a.date}\n")
        print("\n" + tune(a, out))
        return
    rows = table(a, out)
    print(f"\n{a.dataset}, {a.sites} sites, {a.rounds} rounds, FedAvg\n")
    print("\n".join(table_markdown(rows)))
    print("\n".join(gaps(rows, a.epsilons)))
    if a.page:
        write_page(a, rows, out)
        print(f"\npage: {a.page}")


if __name__ == "__main__":
    main()
