"""Training and evaluation loops shared by the centralised baseline and every site.

Two input kinds feed the same loops: uint8 images from the decode-once cache
(augmented on the fly) and cached activations of a frozen trunk. The second is
what makes pretrained models practical on a CPU-only hospital server: the frozen
stages run once per image instead of once per image per epoch.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from fedscan.common.core.errors import ConfigError
from fedscan.common.core.parallel import available_cpus
from fedscan.common.core.progress import progress
from fedscan.common.data.transforms import Augment, to_float
from fedscan.common.learn.intervals import IntervalSettings, group_bootstrap
from fedscan.common.learn.losses import BalancedSoftmaxLoss
from fedscan.common.learn.metrics import classification_metrics
from fedscan.common.learn.models import PREFIX_PRECISIONS, StagedModel
from fedscan.common.learn.scans import scan_metrics
from fedscan.common.learn.settings import TrainSettings


def select_device(preference: str = "auto", num_threads: int | None = None) -> torch.device:
    """A GPU when present (``auto``), else the CPU limited to the cores we may use.

    On the CPU, denormal floats are flushed to zero. A confident head (a Fed3R head
    scaled into logits, or any well-trained one) gives softmax gradients below
    1e-38; x86 CPUs compute such denormals in microcode, and backpropagating them
    through the trainable blocks made a fine-tune round 2.5-3.5x slower here (342-502 s
    against 128 s). Values that small change no weight.
    """
    if preference not in ("auto", "cpu", "cuda"):
        raise ConfigError("device", f"use auto, cpu or cuda (got '{preference}')")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda requested but no GPU is visible")
    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    if not use_cuda:
        torch.set_num_threads(num_threads or available_cpus())
        torch.set_flush_denormal(True)  # False where the CPU cannot (then nothing changes)
    return torch.device("cuda" if use_cuda else "cpu")


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to ``device``; on CPUs use channels-last, ~2x faster convolutions here."""
    model.to(device)
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on GPUs (bfloat16 where supported); full precision on CPUs.

    CPUs train in float32 even where they compute bfloat16 natively: measured here
    (Xeon with AMX), a bfloat16 backward pass through the trainable blocks took 1.5x
    as long as float32's. Forward-only passes are another matter: :func:`prefix_autocast`.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def cpu_computes_bf16() -> bool:
    """Whether this CPU has native bfloat16 arithmetic for oneDNN (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def prefix_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype the frozen prefix computes in (``model.prefix_precision``).

    ``auto``: what the hardware does fast. GPUs use :func:`autocast`'s dtype; CPUs
    with native bfloat16 (AMX / AVX512-BF16) bfloat16, which ran the frozen trunk of
    EfficientNet-Lite0 2.8x faster than float32 here; other CPUs float32, where
    emulated bfloat16 would be slower.
    """
    if precision not in PREFIX_PRECISIONS:
        raise ConfigError(
            "model.prefix_precision", f"use one of {PREFIX_PRECISIONS}, got '{precision}'"
        )
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_computes_bf16() else torch.float32


def prefix_autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` (from :func:`prefix_dtype`) for a forward-only pass."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@dataclass(frozen=True)
class FeatureRows:
    """A cached prefix's output for the images ``rows`` only, read by image index.

    ``features[i]`` belongs to image ``rows[i]`` (``rows`` sorted). Compact where only
    some images need the features (mirrored training images, the test splits), and
    indexable like the full per-image array (``x[indices]``), so that :class:`Batches`
    reads either. An index outside ``rows`` is a ``KeyError``, never a row of zeros.
    """

    features: np.ndarray
    rows: np.ndarray

    @property
    def dtype(self) -> np.dtype:
        return self.features.dtype

    def take(self, indices: np.ndarray) -> np.ndarray:
        """The features of ``indices`` (image indices, each in ``rows``)."""
        indices = np.asarray(indices, dtype=np.int64)
        pos = np.searchsorted(self.rows, indices)
        inside = pos < len(self.rows)
        if not (inside.all() and np.array_equal(self.rows[pos], indices)):
            missing = np.setdiff1d(indices, self.rows)
            raise KeyError(f"no cached features for image indices {missing[:5].tolist()}")
        return self.features[pos]

    def __getitem__(self, indices: np.ndarray) -> np.ndarray:
        return self.take(indices)


class MirroredRows(FeatureRows):
    """The frozen prefix's output for left/right-mirrored images, for ``rows`` only.

    Kept compact because only training rows need it
    (:func:`~common.learn.features.mirrored_features`): a second pass over every image
    would cost the time budget of the default ``fedscan train`` (docs/results/default-vs-plain.md).
    """


class Batches:
    """Mini-batches of ``x[indices]`` (uint8 images or float features) and labels.

    Deterministic for a given seed and epoch; ``balanced`` sampling draws with
    replacement so that every class is seen equally often. With ``mirrored`` (cached
    prefix features of the left/right-mirrored images, ``train.cached_flips``) each
    sample of each epoch is one of its two views, drawn with probability 1/2: the
    flip augmentation that cached features otherwise cannot have.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        indices: np.ndarray,
        *,
        batch_size: int,
        shuffle: bool = False,
        balanced: bool = False,
        augment: Augment | None = None,
        mirrored: MirroredRows | None = None,
        seed: int = 0,
    ) -> None:
        self.x, self.y, self.indices = x, y, np.asarray(indices, dtype=np.int64)
        self.mirrored = mirrored
        self.batch_size, self.shuffle, self.balanced = batch_size, shuffle, balanced
        self.augment, self.seed, self.epoch = augment, seed, 0
        self.is_images = x.dtype == np.uint8

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def _order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.balanced:
            labels = self.y[self.indices]
            counts = np.bincount(labels)
            w = 1.0 / counts[labels]
            return rng.choice(self.indices, size=len(self.indices), replace=True, p=w / w.sum())
        return rng.permutation(self.indices) if self.shuffle else self.indices

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        self.epoch += 1
        # its own stream, so that the order is the same with and without flips
        flips = np.random.default_rng([self.seed, 77, self.epoch])
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            sorted_idx = np.sort(idx)  # memmap reads are faster in file order
            rows = self.x[sorted_idx]
            if self.mirrored is not None:
                pick = flips.random(len(sorted_idx)) < 0.5
                if pick.any():
                    rows = np.array(rows)  # a copy, never a write into the cache
                    rows[pick] = self.mirrored.take(sorted_idx[pick])
            xb = torch.from_numpy(np.ascontiguousarray(rows))
            yb = torch.from_numpy(self.y[sorted_idx].astype(np.int64))
            if self.is_images:
                xb = to_float(xb)
                if self.augment is not None:
                    xb = self.augment(xb)
            else:
                xb = xb.float()
            yield xb, yb


def loss_function(settings: TrainSettings, train_labels: np.ndarray, num_classes: int) -> nn.Module:
    """The training loss for these training labels (a site's own, or the pooled ones)."""
    if settings.loss == "balanced_softmax":
        return BalancedSoftmaxLoss(train_labels, num_classes)
    weight = None
    if settings.class_weighting == "balanced":
        present = np.unique(train_labels)
        w = np.ones(num_classes)
        w[present] = compute_class_weight("balanced", classes=present, y=train_labels)
        weight = torch.tensor(w, dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=settings.label_smoothing)


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay
        )
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def proximal_term(model: nn.Module, anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's (mu / 2) * ||w - w_global||^2 over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return (mu / 2.0) * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))


def train_one_epoch(
    model: StagedModel,
    batches: Batches,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    *,
    device: torch.device,
    start: int = 0,
    proximal_mu: float = 0.0,
    anchor: list[torch.Tensor] | None = None,
    correction: list[torch.Tensor] | None = None,
    desc: str = "train",
) -> tuple[float, float]:
    """One pass; returns (mean loss, accuracy). ``start`` > 0 when inputs are cached features.

    ``correction`` (one tensor per trainable parameter) is added to every gradient
    before the step: SCAFFOLD's ``c - c_i``.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = loss_fn.to(device)
    total, correct, loss_sum = 0, 0, 0.0
    shown = progress(
        batches, total=len(batches), desc=desc, unit="batches", quiet_below=20, announce=False
    )
    for xb, yb in shown:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            logits = model.forward_from(xb, start)
            loss = loss_fn(logits.float(), yb)
        objective = loss
        if proximal_mu > 0 and anchor is not None:
            objective = loss + proximal_term(model, anchor, proximal_mu)
        if not torch.isfinite(objective):
            raise FloatingPointError(f"non-finite training loss ({objective.item()})")
        objective.backward()
        if correction is not None:
            for p, c in zip(params, correction, strict=True):
                if p.grad is not None:
                    p.grad.add_(c)
        optimizer.step()
        n = len(yb)
        total += n
        loss_sum += loss.item() * n
        correct += int((logits.argmax(1) == yb).sum())
    return loss_sum / max(total, 1), correct / max(total, 1)


def mean_gradient(
    model: StagedModel,
    batches: Batches,
    loss_fn: nn.Module,
    *,
    device: torch.device,
    start: int = 0,
) -> dict[str, torch.Tensor]:
    """The gradient of the mean loss over every sample of ``batches`` at the current
    weights, per trainable parameter name (eval mode: no dropout, no BatchNorm update)."""
    model.eval()
    loss_fn = loss_fn.to(device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p) for n, p in named}
    count = 0
    for xb, yb in batches:
        xb, yb = xb.to(device), yb.to(device)
        model.zero_grad(set_to_none=True)
        with autocast(device):
            loss = loss_fn(model.forward_from(xb, start).float(), yb)
        (loss * len(yb)).backward()  # a sum over samples, divided once at the end
        for n, p in named:
            if p.grad is not None:
                total[n] += p.grad.detach()
        count += len(yb)
    model.zero_grad(set_to_none=True)
    return {n: (g / max(count, 1)).cpu() for n, g in total.items()}


@torch.inference_mode()
def predict(
    model: StagedModel, batches: Batches, *, device: torch.device, start: int = 0
) -> tuple[np.ndarray, np.ndarray, float]:
    """(probabilities [N, C], labels [N], mean cross-entropy) in the batches' order.

    Float32 on every device, never :func:`autocast`: evaluation is forward-only and
    cheap, and float32 is what the exported model computes (``deploy/export.py``;
    ONNX Runtime's CPU provider has no bfloat16 convolutions), so a figure measured
    here is the shipped model's wherever the inputs are too
    (:func:`~common.learn.shipped.shipped_inputs`).
    """
    model.eval()
    probs, labels, loss_sum = [], [], 0.0
    for xb, yb in batches:
        logits = model.forward_from(xb.to(device), start).float()
        loss_sum += float(nn.functional.cross_entropy(logits, yb.to(device), reduction="sum"))
        probs.append(torch.softmax(logits, 1).cpu().numpy())
        labels.append(yb.numpy())
    if not probs:
        return np.zeros((0, model.num_classes)), np.zeros(0, np.int64), float("nan")
    y = np.concatenate(labels)
    return np.concatenate(probs), y, loss_sum / len(y)


def evaluate_model(
    model: StagedModel,
    batches: Batches,
    classes: Sequence[str],
    *,
    device: torch.device,
    start: int = 0,
    groups: np.ndarray | None = None,
    intervals: IntervalSettings | None = None,
    scans: bool = False,
) -> dict:
    """:func:`predict` then :func:`classification_metrics` (with the loss).

    With ``groups`` (the leakage group of every sample of ``batches.x``, i.e.
    ``Splits.groups``) and ``intervals``, the metrics gain ``ci``: intervals from a
    bootstrap over the groups of this split (:mod:`common.learn.intervals`). With
    ``scans`` (the groups are CT scans) they also gain ``per_scan``: the same metrics
    with each scan as one case (:mod:`common.learn.scans`).
    """
    probs, y, loss = predict(model, batches, device=device, start=start)
    out = classification_metrics(y, probs, classes, loss=loss)
    if groups is None or not len(y):
        return out
    split_groups = np.asarray(groups)[batches.indices]
    if intervals is not None:
        out["ci"] = group_bootstrap(y, probs.argmax(1), split_groups, classes, intervals)
    if scans:
        out["per_scan"] = scan_metrics(y, probs, split_groups, classes, intervals)
    return out


def fit(
    model: StagedModel,
    train: Batches,
    val: Batches,
    settings: TrainSettings,
    *,
    device: torch.device,
    start: int = 0,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train for ``settings.epochs`` epochs; keep the best epoch's weights if asked.

    Returns the per-epoch history (train/val loss and accuracy, val macro-F1).
    """
    place_model(model, device)
    loss_fn = loss_function(settings, train.y[train.indices], model.num_classes)
    optimizer = make_optimizer(model, settings)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    history: list[dict] = []
    best_score, best_state = -np.inf, None
    classes = [str(i) for i in range(model.num_classes)]
    for epoch in range(1, settings.epochs + 1):
        tr_loss, tr_acc = train_one_epoch(
            model, train, optimizer, loss_fn, device=device, start=start, desc=f"epoch {epoch}"
        )
        sched.step()
        m = evaluate_model(model, val, classes, device=device, start=start)
        row = {
            "epoch": epoch,
            "train_loss": tr_loss,
            "train_accuracy": tr_acc,
            "val_loss": m["loss"],
            "val_accuracy": m["accuracy"],
            "val_macro_f1": m["macro_f1"],
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(row)
        if on_epoch:
            on_epoch(row)
        score = row[settings.best_metric] * (-1 if settings.best_metric.endswith("loss") else 1)
        if settings.select_best and score > best_score:
            best_score, best_state = score, copy.deepcopy(model.state_dict())
    if settings.select_best and best_state is not None:
        model.load_state_dict(best_state)
    return history
