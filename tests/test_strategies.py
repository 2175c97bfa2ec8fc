"""Server-side aggregation through fedscan's strategies, on hand-made site replies."""

import dataclasses
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.common import MessageType, Metadata

from fedscan.common.core.config import load_config
from fedscan.common.core.errors import ConfigError
from fedscan.common.federated.settings import federation_settings
from fedscan.server.strategies import STRATEGIES, build_strategy

FED = federation_settings(load_config(["dataset=synthetic", "federation.min_nodes=2"]))


def reply(node: int, value: float, n: int, *, shape=(3,)):
    meta = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="x",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": torch.full(shape, value)}),
            "metrics": MetricRecord({"num-examples": n, "train_loss": value}),
        }
    )
    return make_message(metadata=meta, content=content)


def test_fedavg_weights_by_samples_and_records_each_site():
    s = build_strategy({"name": "fedavg"}, FED)
    arrays, metrics = s.aggregate_train(1, [reply(1, 1.0, 30), reply(2, 5.0, 10)])
    # site 1 has 3x the samples, so it weighs 3x: (3*1 + 1*5) / 4 = 2
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 2.0))
    assert metrics["train_loss"] == pytest.approx(2.0)
    rows = s.site_metrics[1]["train"]
    assert sorted((r["node_id"], r["num-examples"]) for r in rows) == [(1, 30), (2, 10)]


def test_non_finite_update_is_dropped(caplog):
    s = build_strategy({"name": "fedavg"}, FED)
    arrays, _ = s.aggregate_train(
        2, [reply(1, 1.0, 10), reply(7, float("nan"), 10), reply(3, 3.0, 10)]
    )
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 2.0))
    assert "update from node 7 rejected" in caplog.text  # no partition, no site-name: its node


def test_median_resists_a_scaled_update():
    s = build_strategy({"name": "fedmedian"}, FED)
    arrays, _ = s.aggregate_train(1, [reply(1, 1.0, 10), reply(2, 1.2, 10), reply(3, 100.0, 10)])
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 1.2), rtol=1e-6)


def test_registry_and_bad_settings():
    assert set(STRATEGIES.names()) >= {
        "fedavg",
        "fedprox",
        "fedadam",
        "fedyogi",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
    }
    assert build_strategy({"name": "fedprox", "mu": 0.1}, FED).proximal_mu == 0.1
    with pytest.raises(ConfigError, match=r"strategy\.name"):
        build_strategy({"name": "fedmagic"}, FED)
    with pytest.raises(ConfigError, match=r"strategy\.mu"):
        build_strategy({"name": "fedprox", "mu": -1}, FED)
    with pytest.raises(ConfigError, match=r"federation\.min_nodes"):
        build_strategy({"name": "fedavg"}, dataclasses.replace(FED, min_nodes=0))


def test_too_few_sites_is_a_clear_error_not_a_hang():
    from fedscan.server.app import wait_for_nodes

    class Grid:
        def get_node_ids(self):
            return [11]

    with pytest.raises(ConfigError, match=r"federation\.min_nodes.*only 1 connected"):
        wait_for_nodes(Grid(), 2, 0.0)
    assert wait_for_nodes(Grid(), 1, 0.0) == 1


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def _named(node: int, arrays: dict, n: int = 10):
    msg = reply(node, 0.0, n)
    msg.content["arrays"] = ArrayRecord(arrays)
    return msg


@pytest.mark.parametrize("name", ["fedavg", "fedmedian", "krum", "fedadam"])
def test_updates_with_wrong_names_shapes_or_values_are_rejected_by_name(name, caplog, monkeypatch):
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):  # set by the ServerApp runtime
        monkeypatch.setattr(TaskIdentity, attr, 1)

    s = build_strategy({"name": name}, FED)
    sent = {"w": torch.zeros(3), "b": torch.zeros(2)}
    s.configure_train(4, ArrayRecord(sent), ConfigRecord(), FakeGrid([1, 2, 3, 4, 5, 6, 7]))
    good = [_named(i, {"w": torch.full((3,), 1.0), "b": torch.ones(2)}) for i in (1, 2, 3)]
    bad = [
        _named(4, {"w": torch.full((3,), float("inf")), "b": torch.ones(2)}),
        _named(5, {"w": torch.ones(4), "b": torch.ones(2)}),  # wrong shape
        _named(6, {"weight": torch.ones(3), "b": torch.ones(2)}),  # wrong name
        _named(7, {"w": torch.ones(3, dtype=torch.float64), "b": torch.ones(2)}),  # wrong dtype
    ]
    arrays, _ = s.aggregate_train(4, good + bad)
    for k in ("w", "b"):
        assert np.isfinite(arrays[k].numpy()).all()
    if name == "fedadam":  # a server-side optimiser step from 0 towards the sites' 1.0
        assert (arrays["b"].numpy() > 0).all()
    else:
        np.testing.assert_allclose(arrays["b"].numpy(), np.ones(2), rtol=1e-5)
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 4
    assert "node 4 rejected: NaN/Inf in 'w'" in lines[0]
    assert "node 5 rejected: 'w' is float32[4], expected float32[3]" in lines[1]
    assert (
        "node 6 rejected: parameter names differ (missing ['w'], unexpected ['weight'])" in lines[2]
    )
    assert "node 7 rejected: 'w' is float64[3]" in lines[3]
    assert [r["node_id"] for r in s.site_metrics[4]["train"]] == [1, 2, 3]


def test_too_few_usable_updates_leave_the_global_model_unchanged(caplog):
    s = build_strategy({"name": "fedavg"}, dataclasses.replace(FED, min_nodes=3))
    arrays, metrics = s.aggregate_train(
        5, [reply(1, 1.0, 10), reply(2, 2.0, 10), reply(3, float("nan"), 10)]
    )
    assert arrays is None and metrics is None  # Flower keeps the previous global arrays
    assert "only 2 usable update(s), fewer than federation.min_nodes=3" in caplog.text


def test_aggregated_site_metrics_sum_counts_drop_ids_and_average_rates() -> None:
    from flwr.app import MetricRecord, RecordDict

    from fedscan.server.strategies import site_metrics

    def reply(n: int, site: int, glioma: int, acc: float) -> RecordDict:
        m = {"num-examples": n, "partition-id": site, "n_train_glioma": glioma, "val_accuracy": acc}
        return RecordDict({"metrics": MetricRecord(m)})

    out = dict(site_metrics([reply(10, 0, 7, 0.5), reply(30, 1, 20, 0.9)], "num-examples"))
    assert out == {"num-examples": 40, "n_train_glioma": 27, "val_accuracy": pytest.approx(0.8)}


def test_aggregated_site_metrics_average_a_rate_over_the_sites_that_report_it() -> None:
    """A site's recall of a class its validation split has no image of is NaN; the
    aggregate of glioma's recall is over the sites that have glioma, not diluted (or
    made NaN) by those that have none."""
    from flwr.app import MetricRecord, RecordDict

    from fedscan.server.strategies import site_metrics

    with_glioma = {"num-examples": 10, "val_accuracy": 0.5, "val_recall_glioma": 0.6}
    without = {"num-examples": 30, "val_accuracy": 0.9, "val_recall_glioma": float("nan")}
    records = [RecordDict({"metrics": MetricRecord(m)}) for m in (with_glioma, without)]
    out = dict(site_metrics(records, "num-examples"))
    assert out["val_recall_glioma"] == pytest.approx(0.6)
    assert out["val_accuracy"] == pytest.approx(0.8)


def _stateful(name: str):
    """A stateful strategy as the server builds it (``adaptive-dp``: FedAvg inside
    Flower's server-side adaptive clipping, whose clipping norm moves every round)."""
    from fedscan.common.federated.privacy import CentralDPSettings
    from fedscan.server.strategies import wrap_central_dp

    if name == "adaptive-dp":
        dp = CentralDPSettings(
            side="server", clipping="adaptive", noise_multiplier=0.1, clipping_norm=0.5
        )
        return wrap_central_dp(build_strategy({"name": "fedavg"}, FED), dp, 3)
    return build_strategy({"name": name}, FED)


def _round(strategy, rnd: int, arrays: dict) -> dict:
    """One round of hand-made replies (each site moves every value by a round- and
    site-dependent step; SCAFFOLD's sites send a control delta too)."""
    from flwr.app import ConfigRecord

    np.random.seed(rnd)  # the DP wrapper's noise: the same draws in both runs
    strategy.configure_train(rnd, ArrayRecord(arrays), ConfigRecord(), FakeGrid([1, 2, 3]))
    replies = []
    for node in (1, 2, 3):
        step = 0.3 * rnd + 0.1 * node
        msg = _named(node, {k: v + step for k, v in arrays.items()}, n=10 * node)
        msg.content["scaffold-dc"] = ArrayRecord(
            {k: torch.full_like(v, step) for k, v in arrays.items()}
        )
        if not isinstance(strategy, STRATEGIES.get("scaffold")):
            msg.content.pop("scaffold-dc")
        replies.append(msg)
    new, _ = strategy.aggregate_train(rnd, replies)
    return new.to_torch_state_dict()


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "scaffold", "adaptive-dp"])
def test_a_resumed_strategy_continues_as_an_uninterrupted_one(name, monkeypatch, tmp_path):
    """Rounds 1-3 in one go, against round 1, the state through a checkpoint file
    (export_state -> torch.save -> a new server process's strategy -> import_state),
    then rounds 2-3: the same global arrays and state to the bit."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedscan.server.strategies import export_state, import_state

    for attr in ("_task_id", "_run_id", "_node_id"):  # set by the ServerApp runtime
        monkeypatch.setattr(TaskIdentity, attr, 1)
    start = {"w": torch.zeros(3), "b": torch.ones(2)}
    whole, arrays = _stateful(name), dict(start)
    for rnd in (1, 2, 3):
        arrays = _round(whole, rnd, arrays)
    cut = _stateful(name)
    resumed = _round(cut, 1, dict(start))
    state = export_state(cut)
    assert state, "a stateful strategy exports its state"
    torch.save({"strategy_state": state}, tmp_path / "last.pt")
    again = _stateful(name)
    import_state(again, torch.load(tmp_path / "last.pt", weights_only=False)["strategy_state"])
    for rnd in (2, 3):
        resumed = _round(again, rnd, resumed)
    for k in arrays:
        assert torch.equal(arrays[k], resumed[k]), (k, arrays[k], resumed[k])
    # ... and the same state to carry on with (SCAFFOLD's c shapes the sites' next
    # training, not this aggregate)
    mine, theirs = export_state(whole), export_state(again)
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        if isinstance(value, dict):
            for k in value:
                np.testing.assert_array_equal(value[k], theirs[key][k], err_msg=f"{key}.{k}")
        else:
            assert value == theirs[key], key


def test_a_renamed_flower_attribute_fails_loudly_at_build(monkeypatch) -> None:
    """The adapter writes FedOpt's m_t / v_t (Flower has no state API): if an upgrade
    renames them, the server refuses to start instead of resuming from scratch."""
    from fedscan.server import strategies

    monkeypatch.setitem(
        strategies.STATE_FIELDS, strategies.FedOpt, ("first_moment", "second_moment")
    )
    with pytest.raises(RuntimeError, match=r"no attribute \['first_moment', 'second_moment'\]"):
        build_strategy({"name": "fedadam"}, FED)


def test_fedadam_keeps_the_global_model_in_the_dtypes_it_was_sent(monkeypatch) -> None:
    """Flower's FedAdam step returns float64 arrays; sent on as the global model, every
    site's float32 update then failed the dtype check, so FedAdam trained in round 1
    only. The aggregate keeps the sent dtypes, and round 2 aggregates both sites."""
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):  # set by the ServerApp runtime
        monkeypatch.setattr(TaskIdentity, attr, 1)
    s = build_strategy({"name": "fedadam"}, FED)
    arrays = {"w": torch.zeros(3), "b": torch.ones(2)}
    for rnd in (1, 2):
        s.configure_train(rnd, ArrayRecord(arrays), ConfigRecord(), FakeGrid([1, 2]))
        replies = [_named(n, {k: v + n for k, v in arrays.items()}) for n in (1, 2)]
        new, _ = s.aggregate_train(rnd, replies)
        assert new is not None and {a.dtype for a in new.values()} == {"float32"}
        arrays = new.to_torch_state_dict()
        assert [r["node_id"] for r in s.site_metrics[rnd]["train"]] == [1, 2]
