"""The loops the benchmarks time, shared by train_throughput.py, sweep_throughput.py and gpu_check.py.

The reference style is how the authors' kind of code trains: a torchvision-style Dataset of uint8
images with a per-item ToTensor/Normalize transform, a shuffling DataLoader (4 workers, pinned memory),
torch.optim.SGD with lr = elr * rho0^2, `loss.item()` and the correct count `.item()` at every step,
and the norm recomputed in Python with `.item()` per tensor before rescaling to rho0.

sphrun's loop is `sphrun.train.run_pass` itself (the one loop of every run), with no evaluation point
in the timed window; a pack of K models counts K model-steps per step.
"""

import contextlib
import math
import os
import sys
import tempfile
import time

import torch
import torchvision.transforms as T
from PIL import Image

from sphrun.data import NORMALIZATION, BatchOrder, read_image_folder, synthetic_data
from sphrun.lifecycle import Member, load_run_data
from sphrun.metrics import batch_loss
from sphrun.models import build_model, trainable_scale_invariant
from sphrun.rundir import RunDir, Status
from sphrun.train import Pass, pack_members, run_pass


class ReferenceDataset(torch.utils.data.Dataset):
    """Like torchvision.datasets.CIFAR10: uint8 HWC arrays in memory, PIL and transforms per item."""

    def __init__(self, images, labels):
        mean, std = NORMALIZATION["cifar10"]
        self.images, self.labels = images, labels
        self.transform = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def uint8_images(data_dir):
    if data_dir:
        (images, labels), _, _ = read_image_folder(data_dir, 10)
        return images, labels
    data = synthetic_data()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION["cifar10"])
    images = ((data.train_x * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1)
    return images.numpy(), data.train_y.numpy()


def reference_steps_per_second(config, device, images, labels, steps, warmup):
    model = build_model("convnet", config.width, 10, config.init_scale, config.seed, config.head_seed).to(device)
    params = trainable_scale_invariant(model)
    rho0 = math.sqrt(sum(p.norm().item() ** 2 for p in params))
    optimizer = torch.optim.SGD(params, lr=config.elr * rho0 ** 2)
    loader = torch.utils.data.DataLoader(ReferenceDataset(images, labels), batch_size=config.batch_size,
                                         shuffle=True, num_workers=4, pin_memory=device.type == "cuda",
                                         persistent_workers=True)
    done, start = 0, None
    while done < warmup + steps:
        for x, y in loader:
            if done == warmup:
                synchronize(device)
                start = time.perf_counter()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad()
            logits = model(x)
            loss = batch_loss(logits, y, config.loss)
            loss.backward()
            optimizer.step()
            loss.item(), (logits.argmax(1) == y).sum().item()
            norm = math.sqrt(sum(p.norm().item() ** 2 for p in params))
            with torch.no_grad():
                for p in params:
                    p.mul_(rho0 / norm)
            done += 1
            if done == warmup + steps:
                break
    synchronize(device)
    return steps / (time.perf_counter() - start)


def sphrun_model_steps_per_second(configs, device, steps, warmup, clock=time.perf_counter):
    """Model-steps/s of sphrun's loop training `configs` (one pass: a pack of len(configs) models).
    `warmup` untimed steps first: on CUDA the step is captured in a CUDA graph there (after 3). `clock`:
    time.process_time gives the host's (CPU) time instead of the wall's."""
    first = configs[0]
    data, data_id = load_run_data(first, device)
    order = BatchOrder(len(data.train_y), first.batch_size, first.data_seed, device)
    with tempfile.TemporaryDirectory() as folder:
        members = [Member(c, RunDir(os.path.join(folder, str(i)))) for i, c in enumerate(configs)]
        pack, step = pack_members(members, data, device)
        for m in members:
            m.run.write_config(m.config_record(data, data_id, order, sys.argv))

        def train_to(total):  # no evaluation point: the loop's steps alone
            for m in members:
                m.status = Status.RUNNING
            run_pass(Pass(members, pack, step, data, order, total, eval_steps=[], keep={}))

        train_to(warmup)
        synchronize(device)
        start = clock()
        train_to(warmup + steps)
        synchronize(device)
        return len(configs) * steps / (clock() - start)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vmap_model_steps_per_second(configs, device, steps, warmup):
    """Model-steps/s of PyTorch's model-ensembling recipe, as a user would write it instead of sphrun's
    pack: the K ConvNets' states stacked (torch.func.stack_module_state), one functional_call vmapped
    over them, per-model gradients from torch.func.grad, then each model's SGD step with its own learning
    rate and its rescale to its rho0. BatchNorm keeps no running statistics (replace_all_batch_norm_
    modules_, the recipe's way round in-place buffer updates under vmap), which saves it work."""
    from torch.func import functional_call, grad, replace_all_batch_norm_modules_, stack_module_state, vmap

    first = configs[0]
    data, _ = load_run_data(first, device)
    order = BatchOrder(len(data.train_y), first.batch_size, first.data_seed, device)
    models = [build_model("convnet", c.width, data.num_classes, c.init_scale, c.seed, c.head_seed).to(device)
              for c in configs]
    for m in models:
        replace_all_batch_norm_modules_(m)
    params, buffers = stack_module_state(models)
    names = [n for n, p in models[0].named_parameters() if p.requires_grad]
    trainable = {n: params[n] for n in names}
    frozen = {n: p for n, p in params.items() if n not in names}
    base = models[0]
    rho0 = torch.stack([p.reshape(len(configs), -1).square().sum(1) for p in trainable.values()]).sum(0).sqrt()
    lr = torch.tensor([c.elr for c in configs], device=device) * rho0 ** 2
    precision = torch.autocast(device.type, dtype=torch.bfloat16) if first.precision == "bf16" else None

    def loss(weights, rest, x, y):
        with precision or contextlib.nullcontext():
            return batch_loss(functional_call(base, ({**weights, **rest}, {}), (x,)), y, first.loss)

    step_grads = vmap(grad(loss), in_dims=(0, 0, None, None))

    def step(it):
        idx = order.indices(it)
        grads = step_grads(trainable, frozen, data.train_x[idx], data.train_y[idx])
        with torch.no_grad():
            for n in names:
                trainable[n].sub_(lr.view(-1, *[1] * (trainable[n].dim() - 1)) * grads[n])
            norm = torch.stack([p.reshape(len(configs), -1).square().sum(1) for p in trainable.values()]).sum(0).sqrt()
            for p in trainable.values():
                p.mul_((rho0 / norm).view(-1, *[1] * (p.dim() - 1)))

    for it in range(warmup):
        step(it)
    synchronize(device)
    start = time.perf_counter()
    for it in range(warmup, warmup + steps):
        step(it)
    synchronize(device)
    return len(configs) * steps / (time.perf_counter() - start)
