"""Secure aggregation (Flower's SecAgg+): the server receives no single site's update,
and the mean it unmasks is the plain weighted FedAvg mean within the quantisation bound."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

import fedscan.client.secagg
import fedscan.client.secure
from fedscan.common.core.config import load_config
from fedscan.common.core.errors import ConfigError
from fedscan.common.federated.secure import (
    quantization_bound,
    scaled_statistics,
    secure_settings,
    statistics_bound,
    weighted_peak,
)
from fedscan.common.federated.wire import MASK_GENERATOR
from fedscan.common.runs.validate import validate
from fedscan.simulations.federated import run_federated
from tests.conftest import SIM_BASE

BASE = [
    "dataset=synthetic",
    *(o for o in SIM_BASE if not o.startswith(("federation.num_sites=", "federation.min_nodes="))),
    "num_sites=3",
    "federation.min_nodes=3",
    "secure_aggregation=secaggplus",
    "tracking=none",
]


def _server_view(received: list[np.ndarray]):
    """An outermost site mod: every array that leaves the site, as the server gets it."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        out = call_next(msg, context)
        if out.has_content():
            c = out.content
            for rec in c.array_records.values():
                received.extend(a.numpy().ravel() for a in rec.values())
            sec = c.config_records.get(RECORD_KEY_CONFIGS)
            if sec is not None and Key.MASKED_PARAMETERS in sec:
                received.extend(bytes_to_ndarray(b).ravel() for b in sec[Key.MASKED_PARAMETERS])
        return out

    return mod


def test_the_server_sees_only_the_masked_sum(tmp_path, monkeypatch) -> None:
    truth: list[tuple[int, list[np.ndarray], dict[str, np.ndarray]]] = []
    real = fedscan.client.secure.legacy_train

    def spy(msg: Message, context: Context, call_next) -> Message:
        """Inside secaggplus_mod: the site's true update, before masking."""
        reply = real(msg, context, call_next)
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        received = {k: v.numpy().copy() for k, v in msg.content["arrays"].items()}
        truth.append((fitres.num_examples, parameters_to_ndarrays(fitres.parameters), received))
        return reply

    monkeypatch.setattr(fedscan.client.secure, "legacy_train", spy)
    received: list[np.ndarray] = []
    overrides = [*BASE, "rounds=1", f"runs_dir={tmp_path}"]
    run_dir = run_federated(overrides, client_mods=[_server_view(received)])

    assert len(truth) == 3
    # No message reaching the server holds any site's update: every array it receives
    # (the masked vectors, one per parameter array) differs from the site's true one
    for _, update, _ in truth:
        assert max(np.abs(u).max() for u in update) > 0
        for u in update:
            same_size = [v for v in received if v.size == u.size]
            assert len(same_size) >= 3, "one masked vector per site for every array"
            for vec in same_size:
                assert not np.allclose(vec.astype(np.float64), u.ravel(), atol=1e-3)
    updates = [np.concatenate([u.ravel() for u in upd]) for _, upd, _ in truth]

    # The unmasked aggregate is plain weighted FedAvg of the same updates
    weights = [n for n, _, _ in truth]
    expected = sum(n * u.astype(np.float64) for n, u in zip(weights, updates, strict=True))
    expected /= sum(weights)
    start = truth[0][2]
    assert all(set(t[2]) == set(start) for t in truth)  # every site got the same weights
    final = torch.load(run_dir / "last.pt", weights_only=False)["arrays"]
    names = list(start)
    got = np.concatenate(
        [(final[k].double().numpy() - start[k].astype(np.float64)).ravel() for k in names]
    )
    bound = quantization_bound(secure_settings(load_config(overrides).secure_aggregation), weights)
    error = np.abs(got - expected).max()
    assert error <= bound, (error, bound)
    # ~3.5e-4 here: 163 images in all against max_weight=2000 (the bound scales with
    # max_weight / total images; brain with 5 sites: about 1e-5)
    assert bound < 1e-3


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (
            ["secure_aggregation.reconstruction_threshold=3"],
            "secure_aggregation.reconstruction_threshold",
        ),
        (["secure_aggregation.num_shares=4"], "secure_aggregation.num_shares"),
        (["strategy=krum"], "strategy"),
        (["strategy=fedmedian"], "strategy"),
        (["strategy=scaffold"], "strategy"),
        (["privacy=central", "privacy.side=server"], "privacy.side"),
        (["privacy=central", "privacy.clipping=adaptive"], "privacy.clipping"),
        (["secure_aggregation.modulus_range=1000"], "secure_aggregation.modulus_range"),
        (["secure_aggregation.mask_generator=flower"], "secure_aggregation.mask_generator"),
    ],
)
def test_bad_secure_settings_fail_before_training(extra, key) -> None:
    cfg = load_config([*BASE, *extra])
    with pytest.raises(ConfigError) as err:
        validate(cfg, "federated")
    assert err.value.key == key
    if key == "strategy":
        assert "secure_aggregation" in str(err.value)


def test_statistics_are_scaled_in_name_order_and_refused_outside_the_range() -> None:
    stats = {"gram": np.array([[512.0, -1024.0]]), "cross": np.array([256.0])}
    names, scaled = scaled_statistics(stats, scale=512, clipping_range=2.0)
    assert names == ["cross", "gram"]
    np.testing.assert_array_equal(scaled[1], [[1.0, -2.0]])
    assert scaled[0].dtype == np.float64
    with pytest.raises(ConfigError) as err:
        scaled_statistics(stats, scale=256, clipping_range=2.0)  # |-1024 / 256| = 4 > 2
    assert err.value.key == "secure_aggregation.statistics_scale"


def test_the_weighted_peak_is_what_secaggplus_clips() -> None:
    update = [np.array([0.5, -3.0]), np.zeros(0), np.array([[1.0]])]
    assert weighted_peak(update, 500, max_weight=2000) == pytest.approx(0.75)
    assert weighted_peak([np.zeros(0)], 10, max_weight=2000) == 0.0


def test_a_baseline_refuses_secure_aggregation() -> None:
    cfg = load_config([*BASE, "method=pooled"])
    with pytest.raises(ConfigError, match="secure_aggregation"):
        validate(cfg, "pooled")


def test_a_site_lost_after_sharing_its_keys_leaves_a_correct_mean_of_the_rest(
    tmp_path, monkeypatch
) -> None:
    """Simulation (in-process sites): site 1 answers the setup and key-sharing stages,
    then fails at the masked-vector stage, as a site that dies mid-round. With
    num_shares=3 and threshold 2, the two others' shares rebuild its pairwise masks."""
    truth: dict[int, tuple[int, np.ndarray]] = {}
    real = fedscan.client.secure.legacy_train

    def dies_at_site_1(msg: Message, context: Context, call_next) -> Message:
        site = int(context.node_config["partition-id"])
        if site == 1:
            raise RuntimeError("site 1 lost after sharing its keys")
        reply = real(msg, context, call_next)
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        flat = np.concatenate([u.ravel() for u in parameters_to_ndarrays(fitres.parameters)])
        start = {k: v.numpy().copy() for k, v in msg.content["arrays"].items()}
        truth[site] = (fitres.num_examples, flat, start)
        return reply

    monkeypatch.setattr(fedscan.client.secure, "legacy_train", dies_at_site_1)
    run_dir = run_federated([*BASE, "rounds=1", f"runs_dir={tmp_path}"])
    assert sorted(truth) == [0, 2]
    weights = [truth[s][0] for s in (0, 2)]
    expected = sum(
        n * u.astype(np.float64) for n, u in ((truth[s][0], truth[s][1]) for s in (0, 2))
    )
    expected /= sum(weights)
    start = truth[0][2]
    final = torch.load(run_dir / "last.pt", weights_only=False)["arrays"]
    got = np.concatenate(
        [(final[k].double().numpy() - start[k].astype(np.float64)).ravel() for k in start]
    )
    cfg = load_config([*BASE])
    assert np.abs(got - expected).max() <= quantization_bound(
        secure_settings(cfg.secure_aggregation), weights
    )
    rows = torch.load(run_dir / "last.pt", weights_only=False)["rounds"][-1]["sites"]["train"]
    assert sorted(r["partition-id"] for r in rows) == [0, 2]  # the lost site is not counted


def _site_1_leaves_before_its_keys(stage: str, seen: dict[str, int]):
    """An outermost site mod: at ``stage``, site 1 either fails (share keys: it dies
    before sharing its keys) or answers as a site on another mask generator would
    (setup: its reply announces none, as an older fedscan or plain Flower site)."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        if int(context.node_config["partition-id"]) != 1 or configs is None:
            return call_next(msg, context)
        if configs.get(Key.STAGE) != stage:
            return call_next(msg, context)
        seen["node"] = int(context.node_id)
        if stage == Stage.SHARE_KEYS:
            raise RuntimeError("site 1 lost before sharing its keys")
        reply = call_next(msg, context)
        del reply.content.config_records[RECORD_KEY_CONFIGS][MASK_GENERATOR]
        return reply

    return mod


@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS])
def test_a_site_that_leaves_before_sharing_its_keys_leaves_a_correct_mean_of_the_rest(
    tmp_path, monkeypatch, caplog, stage
) -> None:
    """Site 1 leaves before any key of it reaches another site: refused by the server
    at setup (it announces no mask generator) or lost at the key-sharing stage. Flower
    alone halts such a round at unmasking (it asks the others for shares of a site
    that never sent any); here the round completes with the two others, named in the
    log, and their mean is right."""
    truth: dict[int, tuple[int, np.ndarray, dict]] = {}
    real = fedscan.client.secure.legacy_train

    def spy(msg: Message, context: Context, call_next) -> Message:
        reply = real(msg, context, call_next)
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        flat = np.concatenate([u.ravel() for u in parameters_to_ndarrays(fitres.parameters)])
        start = {k: v.numpy().copy() for k, v in msg.content["arrays"].items()}
        truth[int(context.node_config["partition-id"])] = (fitres.num_examples, flat, start)
        return reply

    monkeypatch.setattr(fedscan.client.secure, "legacy_train", spy)
    seen: dict[str, int] = {}
    caplog.set_level("INFO", logger="fedscan")
    run_dir = run_federated(
        [*BASE, "rounds=1", f"runs_dir={tmp_path}"],
        client_mods=[_site_1_leaves_before_its_keys(stage, seen)],
    )
    assert sorted(truth) == [0, 2]
    weights = [truth[s][0] for s in (0, 2)]
    expected = sum(truth[s][0] * truth[s][1].astype(np.float64) for s in (0, 2)) / sum(weights)
    start = truth[0][2]
    final = torch.load(run_dir / "last.pt", weights_only=False)
    got = np.concatenate(
        [(final["arrays"][k].double().numpy() - start[k].astype(np.float64)).ravel() for k in start]
    )
    bound = quantization_bound(secure_settings(load_config(BASE).secure_aggregation), weights)
    assert np.abs(got - expected).max() <= bound
    rows = final["rounds"][-1]["sites"]["train"]
    assert sorted(r["partition-id"] for r in rows) == [0, 2]
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "fedscan.server")
    name = "setup" if stage == Stage.SETUP else "share keys"
    assert f"site(s) {seen['node']} left SecAgg+ at the {name} stage, before sharing keys" in text
    if stage == Stage.SETUP:
        assert f"SecAgg+ refuses site {seen['node']}: " in text
        assert "announces no mask generator" in text and "mask_generator" in text
    assert "halted" not in text


def test_sites_refuse_a_server_on_another_generator_and_the_round_halts_by_name(
    tmp_path, monkeypatch, caplog
) -> None:
    """A server that announces no mask generator (an older fedscan, or plain Flower):
    every site refuses at setup, before making a key; the server logs the halted round
    with each site and its reason, and the global model is unchanged."""
    trained: list[int] = []
    real = fedscan.client.secure.legacy_train
    monkeypatch.setattr(
        fedscan.client.secure,
        "legacy_train",
        lambda m, c, n: trained.append(1) or real(m, c, n),
    )
    nodes: set[int] = set()

    def old_server(msg: Message, context: Context, call_next) -> Message:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        if configs is not None and configs.get(Key.STAGE) == Stage.SETUP:
            nodes.add(int(context.node_id))
            del configs[MASK_GENERATOR]
        return call_next(msg, context)

    caplog.set_level("INFO", logger="fedscan")
    run_dir = run_federated([*BASE, "rounds=1", f"runs_dir={tmp_path}"], client_mods=[old_server])
    assert trained == [] and len(nodes) == 3
    halted = [
        r.getMessage()
        for r in caplog.records
        if "SecAgg+ halted at the setup stage" in r.getMessage()
    ]
    assert len(halted) == 1
    for node in nodes:
        assert f"site {node}: " in halted[0]
    assert "secure_aggregation.mask_generator" in halted[0]
    assert "the server announces no mask generator" in halted[0]
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1] and not rounds[0]["sites"].get("train")


@pytest.mark.slow
def test_a_resumed_secure_run_equals_an_uninterrupted_one(tmp_path) -> None:
    whole = run_federated([*BASE, "rounds=2", f"runs_dir={tmp_path / 'whole'}"])
    first = run_federated([*BASE, "rounds=1", f"runs_dir={tmp_path / 'cut'}"])
    resumed = run_federated(
        [*BASE, "rounds=2", f"runs_dir={tmp_path / 'cut'}", f"federation.resume={first}"]
    )
    assert resumed == first
    a = torch.load(whole / "last.pt", weights_only=False)
    b = torch.load(resumed / "last.pt", weights_only=False)
    assert a["round"] == b["round"] == 2
    for k in a["arrays"]:
        torch.testing.assert_close(a["arrays"][k], b["arrays"][k], rtol=0, atol=1e-6)


def test_the_statistics_round_under_secaggplus_sums_within_its_bound(tmp_path, monkeypatch):
    """Fed3R's Gram and cross-term sums through SecAgg+ equal the plain sums within
    :func:`statistics_bound`, and the one-shot head predicts as the plain one does."""
    import fedscan.common.federated.refit
    import fedscan.server.rounds

    totals: dict[str, dict] = {}
    real_sum = fedscan.server.rounds.sum_statistics
    real_solve = fedscan.common.federated.refit.solve_head

    def plain_sum(stats):
        totals["plain"] = real_sum(stats)
        return totals["plain"]

    def solve(kind, total, *, ridge):
        totals.setdefault("secure", total)  # the plain run sums first, the secure one not
        return real_solve(kind, total, ridge=ridge)

    monkeypatch.setattr(fedscan.server.rounds, "sum_statistics", plain_sum)
    monkeypatch.setattr(fedscan.common.federated.refit, "solve_head", solve)
    one_shot = [
        *BASE,
        "rounds=0",
        "model=efficientnet_lite0",
        "model.mode=features",
        "federation.head_init=fed3r",
    ]
    plain = run_federated([*one_shot, "secure_aggregation=off", f"runs_dir={tmp_path / 'p'}"])
    totals.pop("secure")  # the plain run's own solve
    secure = run_federated([*one_shot, f"runs_dir={tmp_path / 's'}"])
    settings = secure_settings(load_config(one_shot).secure_aggregation)
    bound = statistics_bound(settings, sites=3)
    for key in ("gram", "cross"):
        error = np.abs(totals["secure"][key] - totals["plain"][key]).max()
        assert 0 < error <= bound, (key, error, bound)
    first = json.loads((plain / "metrics.json").read_text())["rounds"][0]["global"]
    again = json.loads((secure / "metrics.json").read_text())["rounds"][0]["global"]
    for split in first:
        assert again[split]["confusion_matrix"] == first[split]["confusion_matrix"]


def test_central_dp_under_secaggplus_clips_at_the_sites_and_noises_the_sum(
    tmp_path, monkeypatch
) -> None:
    """privacy=central (client-side fixed clipping) composed with SecAgg+ as Flower's
    fl-dp-sa example does: every update that enters the masked sum has norm <= the
    clipping norm, and the new global model is their mean plus Gaussian noise of
    std noise_multiplier x clipping_norm / sampled sites."""
    truth: list[tuple[int, np.ndarray, dict[str, np.ndarray]]] = []
    real = fedscan.client.secure.legacy_train

    def spy(msg: Message, context: Context, call_next) -> Message:
        reply = real(msg, context, call_next)
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        flat = np.concatenate([u.ravel() for u in parameters_to_ndarrays(fitres.parameters)])
        start = {k: v.numpy().copy() for k, v in msg.content["arrays"].items()}
        truth.append((fitres.num_examples, flat.astype(np.float64), start))
        return reply

    monkeypatch.setattr(fedscan.client.secure, "legacy_train", spy)
    clip, multiplier = 0.5, 0.2
    run_dir = run_federated(
        [
            *BASE,
            "rounds=1",
            "privacy=central",
            f"privacy.clipping_norm={clip}",
            f"privacy.noise_multiplier={multiplier}",
            f"runs_dir={tmp_path}",
        ]
    )
    assert len(truth) == 3
    for _, update, _ in truth:
        assert np.linalg.norm(update) <= clip * (1 + 1e-4)
    weights = [n for n, _, _ in truth]
    mean = sum(n * u for n, u, _ in truth) / sum(weights)
    start = truth[0][2]
    final = torch.load(run_dir / "last.pt", weights_only=False)["arrays"]
    got = np.concatenate(
        [(final[k].double().numpy() - start[k].astype(np.float64)).ravel() for k in start]
    )
    noise = got - mean
    expected_std = multiplier * clip / 3
    assert 0.8 * expected_std < noise.std() < 1.2 * expected_std  # thousands of values


def test_the_head_refit_runs_under_secaggplus_after_the_last_round(tmp_path) -> None:
    """``federation.bn_refit`` and ``head_refit`` under SecAgg+: two more masked rounds
    of sums after the last training round (BatchNorm statistics, then the head's);
    round 1 is recorded again with the refitted model."""
    refit = ["federation.bn_refit=true", "federation.head_refit=fed3r"]
    run_dir = run_federated([*BASE, "rounds=1", *refit, f"runs_dir={tmp_path}"])
    rows = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [1]
    assert len(rows[0]["sites"]["statistics"]) == 3 and rows[0]["before_refit"]
    assert len(rows[0]["sites"]["bn_statistics"]) == 3
    state = torch.load(run_dir / "last.pt", weights_only=False)
    assert state["head_refit_done"] is True


def _shape(doc: dict) -> list:
    """A metrics.json reduced to its structure: round numbers, the keys of every split's
    metrics and of every site's row, per phase (node ids, which Flower draws, left out)."""
    out = []
    for r in doc["rounds"]:
        sites = {
            phase: sorted(sorted(k for k in row if k != "node_id") for row in rows)
            for phase, rows in r["sites"].items()
        }
        out.append((r["round"], {s: sorted(m) for s, m in r["global"].items()}, sites))
    return out


def test_the_secure_and_the_plain_path_write_the_same_run_folder(tmp_path) -> None:
    """One loop for both paths: the same seed gives the same rounds, files, keys and
    site rows; the global model differs only by SecAgg+'s quantisation (within its
    bound), so the test metrics agree to that precision."""
    runs = {
        name: run_federated([*BASE, "rounds=1", extra, f"runs_dir={tmp_path / name}"])
        for name, extra in (("plain", "secure_aggregation=off"), ("secure", "tracking=none"))
    }
    docs = {n: json.loads((r / "metrics.json").read_text()) for n, r in runs.items()}
    assert sorted(p.name for p in runs["plain"].iterdir()) == sorted(
        p.name for p in runs["secure"].iterdir()
    )
    assert _shape(docs["plain"]) == _shape(docs["secure"])
    plain, secure = docs["plain"]["rounds"][0], docs["secure"]["rounds"][0]

    def rows(doc: dict, phase: str) -> dict[int, dict]:
        return {
            r["partition-id"]: {k: v for k, v in r.items() if k != "node_id"}
            for r in doc["sites"][phase]
        }

    # round 1 trains from the same global model: what each site reported is the same
    assert rows(plain, "train") == rows(secure, "train")
    for pid, row in rows(plain, "evaluate").items():  # the sites scored the new global model
        assert rows(secure, "evaluate")[pid]["val_loss"] == pytest.approx(row["val_loss"], abs=1e-3)
    weights = [r["num-examples"] for r in plain["sites"]["train"]]
    bound = quantization_bound(secure_settings(load_config(BASE).secure_aggregation), weights)
    a = torch.load(runs["plain"] / "last.pt", weights_only=False)["arrays"]
    b = torch.load(runs["secure"] / "last.pt", weights_only=False)["arrays"]
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert 0 < worst <= bound, (worst, bound)
    for split, m in plain["global"].items():
        assert secure["global"][split]["n"] == m["n"]
        assert abs(secure["global"][split]["loss"] - m["loss"]) < 1e-3, split
        print(
            split,
            m["accuracy"],
            secure["global"][split]["accuracy"],
            m["loss"],
            secure["global"][split]["loss"],
            worst,
            bound,
        )


def test_secagg_rounding_is_seeded_and_numpys_global_generator_is_left_as_it_was(
    monkeypatch,
) -> None:
    """Flower's quantisation draws its stochastic rounding from numpy's global generator.
    The site seeds it (from the round and the site) just before, as it always did, so
    the draws, and the figures of SecAgg+ runs, are unchanged; and puts the state back
    when the mod returns, so in-process the server and the other sites never draw from
    a reseeded generator."""
    import time
    import zlib

    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
    from flwr.app.message.message import make_message
    from flwr.common import FitIns, MessageType, Metadata, ndarrays_to_parameters

    drawn: list[np.ndarray] = []

    def secaggplus_stage(msg: Message, context: Context, call_next) -> Message:
        """Flower's mod at the masked-vector stage: the site's fit, then quantize's draws."""
        reply = call_next(msg, context)
        drawn.append(np.random.rand(4))
        return reply

    def site(msg: Message, context: Context) -> Message:
        arrays = {"w": torch.full((3,), 0.5)}
        metrics = MetricRecord({"num-examples": 10})
        return Message(
            RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg
        )

    monkeypatch.setattr(fedscan.client.secagg, "secaggplus_mod", secaggplus_stage)
    config = {"fedscan-keys": json.dumps(["w"]), "server-round": 2}
    content = compat.fitins_to_recorddict(
        FitIns(ndarrays_to_parameters([np.zeros(3)]), config), keep_input=True
    )
    content[RECORD_KEY_CONFIGS] = ConfigRecord({})
    meta = Metadata(
        run_id=1, message_id="m", src_node_id=0, dst_node_id=5, reply_to_message_id="",
        group_id="2", created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN,
    )  # fmt: skip
    context = Context(
        run_id=1, node_id=5, node_config={"partition-id": 1}, state=RecordDict(), run_config={}
    )
    np.random.seed(7)
    before = np.random.get_state()
    untouched = np.random.rand(3)
    np.random.set_state(before)
    fedscan.client.secure.secure_mod(make_message(metadata=meta, content=content), context, site)
    assert np.array_equal(np.random.rand(3), untouched)  # the process's state, as it was
    np.random.seed(zlib.crc32(b"fedscan-secagg-rounding:2:1"))  # round 2, site 1
    np.testing.assert_array_equal(drawn[0], np.random.rand(4))  # the rounding, as before
