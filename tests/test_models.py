import pytest
import torch
from sklearn.datasets import load_sample_image

from fedscan.common.core.errors import ConfigError
from fedscan.common.learn.models import MODELS, build_model
from fedscan.common.learn.models.efficientnet_lite import imagenet_lite0


@pytest.mark.parametrize("name", ["paper_cnn", "resnet18", "efficientnet_lite0"])
@pytest.mark.parametrize("size", [64, 96])
def test_output_shapes_from_grayscale(name, size):
    mode = "finetune" if name == "efficientnet_lite0" else "scratch"
    m = build_model({"name": name, "mode": mode, "finetune_blocks": 2}, num_classes=3).eval()
    with torch.no_grad():
        assert m(torch.rand(2, 1, size, size)).shape == (2, 3)


def test_modes_freeze_the_right_stages():
    feats = build_model({"name": "efficientnet_lite0", "mode": "features"}, 4)
    trainable = [n for n, p in feats.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(f"stages.{len(feats.stages) - 1}.") for n in trainable)
    ft = build_model({"name": "efficientnet_lite0", "mode": "finetune", "finetune_blocks": 2}, 4)
    assert ft.frozen_until == len(ft.stages) - 3
    ft.train()
    assert not ft.stages[1].training and ft.stages[-2].training  # frozen BN stays in eval


def test_frozen_batchnorm_keeps_its_statistics_while_its_scale_trains():
    """``bn_frozen`` (FixBN's rounds, remedy=fixbn): a training step on a one-class batch
    moves the BatchNorm scale and shift but not the stored statistics it normalises with."""
    cfg = {"name": "efficientnet_lite0", "mode": "finetune", "finetune_blocks": 2}
    torch.manual_seed(0)
    x, y = torch.rand(4, 1, 64, 64), torch.zeros(4, dtype=torch.long)
    for frozen in (False, True):
        m = build_model(cfg, 3)
        m.bn_frozen = frozen
        m.train()
        bns = [b for b in m.stages[-2].modules() if isinstance(b, torch.nn.BatchNorm2d)]
        assert bns and all(b.training != frozen for b in bns)
        before = [(b.running_mean.clone(), b.weight.detach().clone()) for b in bns]
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        stats_moved = any(
            not torch.equal(b.running_mean, s) for b, (s, _) in zip(bns, before, strict=True)
        )
        scale_moved = any(
            not torch.equal(b.weight, w) for b, (_, w) in zip(bns, before, strict=True)
        )
        assert stats_moved != frozen and scale_moved


def test_groupnorm_variant_has_no_batchnorm():
    m = build_model({"name": "paper_cnn", "norm": "group"}, 4)
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    assert any(isinstance(x, torch.nn.GroupNorm) for x in m.modules())
    m(torch.rand(1, 1, 32, 32))


def test_bad_model_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.name"):
        build_model({"name": "vgg99"}, 4)
    with pytest.raises(ConfigError, match=r"model\.finetune_blocks"):
        build_model({"name": "efficientnet_lite0", "mode": "finetune", "finetune_blocks": 50}, 4)
    with pytest.raises(ConfigError, match=r"model\.pretrained"):
        build_model({"name": "resnet18", "mode": "features"}, 4)
    with pytest.raises(ConfigError, match=r"model\.mode"):
        build_model({"name": "paper_cnn", "mode": "distill"}, 4)
    assert set(MODELS.names()) >= {"paper_cnn", "resnet18", "efficientnet_lite0"}


def test_offline_imagenet_weights_recognise_a_daisy():
    """The packaged weights load with no network and classify a natural photo correctly."""
    net = imagenet_lite0().eval()
    img = torch.tensor(load_sample_image("flower.jpg")).permute(2, 0, 1).float() / 255
    x = torch.nn.functional.interpolate(img[None], size=(224, 224), mode="bilinear")
    with torch.no_grad():
        top5 = net((x - 0.5) / 0.5).topk(5).indices[0].tolist()
    assert 985 in top5  # ImageNet class 985: daisy
