"""Steps per second of sphrun's training loop beside a reference-style loop, same process, same data.

The reference style is how the authors' kind of code trains: a torchvision-style Dataset of uint8
images with a per-item ToTensor/Normalize transform, a shuffling DataLoader (4 workers, pinned memory),
torch.optim.SGD with lr = elr * rho0^2, `loss.item()` and the correct count `.item()` at every step,
and the norm recomputed in Python with `.item()` per tensor before rescaling to rho0.

sphrun's loop is `sphrun.train.run_steps` itself, with no evaluation point inside the timed window.

    python benchmarks/train_throughput.py [--data-dir DIR] [--width 32] [--steps 30] [--device auto]

Prints steps/s of both and their ratio. DIR is an ImageFolder tree (train/<class>/, test/<class>/),
e.g. the 10 % CIFAR-10 subset; without it the synthetic set is used.
"""

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from sphrun.config import TrainConfig
from sphrun.data import NORMALIZATION, read_image_folder, synthetic_data
from sphrun.metrics import batch_loss
from sphrun.models import build_model, trainable_scale_invariant
from sphrun.rundir import RunDir
from sphrun.train import fresh_state, prepare, resolve_device, run_record, run_steps


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


def sphrun_steps_per_second(config, device, steps, warmup):
    data, model, params, order = prepare(config, device)
    state = fresh_state(params)
    with tempfile.TemporaryDirectory() as folder:
        run = RunDir(os.path.join(folder, "run"))
        run.write_config(run_record(config, data, order, state.rho0, sys.argv))
        elr_at = lambda step: config.elr
        run_steps(run, config, model, params, data, order, state, warmup, [], elr_at)
        synchronize(device)
        start = time.perf_counter()
        run_steps(run, config, model, params, data, order, state, warmup + steps, [], elr_at)
        synchronize(device)
        return steps / (time.perf_counter() - start)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="ImageFolder tree; default: the synthetic set")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dataset = "cifar10" if args.data_dir else "synthetic"
    config = TrainConfig(elr=7e-4, dataset=dataset, data_dir=args.data_dir or "", width=args.width,
                         iters=args.steps, device=str(device))
    images, labels = uint8_images(args.data_dir)
    reference = reference_steps_per_second(config, device, images, labels, args.steps, args.warmup)
    ours = sphrun_steps_per_second(config, device, args.steps, args.warmup)
    print(f"device {device}, {torch.get_num_threads()} threads, ConvNet width {args.width}, batch 128, "
          f"{len(labels)} train images ({dataset})")
    print(f"reference-style loop: {reference:8.2f} steps/s")
    print(f"sphrun loop:          {ours:8.2f} steps/s")
    print(f"ratio sphrun/reference: {ours / reference:.2f}x")


if __name__ == "__main__":
    main()
