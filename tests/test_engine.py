"""The in-process simulation engine: Flower's engine with fedscan's backend swapped in
(``simulations/engine.py``), proven at every run, and the run folder named by the run."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.server.superlink.fleet.vce.backend import raybackend

import fedscan.simulations.engine as engine
from fedscan.common.core.errors import ConfigError
from fedscan.simulations.federated import run_federated
from tests.conftest import SIM_BASE

pytestmark = pytest.mark.usefixtures("_no_real_data")

ONE_ROUND = [
    *SIM_BASE,
    "dataset=synthetic",
    "rounds=1",
    "tracking=none",
    "federation.engine=inprocess",
]


def test_the_inprocess_engine_never_starts_ray(tmp_path: Path, monkeypatch) -> None:
    """Were the swap to stop taking effect, Flower would build its RayBackend, whose
    constructor starts Ray: here that start is refused, so the run would fail."""
    import ray

    started: list[dict] = []

    def no_ray(*args, **kwargs):
        started.append(kwargs)
        raise AssertionError("ray.init called under federation.engine=inprocess")

    monkeypatch.setattr(ray, "init", no_ray)
    run_dir = run_federated([*ONE_ROUND, f"runs_dir={tmp_path}"])
    assert started == []
    assert not ray.is_initialized()
    assert run_dir.parent == tmp_path and (run_dir / "metrics.json").exists()
    assert raybackend.RayBackend.__name__ == "RayBackend"  # the swap is undone


class OtherBackend(engine.InProcessBackend):
    """What Flower would build were it to stop reading ``raybackend.RayBackend`` at call
    time: some backend that is not the swapped-in one (Ray's, in real life; a stub
    here, so the test costs no Ray start). Built, it tells no EngineCheck."""

    built = 0

    def build(self, app_fn) -> None:
        OtherBackend.built += 1

    def process_message(self, message, context):
        raise AssertionError("a site ran on a backend that is not fedscan's")


def test_the_engine_check_fails_the_run_when_the_swap_stops_taking_effect(
    tmp_path: Path, monkeypatch
) -> None:
    """The swap patches a name Flower no longer reads (what a Flower release that moved
    the import would do); Flower builds another backend. The ServerApp stops before any
    work, with an error naming federation.engine, instead of running on Ray unnoticed."""
    from types import SimpleNamespace

    monkeypatch.setattr(engine, "_backend_module", lambda: SimpleNamespace(RayBackend=None))
    monkeypatch.setattr(raybackend, "RayBackend", OtherBackend)
    monkeypatch.setattr(engine, "BUILD_TIMEOUT_S", 3.0)
    OtherBackend.built = 0
    with pytest.raises(ConfigError) as err:
        run_federated([*ONE_ROUND, f"runs_dir={tmp_path}"])
    assert err.value.key == "federation.engine"
    assert "did not build fedscan's in-process backend" in str(err.value)
    assert OtherBackend.built == 1  # Flower did build a backend: the other one
    assert not any(tmp_path.iterdir())  # no run folder: the check ran before any work


def test_the_run_folder_is_the_one_the_run_opened(tmp_path: Path) -> None:
    """Named by the ServerApp, not found by listing runs_dir: a run folder another run
    opens beside it while it runs is not taken for it."""
    other = tmp_path / "zzz-another-run"

    def another_run_starts(msg, context, call_next):
        other.mkdir(exist_ok=True)
        (other / "config.yaml").write_text("seed: 1\n")
        return call_next(msg, context)

    run_dir = run_federated(
        [*ONE_ROUND, f"runs_dir={tmp_path}", "run_name=mine"], client_mods=[another_run_starts]
    )
    assert other.is_dir() and run_dir == tmp_path / "mine"
