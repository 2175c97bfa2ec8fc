"""Opacus' model fixes for DP-SGD, applied where a model is built.

``privacy=dp_sgd`` sets ``model.dp_compatible``; :func:`build_model` then applies
these fixes on the server and at every site alike, so the exchanged parameters
match. Only the trainable stages change: the frozen trunk keeps its BatchNorm
(its cached features stay valid) and never sees a gradient.
"""

from __future__ import annotations

from fedscan.common.core.errors import ConfigError
from fedscan.common.learn.models.staged import StagedModel, batchnorm_to_groupnorm


def make_dp_compatible(model: StagedModel) -> StagedModel:
    """Opacus' fixes on the trainable stages (BatchNorm -> GroupNorm), in-place
    activations made out-of-place; an unfixable model is a ConfigError now."""
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    for i in range(model.frozen_until, len(model.stages)):
        stage = batchnorm_to_groupnorm(model.stages[i])  # also timm's BatchNormAct2d
        if ModuleValidator.validate(stage, strict=False):
            stage = ModuleValidator.fix(stage)
        for mod in stage.modules():
            if getattr(mod, "inplace", False):
                mod.inplace = False
        errors = ModuleValidator.validate(stage, strict=False)
        if any(p.requires_grad for p in stage.parameters()) or i >= model.frozen_until:
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
    return model
