"""A whole ELR sweep in one process: K ConvNets that differ only in their ELR, trained as one network.

Packing (DESIGN.md, "Performance habits"): the trainable weights of the K models are (K, out, in, 3, 3)
tensors, each model a slice along the first dimension, so norms, learning rates and projections are
per slice (sphrun.sphere with members=True); every BatchNorm holds K*C channels, the frozen last layers
are stacked. On CUDA one grouped convolution (groups=K) computes a layer of all models and each
BatchNorm runs over the K*C channels, so every model keeps its own batch statistics exactly; on the CPU
each model runs through its slices with the very calls of its single run (PackedConvNet says why). The
models never mix: the gradient of the sum of their losses is each model's own gradient.

Each model writes a standard run directory through RunDir and RunState: its slice of the packed state
goes back into a ConvNet state dict at every checkpoint, so the run resumes, extends, fine-tunes and
connects like a single one, and its config.json holds the settings of the single run at that ELR.

A model whose step goes non-finite (its loss, its step, or its norm off the sphere) is frozen on the
device at its last finite weights, without a host sync, and marked diverged at the next sync; the
others go on. On CUDA the step runs on channels_last tensors with cudnn.benchmark and is replayed from a
CUDA graph when capture works (silently eager when not); --precision bf16 runs the convolutions in
bfloat16 while weights, norms, projection and BatchNorm statistics stay float32.
"""

import contextlib
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sphrun import SphrunError
from sphrun.config import TrainConfig
from sphrun.data import BatchOrder, load_data
from sphrun.metrics import batch_loss, eval_metrics, train_metrics
from sphrun.models import ConvNet
from sphrun.progress import StepProgress, message
from sphrun.rundir import RunDir
from sphrun.sphere import global_norm, learning_rate, step_direction, step_on_sphere
from sphrun.lifecycle import (RunState, check_same_run, default_run_path, fresh_state, nothing_left, prepare,
                              resolve_device, run_record, total_steps)
from sphrun.train import (Interrupted, StopRequest, diverged, evaluation_steps, format_row, is_finite_row,
                          metrics_row, mixed_precision)

CUDA_GRAPH_WARMUP = 3  # eager steps before capture (real training steps): cuDNN and autograd settle first


# --- the packed network ---------------------------------------------------------------------------
class PackedConvNet(nn.Module):
    """K ConvNets of one shape as one network: input (B, 3, H, W), logits (B, K, classes).

    The state is packed: each convolution's weights are one (K, out, in, 3, 3) parameter, each BatchNorm
    keeps the K models' running statistics over K*C channels, model-major, and the frozen last layers
    are (K, classes, features) and (K, classes) buffers. Two ways to compute with it:

    grouped=True (the CUDA path): one convolution per layer over K*C channels (groups=K; the first one
    reads the shared image, so it is a plain convolution to K*c channels), one BatchNorm over K*C
    channels, which keeps each model's batch statistics exactly, one batched product for the last layers.

    grouped=False (the CPU path): each model runs through its slices of the packed state with the very
    calls of its single run, so it computes its single run's numbers to the bit. That matters: where two
    inputs of a max-pool tie to the last bit, another rounding picks the other one, and the first steps
    amplify such a difference a thousandfold within 50 steps. (oneDNN's grouped convolutions round
    otherwise, and on the CPU they are no faster than K calls.)
    """

    def __init__(self, models, grouped=False, channels_last=False):
        super().__init__()
        if not all(isinstance(m, ConvNet) for m in models):
            raise SphrunError("only the ConvNet packs: train other models one ELR at a time")
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
        h = x.contiguous(memory_format=memory_format)
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

    def member_state_dict(self, k, template):
        """Model k's slice as the state dict of `template`, a ConvNet of the members' shape."""
        state = template.state_dict()
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
        return state


def packed_batchnorm(norms):
    """One BatchNorm over the K models' channels, model-major, with their running statistics."""
    first = norms[0]
    packed = nn.BatchNorm2d(first.num_features * len(norms), eps=first.eps, momentum=first.momentum,
                            affine=False)
    with torch.no_grad():
        packed.running_mean.copy_(torch.cat([n.running_mean for n in norms]))
        packed.running_var.copy_(torch.cat([n.running_var for n in norms]))
        packed.num_batches_tracked.copy_(first.num_batches_tracked)
    return packed


def member_params(params, k):
    """Model k's trainable tensors, as views of the packed ones (the order of a ConvNet's parameters)."""
    return [p[k] for p in params]


# --- the step -------------------------------------------------------------------------------------
class PackedStep:
    """One training step of every model, reading its inputs from and writing its outputs to fixed device
    tensors, so that it can be replayed from a CUDA graph.

    In: `idx` (the batch's image indices), `lr` (K learning rates) and `step` (the step number, which
    seeds random directions, so that kind is never captured). State: the weights, BatchNorm buffers,
    `alive` (K flags: a model stops once a step of it is non-finite or leaves the sphere, and keeps its
    weights from before that step), `proj_err_sum` (K sums of 1 - r), `loss` (the K latest batch losses).
    """

    def __init__(self, model, params, data, config, rho):
        device = params[0].device
        self.model, self.params, self.data, self.config, self.rho = model, params, data, config, rho
        k = len(rho)
        self.idx = torch.zeros(config.batch_size, dtype=torch.long, device=device)
        self.lr = torch.zeros(k, device=device)
        self.alive = torch.ones(k, dtype=torch.bool, device=device)
        self.proj_err_sum = torch.zeros(k, device=device)
        self.loss = torch.zeros(k, device=device)
        self.step = 0
        self.graph = None

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self.eager()

    def eager(self):
        config, params, rho = self.config, self.params, self.rho
        x, y = self.data.train_x[self.idx], self.data.train_y[self.idx]
        with mixed_precision(config, x.device):
            losses = batch_loss(self.model(x), y, config.loss)
        grads = torch.autograd.grad(losses.sum(), params)  # the models are independent: the sum separates
        with torch.no_grad():
            direction = step_direction(config.step, grads, params, config.seed, self.step, members=True)
            before = [p.clone() for p in params]
            proj_err = step_on_sphere(params, direction, self.lr, rho, config.geodesic, members=True)
            on_sphere = (global_norm(params, members=True) - rho).abs() <= 1e-3 * rho  # False for NaN
            ok = self.alive & torch.isfinite(losses) & torch.isfinite(proj_err) & on_sphere
            for p, b in zip(params, before):
                p.copy_(torch.where(ok.view(-1, *[1] * (p.dim() - 1)), p, b))  # where: a NaN never leaks
            self.alive.copy_(ok)
            self.proj_err_sum.add_(torch.where(ok, proj_err, torch.zeros_like(proj_err)))
            self.loss.copy_(losses)

    def capture(self):
        """Record the step as a CUDA graph, or stay eager when that fails (the step is the same either
        way, and capture runs no kernels, so a failed one changes nothing)."""
        if self.config.step == "random":  # a generator seeded per step cannot be replayed
            return
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.eager()
            self.graph = graph
        except Exception:
            self.graph = None


def run_step(step, taken, side, device):
    """One step: eager on the CPU; on CUDA the first CUDA_GRAPH_WARMUP steps of a pass eager on a side
    stream (as capture wants: lazy initialisation and cuDNN's benchmarking happen there), then the step
    is captured once and replayed."""
    if device.type != "cuda" or step.graph is not None:
        return step()
    if taken < CUDA_GRAPH_WARMUP:
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(device).wait_stream(side)
        return
    if taken == CUDA_GRAPH_WARMUP:
        step.capture()
    step()


# --- a sweep --------------------------------------------------------------------------------------
@dataclass
class Member:
    """One ELR of the sweep: its settings, run directory, where it starts, and its state once packed."""
    config: TrainConfig
    run: RunDir
    checkpoint: dict | None = None  # last.pt of an existing run; None for a new one
    status: str = "running"  # running while it has work to do, else the run's status
    state: RunState | None = None

    @property
    def start(self):
        return int(self.checkpoint["iter"]) if self.checkpoint else self.config.origin


def check_packable(config):
    if config.model != "convnet" or not config.sphere:
        what = f"--model {config.model}" + ("" if config.sphere else " --no-sphere")
        raise SphrunError(f"several ELRs train as one packed ConvNet on the sphere; with {what} train one "
                          f"ELR per command (a shell loop over --elr)")
    if config.origin != 0:
        raise SphrunError("a packed sweep starts from the init: fine-tune one ELR at a time")


def run_paths(configs, parent):
    """Each ELR's run directory: its default name, under `parent` (default: where single runs go)."""
    paths = [os.path.join(parent, c.default_run_name()) if parent else default_run_path(c) for c in configs]
    if len(set(paths)) < len(paths):
        raise SphrunError("two ELRs of the sweep round to the same run name: give ELRs that differ in "
                          "their first 3 significant digits")
    return paths


def open_member(config, path, total):
    """The member of `config` in `path`: new, to resume or extend, or with nothing left to do."""
    member = Member(config, RunDir(path))
    if member.run.exists():
        stored = check_same_run(member.run, config)
        member.checkpoint = member.run.load_checkpoint("last")
        member.status = nothing_left(member.run, stored, config, member.start, total) or "running"
    return member


def passes(members, pack):
    """Groups of at most `pack` members that start at the same step (a pass trains them in lockstep)."""
    groups = []
    for m in sorted(members, key=lambda m: m.start):
        if groups and groups[-1][0].start == m.start and len(groups[-1]) < pack:
            groups[-1].append(m)
        else:
            groups.append([m])
    return groups


def train_sweep(configs, parent=None, pack=None, argv=()):
    """Train the runs of `configs` (one setting apart: the ELR), `pack` models per pass (default: all).

    Starts, resumes or extends each run in its own directory, `parent`/<default run name> (default:
    where single runs go); every directory is checked before any training. Returns [(run directory,
    status)] in the order of `configs`.
    """
    if pack is not None and pack < 1:
        raise SphrunError(f"--pack must be at least 1 model per pass, got {pack}")
    first = configs[0]
    check_packable(first)
    device = resolve_device(first.device)
    data = load_data(first.dataset, first.data_dir, first.subset, device)
    order = BatchOrder(len(data.train_y), first.batch_size, first.data_seed, device)
    total = total_steps(first, order.steps_per_epoch)
    members = [open_member(c, p, total) for c, p in zip(configs, run_paths(configs, parent))]
    groups = passes([m for m in members if m.status == "running"], pack or len(members))
    for number, group in enumerate(groups, 1):
        where = os.path.dirname(str(group[0].run)) or "."
        what = "training" if group[0].start == 0 else "resuming"
        elrs = ", ".join(f"{m.config.elr:.3g}" for m in group)
        message(f"{what} {len(group)} ELR{'s' * (len(group) > 1)} packed ({elrs}) from step {group[0].start} "
                f"to {total} ({order.steps_per_epoch} per epoch) on {device}, runs in {where}/"
                + (f": pass {number} of {len(groups)}" if len(groups) > 1 else ""))
        train_pass(group, data, order, device, total, argv)
    return [(m.run, m.status) for m in members]


def pack_members(members, data, order, device):
    """The members' models (from their checkpoints, or their init) packed: (packed model, its trainable
    tensors, the step, a ConvNet to write checkpoints from). Sets each member's RunState."""
    models = []
    for m in members:
        _, model, params, _ = prepare(m.config, device, data)
        m.state = (RunState.from_checkpoint(m.checkpoint, model, params, m.run.checkpoint_path("last"))
                   if m.checkpoint else fresh_state(params))
        models.append(model)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # one shape all along: let cuDNN time its kernels once
    packed = PackedConvNet(models, grouped=cuda, channels_last=cuda)
    params = list(packed.weights)
    rho = torch.tensor([m.state.rho0 for m in members], device=device)
    return packed, params, PackedStep(packed, params, data, members[0].config, rho), models[0]


def train_pass(members, data, order, device, total, argv):
    """Train `members`, all at one step, together to step `total`, each in its run directory."""
    config = members[0].config
    packed, params, step, template = pack_members(members, data, order, device)
    eval_steps = evaluation_steps(config.origin, total, order.steps_per_epoch, config.eval_every)
    with contextlib.ExitStack() as locks:
        for m in members:
            locks.enter_context(m.run.lock())
        new = [k for k, m in enumerate(members) if m.checkpoint is None]
        for m in members:
            if m.checkpoint is not None:
                m.run.truncate_metrics(m.start)
                m.run.set_status("running")
            else:
                m.run.write_config(run_record(m.config, data, order, m.state.rho0, argv))
        if new:  # a new run's first row and checkpoint
            record(packed, params, data, config, order, members, new, template, keep=True)
            freeze_diverged(step, members)
        run_pass(packed, params, step, data, config, order, members, template, total, eval_steps)


def run_pass(packed, params, step, data, config, order, members, template, total, eval_steps):
    """The loop of a pass, from the members' step to `total`: steps without host syncs, evaluation
    points, divergence, Ctrl-C. Leaves the members' RunStates at the step reached."""
    device = params[0].device
    keep_iter_file = {s: i % (config.keep or 1) == 0 or s == total for i, s in enumerate(eval_steps)}
    it = members[0].state.iter
    pending = [s for s in eval_steps if s > it]
    elrs = None
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    with StopRequest() as stop, StepProgress(total, start=it, label=f"{len(members)} ELRs") as bar:
        tick, since, taken = time.perf_counter(), 0, 0
        while it < total and any(m.status == "running" for m in members):
            now_elrs = [m.config.elr_at(it) for m in members]
            if now_elrs != elrs:  # a host-to-device copy only when an ELR changes
                elrs = now_elrs
                step.lr.copy_(torch.tensor([learning_rate(e, m.state.rho0) for e, m in zip(elrs, members)]))
            step.idx.copy_(order.indices(it))
            step.step = it
            run_step(step, taken, side, device)
            it, since, taken = it + 1, since + 1, taken + 1
            at_eval = pending and it == pending[0]
            if bar.due() or at_eval:  # the only host syncs: a few per second, and evaluation points
                alive, losses = step.alive.tolist(), step.loss.tolist()
                for m, ok in zip(members, alive):
                    if m.status == "running" and not ok:
                        m.state.iter = it
                        m.status = diverged(m.run, m.state)
                running = [k for k, m in enumerate(members) if m.status == "running"]
                if running:
                    best = min(running, key=lambda k: losses[k])
                    bar.update(it, losses[best], elrs[best])
            if at_eval:
                pending.pop(0)
                catch_up(members, step, it, since, tick)
                since = 0
                running = [k for k, m in enumerate(members) if m.status == "running"]
                for row in record(packed, params, data, config, order, members, running, template,
                                  keep=keep_iter_file[it]):
                    bar.log(f"elr {row['elr']:<9.3g} " + format_row(row))
                freeze_diverged(step, members)
                tick = time.perf_counter()
            if stop.requested:
                catch_up(members, step, it, since, tick)
                for k, m in enumerate(members):
                    if m.status == "running":
                        save(m, packed, template, k, at_eval_point=False)
                        m.run.set_status("interrupted")
                where = os.path.dirname(str(members[0].run)) or "."
                raise Interrupted(f"interrupted at step {it}: checkpoints saved in the runs in {where}/; "
                                  f"run the same command to resume")
    catch_up(members, step, it, since, tick)
    for m in members:
        if m.status == "running":
            m.run.set_status("done")
            m.status = "done"


def catch_up(members, step, it, steps, tick):
    """Bring the running members' RunStates to step `it`: `steps` more steps, the pass's projection
    errors since they last were (moved out of the step's accumulator) and the time since `tick`."""
    now = time.perf_counter()
    for k, m in enumerate(members):
        if m.status == "running":
            m.state.iter = it
            m.state.proj_err_sum = m.state.proj_err_sum + step.proj_err_sum[k]
            m.state.proj_err_steps += steps
            m.state.wall_s += now - tick
    step.proj_err_sum.zero_()


def freeze_diverged(step, members):
    """Stop moving the members found diverged at an evaluation point (a non-finite row)."""
    for k, m in enumerate(members):
        if m.status == "diverged":
            step.alive[k] = False


def latest_elr(config, it):
    """The ELR of the step that led to step `it` (at the run's start: its own ELR)."""
    return config.elr_at(it - 1) if it > config.origin else config.elr


def save(member, packed, template, k, at_eval_point):
    """Member k's checkpoint: its slice of the packed state, as a single ConvNet's, through its RunState."""
    template.load_state_dict(packed.member_state_dict(k, template))
    checkpoint = member.state.checkpoint(template, latest_elr(member.config, member.state.iter))
    member.run.save_checkpoint(checkpoint, at_eval_point=at_eval_point)


def record(packed, params, data, config, order, members, which, template, keep):
    """Evaluate every packed model in one pass over the data; for the members `which` (indices), write
    the metrics row and checkpoint, or mark the member diverged when its row is not finite. Returns the
    rows written."""
    start = time.perf_counter()
    with mixed_precision(config, data.train_x.device):
        train_loss, train_err, gm = train_metrics(packed, params, data.train_x, data.train_y, config.loss,
                                                  config.batch_size, order.permutation(0))
        test_loss, test_err = eval_metrics(packed, data.test_x, data.test_y, config.loss)
    norms = global_norm(params, members=True).tolist()
    rows = []
    for k in which:
        m = members[k]
        measured = {"train_loss": train_loss[k], "train_err": train_err[k], "test_loss": test_loss[k],
                    "test_err": test_err[k], "gm": gm[k], "si_norm": norms[k]}
        row = metrics_row(m.state, member_params(params, k), latest_elr(m.config, m.state.iter),
                          order.steps_per_epoch, measured, start)
        if not is_finite_row(row):
            m.status = diverged(m.run, m.state)
            continue
        m.run.append_metrics(row)
        save(m, packed, template, k, at_eval_point=keep)
        rows.append(row)
    return rows
