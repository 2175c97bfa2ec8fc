"""The headline non-IID study, one command:

    python -m fedscan.simulations.study

Both datasets; IID and Dirichlet alpha in {0.3, 0.1}; three seeds. Rows:

- pooled: softmax head trained on all sites' data; the pooled ridge and pooled
  NCM heads in closed form (the like-for-like references of Fed3R / FedNCM);
- local-only sites; FedAvg; FedProx (mu tuned first from {0.001, 0.01, 0.1, 1}
  at the hardest skew on the *sites' own validation splits*, never on a test
  set); SCAFFOLD;
- Fed3R + FedAvg and, at the hardest skew only, FedNCM + FedAvg (the statistics
  round, then FedAvg fine-tunes); their round 0, the one-shot head before any
  fine-tuning, is reported as the ``fed3r one-shot`` / ``fedncm one-shot`` rows
  (a ``rounds=0`` run gives the same model; it would cost a run per cell).

Dirichlet alpha = 1.0 was dropped from the grid: in the previous study it sat
between IID and 0.3 on every row and added 13 runs per seed and dataset; the
remedies' rows cost the time it freed.

Everything runs through ``fedscan simulate``'s harness in the frozen-trunk
feature mode (the pretrained trunk computed once per image and cached; sites
train the classifier head), so it fits a 2-core CPU. The table goes to
``docs/results/study.md`` with the wall time and the command, its figures beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedscan.common.commands.report import (
    aggregate,
    compared_config,
    load_run,
    to_markdown,
    write_report,
)
from fedscan.common.learn.prepare import prepare_run
from fedscan.common.runs.record import read_run
from fedscan.simulations.harness import (
    driver_args,
    merged,
    run_one,
    smoothing_text,
    validate_overrides,
)

log = logging.getLogger("fedscan.study")
ROOT = Path(__file__).resolve().parents[1]
# The page (--docs); its figures are written beside it and linked relative to it.
PAGE = ROOT / "docs" / "results" / "study.md"

# The pooled references: softmax head trained for the epoch budget; ridge and NCM
# heads in closed form (no epoch), the heads Fed3R / FedNCM must equal.
POOLED = (
    [],
    ["federation.head_init=fed3r", "rounds=0"],
    ["federation.head_init=fedncm", "rounds=0"],
)
# The federated rows beside FedProx (whose mu is tuned first).
FEDERATED = (
    ["strategy=fedavg"],
    ["strategy=scaffold"],
    # + FedAvg fine-tuning; its round 0 is the one-shot model, reported as its own row
    ["federation.head_init=fed3r"],
)
# At the hardest skew only: FedNCM's class means were the weaker head in every
# measurement (docs/results/skew.md); IID and 0.3 rows of it would cost 12 runs per dataset.
HARDEST_ONLY = (["federation.head_init=fedncm"],)


def _key(cfg: Any) -> tuple:
    """(seed, config) of a run; a baseline's ``train.epochs`` is its epoch budget (rounds x
    local epochs, written into its config.yaml), so it is left out of the comparison."""
    cfg_items = compared_config(cfg)
    if str(cfg.get("method", "federated")) in ("pooled", "local"):
        cfg_items.pop("train.epochs", None)
    return (int(cfg.seed), tuple(sorted(cfg_items.items())))


def finished_runs(folder: Path) -> dict[tuple, Path]:
    """The complete runs already in ``folder``, by (seed, config): a study stopped
    part-way (hours on a 2-core CPU) continues where it stopped instead of starting over."""
    done: dict[tuple, Path] = {}
    for metrics in sorted(folder.glob("*/metrics.json")):
        try:
            rec = read_run(metrics.parent)
            if rec.kind == "federated" and (
                not rec.rounds or rec.rounds[-1]["round"] < int(rec.cfg.rounds)
            ):
                continue
        except Exception:  # a half-written or foreign folder: not reused
            continue
        done[_key(rec.cfg)] = rec.dir
    return done


def run_or_reuse(overrides: Sequence[str], done: dict[tuple, Path]) -> Path:
    """:func:`run_one`, unless ``done`` holds a finished run of the same config and seed."""
    key = _key(validate_overrides(overrides))
    if key in done:
        log.info("study: reusing %s", done[key].name)
        return done[key]
    run = run_one(overrides)
    done[key] = run
    return run


def build_caches(overrides: Sequence[str]) -> float:
    """Decode every image and run the frozen trunk once; returns the seconds it took.

    Done before the first run so the page can report the one-time cost apart from
    the runs: about zero on a warm machine, minutes on a fresh one. Without it the
    first run of each dataset would silently absorb the cost.
    """
    cfg = validate_overrides(overrides)
    start = time.perf_counter()
    prepare_run(cfg)
    return time.perf_counter() - start


def run_study(
    *,
    datasets: Sequence[str],
    seeds: Sequence[int],
    alphas: Sequence[float],
    mus: Sequence[float],
    sites: int,
    rounds: int,
    local_epochs: int,
    out: Path,
    extra: Sequence[str] = (),
) -> int:
    """Train every run of the study into ``out/<dataset>/`` (see :func:`summarize`);
    returns how many finished runs of an earlier, stopped invocation were reused."""
    reused = 0
    out.mkdir(parents=True, exist_ok=True)
    partitions = [["partition=iid"]] + [
        ["partition=dirichlet", f"partition.alpha={a}"] for a in alphas
    ]
    for ds in datasets:
        base = [
            f"dataset={ds}",
            "model.mode=features",
            f"num_sites={sites}",
            f"federation.min_nodes={sites}",
            f"rounds={rounds}",
            f"federation.local_epochs={local_epochs}",
            f"runs_dir={out / ds}",
            *extra,
        ]
        skewed = ["partition=dirichlet", f"partition.alpha={min(alphas)}"]
        (out / ds).mkdir(parents=True, exist_ok=True)
        for s in seeds:  # every override checked before the first run trains
            for extra_pooled in POOLED:
                validate_overrides(merged(base, ["method=pooled", *extra_pooled, f"seed={s}"]))
            for part in partitions:
                for method in (["method=local"], ["strategy=fedprox"], *FEDERATED, *HARDEST_ONLY):
                    validate_overrides(merged(base, [*part, *method, f"seed={s}"]))
        done = finished_runs(out / ds)
        reused += len(done)
        if done:
            log.info("%s: %d finished runs found, reused", ds, len(done))
        timed = out / ds / "caches.json"
        if done and timed.exists():  # a continuation: the first invocation timed the build
            log.info("%s: cache build timed by the earlier invocation, not repeated", ds)
        else:
            seconds = build_caches(base)
            timed.write_text(json.dumps({"seconds": round(seconds, 1)}))
            log.info("%s: caches built in %.1f s", ds, seconds)
        # 1. FedProx's mu, on the sites' validation splits at the hardest skew, seed 0
        scores = {}
        for mu in mus:
            run = run_or_reuse(
                merged(base, [*skewed, "strategy=fedprox", f"strategy.mu={mu}", "seed=0"]), done
            )
            scores[mu] = read_run(run).mean_site_val_accuracy()
            log.info("%s: FedProx mu=%g -> sites' val accuracy %.4f", ds, mu, scores[mu])
        mu = max(scores, key=scores.get)
        # 2. the grid (the tuning run with the chosen mu is its seed-0, hardest-skew cell)
        for s in seeds:
            for extra_pooled in POOLED:
                run_or_reuse(merged(base, ["method=pooled", *extra_pooled, f"seed={s}"]), done)
            for part in partitions:
                run_or_reuse(merged(base, [*part, "method=local", f"seed={s}"]), done)
                if not (s == 0 and part == skewed):
                    prox = [*part, "strategy=fedprox", f"strategy.mu={mu}", f"seed={s}"]
                    run_or_reuse(merged(base, prox), done)
                for method in FEDERATED + (HARDEST_ONLY if part == skewed else ()):
                    run_or_reuse(merged(base, [*part, *method, f"seed={s}"]), done)
    return reused


def _started(run: Path) -> float:
    """A run folder's start time, from its ``YYYYmmdd-HHMMSS-`` name."""
    return time.mktime(time.strptime(run.name[:15], "%Y%m%d-%H%M%S"))


def summarize(out: Path, datasets: Sequence[str], alpha: float) -> tuple[list[Path], dict]:
    """Everything the results page needs, from the run folders alone.

    FedProx's mu is the tuning run (seed 0, Dirichlet ``alpha``) with the best
    sites' validation accuracy; the other tuning runs are left out of the table.
    Wall time per dataset: first run's start to the last metrics.json written.
    """
    runs: list[Path] = []
    meta: dict = {"mu": {}, "seconds": {}, "cache_seconds": {}}
    for ds in datasets:
        folders = sorted(p for p in (out / ds).glob("*/metrics.json"))
        folders = [p.parent for p in folders]
        if not folders:
            continue
        records = [read_run(r) for r in folders]
        tuning = {}
        for rec in records:
            cell = rec.seed == 0 and rec.partition == f"dirichlet(alpha={alpha:g})"
            if rec.kind == "federated" and rec.strategy == "fedprox" and cell:
                mu = float(rec.strategy_params["mu"])
                tuning[mu] = (rec.mean_site_val_accuracy(), rec.dir)
        chosen = max(tuning, key=lambda m: tuning[m][0])
        meta["mu"][ds] = {
            "chosen": chosen,
            "site_val_accuracy": {m: v for m, (v, _) in sorted(tuning.items())},
        }
        for rec in records:
            is_prox = rec.kind == "federated" and rec.strategy == "fedprox"
            if is_prox and float(rec.strategy_params["mu"]) != chosen:
                continue
            runs.append(rec.dir)
        end = max((r / "metrics.json").stat().st_mtime for r in folders)
        meta["seconds"][ds] = round(end - min(_started(r) for r in folders), 1)
        caches = out / ds / "caches.json"
        if caches.exists():
            meta["cache_seconds"][ds] = json.loads(caches.read_text())["seconds"]
    meta["seconds"]["total"] = round(sum(meta["seconds"].values()), 1)
    wall = out / "wall.json"
    if wall.exists():  # the whole command, cache builds and FedProx's tuning included
        meta["wall"] = json.loads(wall.read_text())
    return runs, meta


def _wall_time(meta: dict) -> str:
    """The wall-time sentence: the one-time cache build apart from the runs when it was timed."""
    runs = {k: v for k, v in meta["seconds"].items() if k != "total"}
    caches = meta.get("cache_seconds", {})
    if "wall" in meta:
        whole = f" The whole command took {meta['wall']['seconds'] / 60:.1f} min."
        if meta["wall"].get("reused_runs"):
            whole = (
                f" The last command took {meta['wall']['seconds'] / 60:.1f} min and reused "
                f"{meta['wall']['reused_runs']} runs finished by an earlier, stopped one: these "
                "times are not one uninterrupted study's."
            )
        return _wall_time({k: v for k, v in meta.items() if k != "wall"}) + whole
    text = (
        "Wall time on this machine (2 CPU cores, no GPU), from the first run's start to the "
        "last run's end: "
    )
    text += ", ".join(f"{k} {v / 60:.1f} min" for k, v in runs.items())
    if set(caches) >= set(runs):
        total = sum(runs.values()) + sum(caches[k] for k in runs)
        return (
            text
            + "; before them, the one-time cache build (decode every image, run the frozen trunk "
            + "once): "
            + ", ".join(f"{k} {caches[k] / 60:.1f} min" for k in runs)
            + f". Total {total / 60:.1f} min."
        )
    return (
        text
        + f" (total {meta['seconds']['total'] / 60:.1f} min), with warm caches (decoded images "
        "and frozen-trunk features from earlier runs; on a fresh machine each dataset also "
        "decodes every image and computes its trunk features once, not timed here)."
    )


def expected_runs(args: argparse.Namespace) -> int:
    """Runs per dataset: FedProx's tuning, then every seed's pooled references and
    cells (the tuning run with the chosen mu doubles as one cell)."""
    cells = 1 + len(args.alphas)  # IID and each alpha
    per_seed = len(POOLED) + cells * (2 + len(FEDERATED)) + len(HARDEST_ONLY)
    return len(args.mus) + len(args.seeds) * per_seed - 1


def _missing(args: argparse.Namespace, meta: dict) -> list[str]:
    """A line for every requested dataset the page has no runs for (a study stopped
    before it reached them): the page says so rather than leaving it out silently."""
    missing = [ds for ds in args.datasets if ds not in meta["mu"]]
    if not missing:
        return []
    return [
        f"**Not regenerated yet: {', '.join(missing)}.** The study stopped before these "
        "datasets' runs finished; `python -m fedscan.simulations.study` continues it "
        "(finished runs are reused). Their previous tables (pooled, local, FedAvg and "
        "FedProx only) are in this page's git history.",
        "",
    ]


# Beside every per-class brain figure: the Kaggle set's classes come from different sources.
NOTUMOR_CAVEAT = (
    "**Read `recall notumor` with care.** The Kaggle brain set is assembled from three "
    "sources: its `notumor` images come from Br35H, the tumour classes from figshare and "
    "SARTAJ. Part of notumor's near-perfect recall may be the model recognising the "
    "source (scanner, contrast, framing), not the absence of a tumour; the figure says "
    "little about telling a tumour-free scan from a tumour in one hospital's images."
)


def write_results(runs: list[Path], meta: dict, args: argparse.Namespace, docs: Path) -> None:
    """``docs/results/study.md``: the command, wall times, tuned mu, the table, a few plots
    (written beside the page)."""
    report_dir = Path(args.out) / "report"
    # methods compared after the same rounds (the last), as the page's figures always were
    files = write_report(runs, report_dir, figures="last")
    table = aggregate(row for r in runs for row in load_run(r, figures="last"))
    figures = docs.parent  # beside the page: its links are the bare file names
    figures.mkdir(parents=True, exist_ok=True)
    keep = [k for k in files if k.startswith("curves_") or k.startswith("partition_")]
    keep = [k for k in keep if k.startswith("curves_") or k.endswith("(alpha=0.1)")]
    for k in keep:
        shutil.copy(files[k], figures / files[k].name)
    mus = ", ".join(
        f"{ds}: mu = {m['chosen']:g} (sites' val accuracy "
        + ", ".join(f"{mu:g}: {100 * v:.1f}" for mu, v in m["site_val_accuracy"].items())
        + ")"
        for ds, m in meta["mu"].items()
    )
    scales = ", ".join(
        sorted({f"{float(read_run(r).cfg.federation.get('head_scale', 1.0)):g}" for r in runs})
    )
    lines = [
        "# Results: federated learning under non-IID class imbalance",
        "",
        "Regenerate from a clean checkout (with `FEDSCAN_DATA` pointing at the datasets):",
        "",
        "```bash",
        "python3 -m venv .venv && .venv/bin/pip install -q -e . && "
        ".venv/bin/python -m fedscan.simulations.study",
        "```",
        "",
        f"Setting: {args.sites} sites, {args.rounds} rounds, {args.local_epochs} local epochs, "
        f"seeds {', '.join(map(str, args.seeds))}; {args.image_size} px images, "
        f"{smoothing_text(args)}; "
        "EfficientNet-Lite0 (ImageNet weights) in "
        "feature mode: the frozen trunk's output is computed once per image and cached, sites "
        "train the classifier head. Local-only sites and the pooled model train for rounds x "
        "local epochs epochs. Partitions are by whole scan / duplicate groups. FedProx's mu "
        f"was tuned at the hardest skew on the sites' validation splits, seed 0: {mus}.",
        "",
        "Rows: `pooled` trains the softmax head on all sites' data; `pooled+fed3r` / "
        "`pooled+fedncm` are the closed-form ridge / normalised-class-mean heads of the "
        "same pooled data (no epoch), the references the federated heads must equal. "
        "`fed3r one-shot` / `fedncm one-shot` is the statistics round alone (each site sends "
        "its feature sums once, the server solves the head), read at round 0 of the "
        "`fed3r+fedavg` / `fedncm+fedavg` runs (what `rounds=0` would train); "
        "`fed3r+fedavg` / `fedncm+fedavg` start FedAvg from that head "
        f"(`federation.head_scale={scales}`, chosen on the sites' validation "
        "splits, see [the label-skew measurements](skew.md)); `scaffold` is SCAFFOLD "
        "(Option I control variates) with the same AdamW local optimiser. Dirichlet "
        "alpha = 1.0 is no longer in the grid (in the previous study it sat between IID "
        "and 0.3 on every row).",
        "",
        _wall_time(meta) + " The recommended fine-tune model (`model.finetune_blocks=4`: "
        "the last blocks train from the cached prefix) costs minutes per brain epoch on this "
        "CPU, too much for 3 seeds of every cell; one seed of its key cells is on "
        "[finetune.md](finetune.md) (`python -m fedscan.simulations.finetune`).",
        "",
        "Every accuracy names its test split: brain `test_official` (the publisher's test "
        "set) beside `test_dedup` (test images pixel-identical to a training image removed); "
        "lung `test_scan_grouped` (held-out scan groups). Values are mean ± std over seeds, in %. "
        "`worst site acc.`: federated, the lowest site validation accuracy of the final global "
        "model; local-only, the worst single site's model on the global test set.",
        "",
        NOTUMOR_CAVEAT,
        "",
        *_missing(args, meta),
        to_markdown(table),
        "",
        "Whether more rounds close the gap at the hardest skew (pooled trained for the same "
        "epochs beside each checkpoint): [longer training](horizon.md), "
        "`python -m fedscan.simulations.horizon`.",
        "",
        *[f"![{k}]({files[k].name})" for k in keep],
        "",
    ]
    docs.write_text("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedscan.simulations.study", description=__doc__)
    p.add_argument("--datasets", nargs="+", default=["brain_mri", "lung_ct"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--alphas", nargs="+", type=float, default=[0.3, 0.1])
    p.add_argument("--mus", nargs="+", type=float, default=[0.001, 0.01, 0.1, 1.0])
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=2)
    args = driver_args(p, argv, out="runs/study", docs=PAGE)
    out = Path(args.out).resolve()
    started = time.time()
    if not args.report_only:
        reused = run_study(
            datasets=args.datasets,
            seeds=args.seeds,
            alphas=args.alphas,
            mus=args.mus,
            sites=args.sites,
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            out=out,
            extra=args.overrides,
        )
        out.mkdir(parents=True, exist_ok=True)
        wall = {"seconds": round(time.time() - started, 1), "reused_runs": reused}
        (out / "wall.json").write_text(json.dumps(wall))
    expected = expected_runs(args)
    complete = [ds for ds in args.datasets if len(finished_runs(out / ds)) >= expected]
    for ds in sorted(set(args.datasets) - set(complete)):
        log.info(
            "%s: %d of %d runs finished; left off the page",
            ds,
            len(finished_runs(out / ds)),
            expected,
        )
    runs, meta = summarize(out, complete, min(args.alphas))
    (out / "study.json").write_text(json.dumps({"runs": [str(r) for r in runs], **meta}, indent=2))
    write_results(runs, meta, args, Path(args.docs))
    caches = sum(meta["cache_seconds"].values())
    print(
        f"results: {args.docs} (runs {meta['seconds']['total'] / 60:.1f} min"
        + (f", cache build {caches / 60:.1f} min)" if caches else ")")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
