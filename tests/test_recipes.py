"""One-name recipes and remedies (configs/recipe/, configs/remedy/) and the defaults that
follow the settings they depend on (federation.min_nodes, federation.head_ridge)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedscan.common.core.config import group_options, load_config
from fedscan.common.core.errors import ConfigError
from fedscan.common.federated.settings import federation_settings
from fedscan.common.runs.record import RunRecord
from fedscan.common.runs.validate import validate

pytestmark = pytest.mark.usefixtures("_no_real_data")

# docs/results/skew.md, "Today's brain defaults: the same recipe with cached flips", seed 0
LONG_SKEW_COMMAND = [
    *("dataset=brain_mri", "model.mode=finetune", "model.finetune_blocks=4", "num_sites=5"),
    *("federation.min_nodes=5", "rounds=10", "federation.local_epochs=1", "seed=0"),
    *("partition=dirichlet", "partition.alpha=0.1", "strategy=fedavg"),
    *("federation.bn_refit=true", "federation.head_refit=fed3r", "federation.head_ridge=0.01"),
]


def _resolved(overrides: list[str]) -> dict:
    return OmegaConf.to_container(load_config(overrides, check_data=False), resolve=True)


def test_recipe_skew_is_the_documented_long_command_key_for_key(tmp_path: Path) -> None:
    """`recipe=skew partition.alpha=0.1 num_sites=5` trains exactly the run of the long
    command docs/results/skew.md shows, so it reproduces its figure to the digit."""
    root = f"data_root={tmp_path}"  # a data root: brain_mri itself, not the synthetic stand-in
    short = _resolved(["recipe=skew", "partition.alpha=0.1", "num_sites=5", "seed=0", root])
    long = _resolved([*LONG_SKEW_COMMAND, root])
    assert (short.pop("recipe"), long.pop("recipe")) == ("skew", None)
    assert short["dataset"]["name"] == "brain_mri"
    flat = {k: v for k, v in _flat(short).items() if _flat(long).get(k) != v}
    assert flat == {} and short == long


def _flat(tree: object, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def test_a_recipe_overrides_the_tree_and_the_command_line_overrides_the_recipe() -> None:
    tree = load_config([])
    skew = load_config(["recipe=skew"])
    assert (tree.rounds, tree.partition.name, tree.federation.bn_refit) == (3, "iid", False)
    assert (skew.rounds, skew.partition.name, skew.federation.bn_refit) == (10, "dirichlet", True)
    assert skew.federation.head_refit == "fed3r" and skew.recipe == "skew"
    mine = load_config(
        ["recipe=skew", "rounds=4", "partition=iid", "federation.bn_refit=false", "strategy=krum"]
    )
    assert (mine.rounds, mine.partition.name, mine.federation.bn_refit) == (4, "iid", False)
    assert mine.strategy.name == "krum" and mine.federation.head_refit == "fed3r"
    # a recipe also wins over a remedy's keys, and a remedy adds to a recipe
    both = load_config(["recipe=skew", "remedy=fedbabu"])
    assert both.federation.head_freeze and both.federation.bn_refit
    assert load_config(["recipe=paper"]).model.name == "paper_cnn"
    assert load_config(["recipe=paper", "model=resnet18"]).model.name == "resnet18"


def test_an_unknown_recipe_names_the_options_and_the_nearest_before_anything_loads() -> None:
    code = (
        "import sys, time; t = time.perf_counter(); "
        "from fedscan.simulations.cli import main; "
        "rc = main(['{cmd}', 'recipe=skw']); "
        "print(rc, 'torch' in sys.modules, round(time.perf_counter() - t, 2))"
    )
    for cmd in ("simulate", "train"):
        out = subprocess.run(
            [sys.executable, "-c", code.format(cmd=cmd)], capture_output=True, text=True
        )
        rc, torch_loaded, seconds = out.stdout.split()
        assert (rc, torch_loaded) == ("2", "False"), out.stdout + out.stderr
        assert float(seconds) < 2.0, f"{cmd}: answered in {seconds} s"
        assert "did you mean recipe=skew?" in out.stderr
        assert "options: " in out.stderr and "paper" in out.stderr


def test_a_run_logs_what_its_recipe_set_and_records_the_recipe(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedscan.simulations.cli import main

    small = ["dataset.image_size=32", "dataset.size=32", "dataset.per_class=12"]
    args = ["train", "recipe=paper", *small, "train.epochs=1", "tracking=none"]
    with caplog.at_level(logging.INFO, logger="fedscan.recipe"):
        assert main([*args, f"runs_dir={tmp_path}"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "fedscan.recipe"]
    assert lines == [
        "recipe=paper sets model=paper_cnn, dataset.image_size=32 (recipe: 128), "
        "train.epochs=1 (recipe: 30)"
    ]
    (run,) = [p for p in tmp_path.iterdir() if (p / "config.yaml").exists()]
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.recipe == "paper" and saved.model.name == "paper_cnn"


@pytest.mark.parametrize("group", ["recipe", "remedy"])
def test_every_recipe_and_remedy_validates_for_a_federated_run(group: str) -> None:
    for option in group_options()[group]:
        validate(load_config([f"{group}={option}"]), "federated")


def test_every_remedy_is_cited_measured_and_named_in_the_run_label() -> None:
    """A remedy is selected by its name and reported under it: the run label holds the
    file's name, so `fedscan report` rows say which published method ran."""
    from fedscan.common.core.config import config_dir

    for name in group_options()["remedy"]:
        if name == "none":
            continue
        text = (config_dir() / "remedy" / f"{name}.yaml").read_text()
        assert "Measured" in text and any(f"{y}" in text for y in range(2017, 2027)), name
        record = RunRecord(
            dir=Path("."), kind="federated", cfg=load_config([f"remedy={name}"]), doc={}
        )
        tokens = record.method.replace("+", " ").replace("(", " ").split()
        assert name in tokens, (name, record.method)
    assert RunRecord(dir=Path("."), kind="federated", cfg=load_config([]), doc={}).method == (
        "fedavg"
    )


def test_min_nodes_follows_num_sites_unless_set() -> None:
    nodes = lambda *o: federation_settings(load_config(list(o))).min_nodes  # noqa: E731
    assert nodes() == 2
    assert nodes("num_sites=5") == 5
    assert nodes("federation.num_sites=7") == 7
    assert nodes("num_sites=5", "federation.min_nodes=3") == 3
    with pytest.raises(ConfigError, match=r"federation\.min_nodes"):
        validate(load_config(["num_sites=2", "federation.min_nodes=3"]), "federated")


def test_the_head_ridge_default_follows_the_model_mode() -> None:
    """1.0 for feature mode's pretrained features, 0.01 for the fine-tuned blocks' (chosen
    on the sites' validation); an explicit value wins; a mode without one is named."""
    ridge = lambda *o: federation_settings(load_config(list(o))).head_ridge  # noqa: E731
    assert ridge() == 0.01  # the default model fine-tunes 4 blocks
    assert ridge("model.mode=features") == 1.0
    assert ridge("model=paper_cnn") == 1.0
    assert ridge("model.mode=features", "federation.head_ridge=0.3") == 0.3
    with pytest.raises(ConfigError, match=r"model\.mode.*set federation\.head_ridge"):
        ridge("model=paper_cnn", "model.mode=features")


def test_a_removed_option_is_refused_naming_what_replaced_it(capsys) -> None:
    from fedscan.simulations.cli import main

    with pytest.raises(ConfigError, match=r"model\.freeze_bn.*removed.*remedy=fixbn"):
        load_config(["model.freeze_bn=true"])
    assert main(["simulate", "model.freeze_bn=false"]) == 2
    assert "removed in fedscan 0.2.0" in capsys.readouterr().err


def test_a_fraction_of_the_sites_needs_min_nodes_at_or_below_it() -> None:
    """min_nodes follows num_sites, and Flower samples at least min_nodes sites: with
    fraction_train=0.5 alone every site would still train each round, silently."""
    with pytest.raises(ConfigError, match=r"federation\.min_nodes.*min_nodes=5 or lower"):
        validate(load_config(["num_sites=10", "federation.fraction_train=0.5"]), "federated")
    with pytest.raises(ConfigError, match=r"fraction_evaluate=0\.5"):
        validate(load_config(["num_sites=4", "federation.fraction_evaluate=0.5"]), "federated")
    ok = ["num_sites=10", "federation.fraction_train=0.5", "federation.min_nodes=5"]
    validate(load_config(ok), "federated")
    validate(load_config(["num_sites=4", "federation.fraction_evaluate=0"]), "federated")


def test_every_recipe_records_its_own_name_and_flwr_run_can_pick_one() -> None:
    """config.yaml names the recipe a run used: each file sets `recipe: <its name>`."""
    from fedscan.common.core.config import overrides_from_run_config

    for name in group_options()["recipe"]:
        assert load_config([f"recipe={name}"]).recipe == name
    picked = overrides_from_run_config({"recipe": "skew", "overrides": "num_sites=5"})
    assert load_config(picked).rounds == 10 and load_config(picked).num_sites == 5
    assert overrides_from_run_config({"recipe": ""}) == []  # empty: the tree's default
