"""DP-SGD at a site: settings, accounting across rounds, model fixes, budget stop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from fedscan.common.core.errors import ConfigError
from fedscan.common.federated.privacy import (
    BudgetExhausted,
    PrivacyLedger,
    dp_local_fit,
    dp_settings,
    planned_noise,
    steps_per_epoch,
)
from fedscan.common.learn.models import build_model, make_dp_compatible
from fedscan.common.learn.models.staged import InputAdapter, StagedModel, set_trainable
from tests.conftest import tree_dp_settings, tree_privacy, tree_train_settings

CPU = torch.device("cpu")


def test_epsilon_of_a_known_schedule_is_opacus_rdp() -> None:
    ledger = PrivacyLedger([(1.1, 0.01, 1000)])
    assert ledger.epsilon(1e-5) == pytest.approx(1.7117700912203435, rel=1e-12)
    ref = RDPAccountant()
    ref.history = [(1.1, 0.01, 1000)]
    assert ledger.epsilon(1e-5) == ref.get_epsilon(delta=1e-5)


def test_three_rounds_of_kept_history_equal_one_accountant_over_all_steps() -> None:
    ledger = PrivacyLedger()
    for _ in range(3):  # what each round's fresh engine appends
        ledger = PrivacyLedger.from_dict(ledger.to_dict())  # saved and reloaded between rounds
        ledger.history.append((1.1, 0.01, 1000))
    assert ledger.steps == 3000
    assert ledger.epsilon(1e-5) == pytest.approx(2.9331430686142665, rel=1e-12)
    one_round = PrivacyLedger([(1.1, 0.01, 1000)]).epsilon(1e-5)
    assert ledger.epsilon(1e-5) > 1.5 * one_round  # what a per-round engine would under-report


def test_planned_noise_spends_the_target_over_the_planned_epochs() -> None:
    dp = tree_dp_settings(target_epsilon=3.0, delta=1e-4)
    sigma = planned_noise(dp, n_train=500, batch_size=25, epochs_total=6, delta=1e-4)
    steps = steps_per_epoch(500, 25)
    eps = PrivacyLedger([(sigma, 1 / steps, steps * 6)]).epsilon(1e-4)
    assert 2.9 < eps <= 3.0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("target_epsilon", 0, "privacy.target_epsilon.*must be > 0"),
        ("target_epsilon", -1, "privacy.target_epsilon"),
        ("delta", 1.0, r"privacy.delta.*\(0, 1\)"),
        ("max_grad_norm", 0, "privacy.max_grad_norm.*must be > 0"),
        ("noise_multiplier", -0.5, "privacy.noise_multiplier"),
        ("accountant", "moments", "privacy.accountant"),
        ("target_epsilon", "lots", "privacy.target_epsilon.*expected a number"),
        ("epsilon", 3, "privacy.epsilon.*unknown key"),
        ("batchnorm", "batch", "privacy.batchnorm.*group.*frozen"),
        ("noise_seed", "fixed", "privacy.noise_seed.*secret.*run"),
    ],
)
def test_bad_dp_settings_name_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dp_settings(tree_privacy("dp_sgd", **{key: value}))


def test_privacy_off_has_no_settings() -> None:
    assert dp_settings({"name": "off"}) is None


def _batchnorm_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in module.modules())


def test_batchnorm_model_is_fixed_only_where_it_trains() -> None:
    cfg = {"name": "efficientnet_lite0", "mode": "finetune", "finetune_blocks": 2}
    plain = build_model(cfg, 3)
    fixed = build_model({**cfg, "dp_compatible": True}, 3)
    cut = fixed.frozen_until
    assert _batchnorm_count(fixed.stages[cut:]) == 0 < _batchnorm_count(plain.stages[cut:])
    # the frozen pretrained trunk keeps its BatchNorm, so its cached features stay valid
    assert _batchnorm_count(fixed.stages[:cut]) == _batchnorm_count(plain.stages[:cut]) > 0
    assert not any(getattr(m, "inplace", False) for m in fixed.stages[cut:].modules())
    assert all(
        p.requires_grad == (i >= cut) for i, s in enumerate(fixed.stages) for p in s.parameters()
    )


def _site(n: int = 96, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    x = rng.integers(0, 60, (n, size, size), dtype=np.uint8)
    for i, y in enumerate(labels):  # a learnable signal: a bright square per class
        x[i, 2 + 4 * y : 6 + 4 * y, 4:10] = 220
    return x, labels


def test_batchnorm_cnn_trains_under_dp_and_rounds_accumulate() -> None:
    model = build_model({"name": "paper_cnn", "mode": "scratch", "dp_compatible": True}, 3)
    assert _batchnorm_count(model) == 0
    x, labels = _site()
    idx = np.arange(len(labels))
    settings = tree_train_settings(batch_size=16, lr=0.01)
    dp = tree_dp_settings(
        target_epsilon=5.0, delta=1e-3, max_grad_norm=1.0, max_physical_batch_size=8
    )
    ledger = PrivacyLedger()
    before = [p.detach().clone() for p in model.parameters()]
    eps = []
    for rnd in range(3):
        r = dp_local_fit(
            model, x, labels, idx, settings, dp, ledger,
            device=CPU, start=0, epochs=1, epochs_total=3, seed=rnd,
        )  # fmt: skip
        assert np.isfinite(r.loss) and r.delta == 1e-3
        eps.append(r.epsilon)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert eps[0] < eps[1] < eps[2] <= 5.0 * 1.001
    steps = steps_per_epoch(96, 16)
    assert ledger.steps == 3 * steps
    one = PrivacyLedger([(r.noise_multiplier, 1 / steps, 3 * steps)]).epsilon(1e-3)
    assert eps[2] == pytest.approx(one, rel=1e-9)
    # A fourth round was not planned: the budget stops it before any training.
    snapshot = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(BudgetExhausted, match="privacy budget spent: epsilon"):
        dp_local_fit(
            model, x, labels, idx, settings, dp, ledger,
            device=CPU, start=0, epochs=1, epochs_total=3, seed=9,
        )  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.parameters(), strict=True))
    assert ledger.steps == 3 * steps  # nothing spent


class _Scaled(nn.Module):
    """A trainable layer with a buffer: Opacus has no per-sample gradient for it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight * self.scale


def test_a_model_opacus_cannot_fix_is_a_config_error() -> None:
    stages = [
        ("input", InputAdapter(1, [0.5], [0.5])),
        ("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 3))),
        ("classifier", _Scaled()),
    ]
    model = set_trainable(StagedModel("odd", stages, 3), 0)
    with pytest.raises(
        ConfigError, match=r"model\.name.*Opacus cannot make odd stage 'classifier'"
    ):
        make_dp_compatible(model)


# ------------------------------------------------------------ in a federation


@pytest.mark.usefixtures("_no_real_data")
def test_dp_federation_accounts_per_site_across_rounds_and_a_resume_stops_at_the_budget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedscan.simulations.federated import run_federated
    from tests.conftest import SIM_BASE as BASE

    dp = [*BASE, f"runs_dir={tmp_path}", "privacy=dp_sgd", "privacy.target_epsilon=4"]
    run = run_federated([*dp, "federation.rounds=2"])
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    for pid in (0, 1):
        eps = [next(s for s in r["sites"]["train"] if s["partition-id"] == pid) for r in rounds]
        assert 0 < eps[0]["dp_epsilon"] < eps[1]["dp_epsilon"] <= 4 * 1.001
        assert eps[1]["dp_budget_spent"] == 0 and eps[1]["dp_delta"] < 1 / eps[1]["num-examples"]
        ledger = PrivacyLedger.load(run / "site-privacy" / f"site-{pid}.json")
        assert ledger.epsilon(eps[1]["dp_delta"]) == pytest.approx(eps[1]["dp_epsilon"])
    before = torch.load(run / "last.pt", weights_only=False)["arrays"]

    # One round more than planned: both sites refuse to train, the model stays as it was.
    run_federated([*dp, "federation.rounds=3", f"federation.resume={run}"])
    third = json.loads((run / "metrics.json").read_text())["rounds"][-1]
    assert third["round"] == 3
    assert [s["dp_budget_spent"] for s in third["sites"]["train"]] == [1, 1]
    assert all(s["num-examples"] == 0 for s in third["sites"]["train"])
    after = torch.load(run / "last.pt", weights_only=False)["arrays"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def _round_one_update(run: Path, initial: dict[str, torch.Tensor]) -> np.ndarray:
    """The global model's change in round 1, flattened (what the server's aggregate did)."""
    after = torch.load(run / "last.pt", weights_only=False)["arrays"]
    return np.concatenate([(after[k] - initial[k]).double().flatten().numpy() for k in initial])


@pytest.fixture(scope="module")
def plain_round(tmp_path_factory: pytest.TempPathFactory):
    """One FedAvg round without DP, and the initial global model it started from."""
    from fedscan.common.core.config import load_config
    from fedscan.common.federated.exchange import exchanged_keys, get_exchanged
    from fedscan.common.learn.prepare import prepare_run
    from fedscan.simulations.federated import run_federated
    from tests.conftest import SIM_BASE

    mp = pytest.MonkeyPatch()
    mp.delenv("FEDSCAN_DATA", raising=False)
    base = [*SIM_BASE, "federation.rounds=1", "federation.fraction_evaluate=0"]
    model = prepare_run(load_config(base)).model  # the server's seeded initial model
    initial = get_exchanged(model, exchanged_keys(model))
    run = run_federated([*base, f"runs_dir={tmp_path_factory.mktemp('plain')}"])
    yield base, initial, _round_one_update(run, initial)
    mp.undo()


@pytest.mark.usefixtures("_no_real_data")
@pytest.mark.parametrize("side", ["client", "server"])
def test_central_dp_clips_and_noises_updates(tmp_path: Path, side: str, plain_round) -> None:
    """Against the same round without DP: with noise 0 the aggregate update is clipped to
    the norm (each site's is, so their average is); with noise it differs from the
    noise-free one by Gaussian noise of Flower's std (noise x norm / sampled sites)."""
    from fedscan.simulations.federated import run_federated

    base, initial, plain = plain_round
    norm = float(np.linalg.norm(plain)) / 4  # well below what the sites' updates are
    dp = [*base, "privacy=central", f"privacy.side={side}", f"privacy.clipping_norm={norm}"]
    clipped = _round_one_update(
        run_federated([*dp, "privacy.noise_multiplier=0", f"runs_dir={tmp_path / 'a'}"]), initial
    )
    assert np.linalg.norm(clipped) <= norm * (1 + 1e-4)
    assert np.linalg.norm(plain) > 3.9 * norm
    cos = clipped @ plain / (np.linalg.norm(clipped) * np.linalg.norm(plain))
    assert cos > 0.9  # clipping scales the sites' updates; it does not replace them

    # small noise: Flower adds it to every exchanged tensor, BatchNorm variances included
    expected = 0.01  # Flower's std: noise_multiplier * clipping_norm / sampled sites
    multiplier = expected * 2 / norm
    noisy = _round_one_update(
        run_federated(
            [*dp, f"privacy.noise_multiplier={multiplier}", f"runs_dir={tmp_path / 'b'}"]
        ),
        initial,
    )
    noise = noisy - clipped
    assert abs(noise.mean()) < 5 * expected / np.sqrt(noise.size)
    assert noise.std() == pytest.approx(expected, rel=0.05)


@pytest.mark.usefixtures("_no_real_data")
def test_bad_dp_setting_stops_a_simulation_before_it_starts(tmp_path: Path) -> None:
    from fedscan.simulations.federated import run_federated
    from tests.conftest import SIM_BASE as BASE

    with pytest.raises(ConfigError, match=r"privacy\.max_grad_norm"):
        run_federated([*BASE, f"runs_dir={tmp_path}", "privacy=dp_sgd", "privacy.max_grad_norm=0"])
    assert not any(tmp_path.iterdir())  # no run folder: nothing started


# ------------------------------------------------- the noise and the accountant


def _linear_site(
    n: int, d: int, k: int, *, bias: bool = False
) -> tuple[StagedModel, np.ndarray, np.ndarray]:
    """Feature mode in miniature: cached features [n, d] into a zero linear head."""
    stages = [("input", nn.Identity()), ("classifier", nn.Linear(d, k, bias=bias))]
    model = set_trainable(StagedModel("linear", stages, k), 1)
    nn.init.zeros_(model.stages[1].weight)
    x = np.zeros((n, d), np.float32)
    return model, x, np.zeros(n, np.int64)


def test_the_noise_added_is_the_calibrated_multiplier_times_the_clip_norm() -> None:
    """One full-batch step from a zero head on identical samples: every per-sample
    gradient is the same vector, clipped to norm C, so the update is
    -lr x (C g/|g| + N(0, sigma^2 C^2) / B). What is left after the clipped mean must
    be Gaussian with std sigma x C / B, sigma the multiplier planned for the target."""
    n, d, k, clip, lr = 64, 2048, 8, 0.5, 2.0
    model, x, labels = _linear_site(n, d, k)
    x[:] = 10.0 / np.sqrt(d)  # norm 10: the per-sample gradient (|p - y| x 10) is clipped
    settings = tree_train_settings(
        batch_size=n, lr=lr, optimizer="sgd", weight_decay=0.0, label_smoothing=0.0
    )
    dp = tree_dp_settings(target_epsilon=3.0, delta=1e-3, max_grad_norm=clip)
    idx = np.arange(n)
    before = model.stages[1].weight.detach().clone()
    r = dp_local_fit(
        model, x, labels, idx, settings, dp, PrivacyLedger(),
        device=CPU, start=1, epochs=1, epochs_total=1, seed=0,
    )  # fmt: skip
    sigma = planned_noise(dp, n_train=n, batch_size=n, epochs_total=1, delta=1e-3)
    assert r.noise_multiplier == sigma and r.steps == 1
    step = -(model.stages[1].weight.detach() - before).double() / lr  # the privatised gradient
    p_minus_y = torch.full((k,), 1.0 / k, dtype=torch.float64)
    p_minus_y[0] -= 1.0
    g = torch.outer(p_minus_y, torch.from_numpy(x[0]).double())  # every sample's gradient
    residual = (step - clip * g / g.norm()).flatten().numpy()
    expected = sigma * clip / n  # Opacus: (sum of clipped + N(0, sigma^2 C^2)) / B
    m = residual.size
    assert abs(residual.mean()) < 5 * expected / np.sqrt(m)
    # the sample std of m Gaussian draws has relative standard error 1 / sqrt(2 m)
    assert residual.std() == pytest.approx(expected, rel=6 / np.sqrt(2 * m))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_the_run_long_epsilon_is_opacus_accountant_over_every_step_taken(
    accountant: str,
) -> None:
    """Three rounds, each with a fresh PrivacyEngine resumed from the ledger; Opacus'
    own accountant, stepped once per step actually taken, gives the same epsilon,
    and it spends the planned target (Opacus' search stops within 0.01 below it)."""
    from opacus.accountants import create_accountant

    n, batch, rounds, delta, target = 64, 16, 3, 1e-3, 2.0
    model, x, labels = _linear_site(n, 32, 3, bias=True)
    x[:] = np.random.default_rng(0).normal(size=x.shape)
    settings = tree_train_settings(batch_size=batch, lr=0.1, optimizer="sgd")
    dp = tree_dp_settings(target_epsilon=target, delta=delta, accountant=accountant)
    ledger = PrivacyLedger([], accountant)
    for rnd in range(rounds):
        r = dp_local_fit(
            model, x, labels, np.arange(n), settings, dp, ledger,
            device=CPU, start=1, epochs=1, epochs_total=rounds, seed=rnd,
        )  # fmt: skip
    reference = create_accountant(accountant)
    for _ in range(rounds * steps_per_epoch(n, batch)):
        reference.step(noise_multiplier=r.noise_multiplier, sample_rate=batch / n)
    assert r.steps == rounds * n // batch
    assert r.epsilon == pytest.approx(reference.get_epsilon(delta=delta), rel=1e-6)
    assert target - 0.011 <= r.epsilon <= target * 1.001


# ----------------------------------------------------------- plans that cannot work


@pytest.mark.usefixtures("_no_real_data")
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        # (a clip norm <= 0: test_bad_dp_setting_stops_a_simulation_before_it_starts)
        # no noise multiplier reaches it (Opacus' search gives up at sigma 1e6)
        (["privacy.target_epsilon=1e-7"], r"privacy\.target_epsilon.*cannot be reached"),
        # a fixed noise that would spend the budget before the planned rounds end
        (
            ["privacy.noise_multiplier=0.3", "federation.rounds=5"],
            r"privacy\.noise_multiplier.*more than privacy\.target_epsilon=8",
        ),
        # a multiplier PRV cannot bound (its grid would need 209 GiB), epsilon only reported
        (
            [
                "privacy.noise_multiplier=0.001",
                "privacy.target_epsilon=null",
                "privacy.accountant=prv",
            ],
            r"privacy\.accountant.*prv accountant cannot bound noise multiplier 0\.001",
        ),
    ],
)
def test_a_dp_plan_that_cannot_work_stops_a_simulation_before_it_starts(
    tmp_path: Path, overrides: list[str], key: str
) -> None:
    from fedscan.simulations.federated import run_federated
    from tests.conftest import SIM_BASE as BASE

    with pytest.raises(ConfigError, match=key):
        run_federated([*BASE, f"runs_dir={tmp_path}", "privacy=dp_sgd", *overrides])
    assert not any(tmp_path.iterdir())  # no run folder: nothing started


def test_a_site_refuses_an_unreachable_plan_before_its_first_step() -> None:
    """In deployment only the site knows its size: the same check, before training."""
    model, x, labels = _linear_site(40, 8, 2)
    before = model.stages[1].weight.detach().clone()
    dp = tree_dp_settings(target_epsilon=1e-7, delta=1e-3)
    with pytest.raises(ConfigError, match=r"privacy\.target_epsilon.*40 training samples"):
        dp_local_fit(
            model, x, labels, np.arange(40), tree_train_settings(batch_size=8), dp,
            PrivacyLedger(), device=CPU, start=1, epochs=1, epochs_total=2,
        )  # fmt: skip
    assert torch.equal(before, model.stages[1].weight)


# ----------------------------------------------------- what the recipe adds


def test_l2_feature_norm_is_the_classifiers_first_module_and_scale_free() -> None:
    from fedscan.common.federated.head_init import classifier_features, linear_head
    from fedscan.common.learn.models.staged import L2Normalize

    cfg = {"name": "efficientnet_lite0", "mode": "features", "feature_norm": "l2"}
    model = build_model(cfg, 4).eval()
    assert isinstance(model.stages[-1][0], L2Normalize)
    assert linear_head(model) is model.stages[-1][-1]  # Fed3R / FedNCM still find the head
    feats = torch.rand(5, 1280) * 3
    cut = model.frozen_until
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_from(feats, cut), model.forward_from(7.5 * feats, cut)
        )
    # the closed-form heads are solved on what the linear layer sees: unit-norm rows
    rows = classifier_features(model, feats.numpy(), np.arange(5), start=cut, device=CPU)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ConfigError, match=r"model\.feature_norm"):
        build_model({**cfg, "feature_norm": "l1"}, 4)


@pytest.mark.usefixtures("_no_real_data")
@pytest.mark.parametrize("feature_norm", ["l2", "centred"])
def test_the_exported_model_normalises_its_features(tmp_path: Path, feature_norm: str) -> None:
    """A trained run with feature_norm=l2 (centred), exported: the package predicts what
    the model with its normalisation (and its installed centre) does, not what it would
    without them."""
    from fedscan.common.core.config import load_config
    from fedscan.common.learn.models.staged import L2Normalize
    from fedscan.deploy.export import export_run, load_run_model
    from fedscan.deploy.package import ModelPackage
    from fedscan.simulations.centralised import run_centralised

    cfg = load_config(
        [
            "dataset=synthetic",
            "dataset.image_size=32",
            "model.mode=features",
            f"model.feature_norm={feature_norm}",
            "train.epochs=1",
            "tracking=none",
            f"runs_dir={tmp_path}",
        ]
    )
    run = run_centralised(cfg)
    package = ModelPackage(export_run(run, fmt="torchscript"))
    model, _ = load_run_model(run)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    batch = torch.from_numpy(np.stack([package.prepare(im) for im in images]))
    with torch.no_grad():
        with_norm = torch.softmax(model(batch), 1).numpy()
        if feature_norm == "centred":  # the pooled run's centre is in the package
            norm = model.stages[-1][0]
            assert norm.centre.norm() > 0.1
            centre = norm.centre.clone()
            norm.centre.zero_()
            assert np.abs(torch.softmax(model(batch), 1).numpy() - with_norm).max() > 1e-3
            norm.centre.copy_(centre)
        model.stages[-1][0] = nn.Identity()
        assert not any(isinstance(m, L2Normalize) for m in model.modules())
        without = torch.softmax(model(batch), 1).numpy()
    np.testing.assert_allclose(package.probabilities(batch.numpy()), with_norm, atol=1e-5)
    assert np.abs(without - with_norm).max() > 1e-3


class _BNBlock(nn.Module):
    """conv -> BatchNorm -> ReLU, with a record of the mode BatchNorm ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)
        self.modes: list[bool] = []
        self.bn.register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, _: object) -> None:
        self.modes.append(module.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def _bn_model(frozen: bool) -> StagedModel:
    torch.manual_seed(0)
    stages = [
        ("input", InputAdapter(1, [0.5], [0.5])),
        ("block", _BNBlock()),
        ("classifier", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))),
    ]
    model = set_trainable(StagedModel("bn", stages, 3), 1)
    with torch.no_grad():  # "pretrained" statistics and affine
        bn = model.stages[1].bn
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    model.bn_frozen = frozen
    return make_dp_compatible(model)


def test_frozen_batchnorm_stays_frozen_and_in_eval_mode_under_dp_sgd() -> None:
    """The frozen-BatchNorm route: Opacus accepts it (its validators see only trainable
    modules), the convolution and head train privately, and BatchNorm normalises with
    its stored statistics in every step, changing nothing of its own."""
    model = _bn_model(frozen=True)
    bn = model.stages[1].bn
    assert isinstance(bn, nn.BatchNorm2d) and not any(p.requires_grad for p in bn.parameters())
    assert model.stages[1].conv.weight.requires_grad
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    conv = model.stages[1].conv.weight.detach().clone()
    x, labels = _site(n=48)
    settings = tree_train_settings(batch_size=16, lr=0.05)
    dp = tree_dp_settings(target_epsilon=5.0, delta=1e-3, max_physical_batch_size=8)
    dp_local_fit(
        model, x, labels, np.arange(48), settings, dp, PrivacyLedger(),
        device=CPU, start=0, epochs=2, epochs_total=2, seed=0,
    )  # fmt: skip
    modes = model.stages[1].modes
    assert modes and not any(modes)  # every private forward pass: eval mode
    assert all(torch.equal(v, bn.state_dict()[k]) for k, v in state.items())
    assert not torch.equal(conv, model.stages[1].conv.weight)
    # the GroupNorm route of the same model swaps it instead
    swapped = _bn_model(frozen=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in swapped.stages[1].modules())


def test_a_batchnorm_that_would_mix_samples_is_refused() -> None:
    from fedscan.common.learn.models.dp import check_no_batch_mixing

    model = _bn_model(frozen=True)
    check_no_batch_mixing(model.stages[1].eval())  # frozen and in eval mode: accepted
    model.stages[1].bn.train()  # frozen parameters, but batch statistics: Opacus would pass it
    with pytest.raises(RuntimeError, match=r"BatchNorm layers.*bn"):
        check_no_batch_mixing(model.stages[1])


def _dp_finetune_model(*overrides: str) -> StagedModel:
    """EfficientNet-Lite0 with 2 trainable blocks under privacy=dp_sgd, built from the
    config tree as the server and the sites build it."""
    from fedscan.common.core.config import load_config

    base = ["dataset=synthetic", "privacy=dp_sgd", "model.mode=finetune"]
    cfg = load_config([*base, "model.finetune_blocks=2", *overrides], check_data=False)
    return build_model(cfg.model, 4)


def test_efficientnet_with_frozen_batchnorm_passes_opacus_validation() -> None:
    """privacy.batchnorm=frozen reaches the model through the tree: BatchNorm kept,
    its parameters fixed, Opacus' validators content; group (default) swaps it."""
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    model = _dp_finetune_model("privacy.batchnorm=frozen")
    assert model.bn_frozen
    cut = model.frozen_until
    trainable = nn.Sequential(*model.stages[cut:]).train()
    bns = [m for m in trainable.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) >= 4  # block6's and the head's BatchNorm are kept, not swapped
    assert not any(p.requires_grad for m in bns for p in m.parameters())
    assert ModuleValidator.validate(trainable, strict=False) == []
    assert GradSampleModule.validate(trainable, strict=False) == []
    assert any(p.requires_grad for p in trainable.parameters())  # the convolutions train
    group = _dp_finetune_model()
    assert not group.bn_frozen
    assert _batchnorm_count(nn.Sequential(*group.stages[group.frozen_until :])) == 0


def test_bad_batchnorm_routes_are_config_errors_naming_privacy_batchnorm() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.batchnorm.*group.*frozen.*got 'eval'"):
        _dp_finetune_model("privacy.batchnorm=eval")
    with pytest.raises(ConfigError, match=r"privacy\.batchnorm.*pretrained"):
        build_model({"name": "paper_cnn", "dp_compatible": True, "dp_batchnorm": "frozen"}, 4)
    # the removed non-private knob stays refused, with its reason
    from fedscan.common.core.config import load_config

    with pytest.raises(ConfigError, match=r"model\.freeze_bn.*removed"):
        load_config(["dataset=synthetic", "privacy=dp_sgd", "model.freeze_bn=true"])


def test_a_dp_checkpoint_records_the_batchnorm_route_resolved(tmp_path: Path) -> None:
    """model.dp_batchnorm is an interpolation of privacy.batchnorm: model.pt holds its
    value, so an export rebuilds the same architecture without the privacy group."""
    from fedscan.common.core.config import load_config
    from fedscan.common.runs.record import write_model

    cfg = load_config(
        ["dataset=synthetic", "privacy=dp_sgd", "privacy.batchnorm=frozen"], check_data=False
    )
    path = write_model(tmp_path, nn.Linear(2, 2), cfg)
    saved = torch.load(path, weights_only=False)["model"]
    assert saved["dp_batchnorm"] == "frozen" and saved["dp_compatible"] is True


def test_recipe_dp_is_private_and_the_command_line_still_wins() -> None:
    from fedscan.common.core.config import load_config

    cfg = load_config(["dataset=synthetic", "recipe=dp"])
    assert cfg.privacy.name == "dp_sgd" and cfg.model.dp_compatible
    assert (cfg.model.mode, cfg.model.feature_norm) == ("features", "centred")
    assert dp_settings(cfg.privacy) is not None  # a complete, valid privacy section
    # the recipe overrides the tree; the command line overrides the recipe
    assert load_config(["dataset=synthetic", "recipe=dp", "train.lr=0.123"]).train.lr == 0.123
    assert cfg.recipe == "dp" and cfg.privacy.batchnorm == "group"
    twin = load_config(["dataset=synthetic", "recipe=dp", "privacy=off"])
    assert twin.privacy.name == "off" and dp_settings(twin.privacy) is None
    assert (twin.model.feature_norm, twin.train.lr) == ("centred", cfg.train.lr)  # the same model


def _noised_head(noise_seed: str) -> torch.Tensor:
    """One private round of a linear head from zero, same data and run seed each time."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 48)
    x = rng.normal(size=(48, 6)).astype(np.float32)
    model = make_dp_compatible(StagedModel("head", [("classifier", nn.Linear(6, 3))], 3))
    nn.init.zeros_(model.stages[0].weight)
    dp = tree_dp_settings(target_epsilon=8.0, delta=1e-3, noise_seed=noise_seed)
    dp_local_fit(
        model, x, labels, np.arange(48), tree_train_settings(batch_size=16, lr=0.5), dp,
        PrivacyLedger(), device=CPU, start=0, epochs=2, epochs_total=2, seed=7,
    )  # fmt: skip
    return model.stages[0].weight.detach().clone()


def test_the_noise_is_secret_unless_a_reproducible_run_is_asked_for() -> None:
    """privacy.noise_seed=secret (the default): the same site, data and run seed give
    different private weights each time, since the run's seed is in the config the
    coordinator writes and must not determine the noise; =run repeats them exactly."""
    assert tree_dp_settings().noise_seed == "secret"
    assert not torch.equal(_noised_head("secret"), _noised_head("secret"))
    assert torch.equal(_noised_head("run"), _noised_head("run"))
