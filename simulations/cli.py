"""The ``fedscan`` command line.

Settings are Hydra overrides (``key=value``) resolved from ``configs/``, not
flags: ``fedscan train dataset=lung_ct model=paper_cnn train.epochs=20``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedscan import __version__
from fedscan.common.core.errors import ConfigError, DataError, FedscanError


def _setup_logging(verbose: bool) -> None:
    from fedscan.common.core.logs import configure_logging

    configure_logging(verbose=verbose)


def _check_values(cfg: Any, *, federated: bool = False) -> None:
    """The ``train`` (and ``federation``) values, typed and range-checked without torch:
    ``train.lr=abc`` is answered in well under a second, not after torch loads."""
    from fedscan.common.learn.settings import train_settings

    train_settings(cfg)
    if federated:
        from fedscan.common.federated.settings import federation_settings

        federation_settings(cfg)


def _cmd_train(args: argparse.Namespace) -> int:
    from fedscan.common.core.config import load_config

    cfg = load_config(args.overrides)  # a bad key fails here, before torch is imported
    _check_values(cfg)
    from fedscan.common.core.recipes import log_recipe

    log_recipe(cfg)
    from fedscan.simulations.centralised import run_centralised

    run_dir = run_centralised(cfg)
    print(f"results: {run_dir}")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedscan.common.core.config import expand_sweep, load_config

    for overrides in expand_sweep(args.overrides) if args.multirun else [args.overrides]:
        # names, spellings and the typed settings, before torch, Flower and Ray load
        _check_values(load_config(overrides), federated=True)
    from fedscan.simulations.harness import run_one, run_sweep

    if args.multirun:
        for run_dir in run_sweep(args.overrides):
            print(f"results: {run_dir}")
        return 0
    print(f"results: {run_one(args.overrides)}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    path = Path(args.path).expanduser().resolve()
    if not path.is_dir():  # answered at once, before anything heavy loads
        raise DataError(path, "no such folder")
    from fedscan.common.commands.audit import audit, format_report
    from fedscan.common.core.paths import cache_root

    report = audit(path, cache_root(None))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _cmd_site_check(args: argparse.Namespace) -> int:
    path = Path(args.data_path).expanduser().resolve()
    if not path.is_dir():  # answered at once, before anything heavy loads
        raise ConfigError("--data-path", f"{path}: no such folder")
    from fedscan.common.core.config import load_config

    cfg = load_config(["dataset=site", *args.overrides])  # a site reads its own folder
    log = logging.getLogger("fedscan.sitecheck")
    log.info("site check of %s: loading the checks (torch) ...", path)
    from omegaconf import OmegaConf

    from fedscan.common.commands.sitecheck import domain_of_folder, format_site_report, site_check
    from fedscan.common.core.paths import cache_root
    from fedscan.common.runs.validate import validate

    validate(cfg, "site")
    domain = args.domain
    if domain is None and any(o.startswith("dataset.domain=") for o in args.overrides):
        domain = str(cfg.dataset.domain)
    estimate = None
    if not args.no_estimate:
        # timed as the federation trains this domain: its dataset's image size (brain 160 px)
        shape = load_config(
            [f"dataset={domain or domain_of_folder(path)}", *args.overrides], check_data=False
        )
        estimate = OmegaConf.to_container(shape, resolve=True)
    report = site_check(
        path,
        cache_root=cache_root(cfg.cache_dir),
        domain=domain,
        on_unreadable=str(cfg.dataset.on_unreadable),
        estimate=estimate,
    )
    print(json.dumps(report, indent=2) if args.json else format_site_report(report))
    if not report["usable"]:
        print(
            "fedscan: site is not ready: " + "; ".join(report["problems"]),
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    from fedscan.deploy.pki import make_dev_pki

    out = Path(args.out).expanduser().resolve()
    make_dev_pki(out, sites=args.site, hosts=args.host or ["127.0.0.1", "localhost"])
    print(f"development PKI in {out}")
    print(f"  SuperLink: {out / 'ca.crt'}, {out / 'superlink.crt'}, {out / 'superlink.key'}")
    for site in args.site:
        print(f"  site {site}: {out / 'sites' / site} (give it ca.crt and this folder only)")
    print("next: docs/how-to/coordinate.md, step 3 (start the SuperLink)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fedscan.common.commands.report import write_report

    out = Path(args.out).expanduser().resolve()
    files = write_report([Path(d) for d in args.run_dirs], out)
    print(files["markdown"].read_text())
    print(f"report: {files['markdown']}, {files['csv']} and {len(files) - 2} plot(s) in {out}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from fedscan.common.core.config import load_config

    # the tree as composed; folders are checked by the commands that read them
    print(OmegaConf.to_yaml(load_config(args.overrides, check_data=False)))
    return 0


def _cmd_flwr_run(args: argparse.Namespace) -> int:
    from fedscan.deploy.flwr_status import flwr_run

    return flwr_run([a for a in args.flwr_args if a != "--"])


def _cmd_run_status(args: argparse.Namespace) -> int:
    from fedscan.deploy.flwr_status import exit_code, run_status

    status = run_status(args.run_id, superlink=args.superlink)
    print(status)
    return exit_code(status)


def _cmd_export(args: argparse.Namespace) -> int:
    from fedscan.deploy.export import export_run

    out = export_run(Path(args.run_dir), Path(args.out) if args.out else None, fmt=args.format)
    print(f"model package: {out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from fedscan.deploy.predict import run_predict

    return run_predict(
        Path(args.model),
        [Path(f) for f in args.files],
        as_json=args.json,
        explain_dir=Path(args.explain) if args.explain else None,
        runtime=args.runtime,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from fedscan.deploy.package import ModelPackage
    from fedscan.deploy.service import serve

    if args.max_upload_mb <= 0:
        raise ConfigError("--max-upload-mb", f"must be > 0, got {args.max_upload_mb}")
    package = ModelPackage(Path(args.model), runtime=args.runtime)
    print(f"serving {package.name} on http://{args.host}:{args.port}/", flush=True)
    serve(
        package,
        host=args.host,
        port=args.port,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedscan",
        description="Federated brain-MRI and lung-CT classification. Settings are key=value "
        "overrides of the configs/ tree (see `fedscan config`).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"fedscan {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="centralised baseline: train, evaluate, write a run folder")
    t.add_argument("overrides", nargs="*", help="config overrides, e.g. dataset=lung_ct")
    t.set_defaults(fn=_cmd_train)

    s = sub.add_parser(
        "simulate",
        help="federated simulation (same ServerApp/ClientApp as flwr run) or a baseline "
        "(method=local|pooled); -m sweeps",
    )
    s.add_argument(
        "-m", "--multirun", action="store_true", help="sweep: a=1,2 b=x,y runs every combination"
    )
    s.add_argument(
        "overrides",
        nargs="*",
        help="e.g. partition=dirichlet partition.alpha=0.1 strategy=fedprox num_sites=10",
    )
    s.set_defaults(fn=_cmd_simulate)

    a = sub.add_parser("audit", help="counts, unreadable files, duplicates, scan groups")
    a.add_argument("path", help="a dataset folder (brain, lung or <class>/ site layout)")
    a.add_argument("--json", action="store_true", help="machine-readable report")
    a.set_defaults(fn=_cmd_audit)

    e = sub.add_parser("export", help="a run's global model as a self-describing package")
    e.add_argument("run_dir", help="a run folder from fedscan train / simulate / flwr run")
    e.add_argument(
        "--format",
        choices=("onnx", "torchscript"),
        default="onnx",
        help="the package's runtime format",
    )
    e.add_argument("--out", help="package folder (default RUN_DIR/export-FORMAT)")
    e.set_defaults(fn=_cmd_export)

    runtimes = ("onnx", "torchscript")
    pr = sub.add_parser("predict", help="classify JPEG / PNG / DICOM files with a package")
    pr.add_argument("model", help="a package folder written by fedscan export")
    pr.add_argument("files", nargs="+", help="JPEG, PNG or DICOM files")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.add_argument("--explain", metavar="DIR", help="write Grad-CAM overlays into DIR")
    pr.add_argument("--runtime", choices=runtimes, help="default: the package's own format")
    pr.set_defaults(fn=_cmd_predict)

    sv = sub.add_parser("serve", help="HTTP inference API and upload page for a package")
    sv.add_argument("model", help="a package folder written by fedscan export")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on")
    sv.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="largest upload accepted, in MB"
    )
    sv.add_argument("--runtime", choices=runtimes, help="default: the package's own format")
    sv.set_defaults(fn=_cmd_serve)

    site = sub.add_parser("site", help="site tools for hospital IT (see `fedscan site check`)")
    site_sub = site.add_subparsers(dest="site_command", required=True, metavar="SITE_COMMAND")
    sc = site_sub.add_parser(
        "check",
        help="pre-flight check of a site folder: counts, bad files, duplicates, time per round",
    )
    sc.add_argument("--data-path", required=True, help="the folder given to the SuperNode")
    sc.add_argument("--domain", choices=("brain_mri", "lung_ct"), help="default: inferred")
    sc.add_argument("--json", action="store_true", help="machine-readable report")
    sc.add_argument("--no-estimate", action="store_true", help="skip timing the model")
    sc.add_argument("overrides", nargs="*", help="e.g. model=paper_cnn federation.local_epochs=2")
    sc.set_defaults(fn=_cmd_site_check)

    rp = sub.add_parser(
        "report", help="the metrics table (markdown + CSV) and plots over many run folders"
    )
    rp.add_argument("run_dirs", nargs="+", help="run folders (fedscan simulate / train)")
    rp.add_argument("--out", default="report", help="output folder (default ./report)")
    rp.set_defaults(fn=_cmd_report)

    ce = sub.add_parser(
        "certs", help="development CA, SuperLink TLS certificate and per-site auth keys"
    )
    ce.add_argument("--out", required=True, help="a new folder for the keys")
    ce.add_argument("--site", action="append", required=True, help="a site name (repeat)")
    ce.add_argument(
        "--host",
        action="append",
        help="a name or IP the SuperLink is reached at (repeat; default 127.0.0.1, localhost)",
    )
    ce.set_defaults(fn=_cmd_certs)

    c = sub.add_parser("config", help="print the resolved config for some overrides")
    c.add_argument("overrides", nargs="*", help="e.g. recipe=skew num_sites=5")
    c.set_defaults(fn=_cmd_config)

    fr = sub.add_parser(
        "flwr-run",
        help="`flwr run ARGS` that exits 1 when the run fails (flwr's own CLI exits 0)",
    )
    fr.add_argument("flwr_args", nargs=argparse.REMAINDER, help="what `flwr run` takes")
    fr.set_defaults(fn=_cmd_flwr_run)
    rs = sub.add_parser(
        "run-status",
        help="a Flower run's final status; exit 0 completed, 1 failed/stopped, 3 not finished",
    )
    rs.add_argument("run_id", type=int, help="the run ID `flwr run` printed")
    rs.add_argument("superlink", nargs="?", default=None, help="SuperLink connection name")
    rs.set_defaults(fn=_cmd_run_status)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.fn(args)
    except FedscanError as exc:
        print(f"fedscan: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
