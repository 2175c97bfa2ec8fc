"""Logging set-up for entry points, and only for them.

Library code logs to its own ``fedscan.*`` loggers and never configures logging
(handlers, levels, Flower's logger, warning filters): a program that imports fedscan
keeps its own set-up. The processes fedscan itself starts configure it here:

- :func:`configure_logging`: the ``fedscan`` command line's ``main`` and the
  ServerApp object ``flwr run`` loads (``fedscan.server.app:app``);
- :func:`configure_site_logging`: the ClientApp where it is the process's entry point
  (``flwr run``'s ClientApp processes, a simulation's Ray actors), which nobody else
  configures, so fedscan's progress lines would be dropped.
"""

from __future__ import annotations

import logging

# Third-party loggers that speak at INFO about their own plumbing: alembic (via MLflow
# and Ray) a line per plugin and migration step, MLflow's store its table creation
QUIET = (
    "matplotlib",
    "PIL",
    "hydra",
    "onnx_ir",
    "onnxscript",
    "torch.onnx",
    "alembic",
    "httpx",
    "mlflow.store.db.utils",
    "mlflow.store.tracking.sqlalchemy_store",
)
FORMAT = "%(asctime)s %(levelname)s %(message)s"


def configure_logging(*, verbose: bool = False) -> None:
    """The process's logging, as the ``fedscan`` command prints it: fedscan's INFO
    lines (DEBUG with ``verbose``), Flower's own handler left to print Flower's (not
    twice), and the plumbing of :data:`QUIET` at WARNING. A process that already has
    handlers keeps them."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format=FORMAT, datefmt="%H:%M:%S"
    )
    logging.getLogger("flwr").propagate = False  # flwr has its own handler
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


def configure_site_logging() -> None:
    """Show a site's progress lines where its ClientApp runs (a Ray actor, a
    ``flwr-clientapp`` process): without it a fine-tune round looked like minutes of
    silence. Where the process already has handlers (the driver, pytest), nothing
    changes."""
    fedscan = logging.getLogger("fedscan")
    if logging.getLogger().handlers or fedscan.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
    fedscan.addHandler(handler)
    fedscan.setLevel(logging.INFO)
    fedscan.propagate = False  # a library that later configures the root (Opacus) doubles lines
