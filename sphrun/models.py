"""The networks (the paper's ConvNet, VGG-16-BN, pre-activation ResNet-18) and which of a network's
parameters are scale-invariant.

Each network comes in two forms: fully scale-invariant, for training on the sphere (BatchNorm without
affine parameters, the last layer frozen, every trainable tensor SI), and conventional (BatchNorm
affine, every parameter trainable).

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


def batchnorm(channels, scale_invariant):
    """BatchNorm2d (momentum 0.1); its affine parameters are neither scale-invariant nor needed on the
    sphere, so the scale-invariant form has none."""
    return nn.BatchNorm2d(channels, affine=not scale_invariant)


class ConvNet(nn.Module):
    """Table 1 of the paper: four bias-free 3x3 convolutions with BatchNorm and ReLU, then the last
    Linear layer. At width c = 32 the convolutions hold 387,936 parameters."""

    def __init__(self, width=32, num_classes=10, scale_invariant=True):
        super().__init__()
        c = width
        block = lambda cin, cout, pool: [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                         batchnorm(cout, scale_invariant), nn.ReLU()] + (
                                            [nn.MaxPool2d(2)] if pool else [])
        self.features = nn.Sequential(*block(3, c, False), *block(c, 2 * c, True),
                                      *block(2 * c, 4 * c, True), *block(4 * c, 8 * c, True),
                                      nn.MaxPool2d(4), nn.Flatten())
        self.head = nn.Linear(8 * c, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


# Channels in units of the width (64 in the usual model); "M" is a 2x2 max-pool.
VGG16_LAYOUT = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M")


class VGG16BN(nn.Module):
    """The usual CIFAR VGG-16 with BatchNorm: thirteen 3x3 convolutions, each followed by BatchNorm and
    ReLU, five max-pools down to 1x1, one Linear classifier. Width 64 gives 64-...-512 channels.

    The convolutions have no bias in either form: BatchNorm subtracts the batch mean, so a bias before
    it has zero gradient and changes nothing."""

    def __init__(self, width=64, num_classes=10, scale_invariant=True):
        super().__init__()
        layers, cin = [], 3
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                cout = item * width
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), batchnorm(cout, scale_invariant),
                           nn.ReLU()]
                cin = cout
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the shortcut (identity, or a strided 1x1 projection of the
    pre-activated input). The scale-invariant form closes the branch and the projection with a
    BatchNorm each: without them those convolutions feed the sum, and scaling one summand is not
    undone by the BatchNorm that follows the sum."""

    def __init__(self, cin, cout, stride, scale_invariant):
        super().__init__()
        self.bn1 = batchnorm(cin, scale_invariant)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn2 = batchnorm(cout, scale_invariant)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn3 = batchnorm(cout, True) if scale_invariant else nn.Identity()
        self.shortcut = None
        if stride != 1 or cin != cout:
            projection = [nn.Conv2d(cin, cout, 1, stride, bias=False)]
            self.shortcut = nn.Sequential(*projection, *([batchnorm(cout, True)] if scale_invariant else []))

    def forward(self, x):
        h = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(h)
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return self.bn3(h) + shortcut


class PreActResNet18(nn.Module):
    """The pre-activation CIFAR ResNet-18 (He et al., "Identity mappings in deep residual networks",
    2016): a 3x3 stem convolution, four stages of two blocks with width, 2, 4, 8 x width channels
    (strides 1, 2, 2, 2), a final BN-ReLU, global average pooling and one Linear classifier.

    The conventional form (scale_invariant=False) is the textbook model, BatchNorm affine. The fully
    scale-invariant form differs in three places, each so that a convolution feeds a BatchNorm rather
    than a residual sum: a BatchNorm after the stem (its output enters the first identity shortcut), one
    at the end of every residual branch, and one after every shortcut projection. Each block then adds
    normalized tensors, so every convolution is scale-invariant on its own, not only all of them jointly.
    """

    def __init__(self, width=64, num_classes=10, scale_invariant=True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False),
                                  *([batchnorm(width, True)] if scale_invariant else []))
        blocks, cin = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2 ** stage
            blocks += [PreActBlock(cin, cout, stride, scale_invariant), PreActBlock(cout, cout, 1, scale_invariant)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = batchnorm(cin, scale_invariant)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        h = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


ARCHITECTURES = {"convnet": ConvNet, "vgg16bn": VGG16BN, "resnet18": PreActResNet18}


def build_model(name, width, num_classes, init_scale, seed, head_seed, sphere=True):
    """A network on the CPU, its weights from `seed` and its last layer from `head_seed`.

    On the sphere: the fully scale-invariant form, the last layer frozen at its init, its weight rescaled
    to Frobenius norm `init_scale`. Off the sphere: the conventional form, every parameter trainable, the
    last layer at torch's init (rescaled to `init_scale` when one is given).
    """
    if name not in ARCHITECTURES:
        raise SphrunError(f"unknown model {name!r}: choose one of {', '.join(ARCHITECTURES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ARCHITECTURES[name](width, num_classes, scale_invariant=sphere)
        torch.manual_seed(head_seed)
        model.head.reset_parameters()
    if init_scale is not None:
        with torch.no_grad():
            model.head.weight.mul_(init_scale / model.head.weight.norm())
    if sphere:
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
