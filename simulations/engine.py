"""Run the simulated sites in this process, one after another, instead of in Ray actors.

Why: on a 2-core CPU the default simulation runs one site at a time anyway (a site
gets every core), so Ray buys nothing but its cost: ~17 s to start Ray and an actor
that imports torch and fedscan again, every run. A feature-mode federation trains a
linear head in well under a second per round, so that start-up was most of a
study's 80-odd federated runs (docs/results.md).

Flower 1.42's simulation engine (``flwr.server.superlink.fleet.vce``) takes its
backend from ``vce.backend.raybackend.RayBackend`` and has no switch for another
one; :func:`inprocess_backend` swaps that one name for :class:`InProcessBackend`
for the duration of a ``run_simulation`` call. Everything else (the LinkState,
message routing, node contexts, error replies) is Flower's own code, unchanged,
so the ServerApp and ClientApp see exactly the messages they see under Ray.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig

from fedscan.common.core.errors import ConfigError

# One swap at a time: the patched name is process-wide.
_SWAP = threading.Lock()


class InProcessBackend(Backend):
    """A Flower simulation backend with one worker: this process.

    A message and the node's context are deep-copied on the way in, as Ray's
    serialisation copies them, so a ClientApp cannot change what the server or
    the LinkState holds by mutating its input.
    """

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self._app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self._app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        self._app_fn = None

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self._app_fn is None:
            raise RuntimeError("InProcessBackend.process_message before build()")
        context = copy.deepcopy(context)
        reply = self._app_fn()(message=copy.deepcopy(message), context=context)
        return reply, context


@contextmanager
def inprocess_backend() -> Iterator[None]:
    """While open, ``flwr.simulation.run_simulation`` runs its sites with
    :class:`InProcessBackend` instead of Ray."""
    try:
        from flwr.server.superlink.fleet.vce.backend import raybackend
    except ImportError as e:  # a Flower without Ray's backend: nothing to swap
        raise ConfigError(
            "federation.engine",
            f"inprocess needs Flower's simulation engine ({e}); use federation.engine=ray",
        ) from e
    with _SWAP:
        original = raybackend.RayBackend
        raybackend.RayBackend = InProcessBackend  # type: ignore[misc]
        try:
            yield
        finally:
            raybackend.RayBackend = original  # type: ignore[misc]


def choose_engine(engine: str, *, cpus_per_site: int, cpus: int) -> str:
    """``federation.engine`` resolved: ``auto`` is in-process when sites run one at a
    time (a site gets every CPU), Ray when several sites can run side by side."""
    if engine != "auto":
        return engine
    return "inprocess" if cpus_per_site >= cpus else "ray"
