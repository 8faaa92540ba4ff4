"""VGG-16-BN and the pre-activation ResNet-18 in both forms: the scale-invariant set found from the
structure is exactly the set of tensors f is invariant to scaling, one tensor at a time."""

import pytest
import torch
from torch import nn

from sphrun.config import DEFAULT_WIDTH, MODELS as CONFIG_MODELS
from sphrun.models import ARCHITECTURES, build_model, scale_invariant_parameters, trainable_scale_invariant
from test_models import is_scale_invariant

MODELS = ("convnet", "vgg16bn", "resnet18")


def tiny_model(name, sphere):
    return build_model(name, 2, 10, 10.0 if sphere else None, seed=0, head_seed=0, sphere=sphere)


def conv_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


def ids(tensors):
    return [id(t) for t in tensors]


def agrees_with_definition(model, si):
    """The structural answer equals f(a * theta_i) == f(theta_i), tensor by tensor (BN train mode)."""
    torch.manual_seed(1)
    x = torch.randn(8, 3, 32, 32)
    return all(is_scale_invariant(model, p, x) == any(p is q for q in si) for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_on_the_sphere_every_conv_and_nothing_else_is_scale_invariant(name):
    model = tiny_model(name, sphere=True)
    si = scale_invariant_parameters(model)
    assert ids(si) == ids(conv_weights(model))
    assert agrees_with_definition(model, si)
    assert ids(trainable_scale_invariant(model)) == ids(si)  # the frozen head is all that is left
    assert not any(p.requires_grad for p in model.head.parameters())
    assert abs(model.head.weight.norm().item() - 10.0) < 1e-5


@pytest.mark.parametrize("name", MODELS)
def test_conventional_form_trains_everything_and_si_set_still_matches(name):
    model = tiny_model(name, sphere=False)
    with torch.no_grad():  # BatchNorm starts at gamma 1, beta 0: a zero beta is trivially "invariant"
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    si = scale_invariant_parameters(model)
    assert agrees_with_definition(model, si)
    assert all(p.requires_grad for p in model.parameters())
    affine = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert affine and all(m.affine for m in affine)
    if name == "resnet18":
        # the textbook block: only the first conv of each branch feeds a BatchNorm; the stem, the
        # second convs and the projections feed residual sums
        assert ids(si) == ids(block.conv1.weight for block in model.blocks)
    else:
        assert ids(si) == ids(conv_weights(model))


def test_vgg16bn_layout_at_width_64():
    model = build_model("vgg16bn", 64, 10, 10.0, seed=0, head_seed=0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert sum(c.weight.numel() for c in convs) == 14_710_464
    assert model.head.in_features == 512 and model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_textbook_size_and_scale_invariant_additions():
    textbook = build_model("resnet18", 64, 10, None, seed=0, head_seed=0, sphere=False)
    # 11,171,146 in the common CIFAR code (no final BN) plus the final BatchNorm's 2 x 512
    assert sum(p.numel() for p in textbook.parameters()) == 11_172_170
    si = build_model("resnet18", 64, 100, 10.0, seed=0, head_seed=0)
    norms = lambda m: sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    # the stem, the 8 branch ends and the 3 projections each gain a BatchNorm
    assert norms(si) - norms(textbook) == 1 + 8 + 3
    assert ids(scale_invariant_parameters(si)) == ids(conv_weights(si))
    assert si(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_the_same_seed_gives_the_same_convolutions_in_both_forms():
    on, off = tiny_model("vgg16bn", True), tiny_model("vgg16bn", False)
    assert all(torch.equal(a, b) for a, b in zip(conv_weights(on), conv_weights(off)))


def test_the_settings_know_every_architecture():
    assert CONFIG_MODELS == MODELS == tuple(ARCHITECTURES) == tuple(DEFAULT_WIDTH)
