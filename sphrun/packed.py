"""K models as one network (a pack), and the training step the loop replays.

Every run trains as a pack: several ELRs of the ConvNet on the sphere as K packed ConvNets, any other
run (one ELR, another model, off the sphere) as a pack of one. A pack's trainable tensors carry the
models along their first dimension, (K, ...), so norms, learning rates and projections are per slice
(sphrun.sphere with members), and its forward gives logits (B, K, classes). The models never mix:
the gradient of the sum of their losses is each model's own gradient.

PackedConvNet: every BatchNorm holds K*C channels, the frozen last layers are stacked. On CUDA one
grouped convolution (groups=K) computes a layer of all models and each BatchNorm runs over the K*C
channels, so every model keeps its own batch statistics exactly; on the CPU each model runs through its
slices with the very calls of its single run (the class says why).

The step (TrainingStep) reads its inputs from and writes its outputs to fixed device tensors, so that on CUDA
it is captured once in a CUDA graph and replayed, with cudnn.benchmark and channels_last tensors. The
first replay is checked against the same step taken eagerly; when capture fails (its graph and memory
then released), or the check does, one line says why and training goes on eagerly. A model whose step
goes non-finite (its loss, its step, or its norm off the sphere) is frozen on the device at its last
finite weights, without a host sync. --precision bf16 runs convolutions and matrix products in bfloat16 (autocast) while weights,
norms, the projection and BatchNorm statistics stay float32.
"""

import contextlib
import gc

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sphrun import SphrunError, noise
from sphrun.metrics import batch_loss
from sphrun.models import ConvNet, scale_invariant_parameters
from sphrun.progress import message
from sphrun.sphere import (BATCHED, EACH, global_norm, learning_rate, random_keys, random_noise, sgd_step,
                           step_direction, step_on_sphere)

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
        self.form = BATCHED if grouped else EACH  # the grouped form reduces over the K models at once
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
            torch._foreach_add_([bn.num_batches_tracked for bn in self.norms], 1)
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
                h = self.normalize(h, self.norms[which])
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
    def normalize(h, bn, channels=None):
        """nn.BatchNorm2d's computation on `channels` of `bn` (all by default), their running statistics
        updated in place."""
        mean, var = (bn.running_mean, bn.running_var) if channels is None else (
            bn.running_mean[channels], bn.running_var[channels])
        return F.batch_norm(h, mean, var, training=bn.training, momentum=bn.momentum, eps=bn.eps)

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

    form = EACH

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


class TrainingStep:
    """One training step of every model of a pack, reading its inputs from and writing its outputs to
    fixed device tensors, so that it can be replayed from a CUDA graph.

    In, fed by `take` before each step (device-to-device, no host sync): `idx` (the batch's image
    indices), `lr` (K learning rates: elr * rho0^2 on the sphere, the plain rate off it, a row of
    `rates`, the schedule computed once per pass) and `counter` (the step's number, which keys the random
    step's noise, drawn on the device: sphrun.noise). State: the weights, BatchNorm buffers, `momentum`
    buffers off the sphere, `alive` (K flags: a model stops once a step of it is non-finite or leaves
    the sphere, and keeps its weights from before that step), `proj_err_sum` (K sums of 1 - r), `loss`
    (the K latest batch losses).
    """

    def __init__(self, pack, data, configs, rho0s, device, momentum=None):
        self.pack, self.params, self.data, self.device = pack, pack.params, data, device
        self.config = config = configs[0]  # the settings the members share (all but ELR and seeds)
        self.members = pack.form  # how per-model reductions run: sphrun.sphere.EACH or BATCHED
        k = len(configs)
        self.rho = torch.tensor(rho0s, device=device)
        self.rates = torch.tensor(schedule(configs, rho0s), device=device)
        self.idx = torch.zeros(config.batch_size, dtype=torch.long, device=device)
        self.lr = torch.zeros(k, device=device)
        self.counter = torch.zeros((), dtype=torch.long, device=device)
        self.alive = torch.ones(k, dtype=torch.bool, device=device)
        self.proj_err_sum = torch.zeros(k, device=device)
        self.loss = torch.zeros(k, device=device)
        if momentum is None and not config.sphere:
            momentum = [torch.zeros_like(p) for p in self.params]
        self.momentum = momentum  # off the sphere: SGD's momentum buffers, packed like the weights
        self.before = [torch.empty_like(p) for p in self.params]  # the weights before the step
        self.noise_keys = self.elements = None
        if config.step == "random":  # each member's stream from its seed, as its single run draws it
            self.noise_keys = random_keys([c.seed for c in configs]).to(device)
            self.elements = noise.element_keys(noise.pairs(sum(p[0].numel() for p in self.params)), device)
        self.graph, self.eager_only, self.taken = None, device.type != "cuda", 0
        self.side = None if self.eager_only else torch.cuda.Stream(device)

    def take(self, it, batch):
        """Step `it` (counted over the lineage) on the images `batch`, a device tensor of indices."""
        self.idx.copy_(batch)
        self.lr.copy_(self.rates[min(it - self.config.origin, len(self.rates) - 1)])
        self.counter.fill_(it)
        self()

    def __call__(self):
        """One step: eager on the CPU; on CUDA the first CUDA_GRAPH_WARMUP steps eager on a side stream
        (as capture wants: lazy initialisation and cuDNN's benchmarking happen there), then the step is
        captured once, checked, and replayed."""
        if self.graph is not None:
            self.graph.replay()
        elif self.eager_only:
            self.eager()
        elif self.taken < CUDA_GRAPH_WARMUP:
            self.taken += 1
            main = torch.cuda.current_stream(self.device)
            self.side.wait_stream(main)
            with torch.cuda.stream(self.side):
                self.eager()
            main.wait_stream(self.side)
        else:
            self.capture_and_check()

    def eager(self):
        config, params, members = self.config, self.params, self.members
        x, y = self.data.train_x[self.idx], self.data.train_y[self.idx]
        with mixed_precision(config.precision, self.device):
            losses = batch_loss(self.pack(x), y, config.loss, members)
        grads = torch.autograd.grad(losses.sum(), params)  # the models are independent: the sum separates
        with torch.no_grad():
            torch._foreach_copy_(self.before, params)
            if config.sphere:
                drawn = None
                if self.noise_keys is not None:
                    drawn = random_noise(params, self.noise_keys, self.counter, members, self.elements)
                direction = step_direction(config.step, grads, params, members=members, noise=drawn)
                proj_err, norm = step_on_sphere(params, direction, self.lr, self.rho, config.geodesic, members)
            else:  # no projection: 1 - r is 0, and the norm only has to stay finite
                sgd_step(params, grads, self.lr, config.momentum, config.wd, self.momentum)
                proj_err, norm = torch.zeros_like(losses), global_norm(params, members)
            # finite: x * 0 is 0 for a finite x, NaN for an infinite or NaN one; on the sphere the
            # rescale also needs a norm above 0
            ok = self.alive & ((losses + proj_err + norm) * 0 == 0)
            if config.sphere:
                ok &= norm > 0
            for p, b in zip(params, self.before):
                p.copy_(torch.where(ok.view(-1, *[1] * (p.dim() - 1)), p, b))  # where: a NaN never leaks
            self.alive.copy_(ok)
            self.proj_err_sum.add_(torch.where(ok, proj_err, 0.0))
            self.loss.copy_(losses.detach())

    def capture(self):
        """Record the step as a CUDA graph, or stay eager when that fails, saying why (the step is the
        same either way; a failed capture ran no kernels, so it changed nothing). A failed capture (one
        an illegal op invalidated raises at its end) leaves the device as it was: the graph and its
        memory pool are released and the step's stream is current again, so the eager steps have it."""
        graph = None
        try:
            graph = torch.cuda.CUDAGraph()  # may refuse at once: nothing captured, nothing to release
            stream = torch.cuda.current_stream(self.device)
            with torch.cuda.graph(graph):
                self.eager()
        except Exception as e:  # the device's own refusal, whatever its kind: eager training still works
            failure = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        else:
            self.graph = graph
            return
        if graph is not None:  # after the except block: its traceback held the capture
            release_capture(graph, stream, self.device)
        self.eager_only = True
        message(f"note: CUDA graph capture failed ({failure}); training without it, more slowly")

    def capture_and_check(self):
        """Capture the step, then take it twice from the same state, eagerly and by the graph's first
        replay, and keep the graph only when the two agree on every tensor the step writes: a run never
        trains on a wrong graph. One extra step's work and one host sync per pass."""
        saved = clone(self.written())
        self.capture()
        if self.graph is None:
            restore(self.written(), saved)  # a capture runs no kernel; this holds even where one ran
            self.eager()
            return
        self.eager()
        expected = clone(self.written())
        restore(self.written(), saved)
        self.graph.replay()
        difference = first_difference(self.written(), expected)
        if difference:
            restore(self.written(), expected)
            self.graph, self.eager_only = None, True
            message(f"note: the CUDA graph's first step differs from the same step taken eagerly ({difference}); "
                    f"training without the graph, more slowly")

    def written(self):
        """Every tensor the step writes, by name."""
        tensors = {f"weight {i}": p for i, p in enumerate(self.params)}
        tensors.update({f"buffer {name}": b for name, b in self.pack.named_buffers()})
        tensors.update({f"momentum {i}": b for i, b in enumerate(self.momentum or [])})
        tensors.update(alive=self.alive, proj_err_sum=self.proj_err_sum, loss=self.loss)
        return tensors


def schedule(configs, rho0s):
    """The learning rates of the steps of a pass, (D + 1, K) numbers: row j for step origin + j (the
    members share their origin), the last row for every later step; D is the longest transition."""
    origin = configs[0].origin
    length = max(c.transition for c in configs)
    rate = lambda c, rho0, elr: learning_rate(elr, rho0) if c.sphere else elr
    return [[rate(c, rho0, c.elr_at(origin + j)) for c, rho0 in zip(configs, rho0s)] for j in range(length + 1)]


def release_capture(graph, stream, device):
    """Free a failed capture's graph and the memory its pool holds, and make `stream` (the one the
    capture started from: a capture that raises at its end leaves its own current) current again."""
    graph.reset()
    del graph
    torch.cuda.set_stream(stream)
    torch.cuda.synchronize(device)
    free_unused_memory()


def free_unused_memory():
    """Return the device memory no tensor holds any more (a collection first: cycles may hold some)."""
    gc.collect()
    torch.cuda.empty_cache()


def clone(tensors):
    return {name: t.clone() for name, t in tensors.items()}


@torch.no_grad()
def restore(tensors, saved):
    for name, t in tensors.items():
        t.copy_(saved[name])


def first_difference(tensors, expected, rtol=1e-5):
    """The name of the first of `tensors` that differs from `expected` beyond round-off, or None (one
    host sync). Round-off: rtol of each value plus rtol of the tensor's largest value; flags and counts
    match exactly, NaNs in place."""
    agree = []
    for name, t in tensors.items():
        e = expected[name]
        if t.is_floating_point() and t.numel():
            scale = e.abs().nan_to_num(0, 0, 0).max()
            agree.append(((t - e).abs() <= rtol * (e.abs() + scale)).logical_or(t.isnan() & e.isnan()).all())
        else:
            agree.append((t == e).all())
    for name, ok in zip(tensors, torch.stack(agree).tolist()):
        if not ok:
            return name
    return None
