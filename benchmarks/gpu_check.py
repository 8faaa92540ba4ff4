"""One command that proves sphrun on a GPU: every path against the CPU and against itself, then speed.

    python benchmarks/gpu_check.py [--device cuda] [--budget SECONDS] [--skip-throughput] [--only NAME,...]

(a) Each line runs one path of sphrun on small synthetic runs (ConvNet width 8, 1,024 images, batch 64,
20 steps, evaluated at 0, 10 and 20) and says PASS, or FAIL with every reason:
- every run ends `done`, or `diverged` only where the check makes a model diverge on purpose, and no
  CUDA graph failed to capture or failed its first-replay check;
- the same command on the CPU (TF32 off on the GPU) gives the same metrics, within the bands below
  (BANDS: each from a measured spread, its reason beside it);
- the same command with the CUDA graph turned off gives the same metrics within 1e-5 (the same
  kernels, cuDNN limited to deterministic ones for both);
- it covers a pack, --device auto, a member that diverges after the capture, random steps, a fine-tune
  whose transition runs past the capture, VGG-16-BN in bf16 (the most telling first), then geodesic and
  ascent steps, mse, ELRs x seeds x data seeds with --pack, ResNet-18 in bf16, kill -9 and resume,
  connect and curvature in full float32 and with --tf32, the plane through three runs (its points packed)
  and hessian-density, and plot. Each check stands alone, in its own folder: --only runs any of them.
(b) A throughput table measured in this process, after the first six checks: the reference-style loop
(a per-item DataLoader, .item() every step), a torch.func.vmap ensemble of 16 ConvNets (PyTorch's
model-ensembling recipe), sphrun single and packed K = 16 in fp32 and bf16; ConvNet width 32, batch 128,
the built-in CIFAR-shaped synthetic set. Targets, as PASS/FAIL lines: single >= 6x the reference, packed
K = 16 >= 12.5x (fp32) and >= 20x (bf16) in model-steps/s, and the pack faster than the vmap ensemble.

--budget (default 480 s, 8 minutes, counted from the start of this script, imports and CUDA's start-up
included): a check or the table starts only when its estimate (ESTIMATES, seconds on one H200, scaled
by how much slower than estimated the items so far ran) fits in what is left; what did not is listed.
Exits 1 when any line fails. `--device cpu` runs (a) against itself on a CPU (slowly); the suite runs
the checks on an emulated GPU (tests/test_gpu_check.py).
"""

import time

START = time.monotonic()  # --budget counts from here: the imports and CUDA's start-up are part of it

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loops import (reference_steps_per_second, sphrun_model_steps_per_second, uint8_images,  # noqa: E402
                   vmap_model_steps_per_second)

from sphrun.cli import main as sphrun_main  # noqa: E402
from sphrun.config import TrainConfig  # noqa: E402
from sphrun.lifecycle import use_device  # noqa: E402
from sphrun.metrics import tf32  # noqa: E402
from sphrun.packed import PackedConvNet, TrainingStep  # noqa: E402
from sphrun.rundir import RunDir  # noqa: E402

SMALL = ["--dataset", "synthetic", "--subset", "1024", "--width", "8", "--batch-size", "64"]
SHORT = ["--iters", "20", "--eval-every", "10"]
TINY_NET = ["--dataset", "synthetic", "--subset", "256", "--width", "4", "--batch-size", "32", "--iters", "8",
            "--eval-every", "4"]
COLUMNS = ("train_loss", "test_loss", "gm", "si_norm", "cos_prev", "cos_init", "proj_err")
CONNECT_COLUMNS = ("train_loss", "train_err", "test_loss", "test_err", "gm")


class Band:
    """How far two runs' metrics may be apart: each of COLUMNS relative, by `values` (one number for all
    or {column: number}), train and test errors by `errors` (a fraction of the images, one number or
    {column: number}) plus `images` images."""

    def __init__(self, values, errors, images=0):
        self.values, self.errors, self.images = values, errors, images

    def value(self, column):
        return self.values[column] if isinstance(self.values, dict) else self.values

    def error(self, column, images):
        share = self.errors[column] if isinstance(self.errors, dict) else self.errors
        return share + self.images / images


# Each band from a measured spread (benchmarks/check_spread.py: the CPU runs of every check with 1 and
# with 2 threads, whose sums split otherwise, as a GPU's and a CPU's do; bf16 against fp32), and what
# cuDNN is known to do, with its reason:
BANDS = dict(
    # Step 0, the same weights: only the order of sums differs. Measured: 0 between thread counts, ~1e-6
    # between the CUDA and CPU forms of a pack (tests/test_emulated_gpu.py); cuDNN's benchmark mode may
    # pick Winograd or FFT convolutions, whose fp32 rounding is of order 1e-6 per output (Lavin and Gray
    # 2016), and the metrics are means over 1,024 images. 1e-4 is 10x that, yet a BatchNorm pooling
    # another set of images moves the loss at init by 1.3e-4 (one in the wrong mode by 60 %). 2 images:
    # an argmax tie that 1e-6 can flip.
    at_init=Band(1e-4, 0, images=2),
    # After 10 and 20 steps (60 for kill -9) the first steps have amplified the order of sums into the
    # percent level, as much between a GPU and a CPU as between 1 and 2 CPU threads: each band is twice
    # the largest spread between thread counts over every check's runs (one pair per run is a small
    # sample): train loss 2.5e-2, test loss 7e-2 (BN eval mode near chance), GM 5.3e-2, 1 - r 0.16,
    # cosines 1.1e-3, the radius 3e-7 (rounding only: 1e-5), train error 28 of 1,024 images, test error
    # 109 of 1,000. A 2x learning rate is off by 35-44 % in train loss, 21-28 % in GM, 4-5 % in cosines.
    early=Band({"train_loss": 5e-2, "test_loss": 0.15, "gm": 0.11, "si_norm": 1e-5, "cos_prev": 3e-3,
                "cos_init": 3e-3, "proj_err": 0.35}, {"train_err": 0.06, "test_err": 0.22}),
    # bf16 at step 0: bf16 against fp32 on the CPU differs by at most 4.9e-3 (GM), 1.2e-3 (train loss)
    # and 1 image (VGG-16-BN, ResNet-18); two bf16 implementations (CPU and GPU autocast round otherwise)
    # each differ from fp32 so, hence from each other by up to twice that; twice again for the margin.
    bf16_at_init=Band(3e-2, 0, images=4),
    # Graph against eager on the device, cuDNN deterministic for both: the same kernels in the same
    # order, so the same numbers (the emulated device: bit for bit); 1e-5 for a reduction another stream
    # may order otherwise, and 1 image for a tie that flips.
    graph=Band(1e-5, 0, images=1),
)
# connect, curvature and the plane measure fixed weights, where no step amplifies anything: device and
# CPU differ by the order of sums (~1e-6, as at step 0; curvature's probes are the same numbers on both),
# through at most 5 Lanczos steps: 1e-3, and 2 images for a tie (errors in absolute terms). --tf32 rounds
# the inputs of the device's products to 10 bits (~5e-4 each), partly averaged over sums of thousands:
# 3e-2, an estimate only (the CPU and the emulated device have no TF32 to measure).
FIXED_WEIGHTS, FIXED_WEIGHTS_TF32, FIXED_WEIGHTS_ERRORS = 1e-3, 3e-2, 2e-3


def sphrun(*args):
    """Run `sphrun ARGS` in this process; returns (exit code, what it printed on stderr). What it prints
    on stdout (plot's table of phases) is dropped: this script's own lines are its output."""
    err = io.StringIO()
    argv = sys.argv
    sys.argv = ["sphrun", *map(str, args)]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
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
    capture = TrainingStep.capture
    TrainingStep.capture = lambda self: setattr(self, "eager_only", True)
    try:
        yield
    finally:
        TrainingStep.capture = capture


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
    init, forward = TrainingStep.__init__, PackedConvNet.forward

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        steps.append(self)

    def poisoned(self, x):
        logits = forward(self, x)
        if steps and self.training and torch.is_grad_enabled():
            nan = torch.where(steps[-1].counter >= from_step, float("nan"), 0.0)
            logits = torch.cat([logits[:, :member], logits[:, member:member + 1] + nan, logits[:, member + 1:]], 1)
        return logits

    TrainingStep.__init__, PackedConvNet.forward = tracked_init, poisoned
    try:
        yield
    finally:
        TrainingStep.__init__, PackedConvNet.forward = init, forward


class Check:
    """What one line found: `problems` (empty when it passed). Its runs go in its own folder `root`."""

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
            self.check_statuses(str(args[list(args).index("--out") + 1]), must_end)

    def check_statuses(self, out, must_end):
        statuses = [RunDir(r).read_config()["status"] for r in run_dirs(out)]
        wanted = list(must_end) if len(must_end) == len(statuses) else [must_end[0]] * len(statuses)
        if statuses != wanted:
            self.problems.append(f"{out}: runs ended {', '.join(statuses)}, expected {', '.join(wanted)}")

    def train_three_ways(self, args, must_end=("done",), cpu=True, bf16=False, device_option=None):
        """The command on the device (named `device_option`, default this check's), on the device without
        graphs, and on the CPU; compares them."""
        option = device_option or self.device
        with tf32(False), deterministic():
            self.run(*args, "--device", option, "--out", self.path("device"), must_end=must_end)
            with graphs_off():
                self.run(*args, "--device", option, "--out", self.path("eager"), must_end=must_end)
        self.compare(self.path("device"), self.path("eager"), "graph against eager", BANDS["graph"], BANDS["graph"])
        if cpu:
            self.run(*args, "--device", "cpu", "--out", self.path("cpu"), must_end=must_end)
            later = None if bf16 else BANDS["early"]
            self.compare(self.path("device"), self.path("cpu"), "against the CPU",
                         BANDS["bf16_at_init" if bf16 else "at_init"], later)

    def compare(self, ours, theirs, what, first, later):
        """Metrics rows of the runs in `ours` against those in `theirs`, run by run: the first row within
        the Band `first`, the others within `later` (None: not compared)."""
        if not (os.path.isdir(ours) and os.path.isdir(theirs)):
            return  # a run that failed to start: its line already says why
        for a, b in zip(run_dirs(ours), run_dirs(theirs)):
            rows_a, rows_b = RunDir(a).read_metrics(), RunDir(b).read_metrics()
            if [r["iter"] for r in rows_a] != [r["iter"] for r in rows_b]:
                self.problems.append(f"{what}: {a} has rows at steps {[r['iter'] for r in rows_a]}, "
                                     f"{b} at {[r['iter'] for r in rows_b]}")
                continue
            stored = RunDir(a).read_config()
            sizes = {"train_err": stored["train_size"], "test_err": stored["test_size"]}
            for i, (ra, rb) in enumerate(zip(rows_a, rows_b)):
                band = first if i == 0 else later
                if band is None:
                    continue
                far = [f"{c} {ra[c]:.6g} vs {rb[c]:.6g}" for c in COLUMNS if not close(ra[c], rb[c], band.value(c))]
                far += [f"{c} {ra[c]:.4f} vs {rb[c]:.4f}" for c, n in sizes.items()
                        if abs(ra[c] - rb[c]) > band.error(c, n) + 1e-9]
                if far:
                    self.problems.append(f"{what}, {os.path.basename(a)} step {ra['iter']}: {'; '.join(far)}")


def close(a, b, rel):
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= rel * max(abs(a), abs(b)) + 1e-7


def run_dirs(path):
    if RunDir(path).exists():
        return [path]
    if not os.path.isdir(path):
        return []
    return sorted(os.path.join(path, n) for n in os.listdir(path) if RunDir(os.path.join(path, n)).exists())


# --- the checks: each a function of a Check ----------------------------------------------------------

def training(args, **how):
    """A check that trains `args()` (built when it runs: the suite shrinks SMALL) three ways."""
    def check(c):
        c.train_three_ways(args(), **how)
    check.args = args
    return check


def transition(c):
    """A fine-tune whose rate moves for 12 steps, 8 of them after the capture (at the 4th step)."""
    for where in ("device", "eager", "cpu"):
        parent = c.path("parent", where)
        options = ["--device", "cpu" if where == "cpu" else c.device]
        with tf32(False), deterministic(), (graphs_off() if where == "eager" else contextlib.nullcontext()):
            c.run("train", "--elr", "1e-4", *SMALL, *SHORT, *options, "--out", parent)
            c.run("finetune", parent, "--elr", "1e-3", "--transition", "12", "--iters", "20", "--eval-every", "10",
                  *options, "--out", c.path("transition", where))
    c.compare(c.path("transition", "device"), c.path("transition", "eager"), "graph against eager", BANDS["graph"],
              BANDS["graph"])
    c.compare(c.path("transition", "device"), c.path("transition", "cpu"), "against the CPU", BANDS["at_init"],
              BANDS["early"])


def diverging_member(c):
    with diverging(member=1, from_step=8):
        c.train_three_ways(["train", "--elr", "1e-4,2e-4", *SMALL, *SHORT], must_end=("done", "diverged"), cpu=False)


def as_parent():
    """How a child process runs Python as this one does: this interpreter, with this process's import
    path (so it imports the sphrun this process imported, installed or not)."""
    return [sys.executable], {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def kill_and_resume(c):
    """kill -9 once the run is past its capture and first evaluation, then the same command again; the
    processes run sphrun as this one does (as_parent), in the check's folder."""
    python, env = as_parent()
    args = [*python, "-m", "sphrun", "train", "--elr", "1e-4", *SMALL, "--iters", "60", "--eval-every", "20",
            "--device", c.device, "--out", c.path("killed")]
    whole = [*args[:-1], c.path("whole")]
    os.makedirs(c.root, exist_ok=True)
    process = subprocess.Popen(args, stderr=subprocess.DEVNULL, env=env, cwd=c.root)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(RunDir(c.path("killed")).read_metrics()) < 2 and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    for command in (args, whole):
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=c.root)
        if done.returncode != 0:
            c.problems.append(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
            return
    # another process: cuDNN may pick other kernels, so the runs part as the device and the CPU do
    c.compare(c.path("killed"), c.path("whole"), "resumed after kill -9 against uninterrupted", BANDS["at_init"],
              BANDS["early"])


def trained_on_cpu(c, ends):
    """The runs connect and curvature measure: a parent and fine-tunes of it (`ends`: their folders),
    trained on the CPU in this check's folder."""
    c.run("train", "--elr", "1e-4", *SMALL, *SHORT, "--device", "cpu", "--out", ends[0])
    for end, elr in zip(ends[1:], ("1e-3", "3e-3")):
        c.run("finetune", ends[0], "--elr", elr, "--iters", "10", "--eval-every", "10", "--device", "cpu",
              "--out", end)


def connect_and_curvature(c, tf32):
    """connect and curvature on the device against the CPU, in full float32 or with --tf32."""
    flag = ["--tf32"] if tf32 else []
    tolerance = FIXED_WEIGHTS_TF32 if tf32 else FIXED_WEIGHTS
    parent, child = c.path("parent"), c.path("fine-tune")
    trained_on_cpu(c, [parent, child])
    where = {"device": c.device, "cpu": "cpu"}
    for name, device in where.items():
        c.run("connect", parent, child, "--points", "3", "--bn-batches", "4", *flag, "--device", device, "--out",
              c.path("connect", name))
    ours, theirs = (read_csv(c.path("connect", name, "connect.csv")) for name in where)
    for a, b in zip(ours, theirs):
        compare_point(c, f"connect at alpha {a['alpha']}", a, b, tolerance)
    measured = {}
    for name, device in where.items():
        run = c.path(f"curvature-{name}")
        shutil.copytree(parent, run)
        c.run("curvature", run, "--at", "last", "--probes", "2", "--lanczos", "5", "--batches", "4", *flag,
              "--device", device)
        measured[name] = (read_csv(os.path.join(run, "curvature.csv")) or [{}])[-1]
    for k, v in measured["cpu"].items():
        if not close(measured["device"].get(k, math.nan), v, tolerance):
            c.problems.append(f"curvature: {k} {measured['device'].get(k, math.nan):.6g} vs {v:.6g} on the CPU")


def plane_and_density(c):
    """The plane through three runs (its points packed, 16 at a time on the GPU, 4 on the CPU) and
    hessian-density on the device against the CPU, in full float32."""
    ends = [c.path("parent"), c.path("fine-tune"), c.path("fine-tune-2")]
    trained_on_cpu(c, ends)
    where = {"device": c.device, "cpu": "cpu"}
    for name, device in where.items():
        c.run("connect", *ends, "--grid", "3", "--bn-batches", "4", "--device", device, "--out", c.path("plane", name))
    ours, theirs = (read_csv(c.path("plane", name, "plane.csv")) for name in where)
    for a, b in zip(ours, theirs):
        compare_point(c, f"plane at u {a['u']:.4g}, v {a['v']:.4g}", a, b, FIXED_WEIGHTS)
    summaries = {}
    for name, device in where.items():
        run = c.path(f"density-{name}")
        shutil.copytree(ends[0], run)
        c.run("curvature", run, "--at", "last", "--measures", "hessian-density", "--probes", "2", "--lanczos",
              "5", "--batches", "4", "--device", device)
        rows = read_csv(os.path.join(run, "hessian-density.csv"))
        e, d = np.array([r["eigenvalue"] for r in rows]), np.array([r["density"] for r in rows])
        integral = lambda f: float(np.sum((f[1:] + f[:-1]) / 2 * np.diff(e)))  # the trapezoid rule
        # the grid's ends (5 widths past the outermost Ritz values), its mass and mean eigenvalue
        summaries[name] = {"lowest": e[0], "highest": e[-1], "mass": integral(d), "mean": integral(e * d)} \
            if len(e) else {}
    for k, v in summaries["cpu"].items():
        if not close(summaries["device"].get(k, math.nan), v, FIXED_WEIGHTS):
            c.problems.append(f"hessian-density: {k} {summaries['device'].get(k, math.nan):.6g} vs {v:.6g} on the CPU")


def compare_point(c, where, ours, theirs, tolerance):
    """A problem naming the measures of a connect point (segment or plane) off the CPU's by more than
    `tolerance` (errors: by more than FIXED_WEIGHTS_ERRORS)."""
    far = [f"{k} {ours[k]:.6g} vs {theirs[k]:.6g}" for k in CONNECT_COLUMNS
           if not (abs(ours[k] - theirs[k]) <= FIXED_WEIGHTS_ERRORS + 1e-9 if k.endswith("_err")
                   else close(ours[k], theirs[k], tolerance))]
    if far:
        c.problems.append(f"{where}: {'; '.join(far)}")


def read_csv(path):
    import csv
    if not os.path.exists(path):
        return []  # a command that failed: its line already says why
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def plots(c):
    """The figures of a pack trained on the device (trained here: the check stands alone)."""
    c.run("train", "--elr", "1e-4,5e-4", *SMALL, *SHORT, "--device", c.device, "--out", c.path("pack"))
    c.run("plot", c.path("pack"), "--kind", "phase", "--out", c.path("phase.png"))
    c.run("plot", c.path("pack"), "--kind", "metrics", "--out", c.path("metrics.png"))


# In the order they run: the first FIRST are the most telling, then comes the throughput table (b).
CHECKS = {
    "train packed": training(lambda: ["train", "--elr", "1e-4,2e-4,5e-4", *SMALL, *SHORT]),
    "train single --device auto": training(lambda: ["train", "--elr", "1e-4", *SMALL, *SHORT], device_option="auto"),
    "a member diverging after capture": diverging_member,
    "random steps": training(lambda: ["train", "--elr", "1e-4,5e-4", "--step", "random", *SMALL, *SHORT]),
    "transition past the capture": transition,
    "VGG-16-BN bf16": training(lambda: ["train", "--model", "vgg16bn", "--elr", "1e-4", "--precision", "bf16",
                                        *TINY_NET], bf16=True),
    "geodesic steps": training(lambda: ["train", "--elr", "1e-4,5e-4", "--geodesic", *SMALL, *SHORT]),
    "ascent steps": training(lambda: ["train", "--elr", "1e-4,5e-4", "--step", "ascent", *SMALL, *SHORT]),
    "mse": training(lambda: ["train", "--elr", "1e-4,5e-4", "--loss", "mse", *SMALL, *SHORT]),
    "seeds x data seeds with --pack": training(lambda: ["train", "--elr", "1e-4,5e-4", "--seed", "0:2",
                                                        "--data-seed", "0:2", "--pack", "3", *SMALL, *SHORT]),
    "ResNet-18 bf16": training(lambda: ["train", "--model", "resnet18", "--elr", "1e-4", "--precision", "bf16",
                                        *TINY_NET], bf16=True),
    "kill -9 and resume": kill_and_resume,
    "connect and curvature fp32": lambda c: connect_and_curvature(c, tf32=False),
    "connect and curvature --tf32": lambda c: connect_and_curvature(c, tf32=True),
    "plane and hessian-density fp32": plane_and_density,
    "plot": plots,
}
FIRST = 6
THROUGHPUT = "throughput table"

# Seconds each item takes on one H200, start-up aside, estimated (README, Checking a GPU) from CPU
# seconds on one core (check_spread.py, less 2.1 s of imports): each CPU run as timed, each device run
# as the same run at width 1 (its work but the convolutions': Python, data, files, evaluations' loops)
# plus 1 s of cuDNN's benchmarking and the capture (2 s more for VGG's and ResNet's many layers); the
# checks that do not train three ways timed with --device cpu, their device half as half its CPU time.
ESTIMATES = {"train packed": 22, "train single --device auto": 9, "a member diverging after capture": 7,
             "random steps": 15, "transition past the capture": 17, "VGG-16-BN bf16": 8, "geodesic steps": 15,
             "ascent steps": 15, "mse": 16, "seeds x data seeds with --pack": 57, "ResNet-18 bf16": 10,
             "kill -9 and resume": 21, "connect and curvature fp32": 22, "connect and curvature --tf32": 22,
             "plane and hessian-density fp32": 36, "plot": 6,
             # 6 loops of 220 steps: 16 ConvNets of width 32 at batch 128 take ~0.7 TFLOP a step, ~25 ms at
             # 30 TFLOP/s, 6 s a loop, with the set-up of each (data, cuDNN, workers) ~4 s more
             THROUGHPUT: 60}
START_UP = 20  # torch's import and CUDA's initialisation, before the first check


def run_check(name, device, root):
    """Run one check of (a) in its own folder under `root` and print its line; True when it failed."""
    check = Check(device, os.path.join(root, folder_name(name)))
    start = time.perf_counter()
    try:
        CHECKS[name](check)
    except Exception as e:  # a bug: show where
        check.problems.append(f"{type(e).__name__}: {e} at {traceback.extract_tb(e.__traceback__)[-1]}")
    verdict = "PASS" if not check.problems else "FAIL  " + " | ".join(check.problems)
    print(f"{name:<34} {time.perf_counter() - start:6.1f} s  {verdict}", flush=True)
    return bool(check.problems)


def folder_name(name):
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


def run_checks(device, names=None, root=None):
    """Part (a), no budget: a PASS or FAIL line per check; returns the number of failures."""
    with tempfile.TemporaryDirectory() as scratch:
        return sum(run_check(name, device, root or scratch) for name in names or CHECKS)


class Budget:
    """--budget SECONDS from START: an item starts when its estimate, scaled by how much slower than
    estimated the items so far ran, fits in what is left."""

    def __init__(self, seconds):
        self.seconds, self.start, self.estimated, self.taken = seconds, START, 0.0, 0.0

    def fits(self, estimate):
        slower = max(1.0, self.taken / self.estimated) if self.estimated else 1.0
        return estimate * slower <= self.seconds - (time.monotonic() - self.start)

    def spent(self, estimate, seconds):
        self.estimated += estimate
        self.taken += seconds


def plan(only, skip_throughput):
    """The items to run, in order: the checks named (all by default; ValueError for a name that is not
    one), then the throughput table after the first FIRST checks, unless skipped."""
    names = list(CHECKS)
    if only:
        wanted = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in CHECKS]
        if unknown:
            raise ValueError(f"--only: no check named {', '.join(map(repr, unknown))}; the checks are "
                             f"{', '.join(CHECKS)}")
        names = [n for n in names if n in wanted]
    if not skip_throughput:
        names.insert(sum(n in list(CHECKS)[:FIRST] for n in names), THROUGHPUT)
    return names


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
    parser.add_argument("--budget", type=float, default=480,
                        help="seconds for the whole script, start-up included (default 480: 8 minutes); an item "
                             "whose estimate does not fit what is left is skipped and listed")
    parser.add_argument("--skip-throughput", action="store_true", help="only part (a), the PASS/FAIL lines")
    parser.add_argument("--only", help="comma-separated names of the checks of (a) to run (default: all)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps of each loop in (b)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (the CUDA graph capture too)")
    args = parser.parse_args()
    try:
        items = plan(args.only, args.skip_throughput)
    except ValueError as e:
        parser.error(str(e))
    device = use_device(args.device)
    torch.zeros(1, device=device).sum().item()  # CUDA's initialisation, counted before the first estimate
    print(f"sphrun gpu_check on {device} (torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
          + f"), budget {args.budget:g} s, {time.monotonic() - START:.1f} s in", flush=True)
    budget, failures, skipped, checks = Budget(args.budget), 0, [], 0
    with tempfile.TemporaryDirectory() as scratch:
        for item in items:
            if not budget.fits(ESTIMATES[item]):
                skipped.append(item)
                continue
            start = time.monotonic()
            if item == THROUGHPUT:
                failures += throughput(device, args.steps, args.warmup)
            else:
                failures += run_check(item, str(device), scratch)
                checks += 1
            budget.spent(ESTIMATES[item], time.monotonic() - start)
    print(f"{failures} of {checks} checks failed" if failures else f"all {checks} checks passed", flush=True)
    if skipped:
        print(f"skipped to stay within --budget {args.budget:g} s: {', '.join(skipped)}", flush=True)
    print(f"{time.monotonic() - START:.1f} s in all", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
