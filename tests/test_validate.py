"""Validation before any work: one module, the same checks for every entry point, and
settings whose defaults can only come from the config tree."""

from __future__ import annotations

import dataclasses
import time

import pytest

from fedscan.common.core.config import load_config
from fedscan.common.core.errors import ConfigError, FedscanError
from fedscan.common.federated.privacy import CentralDPSettings, DPSGDSettings
from fedscan.common.federated.settings import FederationSettings, strategy_names
from fedscan.common.learn.settings import TrainSettings
from fedscan.common.runs.validate import validate
from tests.conftest import SIM_BASE

pytestmark = pytest.mark.usefixtures("_no_real_data")


def _cfg(*overrides: str):
    return load_config(["dataset=synthetic", *overrides])


@pytest.mark.parametrize(
    "cls", [TrainSettings, FederationSettings, DPSGDSettings, CentralDPSettings]
)
def test_settings_have_no_defaults_of_their_own(cls: type) -> None:
    """A default here could disagree with configs/; the tree must give every value."""
    with_default = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert with_default == []


def test_the_tree_gives_every_setting() -> None:
    s = validate(_cfg("privacy=dp_sgd"), "federated")
    assert s.train.epochs == 4 and s.federation.rounds == 3 and s.dp.target_epsilon == 8.0
    assert s.federation.epoch_budget == 3  # rounds x local epochs
    assert validate(_cfg("privacy=central"), "server").central_dp.side == "client"


@pytest.mark.parametrize(
    ("overrides", "kind", "key"),
    [
        (["train.lr=abc"], "centralised", "train.lr.*expected a number"),
        (["+train.lrr=0.1"], "centralised", r"train\.lrr.*unknown key"),
        (["train.augment=heavy"], "centralised", r"train\.augment"),
        (["dataset.image_size=8"], "centralised", r"dataset\.image_size"),
        (["model.mode=magic"], "centralised", r"model\.mode"),
        (["privacy=dp_sgd"], "centralised", r"privacy.*pools the data"),
        (["privacy=dp_sgd"], "local", r"privacy.*shares nothing"),
        (["federation.evaluate_every=0"], "server", r"federation\.evaluate_every"),
        (["federation.fraction_train=0"], "server", r"federation\.fraction_train"),
        (["rounds=0"], "server", r"rounds.*must be >= 1"),
        (["strategy=fedprox", "strategy.mu=-1"], "server", r"strategy\.mu.*>= 0"),
        (["+strategy.mu=0.1"], "server", r"strategy\.mu.*'fedavg' takes no parameters"),
        (["strategy.name=fedmagic"], "server", r"strategy\.name.*unknown strategy"),
        (["privacy=central", "privacy.clipping_norm=0"], "server", r"privacy\.clipping_norm"),
        (["privacy=dp_sgd", "privacy.delta=2"], "server", r"privacy\.delta"),
        (["federation.resume=/no/such/run"], "server", r"federation\.resume.*no checkpoint"),
        (["federation.min_nodes=3"], "federated", r"federation\.min_nodes.*more than the 2"),
        (["partition=dirichlet", "partition.alpha=0"], "federated", r"partition\.alpha"),
        (["method=magic"], "federated", r"method.*unknown method"),
        (["strategy=scaffold", "privacy=dp_sgd"], "server", r"strategy.*scaffold.*dp_sgd"),
        (["federation.head_init=fed3r", "privacy=central"], "server", r"head_init.*central"),
        (["federation.head_init=ridge"], "server", r"federation\.head_init"),
        (["rounds=0", "federation.head_init=fedncm"], "pooled", None),
    ],
)
def test_a_bad_value_names_its_key(overrides: list[str], kind: str, key: str | None) -> None:
    if key is None:  # the legal neighbour of a refused value
        validate(_cfg(*overrides), kind)
        return
    with pytest.raises(ConfigError, match=key):
        validate(_cfg(*overrides), kind)


def test_min_nodes_above_simulated_sites_is_fine_for_a_deployed_server() -> None:
    """``num_sites`` means nothing in deployment: a real federation may have 5 sites."""
    validate(_cfg("federation.min_nodes=5"), "server")


def test_every_strategy_in_the_tree_validates() -> None:
    for name in strategy_names():
        validate(_cfg(f"strategy={name}"), "server")


def test_the_server_app_refuses_a_bad_value_before_waiting_for_sites() -> None:
    from fedscan.server.app import run_server

    class NoSites:
        def get_node_ids(self):
            raise AssertionError("asked for sites before validating")

    cfg = _cfg("federation.evaluate_every=0", "federation.wait_for_nodes_s=30")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"federation\.evaluate_every"):
        run_server(NoSites(), cfg)
    assert time.monotonic() - start < 10


def test_config_typos_are_answered_with_the_nearest_valid_spelling() -> None:
    with pytest.raises(ConfigError, match=r"trian\.epochs.*did you mean train\.epochs\?"):
        load_config(["trian.epochs=2"])
    with pytest.raises(ConfigError, match=r"did you mean train\.epochs"):
        load_config(["train.epoch=2"])
    with pytest.raises(ConfigError, match=r"did you mean dataset=brain_mri\? options: brain_mri"):
        load_config(["dataset=brain_mr"])
    # a key that only exists under the chosen option is known once that option is chosen
    assert load_config(["strategy=fedprox", "strategy.mu=1"]).strategy.mu == 1


@pytest.mark.usefixtures("_no_real_data")
def test_a_sweep_checks_every_partition_before_the_first_run_trains(tmp_path) -> None:
    from fedscan.simulations.harness import run_sweep

    small = [o for o in SIM_BASE if not o.startswith("federation.")]
    with pytest.raises(FedscanError, match="site"):
        run_sweep([*small, "num_sites=2,60", "federation.min_nodes=2", f"runs_dir={tmp_path}"])
    assert not list(tmp_path.iterdir())  # nothing trained, no run folder
