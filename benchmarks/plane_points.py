"""Seconds per point of the plane through three solutions (sphrun connect A B C), its points measured one
at a time and K at a time as the members of one packed ConvNet, same process, same data.

Each point is what the command measures: the BatchNorm statistics recomputed over the train batches, the
train metrics with GM in BN train mode and the test metrics in eval mode (connect.point_metrics). The
three ends are the init of seed 0 and two random directions from it, so nothing needs training.

    python benchmarks/plane_points.py [--data-dir DIR] [--width 32] [--points 8] [--pack 4] [--device auto]
                                      [--threads N]

Prints seconds per point of both forms and their ratio (whence connect.POINTS_PER_PASS on the CPU). On
a 2-core CPU, width 32, the 10 % CIFAR-10 subset, 4 points: 22.4 s per point one at a time, 18.4 s in a
pack of 4 (1.21x), though a pack runs its members one after the other on the CPU (sphrun.packed).
DIR is an ImageFolder tree (train/<class>/, test/<class>/), e.g. the 10 % CIFAR-10 subset; without it
the synthetic set (2,000 train images) is used.
"""

import argparse
import time

import torch

from sphrun.config import TrainConfig
from sphrun.connect import measure_plane
from sphrun.lifecycle import prepare, use_device
from sphrun.metrics import full_batches
from sphrun.plane import grid, span_plane


def seconds_per_point(model, config, data, permutation, plane, at, per_pass, device):
    batches = full_batches(permutation, config.batch_size)
    radii = [plane.radius(u, v) for u, v in at]
    measure_plane(model, config, data, permutation, batches, plane, at[:per_pass], radii[:per_pass], per_pass)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    measure_plane(model, config, data, permutation, batches, plane, at, radii, per_pass)  # reads back: synced
    return (time.perf_counter() - start) / len(at)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="ImageFolder tree; default: the synthetic set")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--points", type=int, default=8, help="points timed in each form")
    parser.add_argument("--pack", type=int, default=4, help="points per packed pass")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = use_device(args.device)
    dataset = "cifar10" if args.data_dir else "synthetic"
    config = TrainConfig(elr=7e-4, dataset=dataset, data_dir=args.data_dir or "",
                         subset=None if args.data_dir else 2000, width=args.width, iters=1, device=str(device))
    data, model, params, order = prepare(config, device)
    theta = torch.cat([p.detach().reshape(-1) for p in params]).double()
    directions = torch.randn((2, len(theta)), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plane = span_plane(theta, *(theta + 0.5 * theta.norm() * d.to(device) / d.norm() for d in directions))
    side = max(2, round(args.points ** 0.5 + 0.5))
    at = grid(plane, side, 0.2)[:args.points]
    permutation = order.permutation(0)
    single = seconds_per_point(model, config, data, permutation, plane, at, 1, device)
    packed = seconds_per_point(model, config, data, permutation, plane, at, args.pack, device)
    print(f"device {device}, {torch.get_num_threads()} threads, ConvNet width {args.width}, batch 128, "
          f"{len(data.train_y)} train and {len(data.test_y)} test images ({dataset}), {len(at)} points")
    print(f"one point at a time:  {single:8.3f} s per point")
    print(f"{args.pack} points per pack:   {packed:8.3f} s per point")
    print(f"ratio single/packed: {single / packed:.2f}x")


if __name__ == "__main__":
    main()
