"""One command that proves sphrun on a machine: every subcommand and training path once, then throughput.

(a) Runs each path on tiny synthetic runs in a temporary folder and prints PASS or FAIL per line, with
the error: single, packed, bf16, random, geodesic, ascent, the resume of a pack, finetune, connect,
curvature, VGG-16-BN, ResNet-18, off the sphere, plot. On CUDA a training path also fails when its
CUDA graph could not be captured.
(b) Prints a throughput table measured in this process: the reference-style loop (a per-item
DataLoader, .item() every step), sphrun single, packed K = 16 in fp32 and bf16; ConvNet width 32,
batch 128, the built-in CIFAR-shaped synthetic set (no download). Targets on one H100/H200: single
>= 6x the reference style, packed K = 16 >= 12.5x (fp32) and >= 20x (bf16) in model-steps/s.

    python benchmarks/gpu_check.py [--device cuda] [--skip-throughput]

About a minute for (a) and two for (b) on one GPU; (a) also runs with --device cpu --skip-throughput
(a few minutes on 2 cores). Exits 1 when a check fails.
"""

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loops import reference_steps_per_second, sphrun_model_steps_per_second, uint8_images  # noqa: E402

from sphrun.cli import main as sphrun_main  # noqa: E402
from sphrun.config import TrainConfig  # noqa: E402
from sphrun.lifecycle import use_device  # noqa: E402
from sphrun.rundir import RunDir  # noqa: E402

TINY = ["--dataset", "synthetic", "--subset", "256", "--width", "4", "--batch-size", "32", "--eval-every", "8"]
SMALL_NET = ["--dataset", "synthetic", "--subset", "128", "--width", "2", "--batch-size", "32", "--eval-every", "4"]


def sphrun(*args):
    """Run `sphrun ARGS` in this process; returns (exit code, what it printed on stderr)."""
    err = io.StringIO()
    argv = sys.argv
    sys.argv = ["sphrun", *map(str, args)]
    try:
        with contextlib.redirect_stderr(err):
            sphrun_main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = argv
    return code, err.getvalue()


def checks(device, root):
    """(name, sphrun arguments, run directories that must end `done`) for every path."""
    d = ["--device", device]
    runs = lambda *names: [os.path.join(root, n) for n in names]
    pack = lambda out, *extra: ["train", "--elr", "1e-3,1e-2,1e-1", "--iters", "16", *TINY, *d, *extra, "--out",
                                os.path.join(root, out)]
    single = lambda out, *extra: ["train", "--elr", "1e-3", "--iters", "16", *TINY, *d, *extra, "--out",
                                  os.path.join(root, out)]
    return [
        ("train single", single("single"), runs("single")),
        ("train single bf16", single("single-bf16", "--precision", "bf16"), runs("single-bf16")),
        ("train packed", pack("packed"), None),
        ("train packed bf16", pack("packed-bf16", "--precision", "bf16"), None),
        ("train packed random", pack("packed-random", "--step", "random"), None),
        ("train packed geodesic", pack("packed-geodesic", "--geodesic"), None),
        ("train packed ascent", pack("packed-ascent", "--step", "ascent"), None),
        ("resume a pack (extend)", ["train", "--elr", "1e-3,1e-2,1e-1", "--iters", "24", *TINY, *d, "--out",
                                    os.path.join(root, "packed")], None),
        ("finetune", ["finetune", os.path.join(root, "single"), "--elr", "5e-3", "--transition", "4", "--iters",
                      "8", "--eval-every", "4", *d, "--out", os.path.join(root, "ft")], runs("ft")),
        ("connect", ["connect", os.path.join(root, "single"), os.path.join(root, "ft"), "--points", "3", *d,
                     "--out", os.path.join(root, "connect")], None),
        ("curvature", ["curvature", os.path.join(root, "single"), "--at", "last", "--probes", "2", "--lanczos", "3",
                       "--batches", "2", *d], None),
        ("train vgg16bn", ["train", "--model", "vgg16bn", "--elr", "1e-3", "--iters", "8", *SMALL_NET, *d, "--out",
                           os.path.join(root, "vgg")], runs("vgg")),
        ("train resnet18", ["train", "--model", "resnet18", "--elr", "1e-3", "--iters", "8", *SMALL_NET, *d,
                            "--out", os.path.join(root, "resnet")], runs("resnet")),
        ("train off the sphere", ["train", "--no-sphere", "--lr", "0.05", "--momentum", "0.9", "--wd", "1e-4",
                                  "--iters", "16", *TINY, *d, "--out", os.path.join(root, "off")], runs("off")),
        ("plot phase", ["plot", os.path.join(root, "packed"), runs("ft")[0], "--kind", "phase", "--out",
                        os.path.join(root, "phase.png")], None),
        ("plot metrics", ["plot", os.path.join(root, "packed"), "--kind", "metrics", "--out",
                          os.path.join(root, "metrics.png")], None),
    ]


def run_checks(device):
    """Part (a): PASS/FAIL per path; returns the number of failures."""
    failures = 0
    with tempfile.TemporaryDirectory() as root:
        for name, args, must_be_done in checks(device, root):
            start = time.perf_counter()
            try:
                code, err = sphrun(*args)
                problem = failure(code, err, must_be_done)
            except Exception as e:  # a bug: show where
                problem = f"{type(e).__name__}: {e} at {traceback.extract_tb(e.__traceback__)[-1]}"
            failures += problem is not None
            verdict = "PASS" if problem is None else f"FAIL  {problem}"
            print(f"{name:<26} {time.perf_counter() - start:6.1f} s  {verdict}", flush=True)
    return failures


def failure(code, err, must_be_done):
    """Why a command did not do its job, in one line, or None."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if code != 0:
        return f"exit {code}: {lines[-1] if lines else 'no message'}"
    capture = [line for line in lines if "CUDA graph capture failed" in line]
    if capture:
        return capture[0]
    for path in must_be_done or []:
        status = RunDir(path).read_config()["status"]
        if status != "done":
            return f"{path} ended {status}"
    return None


def throughput(device, steps, warmup):
    """Part (b): model-steps/s of each loop, measured here, and the ratios to the reference style."""
    config = TrainConfig(elr=7e-4, dataset="synthetic", width=32, batch_size=128, iters=steps, device=str(device))
    elrs = [float(f"{e:.3g}") for e in np.geomspace(1e-4, 1e-2, 16)]
    packed = lambda precision: [TrainConfig(**{**config.to_dict(), "elr": e, "precision": precision}) for e in elrs]
    images, labels = uint8_images(None)
    rows = [("reference-style loop", 1, reference_steps_per_second(config, device, images, labels, steps, warmup))]
    rows.append(("sphrun single", 1, sphrun_model_steps_per_second([config], device, steps, warmup)))
    rows.append(("sphrun packed K=16 fp32", 16, sphrun_model_steps_per_second(packed("fp32"), device, steps, warmup)))
    rows.append(("sphrun packed K=16 bf16", 16, sphrun_model_steps_per_second(packed("bf16"), device, steps, warmup)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"\nthroughput on {name}: ConvNet width 32, batch 128, synthetic CIFAR-shaped data, {steps} timed steps "
          f"after {warmup}")
    reference = rows[0][2]
    for label, k, rate in rows:
        print(f"{label:<26} {rate:9.1f} model-steps/s  ({rate / k:8.1f} steps/s)  {rate / reference:6.2f}x reference")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--skip-throughput", action="store_true", help="only part (a), the PASS/FAIL lines")
    parser.add_argument("--steps", type=int, default=200, help="timed steps of each loop in (b)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (the CUDA graph capture too)")
    args = parser.parse_args()
    device = use_device(args.device)
    print(f"sphrun gpu_check on {device} (torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(device)})" if device.type == "cuda" else ")"), flush=True)
    failures = run_checks(str(device))
    print(f"{failures} of {len(checks('cpu', '.'))} checks failed" if failures else "all checks passed", flush=True)
    if not args.skip_throughput:
        throughput(device, args.steps, args.warmup)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
