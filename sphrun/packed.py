"""K models as one network (a pack), and the training step the loop replays.

Every run trains as a pack: several ELRs of the ConvNet on the sphere as K packed ConvNets, any other
run (one ELR, another model, off the sphere) as a pack of one. A pack's trainable tensors carry the
models along their first dimension, (K, ...), so norms, learning rates and projections are per slice
(sphrun.sphere with members=True), and its forward gives logits (B, K, classes). The models never mix:
the gradient of the sum of their losses is each model's own gradient.

PackedConvNet: every BatchNorm holds K*C channels, the frozen last layers are stacked. On CUDA one
grouped convolution (groups=K) computes a layer of all models and each BatchNorm runs over the K*C
channels, so every model keeps its own batch statistics exactly; on the CPU each model runs through its
slices with the very calls of its single run (the class says why).

The step (Step) reads its inputs from and writes its outputs to fixed device tensors, so that on CUDA
it is captured once in a CUDA graph and replayed (eagerly, with a one-line note saying why, when capture
fails); with cudnn.benchmark and channels_last tensors. A model whose step goes non-finite (its loss,
its step, or its norm off the sphere) is frozen on the device at its last finite weights, without a
host sync. --precision bf16 runs convolutions and matrix products in bfloat16 (autocast) while weights,
norms, the projection and BatchNorm statistics stay float32.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sphrun import SphrunError
from sphrun.metrics import batch_loss
from sphrun.models import ConvNet, scale_invariant_parameters
from sphrun.progress import message
from sphrun.sphere import global_norm, random_noise, sgd_step, step_direction, step_on_sphere

CUDA_GRAPH_WARMUP = 3  # eager steps before capture (real training steps): cuDNN and autograd settle first


class PackedConvNet(nn.Module):
    """K ConvNets of one shape as one network: input (B, 3, H, W), logits (B, K, classes).

    The state is packed: each convolution's weights are one (K, out, in, 3, 3) parameter, each BatchNorm
    keeps the K models' running statistics over K*C channels, model-major, and the frozen last layers
    are (K, classes, features) and (K, classes) buffers. Two ways to compute with it:

    grouped=True (the CUDA path): one convolution per layer over K*C channels (groups=K; the first one
    reads the shared image, so it is a plain convolution to K*c channels), one BatchNorm over K*C
    channels, which keeps each model's batch statistics exactly, one batched product for the last layers.

    grouped=False (the CPU path): each model runs through its slices of the packed state with the very
    calls of its single run, so a model computes the same numbers packed with others as alone. That
    matters: where two inputs of a max-pool tie to the last bit, another rounding picks the other one,
    and the first steps amplify such a difference a thousandfold within 50 steps. (oneDNN's grouped
    convolutions round otherwise, and on the CPU they are no faster than K calls.)

    Built on the device of `models`, every tensor of it stays there.
    """

    def __init__(self, models, grouped=False, channels_last=False):
        super().__init__()
        if not all(isinstance(m, ConvNet) for m in models):
            raise SphrunError("only the ConvNet packs: train other models one run at a time")
        self.members = len(models)
        self.grouped, self.channels_last = grouped, channels_last
        self.layers = []  # (kind, position in features, weight/norm index or module), in forward order
        weights, norms = [], []
        for position, module in enumerate(models[0].features):
            if isinstance(module, nn.Conv2d):
                if (module.stride, module.padding, module.dilation, module.groups) != ((1, 1), (1, 1), (1, 1), 1):
                    raise SphrunError("packing expects the ConvNet's 3x3 convolutions, stride 1, padding 1")
                weights.append(nn.Parameter(torch.stack([m.features[position].weight.detach() for m in models])))
                self.layers.append(("conv", position, len(weights) - 1))
            elif isinstance(module, nn.BatchNorm2d):
                norms.append(packed_batchnorm([m.features[position] for m in models]))
                self.layers.append(("bn", position, len(norms) - 1))
            else:  # ReLU, max-pool, flatten: no state, per channel, so they act on each model apart
                self.layers.append(("same", position, module))
        self.weights = nn.ParameterList(weights)
        self.norms = nn.ModuleList(norms)
        self.register_buffer("head_weight", torch.stack([m.head.weight.detach() for m in models]).clone())
        self.register_buffer("head_bias", torch.stack([m.head.bias.detach() for m in models]).clone())
        self.state_names = list(models[0].state_dict())  # a member's checkpoint keys, in a ConvNet's order

    @property
    def params(self):
        """The trainable tensors, (K, ...) each, in a ConvNet's parameter order."""
        return list(self.weights)

    @property
    def si_params(self):
        return self.params  # on the sphere every trainable tensor is scale-invariant

    def forward(self, x):
        if self.grouped:
            logits = self.forward_grouped(x)
        else:
            logits = torch.stack([self.forward_member(x, k) for k in range(self.members)], dim=1)
        if self.training:  # what each nn.BatchNorm2d counts in train mode (bookkeeping: momentum is fixed)
            for bn in self.norms:
                bn.num_batches_tracked.add_(1)
        return logits

    def forward_grouped(self, x):
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        h = x.contiguous(memory_format=memory_format)  # a no-op for data stored channels_last
        for kind, _, which in self.layers:
            if kind == "conv":
                w = self.weights[which]
                kernel = w.reshape(-1, *w.shape[2:]).contiguous(memory_format=memory_format)
                h = F.conv2d(h, kernel, padding=1, groups=1 if h.shape[1] == w.shape[2] else self.members)
            elif kind == "bn":
                h = self.normalize(h, self.norms[which], slice(None))
            else:
                h = which(h)
        h = h.reshape(len(x), self.members, -1)  # channels are model-major
        return torch.einsum("bkf,kcf->bkc", h, self.head_weight) + self.head_bias

    def forward_member(self, x, k):
        h = x
        for kind, _, which in self.layers:
            if kind == "conv":
                h = F.conv2d(h, self.weights[which][k], padding=1)
            elif kind == "bn":
                size = self.norms[which].num_features // self.members
                h = self.normalize(h, self.norms[which], slice(k * size, (k + 1) * size))
            else:
                h = which(h)
        return F.linear(h, self.head_weight[k], self.head_bias[k])

    @staticmethod
    def normalize(h, bn, channels):
        """nn.BatchNorm2d's computation on `channels` of `bn`, their running statistics updated in place."""
        return F.batch_norm(h, bn.running_mean[channels], bn.running_var[channels], training=bn.training,
                            momentum=bn.momentum, eps=bn.eps)

    def member_state_dict(self, k):
        """Model k's slice as a ConvNet's state dict (views of the packed state)."""
        state = {}
        for kind, position, which in self.layers:
            if kind == "conv":
                state[f"features.{position}.weight"] = self.weights[which][k].detach()
            elif kind == "bn":
                bn = self.norms[which]
                size = bn.num_features // self.members
                for name in ("running_mean", "running_var"):
                    state[f"features.{position}.{name}"] = getattr(bn, name)[k * size:(k + 1) * size]
                state[f"features.{position}.num_batches_tracked"] = bn.num_batches_tracked
        state["head.weight"], state["head.bias"] = self.head_weight[k], self.head_bias[k]
        return {name: state[name] for name in self.state_names}


def packed_batchnorm(norms):
    """One BatchNorm over the K models' channels, model-major, with their running statistics, on their
    device (a BatchNorm built on the CPU would stay there while the data is on the GPU)."""
    first = norms[0]
    packed = nn.BatchNorm2d(first.num_features * len(norms), eps=first.eps, momentum=first.momentum,
                            affine=False, device=first.running_mean.device)
    with torch.no_grad():
        packed.running_mean.copy_(torch.cat([n.running_mean for n in norms]))
        packed.running_var.copy_(torch.cat([n.running_var for n in norms]))
        packed.num_batches_tracked.copy_(first.num_batches_tracked)
    return packed


class PackOfOne(nn.Module):
    """Any single model as a pack of one: logits (B, 1, classes), each trainable tensor a (1, ...)
    parameter that shares its memory with the model's own, so the model's state_dict is always current.
    The forward runs the model with views of these (torch.func.functional_call), so gradients reach them."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        trainable = dict(model.named_parameters())
        self.packed = nn.ParameterList([nn.Parameter(trainable[n].detach().unsqueeze(0)) for n in self.names])
        si = {id(p) for p in scale_invariant_parameters(model)}
        self.si_index = [i for i, n in enumerate(self.names) if id(trainable[n]) in si]

    @property
    def params(self):
        return list(self.packed)

    @property
    def si_params(self):
        """The scale-invariant ones among the trainable tensors (all of them on the sphere)."""
        return [self.packed[i] for i in self.si_index]

    def forward(self, x):
        views = {name: p[0] for name, p in zip(self.names, self.packed)}
        return functional_call(self.model, views, (x,)).unsqueeze(1)

    def member_state_dict(self, k):
        return self.model.state_dict()


def pack_models(models, sphere, device):
    """The models as one pack on `device`: the ConvNet on the sphere packs (grouped convolutions on
    CUDA), any other model trains as a pack of one. On CUDA, weights are channels_last."""
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # one shape all along: let cuDNN time its kernels once
    if sphere and all(isinstance(m, ConvNet) for m in models):
        return PackedConvNet(models, grouped=cuda, channels_last=cuda)
    if len(models) != 1:
        raise SphrunError("several models train as one packed ConvNet on the sphere only")
    model = models[0].to(memory_format=torch.channels_last) if cuda else models[0]
    return PackOfOne(model)


def member_params(params, k):
    """Model k's trainable tensors, as views of the packed ones."""
    return [p[k] for p in params]


def mixed_precision(precision, device):
    """--precision bf16: convolutions and matrix products in bfloat16 (autocast); weights, gradients,
    norms, the projection and BatchNorm statistics stay float32. Nothing for fp32. (No weight cache, so
    the context may be captured in a CUDA graph.)"""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


class Step:
    """One training step of every model of a pack, reading its inputs from and writing its outputs to
    fixed device tensors, so that it can be replayed from a CUDA graph.

    In: `idx` (the batch's image indices), `lr` (K learning rates: elr * rho0^2 on the sphere, the plain
    rate off it) and, for random steps, `noise` (filled by `draw_noise` before each step). State: the
    weights, BatchNorm buffers, `momentum` buffers off the sphere, `alive` (K flags: a model stops once a
    step of it is non-finite or leaves the sphere, and keeps its weights from before that step),
    `proj_err_sum` (K sums of 1 - r), `loss` (the K latest batch losses).
    """

    def __init__(self, pack, data, configs, rho, momentum=None):
        device = rho.device
        self.pack, self.params, self.data, self.rho = pack, pack.params, data, rho
        self.config = configs[0]  # the settings the members share (all but ELR and seeds)
        self.seeds = [c.seed for c in configs]
        k = len(configs)
        self.idx = torch.zeros(self.config.batch_size, dtype=torch.long, device=device)
        self.lr = torch.zeros(k, device=device)
        self.alive = torch.ones(k, dtype=torch.bool, device=device)
        self.proj_err_sum = torch.zeros(k, device=device)
        self.loss = torch.zeros(k, device=device)
        if momentum is None and not self.config.sphere:
            momentum = [torch.zeros_like(p) for p in self.params]
        self.momentum = momentum  # off the sphere: SGD's momentum buffers, packed like the weights
        self.noise = [torch.zeros_like(p) for p in self.params] if self.config.step == "random" else None
        self.graph, self.eager_only, self.taken = None, device.type != "cuda", 0
        self.side = None if self.eager_only else torch.cuda.Stream(device)

    def draw_noise(self, step):
        """The random step's Gaussian at `step`, each member's from its own (seed, step) as its single run
        draws it, on the CPU (the same numbers on every device), copied into the step's fixed tensors."""
        shapes = [p.shape[1:] for p in self.params]
        drawn = {seed: random_noise(shapes, seed, step) for seed in set(self.seeds)}
        for k, seed in enumerate(self.seeds):
            for buffer, values in zip(self.noise, drawn[seed]):
                buffer[k].copy_(values, non_blocking=True)

    def __call__(self):
        """One step: eager on the CPU; on CUDA the first CUDA_GRAPH_WARMUP steps eager on a side stream
        (as capture wants: lazy initialisation and cuDNN's benchmarking happen there), then the step is
        captured once and replayed."""
        if self.graph is not None:
            self.graph.replay()
        elif self.eager_only:
            self.eager()
        elif self.taken < CUDA_GRAPH_WARMUP:
            self.taken += 1
            main = torch.cuda.current_stream(self.rho.device)
            self.side.wait_stream(main)
            with torch.cuda.stream(self.side):
                self.eager()
            main.wait_stream(self.side)
        else:
            self.capture()
            self()

    def eager(self):
        config, params = self.config, self.params
        x, y = self.data.train_x[self.idx], self.data.train_y[self.idx]
        with mixed_precision(config.precision, x.device):
            losses = batch_loss(self.pack(x), y, config.loss)
        grads = torch.autograd.grad(losses.sum(), params)  # the models are independent: the sum separates
        with torch.no_grad():
            before = [p.clone() for p in params]
            if config.sphere:
                direction = step_direction(config.step, grads, params, members=True, noise=self.noise)
                proj_err = step_on_sphere(params, direction, self.lr, self.rho, config.geodesic, members=True)
                norms = global_norm(params, members=True)
                kept = (norms - self.rho).abs() <= 1e-3 * self.rho  # False for NaN
            else:  # no projection: 1 - r is 0, and the norm only has to stay finite
                sgd_step(params, grads, self.lr, config.momentum, config.wd, self.momentum)
                proj_err = torch.zeros_like(losses)
                kept = torch.isfinite(global_norm(params, members=True))
            ok = self.alive & torch.isfinite(losses) & torch.isfinite(proj_err) & kept
            for p, b in zip(params, before):
                p.copy_(torch.where(ok.view(-1, *[1] * (p.dim() - 1)), p, b))  # where: a NaN never leaks
            self.alive.copy_(ok)
            self.proj_err_sum.add_(torch.where(ok, proj_err, torch.zeros_like(proj_err)))
            self.loss.copy_(losses.detach())

    def capture(self):
        """Record the step as a CUDA graph, or stay eager when that fails, saying why (the step is the
        same either way; a failed capture ran no kernels, so it changed nothing)."""
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.eager()
            self.graph = graph
        except Exception as e:
            self.eager_only = True
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            message(f"note: CUDA graph capture failed ({type(e).__name__}: {reason}); training without it, "
                    f"more slowly")
