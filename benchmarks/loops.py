"""The loops the benchmarks time, shared by train_throughput.py, sweep_throughput.py and gpu_check.py.

The reference style is how the authors' kind of code trains: a torchvision-style Dataset of uint8
images with a per-item ToTensor/Normalize transform, a shuffling DataLoader (4 workers, pinned memory),
torch.optim.SGD with lr = elr * rho0^2, `loss.item()` and the correct count `.item()` at every step,
and the norm recomputed in Python with `.item()` per tensor before rescaling to rho0.

sphrun's loop is `sphrun.train.run_pass` itself (the one loop of every run), with no evaluation point
in the timed window; a pack of K models counts K model-steps per step.
"""

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
from sphrun.rundir import RunDir
from sphrun.train import pack_members, run_pass


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


def sphrun_model_steps_per_second(configs, device, steps, warmup):
    """Model-steps/s of sphrun's loop training `configs` (one pass: a pack of len(configs) models).
    `warmup` untimed steps first: on CUDA the step is captured in a CUDA graph there (after 3)."""
    first = configs[0]
    data, identity = load_run_data(first, device)
    order = BatchOrder(len(data.train_y), first.batch_size, first.data_seed, device)
    with tempfile.TemporaryDirectory() as folder:
        members = [Member(c, RunDir(os.path.join(folder, str(i)))) for i, c in enumerate(configs)]
        pack, step = pack_members(members, data, device)
        for m in members:
            m.run.write_config(m.record(data, identity, order, sys.argv))

        def train_to(total):
            for m in members:
                m.status = "running"
            run_pass(pack, step, data, order, members, total, [], {})

        train_to(warmup)
        synchronize(device)
        start = time.perf_counter()
        train_to(warmup + steps)
        synchronize(device)
        return len(configs) * steps / (time.perf_counter() - start)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
