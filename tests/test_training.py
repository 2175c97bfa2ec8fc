import numpy as np
import pytest
import torch

from fedscan.common.core.errors import ConfigError
from fedscan.common.data.transforms import Augment
from fedscan.common.learn.models import build_model
from fedscan.common.learn.training import Batches, proximal_term
from tests.conftest import tree_train_settings


def test_batches_are_deterministic_and_cover_the_split():
    x = np.arange(20 * 4 * 4, dtype=np.uint8).reshape(20, 4, 4)
    y = np.arange(20) % 2
    idx = np.arange(3, 17)
    a = [yb.tolist() for _, yb in Batches(x, y, idx, batch_size=4, shuffle=True, seed=1)]
    b = [yb.tolist() for _, yb in Batches(x, y, idx, batch_size=4, shuffle=True, seed=1)]
    assert a == b
    xs = torch.cat([xb for xb, _ in Batches(x, y, idx, batch_size=4)])
    assert xs.shape == (14, 1, 4, 4) and float(xs.max()) <= 1.0


def test_balanced_sampler_evens_out_classes():
    y = np.array([0] * 90 + [1] * 10)
    x = np.zeros((100, 2, 2), np.uint8)
    b = Batches(x, y, np.arange(100), batch_size=100, balanced=True, seed=0)
    seen = np.concatenate([yb.numpy() for _ in range(20) for _, yb in b])
    assert 0.4 < seen.mean() < 0.6


def test_augment_is_seedable():
    x = torch.rand(3, 1, 16, 16)
    assert torch.equal(Augment("standard", seed=5)(x), Augment("standard", seed=5)(x))
    assert not torch.equal(Augment("standard", seed=5)(x), Augment("standard", seed=6)(x))
    assert torch.equal(Augment("none")(x), x)


def test_proximal_term_zero_at_anchor_and_mu_zero():
    m = build_model({"name": "paper_cnn"}, 3)
    anchor = [p.detach().clone() for p in m.parameters() if p.requires_grad]
    assert proximal_term(m, anchor, 0.5).item() == 0.0
    with torch.no_grad():
        next(m.parameters()).add_(1.0)
    assert proximal_term(m, anchor, 0.0).item() == 0.0
    assert proximal_term(m, anchor, 0.5).item() > 0.0


@pytest.mark.parametrize(
    ("key", "value"),
    [("epochs", 0), ("lr", -1.0), ("sampler", "magic"), ("best_metric", "test_accuracy")],
)
def test_bad_train_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"train.{key}"):
        tree_train_settings(**{key: value})


def test_balanced_softmax_is_cross_entropy_of_prior_adjusted_logits():
    from fedscan.common.learn.training import loss_function

    labels = np.array([0, 0, 0, 1])  # class 2 absent from this training split
    loss = loss_function(tree_train_settings(loss="balanced_softmax"), labels, 3)
    logits = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, 3.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    value = loss(logits, y)
    prior = torch.tensor([0.75, 0.25])
    expected = torch.nn.functional.cross_entropy(logits[:, :2].detach() + prior.log(), y)
    assert value.item() == pytest.approx(expected.item(), abs=1e-6)
    value.backward()
    # the absent class gets no gradient: a site cannot un-learn what it never saw
    assert torch.all(logits.grad[:, 2] == 0) and torch.all(logits.grad[:, :2] != 0)
    plain = loss_function(tree_train_settings(), labels, 3)
    assert isinstance(plain, torch.nn.CrossEntropyLoss)


@pytest.mark.parametrize(
    ("key", "value"),
    [("label_smoothing", 0.1), ("class_weighting", "balanced"), ("sampler", "balanced")],
)
def test_balanced_softmax_refuses_a_second_frequency_correction(key, value):
    with pytest.raises(ConfigError, match=f"train.{key}.*balanced_softmax"):
        tree_train_settings(loss="balanced_softmax", **{key: value})


def test_brain_defaults_to_label_smoothing_and_balanced_softmax_says_what_to_add():
    """Brain's dataset config sets train.label_smoothing (0.1); the balanced softmax,
    which refuses it, names the override to add rather than failing obscurely."""
    from fedscan.common.core.config import load_config
    from fedscan.common.learn.settings import train_settings

    def compose(*overrides: str):  # composed only: no folder is looked at, nothing read
        return load_config(list(overrides), check_data=False)

    brain = compose("dataset=brain_mri")
    assert brain.train.label_smoothing == brain.dataset.label_smoothing == 0.1
    assert compose("dataset=lung_ct").train.label_smoothing == 0.0
    assert compose("dataset=brain_mri", "train.label_smoothing=0").train.label_smoothing == 0
    with pytest.raises(ConfigError, match=r"add train\.label_smoothing=0"):
        train_settings(compose("dataset=brain_mri", "train.loss=balanced_softmax"))


def test_unknown_loss_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.loss"):
        tree_train_settings(loss="focal")


def test_the_cpu_flushes_denormals_that_slowed_fine_tuning():
    """A confident head's softmax gradients fall below 1e-38; computed as denormals they
    made fine-tune rounds about 3x slower. On the CPU they become zero."""
    from fedscan.common.learn.training import select_device

    supported = torch.set_flush_denormal(False)  # True where this CPU can flush
    assert select_device("cpu", 1).type == "cpu"
    tiny = torch.tensor([1e-39], dtype=torch.float32) * torch.tensor([1.0])
    assert tiny.item() == (0.0 if supported else pytest.approx(1e-39, rel=1e-3))
