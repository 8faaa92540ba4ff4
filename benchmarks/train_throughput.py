"""Steps per second of sphrun's training loop beside a reference-style loop, same process, same data.

The loops are benchmarks/loops.py's: the reference style (a per-item DataLoader, optimizer.step,
.item() every step) and sphrun's one loop training a single run (a pack of one), no evaluation point
in the timed window.

    python benchmarks/train_throughput.py [--data-dir DIR] [--width 32] [--steps 30] [--device auto]

Prints steps/s of both and their ratio. DIR is an ImageFolder tree (train/<class>/, test/<class>/),
e.g. the 10 % CIFAR-10 subset; without it the synthetic set is used.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loops import reference_steps_per_second, sphrun_model_steps_per_second, uint8_images  # noqa: E402

from sphrun.config import TrainConfig  # noqa: E402
from sphrun.lifecycle import use_device  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="ImageFolder tree; default: the synthetic set")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = use_device(args.device)
    dataset = "cifar10" if args.data_dir else "synthetic"
    config = TrainConfig(elr=7e-4, dataset=dataset, data_dir=args.data_dir or "", width=args.width,
                         iters=args.steps, device=str(device))
    images, labels = uint8_images(args.data_dir)
    reference = reference_steps_per_second(config, device, images, labels, args.steps, args.warmup)
    ours = sphrun_model_steps_per_second([config], device, args.steps, args.warmup)
    print(f"device {device}, {torch.get_num_threads()} threads, ConvNet width {args.width}, batch 128, "
          f"{len(labels)} train images ({dataset})")
    print(f"reference-style loop: {reference:8.2f} steps/s")
    print(f"sphrun loop:          {ours:8.2f} steps/s")
    print(f"ratio sphrun/reference: {ours / reference:.2f}x")


if __name__ == "__main__":
    main()
