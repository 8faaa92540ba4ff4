"""Scale-invariant parameters are found from the structure, and exactly."""

import pytest
import torch
from torch import nn

from sphrun import SphrunError
from sphrun.models import build_model, scale_invariant_parameters, trainable_scale_invariant


def is_scale_invariant(model, param, x):
    """Numerically: f(a * theta_i) == f(theta_i) in BN train mode."""
    model.train()
    with torch.no_grad():
        reference = model(x)
        param.mul_(2.5)
        scaled = model(x)
        param.div_(2.5)
    return torch.allclose(scaled, reference, rtol=1e-3, atol=1e-3)


def test_convnet_si_set_is_exactly_the_four_convolutions():
    model = build_model("convnet", 8, 10, 10.0, seed=0, head_seed=0)
    si = scale_invariant_parameters(model)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [id(p) for p in si] == [id(p) for p in convs]
    x = torch.randn(8, 3, 32, 32)
    for p in model.parameters():  # the structural answer agrees with the definition, tensor by tensor
        assert is_scale_invariant(model, p, x) == any(p is q for q in si)
    assert trainable_scale_invariant(model) == si


def test_width_32_has_the_papers_parameter_count():
    model = build_model("convnet", 32, 10, 10.0, seed=0, head_seed=0)
    assert sum(p.numel() for p in scale_invariant_parameters(model)) == 387_936


class Mixed(nn.Module):
    """A conv with a bias before ReLU, a conv feeding a residual sum, and a conv before BN through ReLU+pool."""

    def __init__(self):
        super().__init__()
        self.biased = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4, affine=False)
        self.residual = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.deep = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn2 = nn.BatchNorm2d(4, affine=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.bn1(torch.relu(self.biased(x)))  # the bias survives the ReLU
        h = h + self.residual(h)  # the sum is not homogeneous in the residual weight
        h = self.bn2(self.pool(torch.relu(self.deep(h))))
        return self.head(h.mean((2, 3)))


def test_structure_rules_on_a_mixed_net():
    model = Mixed()
    si = scale_invariant_parameters(model)
    assert [id(p) for p in si] == [id(model.deep.weight)]
    x = torch.randn(8, 3, 8, 8)
    for p in model.parameters():
        assert is_scale_invariant(model, p, x) == any(p is q for q in si)


def test_training_refuses_a_trainable_parameter_that_is_not_scale_invariant():
    model = build_model("convnet", 4, 10, 10.0, seed=0, head_seed=0)
    model.head.weight.requires_grad_(True)
    with pytest.raises(SphrunError, match="head.weight"):
        trainable_scale_invariant(model)


def test_seeds_split_trainable_init_from_frozen_head():
    a = build_model("convnet", 4, 10, 10.0, seed=0, head_seed=0)
    b = build_model("convnet", 4, 10, 10.0, seed=1, head_seed=0)
    assert torch.equal(a.head.weight, b.head.weight) and torch.equal(a.head.bias, b.head.bias)
    assert not torch.equal(a.features[0].weight, b.features[0].weight)
    assert abs(a.head.weight.norm().item() - 10.0) < 1e-5
    assert not any(p.requires_grad for p in a.head.parameters())
