"""Opacus' model fixes for DP-SGD, applied where a model is built.

``privacy=dp_sgd`` sets ``model.dp_compatible`` (and ``model.dp_batchnorm``, the
model's copy of ``privacy.batchnorm``); :func:`build_model` then applies
these fixes on the server and at every site alike, so the exchanged parameters
match. Only the trainable stages change: the frozen trunk keeps its BatchNorm
(its cached features stay valid) and never sees a gradient.

Two routes for BatchNorm inside the trainable stages:

* **GroupNorm** (``privacy.batchnorm=group``, default): Opacus'
  ``ModuleValidator.fix`` replaces it, keeping the learned scale and shift; the
  normalisation statistics become per sample, but they are no longer the ones
  the pretrained weights were trained with.
* **Frozen BatchNorm** (``privacy.batchnorm=frozen``): BatchNorm stays, in
  inference mode, with its running statistics and its scale and shift fixed.
  This is not the removed ``model.freeze_bn`` of non-private training (there the
  sites could use their batches' statistics, and the ImageNet ones only harmed);
  DP-SGD cannot use batch statistics at all, so the choice here is between the
  pretrained statistics and GroupNorm's per-sample ones. Why the
  guarantee holds: in eval mode BatchNorm is the fixed per-channel affine map
  ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``; each output
  depends on its own sample only, and nothing is written to its buffers. So every
  per-sample gradient of the trainable layers is a function of that one sample,
  which is all Opacus' clipping and noise need. What Opacus 1.6 checks: its
  ``ModuleValidator`` and ``GradSampleModule.validate`` look only at *trainable*
  modules (``trainable_modules``: a parameter with ``requires_grad``), so a
  BatchNorm with frozen parameters passes; it does not check the BatchNorm's mode.
  A frozen BatchNorm in *training* mode would mix the samples of a batch through
  its batch statistics and write them into its running buffers, and Opacus would
  not notice: :func:`check_no_batch_mixing` refuses that before every private
  round. Opacus computes per-sample gradients (hooks, or functorch for timm's
  ``Conv2dSame``) only for modules with trainable parameters: the convolutions
  and the classifier, never the frozen BatchNorm.
"""

from __future__ import annotations

from torch import nn

from fedscan.common.core.errors import ConfigError
from fedscan.common.learn.models.staged import StagedModel, batchnorm_to_groupnorm

_BATCHNORM = nn.modules.batchnorm._BatchNorm  # also timm's BatchNormAct2d

# privacy.batchnorm: what DP-SGD does with BatchNorm in the trainable stages
DP_BATCHNORMS = ("group", "frozen")


def make_dp_compatible(model: StagedModel) -> StagedModel:
    """Opacus' fixes on the trainable stages (BatchNorm -> GroupNorm, or BatchNorm
    frozen when ``model.bn_frozen``: ``privacy.batchnorm=frozen``), in-place
    activations made out-of-place; an unfixable model is a ConfigError now."""
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    for i in range(model.frozen_until, len(model.stages)):
        stage = model.stages[i]
        if model.bn_frozen:
            _freeze_batchnorm(stage)
        else:
            stage = batchnorm_to_groupnorm(stage)  # also timm's BatchNormAct2d
        if ModuleValidator.validate(stage, strict=False):
            stage = ModuleValidator.fix(stage)
        for mod in stage.modules():
            if getattr(mod, "inplace", False):
                mod.inplace = False
        errors = ModuleValidator.validate(stage, strict=False)
        errors += GradSampleModule.validate(stage, strict=False)
        if errors:
            raise ConfigError(
                "model.name",
                f"Opacus cannot make {model.name} stage '{model.stage_names[i]}' private: "
                f"{'; '.join(str(e) for e in errors[:3])}",
            )
        model.stages[i] = stage
    # The fixed stages are new modules: re-apply the trainable flags.
    for i, stage in enumerate(model.stages):
        for p in stage.parameters():
            p.requires_grad_(i >= model.frozen_until)
        if model.bn_frozen and i >= model.frozen_until:
            _freeze_batchnorm(stage)
    return model.train(model.training)


def _freeze_batchnorm(module: nn.Module) -> None:
    """Every BatchNorm's scale and shift fixed (its statistics stay fixed through
    ``StagedModel.bn_frozen``, which keeps it in eval mode)."""
    for m in module.modules():
        if isinstance(m, _BATCHNORM):
            m.requires_grad_(False)


def check_no_batch_mixing(module: nn.Module) -> None:
    """Refuse a module whose BatchNorm would mix the samples of a batch under DP-SGD.

    Opacus validates trainable modules only (see the module docstring), so a
    BatchNorm with frozen parameters left in training mode would pass its checks
    while normalising each sample by its batch's statistics and storing them.
    Called on the private module before every private round; a failure here is a
    bug in fedscan, never a user's setting.
    """
    bad = [
        name
        for name, m in module.named_modules()
        if isinstance(m, _BATCHNORM)
        and (m.training or any(p.requires_grad for p in m.parameters()))
    ]
    if bad:
        raise RuntimeError(
            f"BatchNorm layers {bad[:3]} would train or use batch statistics under DP-SGD; "
            "they must be frozen and in eval mode (privacy.batchnorm=frozen) or GroupNorm"
        )
