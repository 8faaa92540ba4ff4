"""The paper's ConvNet and which of a network's parameters are scale-invariant.

Scale invariance is read from the network's structure (a torch.fx trace), never from parameter names:
a weight is scale-invariant when its layer has no bias and every path from the layer's output reaches
a BatchNorm through positively homogeneous operations only (ReLU, pooling, reshapes, bias-free linear
layers), so multiplying the weight by a > 0 multiplies the BatchNorm input by a, which cancels.
"""

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from sphrun import SphrunError

NORMALIZATIONS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
LINEAR_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
HOMOGENEOUS_MODULES = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)
HOMOGENEOUS_FUNCTIONS = (F.relu, torch.relu, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                         torch.flatten, operator.getitem)
HOMOGENEOUS_METHODS = ("relu", "view", "reshape", "flatten", "contiguous")


class ConvNet(nn.Module):
    """Table 1 of the paper: four bias-free 3x3 convolutions with BatchNorm (affine=False) and ReLU,
    then a frozen Linear layer. At width c = 32 the convolutions hold 387,936 parameters."""

    def __init__(self, width=32, num_classes=10):
        super().__init__()
        c = width
        block = lambda cin, cout, pool: [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                         nn.BatchNorm2d(cout, affine=False), nn.ReLU()] + (
                                            [nn.MaxPool2d(2)] if pool else [])
        self.features = nn.Sequential(*block(3, c, False), *block(c, 2 * c, True),
                                      *block(2 * c, 4 * c, True), *block(4 * c, 8 * c, True),
                                      nn.MaxPool2d(4), nn.Flatten())
        self.head = nn.Linear(8 * c, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def build_model(name, width, num_classes, init_scale, seed, head_seed):
    """A fully scale-invariant network on the CPU: trainable weights from `seed`, the last layer frozen
    at its init from `head_seed`, its weight rescaled to Frobenius norm `init_scale`."""
    if name != "convnet":
        raise SphrunError(f"unknown model {name!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConvNet(width, num_classes)
        torch.manual_seed(head_seed)
        model.head.reset_parameters()
    with torch.no_grad():
        model.head.weight.mul_(init_scale / model.head.weight.norm())
    model.head.requires_grad_(False)
    return model


def scale_invariant_parameters(model):
    """The parameters f is invariant to scaling one at a time, in model.parameters() order."""
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    found = set()
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], LINEAR_LAYERS):
            layer = modules[node.target]
            if layer.bias is None and _reaches_only_normalization(node, modules):
                found.add(id(layer.weight))
    return [p for p in model.parameters() if id(p) in found]


def _reaches_only_normalization(node, modules):
    if not node.users:
        return False  # the output itself: scaling changes it
    for user in node.users:
        if user.op == "call_module":
            module = modules[user.target]
            if isinstance(module, NORMALIZATIONS):
                continue
            homogeneous = isinstance(module, HOMOGENEOUS_MODULES) or (
                isinstance(module, LINEAR_LAYERS) and module.bias is None)
            # a bias-free layer is linear in its input only when the tensor is not its weight
            if homogeneous and user.args[0] is node and _reaches_only_normalization(user, modules):
                continue
        elif user.op == "call_function" and user.target in HOMOGENEOUS_FUNCTIONS:
            if user.args[0] is node and _reaches_only_normalization(user, modules):
                continue
        elif user.op == "call_method" and user.target in HOMOGENEOUS_METHODS:
            if user.args[0] is node and _reaches_only_normalization(user, modules):
                continue
        return False
    return True


def trainable_scale_invariant(model):
    """The trainable parameters, all of which must be scale-invariant for training on the sphere."""
    si = {id(p) for p in scale_invariant_parameters(model)}
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    foreign = [names[id(p)] for p in trainable if id(p) not in si]
    if foreign:
        raise SphrunError(f"cannot train on the sphere: trainable parameters {foreign} are not scale-invariant")
    return trainable
