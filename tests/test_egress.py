"""What leaves a site: every reply a ClientApp sends in a simulation, recorded at the
outermost mod, holds the model's exchanged parameters and scalar metrics, nothing else."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message

from fedscan.common.core.config import load_config
from fedscan.common.federated.exchange import exchanged_keys
from fedscan.common.learn.models import build_model
from fedscan.simulations.federated import run_federated
from tests.conftest import SIM_BASE as BASE

IMAGE = 32


def recorder(folder: Path):
    """A mod that writes a summary of each outgoing reply (runs inside Ray actors)."""

    def record(msg: Message, context: Context, call_next) -> Message:
        out = call_next(msg, context)
        c = out.content
        summary = {
            "type": out.metadata.message_type,
            "error": out.has_error(),
            "kinds": sorted(type(r).__name__ for r in c.values()) if out.has_content() else [],
            "arrays": {
                f"{rk}/{k}": [list(a.shape), str(a.dtype), len(a.data)]
                for rk, rec in c.array_records.items()
                for k, a in rec.items()
            },
            "metrics": [
                [f"{rk}/{k}", type(v).__name__, v if isinstance(v, int | float) else repr(v)]
                for rk, rec in c.metric_records.items()
                for k, v in rec.items()
            ],
            "configs": {rk: dict(rec) for rk, rec in c.config_records.items()},
        }
        (folder / f"{uuid.uuid4().hex}.json").write_text(json.dumps(summary, default=str))
        return out

    return record


pytestmark = pytest.mark.usefixtures("_no_real_data")


def test_sites_send_only_parameters_and_scalar_metrics(tmp_path: Path) -> None:
    captured = tmp_path / "egress"
    captured.mkdir()
    overrides = [
        *BASE,
        f"runs_dir={tmp_path / 'runs'}",
        "federation.rounds=2",
        "privacy=dp_sgd",
        "privacy.target_epsilon=8",
    ]
    run_federated(overrides, client_mods=[recorder(captured)])
    replies = [json.loads(p.read_text()) for p in captured.iterdir()]

    cfg = load_config(overrides)
    model = build_model(cfg.model, 4)
    state = model.state_dict()
    keys = exchanged_keys(model, fedbn=False)
    expected = {f"arrays/{k}": list(state[k].shape) for k in keys}
    model_bytes = sum(state[k].numel() * state[k].element_size() for k in keys)

    train = [r for r in replies if r["type"] == "train"]
    evaluate = [r for r in replies if r["type"] == "evaluate"]
    assert len(train) == 4 and len(evaluate) == 4  # 2 sites x 2 rounds
    for r in replies:
        assert not r["error"]
        assert r["configs"] == {}  # no free-form strings leave a site
        for name, kind, value in r["metrics"]:
            assert kind in ("int", "float"), f"{name} is a {kind}: {value}"
            # NaN only for a recall / macro-F1 a site's validation split cannot define
            # (a class it has no image of): undefined, not 0
            assert np.isfinite(value) or "/val_recall_" in name or name.endswith("val_macro_f1")
    for r in train:
        assert r["kinds"] == ["ArrayRecord", "MetricRecord"]
        assert {k: v[0] for k, v in r["arrays"].items()} == expected  # names and shapes
        assert all(dtype == "float32" for _, dtype, _ in r["arrays"].values())
        sent = sum(n for *_, n in r["arrays"].values())  # serialised: raw data + .npy header
        assert model_bytes <= sent <= model_bytes + 256 * len(r["arrays"])
        assert sent + 8 * len(r["metrics"]) < 1.01 * model_bytes
        # nothing the size or shape of an image
        assert not any(shape[-2:] == [IMAGE, IMAGE] for shape, *_ in r["arrays"].values())
        names = {n.split("/", 1)[1] for n, *_ in r["metrics"]}
        assert {"num-examples", "dp_epsilon", "dp_delta", "train_loss"} <= names
    for r in evaluate:
        assert r["kinds"] == ["MetricRecord"] and r["arrays"] == {}


def test_the_statistics_round_sends_sums_only(tmp_path: Path) -> None:
    """``federation.head_init``: each site's query reply holds a (d+1) x (d+1) Gram matrix
    and a (d+1) x C cross-term (Fed3R), or C x d class sums and C counts (FedNCM):
    nothing with a per-image row, nothing with an image's shape."""
    d, classes = 256, 4  # paper_cnn's classifier input; the synthetic brain classes
    expected = {
        "fed3r": {"arrays/gram": [d + 1, d + 1], "arrays/cross": [d + 1, classes]},
        "fedncm": {"arrays/class_sums": [classes, d], "arrays/class_counts": [classes]},
    }
    for kind, shapes in expected.items():
        captured = tmp_path / kind
        captured.mkdir()
        overrides = [
            *BASE,
            f"runs_dir={tmp_path / 'runs'}",
            "rounds=0",
            f"federation.head_init={kind}",
        ]
        run_federated(overrides, client_mods=[recorder(captured)])
        replies = [json.loads(p.read_text()) for p in captured.iterdir()]
        assert [r["type"] for r in replies] == ["query", "query"]  # 2 sites, nothing else
        for r in replies:
            assert not r["error"] and r["configs"] == {}
            assert r["kinds"] == ["ArrayRecord", "MetricRecord"]
            assert {k: v[0] for k, v in r["arrays"].items()} == shapes
            assert all(dtype == "float64" for _, dtype, _ in r["arrays"].values())
            names = {n.split("/", 1)[1] for n, *_ in r["metrics"]}
            assert names == {"num-examples", "partition-id"}
            n_train = next(v for n, _, v in r["metrics"] if n.endswith("num-examples"))
            # no axis as long as the site's sample list: sums, not rows
            assert not any(n_train in shape for shape, *_ in r["arrays"].values())
            assert not any(shape[-2:] == [IMAGE, IMAGE] for shape, *_ in r["arrays"].values())


def test_the_batchnorm_statistics_round_sends_channel_moments_only(tmp_path: Path) -> None:
    """``federation.bn_refit``: each site's query reply holds its image count and, per
    trained BatchNorm layer, one mean and one variance per channel; nothing else."""
    from fedscan.common.federated.bn_stats import bn_layers

    captured = tmp_path / "bn"
    captured.mkdir()
    overrides = [*BASE, f"runs_dir={tmp_path / 'runs'}", "rounds=1", "federation.bn_refit=true"]
    run_federated(overrides, client_mods=[recorder(captured)])
    replies = [json.loads(p.read_text()) for p in captured.iterdir()]
    queries = [r for r in replies if r["type"] == "query"]
    assert len(queries) == 2  # 2 sites, one statistics round
    model = build_model(load_config(overrides).model, 4)
    shapes = {"arrays/bn.count": [1]}
    for name, bn in bn_layers(model, 0).items():
        shapes[f"arrays/{name}.mean"] = shapes[f"arrays/{name}.var"] = [bn.num_features]
    for r in queries:
        assert not r["error"] and r["configs"] == {}
        assert {k: v[0] for k, v in r["arrays"].items()} == shapes
        assert all(dtype == "float64" for _, dtype, _ in r["arrays"].values())
        names = {n.split("/", 1)[1] for n, *_ in r["metrics"]}
        assert names == {"num-examples", "partition-id"}
