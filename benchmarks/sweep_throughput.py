"""Model-steps per second of a whole ELR sweep: the reference-style loop, sphrun's single-run loop and
sphrun's packed loop (K models per step: ELRs, or ELRs x seeds), side by side on the same data; then a whole sweep, end to end.

A model-step is one SGD step of one model: a packed step of K models counts K. The reference style is
benchmarks/loops.py's (a per-item DataLoader, optimizer.step, .item() every step); single and packed
are sphrun's one loop (sphrun.train.run_pass) on a pack of 1 and of K, with no evaluation point in the
timed window. Each loop runs in a fresh process, so its peak memory is its own: peak
allocated GPU memory on CUDA, peak resident memory of the process on the CPU (the reference loop's
DataLoader workers not included).

The end-to-end figure is the wall time of `sphrun train --elr 1e-5:1:N --epochs E` in a fresh process:
start-up, data loading, training, every evaluation point (all models in one pass each) and checkpoint.

    python benchmarks/sweep_throughput.py --data-dir DIR --device cuda      # width 32, 50 steps, bf16 too
    # on a busy 2-core CPU, small and short, best of 3 rounds:
    python benchmarks/sweep_throughput.py --data-dir DIR --device cpu --width 8 --steps 20 --repeats 3 \
        --sweep-width 4 --threads 1

DIR is an ImageFolder tree such as the 10 % CIFAR-10 subset; without it the synthetic set is used.
Targets on one H100/H200: single >= 6x the reference style, packed K = 16 >= 12.5x in fp32 and >= 20x
in bf16. On the CPU: a pack of 4 ELRs x 4 seeds costs no more per model-step than single runs.
"""

import argparse
import dataclasses
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loops import reference_steps_per_second, sphrun_model_steps_per_second, uint8_images  # noqa: E402

from sphrun.config import TrainConfig  # noqa: E402
from sphrun.lifecycle import use_device  # noqa: E402
from sphrun.rundir import RunDir  # noqa: E402


def packed_configs(config, k, seeds=1):
    """K copies of `config`: K / seeds ELRs from 1e-4 to 1e-2 (phases 1 and 2: none diverges), each with
    init seeds 0 .. seeds - 1."""
    elrs = [float(f"{e:.3g}") for e in np.geomspace(1e-4, 1e-2, k // seeds)]
    return [dataclasses.replace(config, elr=e, seed=s) for e in elrs for s in range(seeds)]


def measure(queue, which, args):
    """In a fresh process: (model-steps/s, peak memory in MiB) of one loop."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":  # every loop here times itself with perf_counter; make it count CPU time instead
        time.perf_counter = time.process_time
    device = use_device(args.device)
    dataset = "cifar10" if args.data_dir else "synthetic"
    config = TrainConfig(elr=7e-4, dataset=dataset, data_dir=args.data_dir or "", width=args.width,
                         iters=args.steps, device=str(device), precision="bf16" if "bf16" in which else "fp32")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if which == "reference":
        images, labels = uint8_images(args.data_dir)
        rate = reference_steps_per_second(config, device, images, labels, args.steps, args.warmup)
    elif which == "single":
        rate = sphrun_model_steps_per_second([config], device, args.steps, args.warmup)
    else:
        seeds = int(which.split("x")[1].split()[0]) if " x " in which else 1  # "packed 16 = 4 ELRs x 4 seeds"
        configs = packed_configs(config, int(which.split()[1]), seeds)
        rate = sphrun_model_steps_per_second(configs, device, args.steps, args.warmup)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # KiB on Linux
    queue.put((rate, peak))


def in_fresh_process(which, args):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=measure, args=(queue, which, args))
    process.start()
    result = queue.get()
    process.join()
    return result


def sweep_wall_time(args, device, folder):
    """Seconds of `sphrun train --elr 1e-5:1:N --epochs E` in a fresh process, the evaluation points of
    its first run, the runs' statuses and the model-steps they took."""
    data = ["--data-dir", args.data_dir] if args.data_dir else ["--dataset", "synthetic"]
    command = [sys.executable, "-m", "sphrun", "train", "--elr", f"1e-5:1:{args.sweep_elrs}",
               "--epochs", str(args.sweep_epochs), "--width", str(args.sweep_width or args.width),
               "--device", str(device), "--precision", args.sweep_precision, "--out", folder, *data]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"the sweep failed:\n{done.stderr[-3000:]}")
    runs = [RunDir(os.path.join(folder, name)) for name in sorted(os.listdir(folder))]
    statuses = [run.read_config()["status"] for run in runs]
    model_steps = sum(run.load_checkpoint("last")["iter"] for run in runs)
    return seconds, len(runs[0].read_metrics()), statuses, model_steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="ImageFolder tree; default: the synthetic set")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50, help="timed steps of each loop")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (the CUDA graph capture too)")
    parser.add_argument("--packs", default="4,16", help="the K values of the packed loop")
    parser.add_argument("--seeds", type=int, default=4, help="also a pack of the last K as K/S ELRs x S seeds "
                                                           "(0: skip it)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="also the packed loop in bf16 (default: on CUDA)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the loops; the best of each counts")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: time the loops by the CPU seconds of their process, for a machine shared "
                             "with other work (with --threads 1); it leaves out the reference loop's "
                             "DataLoader workers, so only single and packed compare")
    parser.add_argument("--sweep-elrs", type=int, default=16, help="ELRs of the end-to-end sweep (0: skip it)")
    parser.add_argument("--sweep-epochs", type=int, default=5)
    parser.add_argument("--sweep-precision", default="fp32")
    parser.add_argument("--sweep-width", type=int, default=None, help="the sweep's width (default: --width)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    device = use_device(args.device)
    packs = [int(k) for k in args.packs.split(",")]
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    loops = ["reference", "single"] + [f"packed {k}" for k in packs] + (
        [f"packed {packs[-1]} = {packs[-1] // args.seeds} ELRs x {args.seeds} seeds"] if args.seeds else []) + (
        [f"packed {packs[-1]} bf16"] if bf16 else [])
    memory = "peak GPU memory allocated" if device.type == "cuda" else "peak RSS of the process"
    threads = args.threads or torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {threads} threads"
    print(f"device {name}; ConvNet width {args.width}, batch 128, "
          f"{'data ' + args.data_dir if args.data_dir else 'synthetic data'}; {args.steps} timed steps, "
          f"best of {args.repeats}, {args.clock} clock", flush=True)
    results = {}
    for _ in range(args.repeats):  # round robin, best of each: a busy machine slows every loop alike
        for which in loops:
            rate, peak = in_fresh_process(which, args)
            best_rate, most_memory = results.get(which, (0, 0))
            results[which] = max(rate, best_rate), max(peak, most_memory)
    for which, (rate, peak) in results.items():
        print(f"{which + ' loop':<40} {rate:9.2f} model-steps/s  {rate / results['reference'][0]:6.2f}x reference"
              f"  {rate / results['single'][0]:5.2f}x single  {memory} {peak:8.0f} MiB")
    if not args.sweep_elrs:
        return
    with tempfile.TemporaryDirectory() as folder:
        seconds, points, statuses, model_steps = sweep_wall_time(args, device, os.path.join(folder, "sweep"))
    print(f"end to end: sphrun train --elr 1e-5:1:{args.sweep_elrs} --epochs {args.sweep_epochs} --width "
          f"{args.sweep_width or args.width} ({args.sweep_precision}): {seconds:.1f} s wall, {points} evaluation "
          f"points per ELR, {model_steps / seconds:.1f} model-steps/s overall; statuses "
          + ", ".join(f"{s} x{statuses.count(s)}" for s in sorted(set(statuses))))


if __name__ == "__main__":
    main()
