"""The site contract: ``SiteTrainer.train(global arrays, round) -> (arrays, metrics)`` and
``evaluate``, without Flower."""

from __future__ import annotations

import math

import pytest
import torch

from fedscan.common.core.config import load_config
from fedscan.common.federated.trainer import SiteState, SiteTrainer, site_seed
from fedscan.common.federated.wire import COUNT_PREFIX, NO_SITE, NUM_EXAMPLES, SITE_ID
from tests.conftest import SIM_BASE

pytestmark = pytest.mark.usefixtures("_no_real_data")


def _trainer(*overrides: str, node: dict | None = None) -> SiteTrainer:
    cfg = load_config([*SIM_BASE, *overrides])
    return SiteTrainer.for_node(cfg, node or {"partition-id": 1, "num-partitions": 2})


def _global(trainer: SiteTrainer) -> dict[str, torch.Tensor]:
    from fedscan.common.federated.exchange import exchanged_keys, get_exchanged

    model = trainer.site.run.model
    return get_exchanged(model, exchanged_keys(model, fedbn=trainer.federation.fedbn))


def test_train_returns_only_exchanged_tensors_and_aggregate_metrics() -> None:
    trainer = _trainer()
    sent = _global(trainer)
    arrays, metrics, _ = trainer.train(sent, rnd=1, state=SiteState())
    assert set(arrays) == set(sent)
    assert any(not torch.equal(arrays[k], sent[k]) for k in sent)  # it trained
    assert metrics[NUM_EXAMPLES] == len(trainer.site.train) and metrics[SITE_ID] == 1
    counts = {k: v for k, v in metrics.items() if k.startswith(COUNT_PREFIX)}
    assert sum(counts.values()) == len(trainer.site.train)
    assert {"train_loss", "train_accuracy", "val_accuracy", "val_macro_f1"} <= set(metrics)
    assert all(isinstance(v, int | float) for v in metrics.values())


def test_a_round_is_reproducible_and_rounds_differ() -> None:
    trainer = _trainer()
    sent = _global(trainer)
    a = trainer.train(sent, rnd=2, state=SiteState()).arrays
    b = trainer.train(sent, rnd=2, state=SiteState()).arrays
    c = trainer.train(sent, rnd=3, state=SiteState()).arrays
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert site_seed(0, 2, 1) != site_seed(0, 3, 1) != site_seed(0, 3, None)


def test_fixbn_holds_the_global_batchnorm_statistics_from_its_round() -> None:
    """``federation.freeze_bn_from=2``: round 1 trains as usual (its BatchNorm statistics
    move); from round 2 they stay the global model's while the weights still train."""
    trainer = _trainer("federation.freeze_bn_from=2")
    sent = _global(trainer)
    stats = [k for k in sent if k.endswith(("running_mean", "running_var"))]
    assert stats
    for rnd, moves in ((1, True), (2, False), (3, False)):
        got = trainer.train(sent, rnd=rnd, state=SiteState()).arrays
        assert any(not torch.equal(sent[k], got[k]) for k in stats) == moves, rnd
        assert any(not torch.equal(sent[k], got[k]) for k in sent if k not in stats)


def test_fixbn_round_must_not_be_negative() -> None:
    from fedscan.common.core.errors import ConfigError
    from fedscan.common.runs.validate import validate

    with pytest.raises(ConfigError, match=r"federation\.freeze_bn_from.*>= 0"):
        validate(load_config([*SIM_BASE, "federation.freeze_bn_from=-1"]), "federated")


def test_fedbn_keeps_batchnorm_at_the_site_across_rounds() -> None:
    trainer = _trainer("federation.fedbn=true")
    sent = _global(trainer)
    state = SiteState()
    arrays = trainer.train(sent, rnd=1, state=state).arrays
    assert state.local_arrays and not set(state.local_arrays) & set(arrays)
    assert all("running_mean" not in k for k in arrays)
    kept = {k: v.clone() for k, v in state.local_arrays.items()}
    before = trainer.evaluate(sent, state=SiteState())
    after = trainer.evaluate(sent, state=state)  # the site's own statistics are used
    assert before["val_loss"] != after["val_loss"]
    assert all(torch.equal(kept[k], state.local_arrays[k]) for k in kept)


def test_evaluate_reports_the_sites_validation_split() -> None:
    trainer = _trainer()
    m = trainer.evaluate(_global(trainer), state=SiteState())
    assert m[NUM_EXAMPLES] == len(trainer.site.val) and m[SITE_ID] == 1
    assert 0.0 <= m["val_accuracy"] <= 1.0


def test_a_deployed_site_reports_no_partition(tmp_path) -> None:
    from fedscan.common.data.datasets.synthetic import generate

    folder = generate(tmp_path / "site", domain="lung_ct", per_class=12, size=32, seed=0)
    trainer = _trainer("dataset.domain=lung_ct", node={"data-path": str(folder)})
    assert trainer.partition_id is None and trainer.site_id == NO_SITE
    metrics = trainer.train(_global(trainer), rnd=1, state=SiteState()).metrics
    assert metrics[SITE_ID] == NO_SITE


def test_a_site_logs_its_round_where_it_runs(caplog) -> None:
    """A fine-tune round takes minutes: the site says what it does, and when it is done."""
    import logging

    trainer = _trainer()
    with caplog.at_level(logging.INFO, logger="fedscan.site"):
        trainer.train(_global(trainer), rnd=3, state=SiteState())
    lines = [r.getMessage() for r in caplog.records if r.name == "fedscan.site"]
    n = len(trainer.site.train)
    assert lines[0] == f"site 1, round 3: training on {n} images, 1 local epoch(s) ..."
    assert lines[-1].startswith("site 1, round 3: done in ")


def test_site_logging_shows_fedscan_lines_in_a_bare_process() -> None:
    """A Ray actor or flwr-clientapp process has no logging set up; the ClientApp adds it."""
    import subprocess
    import sys

    code = (
        "import logging; from fedscan.common.core.logs import configure_site_logging; "
        "configure_site_logging(); "
        "logging.getLogger('fedscan.site').info('site 0, round 1: training'); "
        "logging.getLogger('other').info('not shown')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert "site 0, round 1: training" in out.stderr and "not shown" not in out.stderr


def test_cached_flips_reach_a_fine_tune_site_and_change_its_update() -> None:
    """``train.cached_flips``: the site's first round computes the prefix of its mirrored
    training images (its rows only) and trains on both views; the round stays
    reproducible, and differs from one without flips."""
    ft = ["model=efficientnet_lite0", "model.finetune_blocks=1", "dataset.image_size=64"]
    plain = _trainer(*ft, "train.cached_flips=false")
    flips = _trainer(*ft, "train.cached_flips=true")
    assert plain.site.mirrored(plain.cfg) is None
    mirrored = flips.site.mirrored(flips.cfg)
    assert mirrored is not None and mirrored.rows.tolist() == sorted(flips.site.train)
    assert flips.site.mirrored(flips.cfg) is mirrored  # computed once, kept for later rounds
    sent = _global(flips)
    a = flips.train(sent, rnd=1, state=SiteState()).arrays
    b = flips.train(sent, rnd=1, state=SiteState()).arrays
    c = plain.train(sent, rnd=1, state=SiteState()).arrays
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_a_site_scores_only_the_classes_its_validation_split_holds() -> None:
    """A site of one class (pathological, one class per site) reports that class's recall
    only and a macro-F1 over it, not over four classes three of which it has no image of
    (a macro-F1 of a quarter beside a high accuracy read as a contradiction)."""
    base = [o for o in SIM_BASE if not o.startswith("federation.")]
    one_class = ["num_sites=4", "partition=pathological", "partition.classes_per_site=1"]
    cfg = load_config([*base, *one_class])
    trainer = SiteTrainer.for_node(cfg, {"partition-id": 0, "num-partitions": 4})
    site = trainer.site
    held = sorted({site.run.classes[i] for i in site.labels[site.val]})
    assert len(held) == 1
    m = trainer.evaluate(_global(trainer), state=SiteState())
    assert m["val_classes"] == 1
    recalls = {k[len("val_recall_") :]: v for k, v in m.items() if k.startswith("val_recall_")}
    assert sorted(recalls) == sorted(site.run.classes)  # every site sends every key
    assert sorted(c for c, v in recalls.items() if not math.isnan(v)) == held
    recall = recalls[held[0]]
    # one class: every image is of it, so precision is 1 where anything is predicted as it
    f1 = 2 * recall / (1 + recall) if recall else 0.0
    assert m["val_macro_f1"] == pytest.approx(f1)
    assert m["val_accuracy"] == pytest.approx(recall)
