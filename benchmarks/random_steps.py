"""Host time per step of a random-step run against an sgd run, side by side in one process.

A random step draws its Gaussian inside the step from a counter hash (sphrun.noise): no draw on the
host, no copy to the device. Its host time per step should stay within 1.2x an sgd step's (target),
measured as CPU time of this process (time.process_time) on the run's own loop, rounds alternating
so that both see the same machine.

    python benchmarks/random_steps.py [--width 32] [--steps 10] [--rounds 3] [--device cpu]

Prints each round's seconds per step and the ratio of the medians, PASS or FAIL against 1.2x.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loops import sphrun_model_steps_per_second  # noqa: E402

from sphrun.config import TrainConfig  # noqa: E402
from sphrun.lifecycle import use_device  # noqa: E402

TARGET = 1.2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and kind")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: fair on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = use_device(args.device)
    seconds = {"sgd": [], "random": []}
    for _ in range(args.rounds):
        for kind in seconds:
            config = TrainConfig(elr=1e-3, dataset="synthetic", width=args.width, batch_size=128, iters=1,
                                 step=kind, device=str(device))
            rate = sphrun_model_steps_per_second([config], device, args.steps, 2, clock=time.process_time)
            seconds[kind].append(1 / rate)
    print(f"host (CPU) seconds per step on {device}, ConvNet width {args.width}, batch 128, {args.threads} thread(s):")
    for kind, values in seconds.items():
        print(f"  {kind:<7} " + "  ".join(f"{v:.4f}" for v in values) + f"   median {statistics.median(values):.4f}")
    ratio = statistics.median(seconds["random"]) / statistics.median(seconds["sgd"])
    print(f"random / sgd: {ratio:.3f}x, target <= {TARGET}x  {'PASS' if ratio <= TARGET else 'FAIL'}")


if __name__ == "__main__":
    main()
