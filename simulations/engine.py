"""Run the simulated sites in this process, one after another, instead of in Ray actors.

Why: on a 2-core CPU the default simulation runs one site at a time anyway (a site
gets every core), so Ray buys nothing but its cost: 7-17 s to start Ray and an actor
that imports torch and fedscan again, every run. A feature-mode federation trains a
linear head in well under a second per round, so that start-up was most of a
study's 80-odd federated runs (docs/results/study.md).

Flower 1.42's simulation engine (``flwr.server.superlink.fleet.vce``) has no
backend registry: ``vce_api.start_vce``'s ``backend_fn`` ignores ``backend_name`` and
imports ``RayBackend`` from ``vce.backend.raybackend`` lazily, at call time.
:func:`inprocess_backend` swaps that one name for :class:`InProcessBackend` for the
duration of a ``run_simulation`` call. Everything else (the LinkState, message
routing, node contexts, error replies) is Flower's own code, unchanged, so the
ServerApp and ClientApp see exactly the messages they see under Ray.

The swap works only while Flower reads that name at call time; ``pyproject.toml``
pins ``flwr`` to the version it was verified on. Should a Flower release move the
import, Ray would silently run again, so the swap proves itself at every run
(:class:`EngineCheck`): the ServerApp does no work until the swapped backend has
been built, and stops with an error naming ``federation.engine`` if it never is,
or if Ray is running.
"""

from __future__ import annotations

import copy
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from types import ModuleType

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig

from fedscan.common.core.errors import ConfigError

# One swap at a time: the patched name is process-wide.
_SWAP = threading.Lock()
# How long the ServerApp waits for Flower to build the swapped backend (it does so
# right after starting the ServerApp's thread: milliseconds)
BUILD_TIMEOUT_S = 60.0


class EngineCheck:
    """Proof, at every in-process run, that the swap took effect."""

    def __init__(self) -> None:
        self.built = threading.Event()  # set by InProcessBackend.build

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until Flower has built :class:`InProcessBackend`; fail naming
        ``federation.engine`` if it builds another backend instead, or if Ray runs."""
        timeout_s = BUILD_TIMEOUT_S if timeout_s is None else timeout_s
        if not self.built.wait(timeout_s):
            raise ConfigError(
                "federation.engine",
                f"inprocess: Flower's simulation engine did not build fedscan's in-process "
                f"backend within {timeout_s:g} s; this Flower ({_flwr_version()}) no longer "
                "takes its backend from vce.backend.raybackend.RayBackend at call time "
                "(simulations/engine.py). Use federation.engine=ray, or the pinned flwr",
            )
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            raise ConfigError(
                "federation.engine",
                "inprocess: Ray is running beside the in-process backend; "
                "use federation.engine=ray",
            )


def _flwr_version() -> str:
    from importlib.metadata import version

    return f"flwr {version('flwr')}"


class InProcessBackend(Backend):
    """A Flower simulation backend with one worker: this process.

    A message and the node's context are deep-copied on the way in, as Ray's
    serialisation copies them, so a ClientApp cannot change what the server or
    the LinkState holds by mutating its input.
    """

    def __init__(self, backend_config: BackendConfig, built: threading.Event | None = None) -> None:
        super().__init__(backend_config)
        self._app_fn: Callable[[], ClientApp] | None = None
        self._built = built

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self._app_fn = app_fn
        if self._built is not None:
            self._built.set()  # EngineCheck: this backend, not Ray's, runs the sites

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


def _backend_module() -> ModuleType:
    """The module whose ``RayBackend`` Flower's engine instantiates."""
    try:
        from flwr.server.superlink.fleet.vce.backend import raybackend
    except ImportError as e:  # a Flower without Ray's backend: nothing to swap
        raise ConfigError(
            "federation.engine",
            f"inprocess needs Flower's simulation engine ({e}); use federation.engine=ray",
        ) from e
    return raybackend


@contextmanager
def inprocess_backend() -> Iterator[EngineCheck]:
    """While open, ``flwr.simulation.run_simulation`` runs its sites with
    :class:`InProcessBackend` instead of Ray. The ServerApp must call the yielded
    check's :meth:`EngineCheck.wait` before any work."""
    module = _backend_module()
    check = EngineCheck()
    with _SWAP:
        original = module.RayBackend
        module.RayBackend = partial(InProcessBackend, built=check.built)  # type: ignore[misc]
        try:
            yield check
        finally:
            module.RayBackend = original  # type: ignore[misc]


def choose_engine(engine: str, *, cpus_per_site: int, cpus: int) -> str:
    """``federation.engine`` resolved: ``auto`` is in-process when sites run one at a
    time (a site gets every CPU), Ray when several sites can run side by side."""
    if engine != "auto":
        return engine
    return "inprocess" if cpus_per_site >= cpus else "ray"
