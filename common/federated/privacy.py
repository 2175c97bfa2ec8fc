"""Sample-level differential privacy at a site: DP-SGD with Opacus, accounted over a run.

Three concerns, kept apart (the Opacus habit):

* **Settings** (:class:`DPSGDSettings`): validated before any training, errors
  name the ``privacy.*`` key.
* **Accounting state** (:class:`PrivacyLedger`): the list of
  ``(noise_multiplier, sample_rate, steps)`` a site has spent, across rounds.
  Flower's Opacus example builds a new ``PrivacyEngine`` every round, so the
  epsilon it reports covers one round; the ledger is loaded into each round's
  engine and saved after it, so the epsilon is the run's cumulative one.
* **Math**: Opacus' accountants and ``get_noise_multiplier``; nothing here
  re-derives an RDP bound.

Only the trainable stages are made private: the frozen pretrained trunk never
sees a gradient, so it leaks nothing about the site's data and keeps its
BatchNorm (its cached features stay valid). BatchNorm inside trainable stages
is replaced by GroupNorm (``ModuleValidator.fix``) at model construction, or,
with ``privacy.batchnorm=frozen``, kept frozen in inference mode (why that is
private: ``common/learn/models/dp.py``), on the server and at every site alike,
so the exchanged parameters match.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedscan.common.core.errors import ConfigError
from fedscan.common.core.settings import from_section
from fedscan.common.data.transforms import to_float
from fedscan.common.federated.wire import NUM_EXAMPLES
from fedscan.common.learn.models.dp import DP_BATCHNORMS, check_no_batch_mixing
from fedscan.common.learn.models.staged import StagedModel
from fedscan.common.learn.settings import TrainSettings
from fedscan.common.learn.training import loss_function, make_optimizer, place_model

log = logging.getLogger("fedscan.privacy")

ACCOUNTANTS = ("rdp", "prv", "gdp")
NOISE_SEEDS = ("secret", "run")


class BudgetExhausted(RuntimeError):
    """The next round would take the site past its epsilon budget."""


@dataclass(frozen=True, kw_only=True)
class DPSGDSettings:
    """``privacy=dp_sgd`` (defaults in ``configs/privacy/dp_sgd.yaml``). Give
    ``target_epsilon`` (noise derived from the planned rounds x local epochs) or
    ``noise_multiplier`` (epsilon only reported)."""

    target_epsilon: float | None
    delta: float | None  # None: 0.1 / (site's training samples), below 1/N
    noise_multiplier: float | None
    max_grad_norm: float
    accountant: str
    max_physical_batch_size: int
    batchnorm: str  # group | frozen: the trainable stages' BatchNorm (models/dp.py)
    noise_seed: str  # secret | run: where DP-SGD's sampling and noise are seeded from

    def __post_init__(self) -> None:
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ConfigError(
                "privacy.target_epsilon", "set a target epsilon or a noise multiplier"
            )
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ConfigError("privacy.target_epsilon", f"must be > 0, got {self.target_epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError("privacy.delta", f"must be in (0, 1), got {self.delta}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError(
                "privacy.noise_multiplier", f"must be > 0, got {self.noise_multiplier}"
            )
        if not self.max_grad_norm > 0:
            raise ConfigError("privacy.max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(
                "privacy.accountant", f"unknown '{self.accountant}'; use one of {ACCOUNTANTS}"
            )
        if self.max_physical_batch_size < 1:
            raise ConfigError(
                "privacy.max_physical_batch_size",
                f"must be >= 1, got {self.max_physical_batch_size}",
            )
        if self.noise_seed not in NOISE_SEEDS:
            raise ConfigError(
                "privacy.noise_seed", f"use one of {NOISE_SEEDS}, got '{self.noise_seed}'"
            )
        if self.batchnorm not in DP_BATCHNORMS:
            raise ConfigError(
                "privacy.batchnorm", f"use one of {DP_BATCHNORMS}, got '{self.batchnorm}'"
            )

    def site_delta(self, n_train: int) -> float:
        delta = self.delta if self.delta is not None else 0.1 / max(n_train, 1)
        if delta >= 1.0 / max(n_train, 1):
            log.warning("privacy.delta=%g is not below 1/N (N=%d samples)", delta, n_train)
        return delta


def noise_seed(dp: DPSGDSettings, seed: int) -> int:
    """The seed of a private step's sampling and noise, or of the centring query's noise.

    ``privacy.noise_seed=secret`` (default): 63 bits from the operating system's CSPRNG
    (``secrets``), drawn per round, never sent or stored. The run's seed is in its
    config, which the coordinator writes: noise derived from it could be regenerated
    and subtracted by anyone holding the config, and the epsilon would protect nothing.
    ``run``: ``seed`` itself (derived from the run's seed, site and round), so a rerun
    gives the same figures (the benchmarks' choice); private against no one who knows
    that seed.
    """
    return secrets.randbits(63) if dp.noise_seed == "secret" else seed


def dp_settings(privacy: Mapping[str, Any]) -> DPSGDSettings | None:
    """The ``privacy`` config group as settings (``None`` unless ``name: dp_sgd``)."""
    if str(privacy.get("name", "off")) != "dp_sgd":
        return None
    section = {k: v for k, v in privacy.items() if k != "name"}
    return from_section(DPSGDSettings, section, "privacy")


@dataclass(frozen=True, kw_only=True)
class CentralDPSettings:
    """``privacy=central``: update-level DP with Flower's wrappers (defaults in
    ``configs/privacy/central.yaml``). Only the settings live here; the server applies
    Flower's ``DifferentialPrivacy{Client,Server}Side{Fixed,Adaptive}Clipping``."""

    side: str  # client | server: where updates are clipped
    clipping: str  # fixed | adaptive
    noise_multiplier: float
    clipping_norm: float

    def __post_init__(self) -> None:
        if self.side not in ("client", "server"):
            raise ConfigError("privacy.side", f"use client or server, got '{self.side}'")
        if self.clipping not in ("fixed", "adaptive"):
            raise ConfigError("privacy.clipping", f"use fixed or adaptive, got '{self.clipping}'")
        if self.noise_multiplier < 0:
            raise ConfigError(
                "privacy.noise_multiplier", f"must be >= 0, got {self.noise_multiplier}"
            )
        if self.clipping_norm <= 0:
            raise ConfigError("privacy.clipping_norm", f"must be > 0, got {self.clipping_norm}")


def central_dp_settings(privacy: Mapping[str, Any]) -> CentralDPSettings | None:
    """The ``privacy`` config group as central-DP settings (``None`` unless ``central``)."""
    if str(privacy.get("name", "off")) != "central":
        return None
    section = {k: v for k, v in privacy.items() if k != "name"}
    return from_section(CentralDPSettings, section, "privacy")


PRIVACY_NAMES = ("off", "dp_sgd", "central")


# --------------------------------------------------------------------- accounting
@dataclass
class PrivacyLedger:
    """What a site has spent: Opacus accountant history, ``(sigma, q, steps)`` entries."""

    history: list[tuple[float, float, int]] = field(default_factory=list)
    accountant: str = "rdp"

    def _accountant(self):
        from opacus.accountants import create_accountant

        acc = create_accountant(self.accountant)
        acc.history = [tuple(h) for h in self.history]
        return acc

    def epsilon(self, delta: float) -> float:
        if not self.history:
            return 0.0
        return float(self._accountant().get_epsilon(delta=delta))

    def projected(self, delta: float, *, noise: float, rate: float, steps: int) -> float:
        """Epsilon after ``steps`` more steps at (``noise``, ``rate``)."""
        return PrivacyLedger([*self.history, (noise, rate, steps)], self.accountant).epsilon(delta)

    @property
    def steps(self) -> int:
        return sum(int(h[2]) for h in self.history)

    def to_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant, "history": [list(h) for h in self.history]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrivacyLedger:
        hist = [(float(s), float(q), int(n)) for s, q, n in d.get("history", [])]
        return cls(hist, str(d.get("accountant", "rdp")))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, accountant: str = "rdp") -> PrivacyLedger:
        return cls.from_dict(json.loads(path.read_text())) if path.exists() else cls([], accountant)


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Opacus' Poisson loader: ``ceil(N / B)`` steps at sample rate ``1 / ceil(N / B)``."""
    return max(1, math.ceil(n_train / batch_size))


# The centring query of model.feature_norm=centred (common/federated/centre.py) costs
# what this share of the planned training steps would cost at sample rate 1.
CENTRE_SHARE = 0.1


def centre_noise(noise: float, total_steps: int) -> float:
    """The centring sum's noise multiplier: ``noise / sqrt(m)`` for ``m`` = CENTRE_SHARE x
    the planned steps. At sample rate 1 one Gaussian query at ``sigma / sqrt(m)`` composes
    exactly like ``m`` steps at ``sigma`` (the Gaussian mechanism's composition); the
    ledger records the query as what it is, one step at rate 1 with this multiplier."""
    return noise / math.sqrt(max(1, round(CENTRE_SHARE * total_steps)))


def _history(noise: float, rate: float, steps: int, centred: bool) -> list:
    """The run's planned accountant history: the centring query first, then training."""
    centre = [(centre_noise(noise, steps), 1.0, 1)] if centred else []
    return [*centre, (noise, rate, steps)]


def planned_noise(
    dp: DPSGDSettings,
    *,
    n_train: int,
    batch_size: int,
    epochs_total: int,
    delta: float,
    centred: bool = False,
) -> float:
    """The noise multiplier that spends exactly the target over the planned epochs
    (``centred``: and the centring query before them, :func:`centre_noise`).

    A plan that cannot work is a :class:`ConfigError` naming the key, raised before
    any step: a target epsilon no noise multiplier reaches in the planned steps
    (``privacy.target_epsilon``), or a fixed ``privacy.noise_multiplier`` that
    would spend more than the target before the planned epochs end (the sites
    would refuse to train part-way through the run).
    """
    steps = steps_per_epoch(n_train, batch_size)
    rate, total = 1.0 / steps, steps * epochs_total
    plan = (
        f"{total} steps at sample rate {rate:.4g} (federation.rounds x local_epochs = "
        f"{epochs_total} epochs of {steps} step(s), train.batch_size={batch_size}, "
        f"{n_train} training samples), delta {delta:.3g}"
    )
    if dp.noise_multiplier is not None:
        history = _history(dp.noise_multiplier, rate, total, centred)
        try:  # also when only reported: a plan the accountant cannot bound fails now
            eps = PrivacyLedger(history, dp.accountant).epsilon(delta)
        except MemoryError as exc:  # PRV's grid for a tiny multiplier (0.001: 882 GiB)
            raise ConfigError(
                "privacy.accountant",
                f"Opacus' {dp.accountant} accountant cannot bound noise multiplier "
                f"{dp.noise_multiplier:g} over the planned {plan} ({exc}); use rdp",
            ) from exc
        if dp.target_epsilon is not None and eps > dp.target_epsilon * 1.001:
            raise ConfigError(
                "privacy.noise_multiplier",
                f"{dp.noise_multiplier:g} spends epsilon {eps:.3g} in the planned {plan}, "
                f"more than privacy.target_epsilon={dp.target_epsilon:g}; raise the noise, "
                "plan fewer steps, or set privacy.target_epsilon=null to report epsilon only",
            )
        return dp.noise_multiplier
    try:
        if centred:
            return _noise_with_centre(dp.target_epsilon, delta, rate, total, dp.accountant)
        return _noise_for(dp.target_epsilon, delta, rate, total, dp.accountant)
    except (ValueError, ArithmeticError) as exc:  # Opacus' search gave up
        raise ConfigError(
            "privacy.target_epsilon",
            f"epsilon {dp.target_epsilon:g} cannot be reached in the planned {plan}: "
            f"Opacus' {dp.accountant} accountant found no noise multiplier ({exc}); "
            "raise the target or plan fewer steps",
        ) from exc


@lru_cache(maxsize=256)
def _noise_for(epsilon: float, delta: float, rate: float, steps: int, accountant: str) -> float:
    """Opacus' binary search; memoised, since it costs seconds at large sample rates
    and a site asks the same question every round."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=rate,
            steps=steps,
            accountant=accountant,
        )
    )


@lru_cache(maxsize=64)
def _noise_with_centre(
    epsilon: float, delta: float, rate: float, steps: int, accountant: str
) -> float:
    """:func:`_noise_for` with the centring query first: Opacus' accountant over the
    whole planned history, its root in the noise multiplier found by scipy's ``brentq``
    (Opacus' own search takes one sample rate only). The training alone needs less
    noise, so Opacus' answer for it brackets the root from below."""
    from scipy.optimize import brentq

    def excess(noise: float) -> float:
        return (
            PrivacyLedger(_history(noise, rate, steps, True), accountant).epsilon(delta) - epsilon
        )

    low = _noise_for(epsilon, delta, rate, steps, accountant)
    high = low * 1.25
    while excess(high) > 0:
        if high > 1e6:
            raise ArithmeticError(f"no noise multiplier up to {high:.3g} reaches it")
        high *= 2
    return float(brentq(excess, low, high, rtol=1e-6))


def dp_centre_query(
    dp: DPSGDSettings, ledger: PrivacyLedger, *, n: int, batch_size: int, epochs_total: int
) -> float:
    """The centring sum's noise multiplier (:func:`centre_noise` of the planned training
    noise), written into ``ledger`` as one step at sample rate 1; :class:`BudgetExhausted`
    when it would take the site past the target (a ledger already spent)."""
    delta = dp.site_delta(n)
    total = steps_per_epoch(n, batch_size) * epochs_total
    noise = planned_noise(
        dp, n_train=n, batch_size=batch_size, epochs_total=epochs_total, delta=delta, centred=True
    )
    query = centre_noise(noise, total)
    if dp.target_epsilon is not None:
        after = ledger.projected(delta, noise=query, rate=1.0, steps=1)
        if after > dp.target_epsilon * 1.001:
            raise BudgetExhausted(
                f"privacy budget spent: the centring query would reach epsilon {after:.3f} "
                f"of {dp.target_epsilon:g}"
            )
    ledger.history.append((query, 1.0, 1))
    return query


# ---------------------------------------------------------------------- training
class _Rows(Dataset):
    def __init__(self, x: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
        self.x, self.labels, self.indices = x, labels, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        return torch.from_numpy(np.asarray(self.x[j])), int(self.labels[j])


class _Trainable(nn.Module):
    """The stages Opacus wraps: from the first trainable stage to the classifier.

    Its ``train()`` follows :meth:`StagedModel.train`: with ``bn_frozen`` every
    BatchNorm stays in eval mode, whoever switches the wrapper to training.
    """

    def __init__(self, model: StagedModel) -> None:
        super().__init__()
        self.stages = nn.ModuleList(model.stages[model.frozen_until :])
        self.bn_frozen = model.bn_frozen

    def train(self, mode: bool = True) -> _Trainable:
        super().train(mode)
        if self.bn_frozen:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


@dataclass(frozen=True)
class DPRound:
    loss: float
    accuracy: float
    epsilon: float
    delta: float
    noise_multiplier: float
    steps: int


def _planned_round(
    dp: DPSGDSettings,
    ledger: PrivacyLedger,
    *,
    n: int,
    batch_size: int,
    epochs: int,
    epochs_total: int,
    centred: bool,
) -> tuple[float, float]:
    """This round's ``(delta, noise multiplier)``; :class:`BudgetExhausted` when its
    epochs would take the site past ``dp.target_epsilon``."""
    delta = dp.site_delta(n)
    noise = planned_noise(
        dp,
        n_train=n,
        batch_size=batch_size,
        epochs_total=epochs_total,
        delta=delta,
        centred=centred,
    )
    steps = steps_per_epoch(n, batch_size)
    if dp.target_epsilon is not None:
        after = ledger.projected(delta, noise=noise, rate=1.0 / steps, steps=steps * epochs)
        if after > dp.target_epsilon * 1.001:
            raise BudgetExhausted(
                f"privacy budget spent: epsilon {ledger.epsilon(delta):.3f} of "
                f"{dp.target_epsilon:g} used, this round would reach {after:.3f}"
            )
    return delta, noise


def dp_local_fit(
    model: StagedModel,
    x: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    settings: TrainSettings,
    dp: DPSGDSettings,
    ledger: PrivacyLedger,
    *,
    device: torch.device,
    start: int,
    epochs: int,
    epochs_total: int,
    centred: bool = False,
    proximal_mu: float = 0.0,
    seed: int = 0,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> DPRound:
    """A site's local epochs under DP-SGD; ``ledger`` is extended in place.

    Raises :class:`BudgetExhausted` *before* training when these epochs would
    take the site past ``dp.target_epsilon``, and :class:`ConfigError` when the
    plan cannot work at all (:func:`planned_noise`). FedProx's proximal pull is
    applied as a separate step after each private update (it does not touch the
    data, so it costs no privacy); Opacus' per-sample clipping never sees it. ``seed``
    seeds sampling and noise only with ``privacy.noise_seed=run`` (:func:`noise_seed`).
    """
    from opacus import PrivacyEngine

    delta, noise = _planned_round(
        dp, ledger, n=len(indices), batch_size=settings.batch_size, epochs=epochs,
        epochs_total=epochs_total, centred=centred,
    )  # fmt: skip
    place_model(model, device)
    model.train()
    frozen = model.stages[start : model.frozen_until]
    anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, settings)
    loss_fn = loss_function(settings, labels[indices], model.num_classes).to(device)
    seed = noise_seed(dp, seed)  # Poisson sampling and noise: secret unless asked not to
    loader = DataLoader(
        _Rows(x, labels, indices), batch_size=settings.batch_size,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    engine = PrivacyEngine(accountant=dp.accountant)
    engine.accountant.history = [tuple(h) for h in ledger.history]
    private, optimizer, loader = engine.make_private(
        module=_Trainable(model),
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
        noise_generator=torch.Generator(device=device).manual_seed(seed + 1),
    )
    private.train()
    check_no_batch_mixing(private)
    total, correct, loss_sum = _private_epochs(
        private,
        optimizer,
        loader,
        loss_fn,
        epochs=epochs,
        max_physical_batch_size=dp.max_physical_batch_size,
        frozen=frozen,
        augment=augment,
        device=device,
        proximal=(proximal_mu, params, anchor),
    )
    private._close()
    ledger.history = [tuple(h) for h in engine.accountant.history]
    return DPRound(
        loss=loss_sum / max(total, 1),
        accuracy=correct / max(total, 1),
        epsilon=ledger.epsilon(delta),
        delta=delta,
        noise_multiplier=noise,
        steps=ledger.steps,
    )


def _private_epochs(
    private: nn.Module,
    optimizer: Any,
    loader: DataLoader,
    loss_fn: nn.Module,
    *,
    epochs: int,
    max_physical_batch_size: int,
    frozen: nn.Module,
    augment: Callable[[torch.Tensor], torch.Tensor] | None,
    device: torch.device,
    proximal: tuple[float, list[torch.Tensor], list[torch.Tensor]],
) -> tuple[int, int, float]:
    """:func:`dp_local_fit`'s epochs on Opacus' private module, optimizer and loader;
    returns (images, correct, summed loss). ``proximal``: FedProx's (mu, parameters,
    anchor), a separate step after each private update."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    proximal_mu, params, anchor = proximal
    total, correct, loss_sum = 0, 0, 0.0
    for _ in range(epochs):
        with BatchMemoryManager(
            data_loader=loader,
            max_physical_batch_size=max_physical_batch_size,
            optimizer=optimizer,
        ) as batches:
            for xb, yb in batches:
                xb, yb = xb.to(device), yb.to(device)
                with torch.no_grad():
                    xb = to_float(xb) if xb.dtype == torch.uint8 else xb.float()
                    if augment is not None and len(yb):
                        xb = augment(xb)
                    for stage in frozen:
                        xb = stage(xb)
                optimizer.zero_grad(set_to_none=True)
                logits = private(xb)
                # An empty Poisson batch still is a step (noise only) and must be accounted.
                loss = loss_fn(logits, yb) if len(yb) else logits.sum() * 0.0
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite training loss ({loss.item()})")
                loss.backward()
                optimizer.step()
                if proximal_mu > 0 and not optimizer._is_last_step_skipped:
                    lr = optimizer.param_groups[0]["lr"]
                    with torch.no_grad():
                        for p, a in zip(params, anchor, strict=True):
                            p.sub_(lr * proximal_mu * (p - a))
                total += len(yb)
                loss_sum += loss.item() * len(yb)
                correct += int((logits.argmax(1) == yb).sum())
    return total, correct, loss_sum


@contextmanager
def _known_warnings_quiet() -> Iterator[None]:
    """Two warnings every site repeated in every round, both known and documented:
    Opacus runs without secure_mode (docs/how-to/differential-privacy.md, "Before
    production"), and torch's full backward hook fires on module outputs because the
    cached-feature inputs need no gradient (Opacus' per-sample hooks are unaffected).
    Silenced for the round only: the process's own warning filters are left as they were."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off", module="opacus")
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients")
        yield


def dp_site_round(
    model: StagedModel,
    x: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    settings: TrainSettings,
    dp: DPSGDSettings,
    ledger: PrivacyLedger,
    *,
    site: str,
    rnd: int,
    **fit: Any,
) -> dict[str, float | int]:
    """One round of :func:`dp_local_fit` as the metrics a site reports.

    A spent budget is reported, not raised: one log line, nothing trained, and
    ``num-examples`` 0 so the strategy leaves this site's (unchanged) copy of
    the global model out of the average.
    """
    try:
        with _known_warnings_quiet():
            r = dp_local_fit(model, x, labels, indices, settings, dp, ledger, **fit)
    except BudgetExhausted as exc:
        log.warning("%s: %s; not training in round %d", site, exc, rnd)
        delta = dp.site_delta(len(indices))
        return {
            NUM_EXAMPLES: 0,
            "num_examples_if_trained": len(indices),
            "dp_budget_spent": 1,
            "dp_epsilon": ledger.epsilon(delta),
            "dp_delta": delta,
        }
    return {
        NUM_EXAMPLES: len(indices),
        "train_loss": r.loss,
        "train_accuracy": r.accuracy,
        "dp_budget_spent": 0,
        "dp_noise_multiplier": r.noise_multiplier,
        "dp_steps": r.steps,
        "dp_epsilon": r.epsilon,
        "dp_delta": r.delta,
    }
