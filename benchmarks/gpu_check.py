"""One command that proves sphrun on a GPU: every path against the CPU and against itself, then speed.

    python benchmarks/gpu_check.py [--device cuda] [--skip-throughput] [--only NAME,...]

(a) Each line runs one path of sphrun on small synthetic runs (ConvNet width 8, 1,024 images, batch 64,
20 steps, evaluated at 0, 10 and 20) and says PASS, or FAIL with every reason:
- every run ends `done`, or `diverged` only where the check makes a model diverge on purpose, and no
  CUDA graph failed to capture or failed its first-replay check;
- the same command on the CPU (TF32 off on the GPU) gives the same metrics: at step 0 within 1e-4
  relative and 2 images (the same weights: only the order of sums differs, ~1e-6), and after 20 steps
  at phase-1 ELRs within 5e-2 for losses and GM and 3 % for errors. The first steps amplify a 1e-7
  difference to ~1e-3 within 5 steps, and the two runs then part at the percent level: 2e-2 (losses),
  1.1e-2 (GM), 1.6 % and 2.7 % (train and test error) at most, measured between the CUDA form of the
  pack and the CPU form on the CPU at these settings (summation order alone). A wrong step, rate or
  BatchNorm is off by far more. bf16 paths: 3e-2 at step 0 only (8 bits of mantissa; CPU and GPU
  autocast round differently);
- the same command with the CUDA graph turned off gives the same metrics within 1e-5 (the same
  kernels, cuDNN limited to deterministic ones for both);
- it covers --device auto, packs, random, geodesic and ascent steps, mse, a fine-tune whose transition
  runs past the capture, ELRs x seeds x data seeds with --pack, a member that diverges after the
  capture, VGG-16-BN and ResNet-18 in bf16, kill -9 and resume, connect and curvature in full float32
  and with --tf32, the plane through three runs (its points packed) and hessian-density, and plot.
(b) A throughput table measured in this process: the reference-style loop (a per-item DataLoader,
.item() every step), a torch.func.vmap ensemble of 16 ConvNets (PyTorch's model-ensembling recipe),
sphrun single and packed K = 16 in fp32 and bf16; ConvNet width 32, batch 128, the built-in CIFAR-shaped
synthetic set. Targets, as PASS/FAIL lines: single >= 6x the reference, packed K = 16 >= 12.5x (fp32)
and >= 20x (bf16) in model-steps/s, and the pack faster than the vmap ensemble.

Meant to take a few minutes on one H100/H200 (not yet timed on a GPU). Exits 1 when any line fails. `--device cpu` runs (a) against itself
on a CPU (slowly); the suite runs the checks on an emulated GPU (tests/test_gpu_check.py).
"""

import argparse
import contextlib
import io
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loops import (reference_steps_per_second, sphrun_model_steps_per_second, uint8_images,  # noqa: E402
                   vmap_model_steps_per_second)

from sphrun.cli import main as sphrun_main  # noqa: E402
from sphrun.config import TrainConfig  # noqa: E402
from sphrun.lifecycle import use_device  # noqa: E402
from sphrun.metrics import tf32  # noqa: E402
from sphrun.packed import PackedConvNet, Step  # noqa: E402
from sphrun.rundir import RunDir  # noqa: E402

SMALL = ["--dataset", "synthetic", "--subset", "1024", "--width", "8", "--batch-size", "64"]
SHORT = ["--iters", "20", "--eval-every", "10"]
TINY_NET = ["--dataset", "synthetic", "--subset", "256", "--width", "4", "--batch-size", "32", "--iters", "8",
            "--eval-every", "4"]
AT_INIT, EARLY, EARLY_ERRORS, BF16_AT_INIT, GRAPH = 1e-4, 5e-2, 0.03, 3e-2, 1e-5
COLUMNS = ("train_loss", "test_loss", "gm", "si_norm", "cos_prev", "cos_init", "proj_err")
CONNECT_COLUMNS = ("train_loss", "train_err", "test_loss", "test_err", "gm")


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


@contextlib.contextmanager
def graphs_off():
    """Train without CUDA graphs: the eager reference."""
    capture = Step.capture
    Step.capture = lambda self: setattr(self, "eager_only", True)
    try:
        yield
    finally:
        Step.capture = capture


@contextlib.contextmanager
def deterministic():
    """cuDNN limited to deterministic kernels, so that graph and eager runs can agree to the bit."""
    flag = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic = flag


@contextlib.contextmanager
def diverging(member, from_step):
    """Make model `member` of every pack non-finite from step `from_step` on, on purpose: the step reads
    its counter on the device, so the model diverges inside the replayed graph."""
    steps = []
    init, forward = Step.__init__, PackedConvNet.forward

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        steps.append(self)

    def poisoned(self, x):
        logits = forward(self, x)
        if steps and self.training and torch.is_grad_enabled():
            nan = torch.where(steps[-1].counter >= from_step, float("nan"), 0.0)
            logits = torch.cat([logits[:, :member], logits[:, member:member + 1] + nan, logits[:, member + 1:]], 1)
        return logits

    Step.__init__, PackedConvNet.forward = tracked_init, poisoned
    try:
        yield
    finally:
        Step.__init__, PackedConvNet.forward = init, forward


class Check:
    """What one line found: `problems` (empty when it passed)."""

    def __init__(self, device, root):
        self.device, self.root, self.problems = device, root, []

    def path(self, *names):
        return os.path.join(self.root, *names)

    def run(self, *args, must_end=("done",)):
        """`sphrun ARGS`; a non-zero exit, a failed capture or check of a graph is a problem. Then every
        run directory it names with --out (or below it, for a sweep) must end with a status in must_end
        (one per run, in sorted order, or one for all)."""
        code, err = sphrun(*args)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        if code != 0:
            self.problems.append(f"{' '.join(map(str, args[:3]))}: exit {code}: {lines[-1] if lines else ''}")
            return
        self.problems += [line for line in lines if "CUDA graph capture failed" in line or "first step differs" in line]
        if "--out" in args and args[0] in ("train", "finetune"):
            out = str(args[list(args).index("--out") + 1])
            runs = [out] if RunDir(out).exists() else sorted(
                os.path.join(out, n) for n in os.listdir(out) if RunDir(os.path.join(out, n)).exists())
            statuses = [RunDir(r).read_config()["status"] for r in runs]
            wanted = list(must_end) if len(must_end) == len(runs) else [must_end[0]] * len(runs)
            if statuses != wanted:
                self.problems.append(f"{out}: runs ended {', '.join(statuses)}, expected {', '.join(wanted)}")

    def train_three_ways(self, name, args, must_end=("done",), cpu=True, bf16=False, device_option=None):
        """The command on the device (named `device_option`, default this check's), on the device without
        graphs, and on the CPU; compares them."""
        device, option = self.path(name, "device"), device_option or self.device
        with tf32(False), deterministic():
            self.run(*args, "--device", option, "--out", device, must_end=must_end)
            with graphs_off():
                self.run(*args, "--device", option, "--out", self.path(name, "eager"), must_end=must_end)
        self.compare(device, self.path(name, "eager"), "graph against eager", GRAPH, GRAPH, 0)
        if cpu:
            self.run(*args, "--device", "cpu", "--out", self.path(name, "cpu"), must_end=must_end)
            if bf16:
                self.compare(device, self.path(name, "cpu"), "against the CPU", BF16_AT_INIT, None, None)
            else:
                self.compare(device, self.path(name, "cpu"), "against the CPU", AT_INIT, EARLY, EARLY_ERRORS)

    def compare(self, ours, theirs, what, at_init, later, later_errors):
        """Metrics rows of the runs in `ours` against those in `theirs`, run by run: the first row within
        `at_init` and 2 images, the others within `later` and `later_errors` (None: not compared); the
        others relative, errors as fractions."""
        for a, b in zip(run_dirs(ours), run_dirs(theirs)):
            rows_a, rows_b = RunDir(a).read_metrics(), RunDir(b).read_metrics()
            if [r["iter"] for r in rows_a] != [r["iter"] for r in rows_b]:
                self.problems.append(f"{what}: {a} has rows at steps {[r['iter'] for r in rows_a]}, "
                                     f"{b} at {[r['iter'] for r in rows_b]}")
                continue
            size = RunDir(a).read_config()["train_size"]
            for i, (ra, rb) in enumerate(zip(rows_a, rows_b)):
                tolerance, errors = (at_init, 2 / size) if i == 0 else (later, later_errors)
                if tolerance is None:
                    continue
                far = [f"{c} {ra[c]:.6g} vs {rb[c]:.6g}" for c in COLUMNS if not close(ra[c], rb[c], tolerance)]
                far += [f"{c} {ra[c]:.4f} vs {rb[c]:.4f}" for c in ("train_err", "test_err")
                        if abs(ra[c] - rb[c]) > errors + 1e-9]
                if far:
                    self.problems.append(f"{what}, {os.path.basename(a)} step {ra['iter']}: {'; '.join(far)}")


def close(a, b, rel):
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= rel * max(abs(a), abs(b)) + 1e-7


def run_dirs(path):
    if RunDir(path).exists():
        return [path]
    return sorted(os.path.join(path, n) for n in os.listdir(path) if RunDir(os.path.join(path, n)).exists())


# --- the checks: each a function of a Check ----------------------------------------------------------

def single_auto(c):
    c.train_three_ways("single", ["train", "--elr", "1e-4", *SMALL, *SHORT], device_option="auto")


def packed(c):
    c.train_three_ways("packed", ["train", "--elr", "1e-4,2e-4,5e-4", *SMALL, *SHORT])


def random_steps(c):
    c.train_three_ways("random", ["train", "--elr", "1e-4,5e-4", "--step", "random", *SMALL, *SHORT])


def geodesic(c):
    c.train_three_ways("geodesic", ["train", "--elr", "1e-4,5e-4", "--geodesic", *SMALL, *SHORT])


def ascent(c):
    c.train_three_ways("ascent", ["train", "--elr", "1e-4,5e-4", "--step", "ascent", *SMALL, *SHORT])


def mse(c):
    c.train_three_ways("mse", ["train", "--elr", "1e-4,5e-4", "--loss", "mse", *SMALL, *SHORT])


def transition(c):
    """A fine-tune whose rate moves for 12 steps, 8 of them after the capture (at the 4th step)."""
    for where in ("device", "eager", "cpu"):
        parent = c.path("parent", where)
        options = ["--device", "cpu" if where == "cpu" else c.device]
        with tf32(False), deterministic(), (graphs_off() if where == "eager" else contextlib.nullcontext()):
            c.run("train", "--elr", "1e-4", *SMALL, *SHORT, *options, "--out", parent)
            c.run("finetune", parent, "--elr", "1e-3", "--transition", "12", "--iters", "20", "--eval-every", "10",
                  *options, "--out", c.path("transition", where))
    c.compare(c.path("transition", "device"), c.path("transition", "eager"), "graph against eager", GRAPH, GRAPH, 0)
    c.compare(c.path("transition", "device"), c.path("transition", "cpu"), "against the CPU", AT_INIT, EARLY,
              EARLY_ERRORS)


def seeds_and_data_seeds(c):
    c.train_three_ways("seeds", ["train", "--elr", "1e-4,5e-4", "--seed", "0:2", "--data-seed", "0:2",
                                 "--pack", "3", *SMALL, *SHORT])


def diverging_member(c):
    with diverging(member=1, from_step=8):
        c.train_three_ways("diverging", ["train", "--elr", "1e-4,2e-4", *SMALL, *SHORT], must_end=("done", "diverged"),
                           cpu=False)


def vgg_bf16(c):
    c.train_three_ways("vgg", ["train", "--model", "vgg16bn", "--elr", "1e-4", "--precision", "bf16", *TINY_NET],
                       bf16=True)


def resnet_bf16(c):
    c.train_three_ways("resnet", ["train", "--model", "resnet18", "--elr", "1e-4", "--precision", "bf16",
                                  *TINY_NET], bf16=True)


def kill_and_resume(c):
    """kill -9 once the run is past its capture and first evaluation, then the same command again."""
    args = [sys.executable, "-m", "sphrun", "train", "--elr", "1e-4", *SMALL, "--iters", "200", "--eval-every",
            "20", "--device", c.device, "--out", c.path("killed")]
    whole = [*args[:-1], c.path("whole")]
    process = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(RunDir(c.path("killed")).read_metrics()) < 2:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    for command in (args, whole):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            c.problems.append(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
            return
    c.compare(c.path("killed"), c.path("whole"), "resumed after kill -9 against uninterrupted", AT_INIT, EARLY,
              EARLY_ERRORS)  # another process: cuDNN may pick other kernels


def connect_and_curvature(c, tf32):
    """connect and curvature on the device against the CPU, in full float32 or with --tf32."""
    flag = ["--tf32"] if tf32 else []
    name = "tf32" if tf32 else "fp32"
    tolerance = 3e-2 if tf32 else 1e-3
    parent = c.path("single", "cpu")
    if not RunDir(parent).exists():
        c.run("train", "--elr", "1e-4", *SMALL, *SHORT, "--device", "cpu", "--out", parent)
    child = c.path("single", "cpu-ft")
    if not RunDir(child).exists():
        c.run("finetune", parent, "--elr", "1e-3", "--iters", "10", "--eval-every", "10", "--device", "cpu",
              "--out", child)
    for where in (c.device, "cpu"):
        c.run("connect", parent, child, "--points", "3", "--bn-batches", "4", *flag, "--device", where, "--out",
              c.path(f"connect-{name}", where.replace(":", "")))
    ours, theirs = (read_csv(c.path(f"connect-{name}", w.replace(":", ""), "connect.csv")) for w in (c.device, "cpu"))
    for a, b in zip(ours, theirs):
        compare_point(c, f"connect {name} at alpha {a['alpha']}", a, b, tolerance)
    measured = {}
    for where in (c.device, "cpu"):
        run = c.path(f"curvature-{name}-{where.replace(':', '')}")
        if not os.path.exists(run):
            shutil.copytree(parent, run)
        c.run("curvature", run, "--at", "last", "--probes", "2", "--lanczos", "5", "--batches", "4", *flag,
              "--device", where)
        measured[where] = read_csv(os.path.join(run, "curvature.csv"))[-1]
    for k, v in measured["cpu"].items():
        if not close(measured[c.device][k], v, tolerance):
            c.problems.append(f"curvature {name}: {k} {measured[c.device][k]:.6g} vs {v:.6g} on the CPU")


def plane_and_density(c):
    """The plane through three runs (its points packed, 16 at a time on the GPU, 4 on the CPU) and
    hessian-density on the device against the CPU, in full float32."""
    ends = [c.path("single", "cpu"), c.path("single", "cpu-ft"), c.path("single", "cpu-ft2")]
    if not RunDir(ends[0]).exists():
        c.run("train", "--elr", "1e-4", *SMALL, *SHORT, "--device", "cpu", "--out", ends[0])
    for end, elr in zip(ends[1:], ("1e-3", "3e-3")):
        if not RunDir(end).exists():
            c.run("finetune", ends[0], "--elr", elr, "--iters", "10", "--eval-every", "10", "--device", "cpu",
                  "--out", end)
    for where in (c.device, "cpu"):
        c.run("connect", *ends, "--grid", "3", "--bn-batches", "4", "--device", where, "--out",
              c.path("plane", where.replace(":", "")))
    ours, theirs = (read_csv(c.path("plane", w.replace(":", ""), "plane.csv")) for w in (c.device, "cpu"))
    for a, b in zip(ours, theirs):
        compare_point(c, f"plane at u {a['u']:.4g}, v {a['v']:.4g}", a, b, 1e-3)
    summaries = {}
    for where in (c.device, "cpu"):
        run = c.path(f"density-{where.replace(':', '')}")
        if not os.path.exists(run):
            shutil.copytree(ends[0], run)
        c.run("curvature", run, "--at", "last", "--measures", "hessian-density", "--probes", "2", "--lanczos",
              "5", "--batches", "4", "--device", where)
        rows = read_csv(os.path.join(run, "hessian-density.csv"))
        e, d = np.array([r["eigenvalue"] for r in rows]), np.array([r["density"] for r in rows])
        integral = lambda f: float(np.sum((f[1:] + f[:-1]) / 2 * np.diff(e)))  # the trapezoid rule
        # the grid's ends (5 widths past the outermost Ritz values), its mass and mean eigenvalue
        summaries[where] = {"lowest": e[0], "highest": e[-1], "mass": integral(d), "mean": integral(e * d)}
    for k, v in summaries["cpu"].items():
        if not close(summaries[c.device][k], v, 1e-3):
            c.problems.append(f"hessian-density: {k} {summaries[c.device][k]:.6g} vs {v:.6g} on the CPU")


def compare_point(c, where, ours, theirs, tolerance):
    """A problem naming the measures of a connect point (segment or plane) off the CPU's by more than
    `tolerance`."""
    far = [f"{k} {ours[k]:.6g} vs {theirs[k]:.6g}" for k in CONNECT_COLUMNS if not close(ours[k], theirs[k], tolerance)]
    if far:
        c.problems.append(f"{where}: {'; '.join(far)}")


def read_csv(path):
    import csv
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def plots(c):
    c.run("plot", c.path("packed", "device"), "--kind", "phase", "--out", c.path("phase.png"))
    c.run("plot", c.path("packed", "device"), "--kind", "metrics", "--out", c.path("metrics.png"))


CHECKS = {
    "train single, --device auto": single_auto,
    "train packed": packed,
    "random steps": random_steps,
    "geodesic steps": geodesic,
    "ascent steps": ascent,
    "mse": mse,
    "transition past the capture": transition,
    "seeds x data seeds, --pack": seeds_and_data_seeds,
    "a member diverging after capture": diverging_member,
    "VGG-16-BN bf16": vgg_bf16,
    "ResNet-18 bf16": resnet_bf16,
    "kill -9 and resume": kill_and_resume,
    "connect, curvature fp32": lambda c: connect_and_curvature(c, tf32=False),
    "connect, curvature --tf32": lambda c: connect_and_curvature(c, tf32=True),
    "plane, hessian-density fp32": plane_and_density,
    "plot": plots,
}


def run_checks(device, names=None, root=None):
    """Part (a): a PASS or FAIL line per check; returns the number of failures."""
    failures = 0
    with tempfile.TemporaryDirectory() as scratch:
        for name in names or CHECKS:
            check = Check(device, root or scratch)
            start = time.perf_counter()
            try:
                CHECKS[name](check)
            except Exception as e:  # a bug: show where
                check.problems.append(f"{type(e).__name__}: {e} at {traceback.extract_tb(e.__traceback__)[-1]}")
            failures += bool(check.problems)
            verdict = "PASS" if not check.problems else "FAIL  " + " | ".join(check.problems)
            print(f"{name:<34} {time.perf_counter() - start:6.1f} s  {verdict}", flush=True)
    return failures


# --- (b) throughput -----------------------------------------------------------------------------------

TARGETS = (("sphrun single", "reference-style loop", 6.0), ("sphrun packed K=16 fp32", "reference-style loop", 12.5),
           ("sphrun packed K=16 bf16", "reference-style loop", 20.0),
           ("sphrun packed K=16 fp32", "vmap ensemble K=16 fp32", 1.0),
           ("sphrun packed K=16 bf16", "vmap ensemble K=16 bf16", 1.0))


def throughput(device, steps, warmup):
    """Part (b): model-steps/s of each loop, measured here, with the targets as PASS/FAIL lines; returns
    the number of targets missed."""
    config = TrainConfig(elr=7e-4, dataset="synthetic", width=32, batch_size=128, iters=steps, device=str(device))
    elrs = [float(f"{e:.3g}") for e in np.geomspace(1e-4, 1e-2, 16)]
    packed = lambda precision: [TrainConfig(**{**config.to_dict(), "elr": e, "precision": precision}) for e in elrs]
    images, labels = uint8_images(None)
    rates = {"reference-style loop": (1, reference_steps_per_second(config, device, images, labels, steps, warmup))}
    for precision in ("fp32", "bf16"):
        rates[f"vmap ensemble K=16 {precision}"] = (16, vmap_model_steps_per_second(packed(precision), device, steps,
                                                                                   warmup))
    rates["sphrun single"] = (1, sphrun_model_steps_per_second([config], device, steps, warmup))
    for precision in ("fp32", "bf16"):
        rates[f"sphrun packed K=16 {precision}"] = (16, sphrun_model_steps_per_second(packed(precision), device,
                                                                                    steps, warmup))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"\nthroughput on {name}: ConvNet width 32, batch 128, synthetic CIFAR-shaped data, {steps} timed steps "
          f"after {warmup}")
    reference = rates["reference-style loop"][1]
    for label, (k, rate) in rates.items():
        print(f"{label:<26} {rate:9.1f} model-steps/s  ({rate / k:8.1f} steps/s)  {rate / reference:6.2f}x reference")
    missed = 0
    for ours, theirs, target in TARGETS:
        ratio = rates[ours][1] / rates[theirs][1]
        ok = ratio >= target if target > 1 else ratio > target
        missed += not ok
        print(f"{ours} / {theirs}: {ratio:.2f}x, target {'>=' if target > 1 else '>'} {target:g}x  "
              f"{'PASS' if ok else 'FAIL'}")
    return missed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--skip-throughput", action="store_true", help="only part (a), the PASS/FAIL lines")
    parser.add_argument("--only", help="comma-separated names of the checks of (a) to run (default: all)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps of each loop in (b)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (the CUDA graph capture too)")
    args = parser.parse_args()
    device = use_device(args.device)
    print(f"sphrun gpu_check on {device} (torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(device)})" if device.type == "cuda" else ")"), flush=True)
    names = args.only.split(",") if args.only else None
    failures = run_checks(str(device), names)
    print(f"{failures} of {len(names or CHECKS)} checks failed" if failures else "all checks passed", flush=True)
    if not args.skip_throughput:
        failures += throughput(device, args.steps, args.warmup)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
