#!/usr/bin/env python3
"""The paper in one command: every experiment of Nakhodnov et al. (2022) and Kodryan et al. (NeurIPS 2022)
as ordinary sphrun commands, run in dependency order into one folder, with every figure and an index.

    python examples/paper.py demo OUT                     # built-in synthetic set: minutes on a CPU
    python examples/paper.py small OUT [--data-dir DIR]   # CIFAR-10, reduced width and epochs
    python examples/paper.py paper OUT [--data-dir DIR]   # the paper's settings
    python examples/paper.py paper OUT --shard 0/4        # one of 4 training shards (a SLURM array task)
    python examples/paper.py demo OUT --plan              # the plan and its commands; nothing runs
    python examples/paper.py demo OUT --check             # every figure there, the sweep's phases in order

Each step is printed as it runs and can be copied as it is. Running the same command again resumes: finished
stages are skipped and a cut one goes on, since every sphrun command resumes. What it writes, besides the
commands' own outputs: OUT/figures/ (the figures), OUT/index.md (each paper figure: file, command, what the
paper shows), OUT/timings.md (each stage's estimate and wall time) and OUT/.paper/ (what is done).
"""

import argparse
import csv
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace

from sphrun import SphrunError
from sphrun.cli import parse_shard  # the one reading of --shard I/N, as `sphrun train --shard` reads it
from sphrun.phase_table import table_path_for
from sphrun.phases import PHASES, UNDECIDED, in_paper_order

PAPER = ("Nakhodnov, Kodryan, Lobacheva, Vetrov (2022), Dynamics and loss landscape of deep neural networks "
         "trained with the quadratic loss; Kodryan et al. (NeurIPS 2022), Training Scale-Invariant Neural "
         "Networks on the Sphere Can Happen in Three Regimes")
OUT = "{OUT}"  # stands for the output folder in command templates: a command's identity does not depend on it
STATE = ".paper"  # OUT/.paper: settings.json, stages/ and commands/ (what is done)
FULL_SIZES = {"synthetic": (5000, 1000), "cifar10": (50000, 10000)}  # train and test images


# --- the three scales ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    """Every number of one scale. ELRs are named by their role in the paper; the paper's own value follows
    each in its comment in PAPER_SCALE."""
    name: str
    about: str
    dataset: str
    subset: str | None  # of the main set (the cross-entropy sweep and MSE on the set): a count or fraction
    mse_subset: str  # the paper's 10 % subset
    mse_subset_batch: int
    width: int
    batch: int
    ce_elrs: tuple
    ce_epochs: int
    eval_epochs: float  # between evaluation points of the runs from init (equally spaced: the cosines need it),
    # at least 10 points a run
    keep: int | None  # keep every K-th checkpoint of the cross-entropy sweep (curvature measures those kept)
    p1_low: float  # a phase-1 ELR that does not reach zero train error: raised (figs. 6-9)
    raised: tuple  # a little, more (a jump to another optimum), a lot (into phase 2)
    p1_high: float  # a phase-1 ELR that converges: lowered 2x and 10x (figs. 4, 5); the plane's seeds
    lowered: tuple
    p1_max: float  # the largest phase-1 ELR, whose line the runs of fig. 11 join
    p2_low: float  # a small phase-2 ELR lowered into phase 1 (fig. 11)
    p2_low_to: tuple
    p2_high: float  # a large phase-2 ELR lowered into phase 1 (fig. 12) and the schedules' start (13, 14)
    p2_high_to: tuple
    pairs_unconverged: tuple  # two phase-1 ELRs short of zero train error, and two past it (fig. 3)
    pairs_converged: tuple
    finetune_iters: int
    finetune_eval_every: int
    schedule_to: float
    transitions: tuple  # two transition lengths Delta (steps), each followed by finetune_iters steps
    p3_elrs: tuple  # phase-3 ELRs of the random-walk, ascent and geodesic controls
    p3_epochs: int
    mse_elrs: tuple
    mse_iters: int
    mse_subset_iters: int
    mse_parent: float  # an MSE run on the subset, lowered (fig. 21)
    mse_lowered: tuple
    vgg_width: int
    vgg_lrs: tuple
    vgg_epochs: int
    vgg_subset: str | None  # None: the main set
    wds: tuple = (0.0, 1e-4)
    points: int = 21  # along each segment of linear mode connectivity
    grid: int = 21  # per axis of the plane
    curvature: tuple = ()  # options of sphrun curvature for figs. 22, 23 (its defaults are the paper's)
    curvature_at: str = "all"
    density: tuple = ()  # options of sphrun curvature for the spectrum
    probe_steps: int = 20
    steps_for: int | None = None  # the train set size (the full set, before any subset) that the step counts
    # finetune_iters, finetune_eval_every, transitions, mse_iters and mse_subset_iters are sized for; given
    # another (an ImageFolder tree of another size, e.g. a 10 % subset of CIFAR-10), each is scaled by its size
    # over this one, so that every run sees as many epochs of its data: the same experiment, with fewer steps.
    # None: fixed step counts, whatever the data (the paper's own iterations; the demo's fixed synthetic set)


DEMO = Scale(
    name="demo", about="the built-in synthetic set (500 train images), ConvNet width 4, batch 50: every figure "
                       "in minutes on a CPU; the numbers and phase borders are the synthetic set's, not CIFAR-10's",
    dataset="synthetic", subset="500", mse_subset="50", mse_subset_batch=10, width=4, batch=50,
    ce_elrs=(1e-4, 3e-4, 1e-3, 3e-3, 7e-3, 1e-2, 1e-1, 3e-1), ce_epochs=40, eval_epochs=2, keep=None,
    p1_low=1e-4, raised=(2e-4, 1e-3, 1e-2), p1_high=1e-3, lowered=(5e-4, 1e-4), p1_max=3e-3,
    p2_low=7e-3, p2_low_to=(1e-3, 3e-3), p2_high=1e-2, p2_high_to=(1e-4, 1e-3),
    pairs_unconverged=(1e-4, 3e-4), pairs_converged=(1e-3, 3e-3),
    finetune_iters=100, finetune_eval_every=20, schedule_to=1e-4, transitions=(20, 200),
    p3_elrs=(1e-1, 3e-1), p3_epochs=20,
    mse_elrs=(1e-3, 1e-2, 1e-1, 1.0), mse_iters=200, mse_subset_iters=200, mse_parent=1e-2, mse_lowered=(5e-3, 1e-3),
    vgg_width=4, vgg_lrs=(0.01, 0.1, 1.0), vgg_epochs=20, vgg_subset=None,
    points=11, grid=4,
    curvature=("--measures", "fisher-trace,hessian-eig", "--probes", "2", "--lanczos", "4", "--batches", "2"),
    curvature_at="0,100,200,300,400",
    density=("--probes", "2", "--lanczos", "10", "--batches", "2"),
    probe_steps=20,
)

SMALL = Scale(
    name="small", about="CIFAR-10 and its 10 % subset, ConvNet width 8, sweeps of 20 epochs (the fewest sphrun's "
                        "phase rules read), VGG-16-BN width 8 on the subset: a laptop CPU in a few hours, a GPU in "
                        "minutes; much shorter runs than the paper's, so phase 1 converges less far",
    dataset="cifar10", subset=None, mse_subset="0.1", mse_subset_batch=128, width=8, batch=128,
    ce_elrs=(1e-4, 3e-4, 7e-4, 2e-3, 5e-3, 1e-2, 5e-2, 3e-1), ce_epochs=20, eval_epochs=2, keep=None,
    p1_low=1e-4, raised=(2e-4, 7e-4, 5e-3), p1_high=7e-4, lowered=(3.5e-4, 7e-5), p1_max=7e-4,
    p2_low=2e-3, p2_low_to=(3e-4, 7e-4), p2_high=1e-2, p2_high_to=(1e-4, 3e-4),
    pairs_unconverged=(1e-4, 3e-4), pairs_converged=(3e-4, 7e-4),
    finetune_iters=1950, finetune_eval_every=390, schedule_to=1e-4, transitions=(390, 3900),
    p3_elrs=(5e-2, 3e-1), p3_epochs=5,
    mse_elrs=(1e-3, 1e-2, 5e-2, 5e-1), mse_iters=7800, mse_subset_iters=2000, mse_parent=1e-2,
    mse_lowered=(5e-3, 1e-3),
    vgg_width=8, vgg_lrs=(0.01, 0.1, 1.0), vgg_epochs=20, vgg_subset="0.1",
    points=11, grid=7,
    curvature=("--measures", "fisher-trace,hessian-eig", "--probes", "2", "--lanczos", "5", "--batches", "10"),
    density=("--probes", "2", "--lanczos", "20", "--batches", "10"),
    steps_for=50000,  # on CIFAR-10's 50,000 images: fine-tunes of 5 epochs (1950 steps) evaluated every epoch,
    # transitions of 1 and 10 epochs, MSE for 20 epochs on the set (7800 steps) and about 50 on its subset (2000
    # steps of 5,000 images); on the 10 % subset (5,000 images) the same epochs in 10x fewer steps
)

PAPER_SCALE = Scale(
    name="paper", about="the paper's settings: CIFAR-10, ConvNet width 32, batch 128, 1000 epochs per sweep, "
                        "5000-step fine-tunes, 6000-step MSE runs, curvature with 5 probes and 10 Lanczos steps "
                        "over the train set; evaluation every 5 epochs (the paper's cosines are 1 epoch apart)",
    dataset="cifar10", subset=None, mse_subset="0.1", mse_subset_batch=128, width=32, batch=128,
    ce_elrs=(1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 7e-4, 8e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 3e-1,
             1.0),
    ce_epochs=1000, eval_epochs=5, keep=10,
    p1_low=1e-4, raised=(2e-4, 5e-4, 3e-3),  # the paper: 1e-4 raised a little, more, past the border
    p1_high=5e-4, lowered=(2.5e-4, 5e-5), p1_max=7e-4,  # lowered 2x and 10x
    p2_low=1e-3, p2_low_to=(1e-4, 3e-4, 7e-4), p2_high=1e-2, p2_high_to=(1e-4, 3e-4, 7e-4),
    pairs_unconverged=(2e-5, 5e-5), pairs_converged=(5e-4, 7e-4),
    finetune_iters=5000, finetune_eval_every=250, schedule_to=1e-5, transitions=(1000, 20000),
    p3_elrs=(5e-2, 1e-1, 3e-1), p3_epochs=50,
    mse_elrs=(1e-4, 1e-3, 3e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1, 5e-1), mse_iters=6000, mse_subset_iters=6000,
    mse_parent=1e-2, mse_lowered=(5e-3, 1e-3),
    vgg_width=64, vgg_lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0), vgg_epochs=200, vgg_subset=None,
    curvature=("--measures", "fisher-trace,hessian-eig"),
    density=("--lanczos", "30"),
)

SCALES = {s.name: s for s in (DEMO, SMALL, PAPER_SCALE)}


# --- commands -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunAt:
    """The run trained from init at one ELR (and seed) in a folder of runs: sphrun names it from its settings,
    so it is found when a command that needs it runs."""
    folder: str  # relative to OUT
    elr: float
    seed: int = 0
    step: str = "sgd"

    def template(self):
        seed = f" seed {self.seed}" if self.seed else ""
        step = f" {self.step} steps" if self.step != "sgd" else ""
        return f"{OUT}/{self.folder}/<run at ELR {self.elr:g}{seed}{step}>"

    def find(self, out):
        folder = os.path.join(out, self.folder)
        found = []
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            try:
                with open(os.path.join(folder, name, "config.json")) as f:
                    config = json.load(f)
                settings = config["settings"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if (config.get("parent") is None and math.isclose(float(settings["elr"]), self.elr, rel_tol=1e-6)
                    and int(settings.get("seed", 0)) == self.seed and settings.get("step", "sgd") == self.step):
                found.append(os.path.join(folder, name))
        if len(found) != 1:
            what = "no run" if not found else f"{len(found)} runs"
            raise DriverError(f"{what} at ELR {self.elr:g} seed {self.seed} in {folder}: did its stage finish?")
        return found[0]


@dataclass(frozen=True)
class Cost:
    """What a command does, in the units the probe times. Training: `models` trained together for `steps`
    steps of `batch` images, evaluated at `points` points (the train set forward and backward for train
    metrics and GM, the test set forward); connect: `points` points, each also recomputing BatchNorm
    statistics (the train set forward); curvature: `hvp` images through a Hessian-vector product."""
    kind: str  # "train", "connect", "curvature" or "plot"
    models: int = 1
    steps: int = 0
    batch: int = 0
    points: int = 0
    train_size: int = 0
    test_size: int = 0
    vgg: bool = False
    hvp: float = 0


@dataclass(frozen=True)
class Figure:
    numbers: tuple  # the paper's figure numbers it stands for; () for sphrun's extensions
    file: str  # relative to OUT
    shows: str  # what the paper shows there


@dataclass
class Command:
    args: tuple  # after `sphrun`: strings (OUT stands for the output folder) and RunAt placeholders
    cost: Cost
    runs: tuple = ()  # a training command: the runs it trains (RunAt, or the --out of a single run), in
    # sphrun's grid order (ELR-major)
    parent: RunAt | None = None  # a fine-tune: trained by the shard that trains its parent
    figure: Figure | None = None

    def template(self):
        return shlex.join(["sphrun"] + [a.template() if isinstance(a, RunAt) else a for a in self.args])

    def argv(self, out):
        return [a.find(out) if isinstance(a, RunAt) else a.replace(OUT, out) for a in self.args]


TRAIN, MEASURE, DRAW = "train", "measure", "draw"


@dataclass
class Stage:
    name: str
    kind: str  # TRAIN stages are split by --shard; MEASURE and DRAW run once, after every shard
    what: str
    needs: tuple
    commands: list = field(default_factory=list)


class DriverError(Exception):
    """A mistake in the driver's command line or its output folder: one line, exit 2."""


# --- the experiments --------------------------------------------------------------------------------------
class Experiments:
    """The stages of one scale, in dependency order, built from sphrun commands."""

    def __init__(self, scale, data_dir=None, device=None):
        self.data_dir = data_dir
        self.device = ("--device", device) if device else ()
        full_train, self.test_size = FULL_SIZES[scale.dataset]
        if data_dir and os.path.isdir(os.path.join(data_dir, "train")):  # an ImageFolder tree: count its images
            full_train, self.test_size = (count_images(os.path.join(data_dir, split)) for split in ("train", "test"))
        self.full_train = full_train
        self.s = scaled(scale, full_train)
        self.train_size = subset_size(scale.subset, full_train)
        self.mse_subset_size = subset_size(scale.mse_subset, full_train)
        self.vgg_size = subset_size(scale.vgg_subset, full_train) if scale.vgg_subset else self.train_size

    # the options every run from init shares
    def data(self, subset, batch):
        options = ["--dataset", self.s.dataset]
        if self.data_dir:
            options += ["--data-dir", self.data_dir]
        if subset:
            options += ["--subset", subset]
        return options + ["--batch-size", str(batch), *self.device]

    def train(self, folder, elrs, length, seeds=(0,), step="sgd", subset="main", batch=None, loss="ce", points=None,
              keep=None):
        """One `sphrun train` of several ELRs (and seeds) packed, into OUT/folder; `length` is (--epochs or
        --iters, N); `points`: evaluate only about this many times (default: every eval_epochs)."""
        subset_option, size = (self.s.subset, self.train_size) if subset == "main" else (subset, self.mse_subset_size)
        batch = batch or self.s.batch
        steps = length[1] * (size // batch) if length[0] == "--epochs" else length[1]
        eval_every = max(steps // points, 1) if points else self.every(steps, size // batch)
        args = ["train", "--loss", loss, "--elr", elr_list(elrs), *self.data(subset_option, batch),
                "--width", str(self.s.width), *length_options(length), "--eval-every", str(eval_every)]
        if seeds != (0,):
            args += ["--seed", ",".join(map(str, seeds))]
        if step != "sgd":
            args += ["--step", step]
        if keep:
            args += ["--keep", str(keep)]
        args += ["--out", f"{OUT}/{folder}"]
        models = len(elrs) * len(seeds)
        runs = tuple(RunAt(folder, e, seed, step) for e in elrs for seed in seeds)  # sphrun's grid: ELR-major
        return Command(tuple(args), training_cost(models, steps, batch, evaluations(steps, eval_every), size,
                                                  self.test_size), runs=runs)

    def finetune(self, parent, folder, name, elr, iters, *extra):
        path = f"{OUT}/{folder}/{name}"
        args = ("finetune", parent, "--elr", f"{elr:g}", "--iters", str(iters), "--eval-every",
                str(self.s.finetune_eval_every), *extra, *self.device, "--out", path)
        size = self.mse_subset_size if parent.folder == "mse-subset" else self.train_size
        batch = self.s.mse_subset_batch if parent.folder == "mse-subset" else self.s.batch
        cost = training_cost(1, iters, batch, evaluations(iters, self.s.finetune_eval_every), size, self.test_size)
        return Command(args, cost, runs=(path,), parent=parent)

    def connect(self, a, b, name, c=None):
        ends = (a, b) if c is None else (a, b, c)
        points = self.s.points if c is None else self.s.grid ** 2
        shape = ("--points", str(self.s.points)) if c is None else ("--grid", str(self.s.grid))
        cost = Cost("connect", points=points, train_size=self.train_size, test_size=self.test_size)
        return Command(("connect", *ends, *shape, *self.device, "--out", f"{OUT}/connect/{name}"), cost)

    def plot(self, numbers, name, sources, kind, shows, *extra):
        file = f"figures/{name}.png"
        figure = Figure(tuple(numbers), file, shows)
        return Command(("plot", *sources, "--kind", kind, *extra, "--out", f"{OUT}/{file}"), Cost("plot"),
                       figure=figure)

    def stages(self):
        s = self.s
        sweep = lambda elr: RunAt("sweep-ce", elr)
        references = lambda elrs: [sweep(e) for e in elrs if e in s.ce_elrs]  # from-init runs at those ELRs
        ft = lambda parent, name, elr: self.finetune(parent, "finetune-ce", name, elr, s.finetune_iters)
        epochs = ("--epochs", s.ce_epochs)

        stages = [
            Stage("sweep-ce", TRAIN, "the ELR sweep with cross-entropy from one init (figs. 1, 2, 10, 22-25)", (), [
                self.train("sweep-ce", s.ce_elrs, epochs, keep=s.keep)]),
            Stage("seeds", TRAIN, "two more seeds at a phase-1 ELR, for the plane through three solutions", (), [
                self.train("seeds-ce", (s.p1_high,), epochs, seeds=(1, 2), points=4)]),
            Stage("controls", TRAIN, "phase-3 controls: a random walk and gradient ascent (fig. 15)", (), [
                self.train("controls", s.p3_elrs, ("--epochs", s.p3_epochs), step=step)
                for step in ("random", "ascent")]),
            Stage("mse", TRAIN, "the ELR sweep with MSE on the set and on its 10 % subset (figs. 16-20)", (), [
                self.train("mse", s.mse_elrs, ("--iters", s.mse_iters), loss="mse"),
                self.train("mse-subset", s.mse_elrs, ("--iters", s.mse_subset_iters), loss="mse",
                           subset=s.mse_subset, batch=s.mse_subset_batch)]),
            Stage("vgg", TRAIN, "conventional training: VGG-16-BN off the sphere, weight decay 0 and 1e-4 (appendix "
                                "4, figs. 26-29)", (), [
                self.vgg(lr, wd) for wd in s.wds for lr in s.vgg_lrs]),
            Stage("finetune", TRAIN, "fine-tuning: phase 1 lowered and raised, phase 2 lowered into phase 1 (figs. "
                                     "4-9, 11, 12)", ("sweep-ce",), [
                *(ft(sweep(s.p1_high), f"lowered-{s.p1_high:g}-to-{e:g}", e) for e in s.lowered),
                *(ft(sweep(s.p1_low), f"raised-{s.p1_low:g}-to-{e:g}", e) for e in s.raised),
                *(ft(sweep(s.p2_low), f"lowered-{s.p2_low:g}-to-{e:g}", e) for e in s.p2_low_to),
                *(ft(sweep(s.p2_high), f"lowered-{s.p2_high:g}-to-{e:g}", e) for e in s.p2_high_to)]),
            Stage("schedules", TRAIN, "ELR schedules with two transition lengths (figs. 13, 14)", ("sweep-ce",), [
                self.finetune(sweep(s.p2_high), "schedules", f"{s.p2_high:g}-to-{s.schedule_to:g}-D{d}", s.schedule_to,
                              d + s.finetune_iters, "--transition", str(d)) for d in s.transitions]),
            Stage("finetune-mse", TRAIN, "MSE on the subset, fine-tuned at lower ELRs (fig. 21)", ("mse",), [
                self.finetune(RunAt("mse-subset", s.mse_parent), "finetune-mse", f"lowered-{s.mse_parent:g}-to-{e:g}",
                              e, s.finetune_iters) for e in s.mse_lowered]),
            Stage("connect", MEASURE, "linear mode connectivity (figs. 3, 5, 6) and the plane through three phase-1 "
                                      "solutions", ("sweep-ce", "seeds", "finetune"), self.connections()),
            Stage("curvature", MEASURE, "Fisher trace and top Hessian eigenvalue along the sweep (figs. 22, 23), the "
                                        "Hessian's spectrum", ("sweep-ce",), [
                *(self.curvature(sweep(e)) for e in s.ce_elrs), self.density(sweep(s.p1_high))]),
            Stage("figures", DRAW, "every figure, and the index", tuple(STAGE_ORDER[:-1]), self.figures(references)),
        ]
        return stages

    def vgg(self, lr, wd):
        steps_per_epoch = self.vgg_size // self.s.batch
        steps = self.s.vgg_epochs * steps_per_epoch
        eval_every = self.every(steps, steps_per_epoch)
        path = f"{OUT}/vgg-wd{wd:g}/lr{lr:g}"
        args = ("train", "--model", "vgg16bn", "--no-sphere", "--lr", f"{lr:g}", "--wd", f"{wd:g}",
                *self.data(self.s.vgg_subset or self.s.subset, self.s.batch), "--width", str(self.s.vgg_width),
                "--epochs", str(self.s.vgg_epochs), "--eval-every", str(eval_every), "--out", path)
        cost = training_cost(1, steps, self.s.batch, evaluations(steps, eval_every), self.vgg_size,
                             self.test_size, vgg=True)
        return Command(args, cost, runs=(path,))

    def every(self, steps, steps_per_epoch):
        """Steps between evaluation points: every eval_epochs, and at least 10 points in the run."""
        return max(min(round(self.s.eval_epochs * steps_per_epoch), steps // 10), 1)

    def connections(self):
        s = self.s
        sweep = lambda elr: RunAt("sweep-ce", elr)
        ft = lambda name: f"{OUT}/finetune-ce/{name}"
        low, high = s.pairs_unconverged, s.pairs_converged
        little, more = s.raised[:2]
        commands = [
            self.connect(sweep(low[0]), sweep(low[1]), "fig03-unconverged"),
            self.connect(sweep(high[0]), sweep(high[1]), "fig03-converged"),
            *(self.connect(sweep(s.p1_high), ft(f"lowered-{s.p1_high:g}-to-{e:g}"), f"fig05-to-{e:g}")
              for e in s.lowered),
            *(self.connect(sweep(s.p1_low), ft(f"raised-{s.p1_low:g}-to-{e:g}"), f"fig06-to-{e:g}")
              for e in (little, more)),
        ]
        plane = self.connect(sweep(s.p1_high), RunAt("seeds-ce", s.p1_high, 1), "plane", c=RunAt("seeds-ce", s.p1_high, 2))
        plane.figure = Figure((), "connect/plane/plane.png",
                              "not in the paper: the loss surface on the plane through three phase-1 solutions of "
                              "different seeds (Garipov et al. 2018, fig. 1): separate low basins or one valley")
        return commands + [plane]

    def curvature(self, run):
        s = self.s
        checkpoints = self.checkpoints() if s.curvature_at == "all" else len(s.curvature_at.split(","))
        probes, lanczos, images = self.measured(s.curvature)
        return Command(("curvature", run, "--at", s.curvature_at, *s.curvature, *self.device),
                       Cost("curvature", hvp=checkpoints * images * (probes + lanczos)))  # Fisher probes, eig steps

    def density(self, run):
        probes, lanczos, images = self.measured(self.s.density)
        return Command(("curvature", run, "--at", "last", "--measures", "hessian-density", *self.s.density,
                        *self.device), Cost("curvature", hvp=images * probes * lanczos))

    def measured(self, options):
        """(probes, Lanczos steps, images) of `sphrun curvature` with these options, its defaults otherwise."""
        probes, lanczos, batches = (option(options, name, default)
                                    for name, default in (("--probes", 5), ("--lanczos", 10), ("--batches", 0)))
        return probes, lanczos, batches * self.s.batch if batches else self.train_size

    def checkpoints(self):
        """Checkpoints kept by a run of the sweep: every keep-th evaluation point, the first and last."""
        steps_per_epoch = self.train_size // self.s.batch
        steps = self.s.ce_epochs * steps_per_epoch
        points = evaluations(steps, self.every(steps, steps_per_epoch))
        return points if not self.s.keep else math.ceil(points / self.s.keep) + 1

    def figures(self, references):
        s = self.s
        sweep, runs = f"{OUT}/sweep-ce", lambda elr: RunAt("sweep-ce", elr)
        ft = lambda name: f"{OUT}/finetune-ce/{name}"
        lowered = lambda parent, targets: [ft(f"lowered-{parent:g}-to-{e:g}") for e in targets]
        raised = [ft(f"raised-{s.p1_low:g}-to-{e:g}") for e in s.raised]
        schedules = [f"{OUT}/schedules/{s.p2_high:g}-to-{s.schedule_to:g}-D{d}" for d in s.transitions]
        connect = lambda *names: [f"{OUT}/connect/{n}" for n in names]
        mse_finetunes = [f"{OUT}/finetune-mse/lowered-{s.mse_parent:g}-to-{e:g}" for e in s.mse_lowered]
        plot = self.plot
        return [
            plot([1], "fig01-phase", [sweep], "phase",
                 "the phase diagram: (train loss, GM) over training for each ELR, log-log; three regimes: "
                 "convergence (phase 1, ELR <= 7e-4), chaotic equilibrium (phase 2), divergence (phase 3, ELR >= 2e-2)"),
            plot([2], "fig02-metrics", [sweep], "metrics",
                 "final train loss, train and test error and GM against the ELR: every metric jumps at the 1/2 "
                 "border; the largest phase-1 ELR gives the best test error; in phase 2 a larger ELR gives a lower "
                 "GM and a higher loss"),
            plot([3], "fig03-connect", connect("fig03-unconverged", "fig03-converged"), "connect",
                 "linear mode connectivity of phase-1 solutions of different ELRs: those short of zero train error "
                 "lie in one linearly connected region (no peak between them); converged ones do not (a peak)"),
            plot([4], "fig04-phase", [runs(s.p1_high), *lowered(s.p1_high, s.lowered),
                                      *references(s.lowered)], "phase",
                 "phase 1 fine-tuned with the ELR lowered 2x and 10x: the trajectories continue their trend, "
                 "stuck in the region around their minimum"),
            plot([5], "fig05-connect", connect(*(f"fig05-to-{e:g}" for e in s.lowered)), "connect",
                 "a phase-1 solution and its fine-tunes at a 2x and a 10x lower ELR stay linearly connected"),
            plot([6], "fig06-connect", connect(*(f"fig06-to-{e:g}" for e in s.raised[:2])), "connect",
                 "ELR 1e-4 raised: a small increase stays linearly connected to where it started; a larger one "
                 "moves to the neighbourhood of another optimum (a peak between them)"),
            plot([7, 8, 9], "fig07-09-phase", [runs(s.p1_low), *raised, *references(s.raised)], "phase",
                 "ELR 1e-4 raised: small increases stay in the optimum (fig. 7); a larger one jumps, in a step, to "
                 "another, flatter trajectory (8); one past the phase-1 border turns chaotic at once (9)"),
            plot([10], "fig10-cosine", [sweep], "cosine",
                 "the cosine between neighbouring checkpoints for each ELR: near 1 in phase 1, lower in phase 2 "
                 "and falling as the ELR grows, about 0 in phase 3"),
            plot([11], "fig11-phase", [runs(s.p2_low), *lowered(s.p2_low, s.p2_low_to),
                                       *references(s.p2_low_to + (s.p1_max,))],
                 "phase",
                 "a small phase-2 ELR (1e-3) lowered into phase 1: whatever the final ELR, the runs converge along "
                 "the line of the largest phase-1 ELR (7e-4), to the widest optimum, with a better test error than "
                 "any phase-1 run"),
            plot([12], "fig12-phase", [runs(s.p2_high), *lowered(s.p2_high, s.p2_high_to),
                                       *references(s.p2_high_to)], "phase",
                 "a large phase-2 ELR (1e-2) lowered into phase 1: the runs join the trajectories of runs trained "
                 "at the final ELR from the start, optima of different widths"),
            plot([13], "fig13-schedule", schedules, "phase",
                 "the piecewise-linear ELR schedule from 1e-2 down to the final ELR, with transitions of different "
                 "lengths Delta", "--x", "iter", "--y", "elr"),
            plot([14], "fig14-phase", [runs(s.p2_high), *schedules, *references((s.schedule_to,))], "phase",
                 "the schedules 1e-2 to 1e-5 in the phase diagram: the fastest follows the final ELR's own "
                 "trajectory, slower ones pass along phase-2 trajectories longer and end in wider minima"),
            plot([15], "fig15-metrics", [sweep, f"{OUT}/controls"], "metrics",
                 "phase 3 beside its controls: a random walk and gradient ascent with steps of the same length "
                 "bound the SGD run's curvature from below and above; phase-3 training resembles a random walk"),
            plot([16], "fig16-phase", [f"{OUT}/mse"], "phase",
                 "MSE: the phase diagram; phase 3 at ELR 0.5 and the non-converging part of phase 1 (ELR <= 1e-4) "
                 "stand out, the rest resembles phases 1 and 2 of cross-entropy"),
            plot([17], "fig17-cosine", [f"{OUT}/mse"], "cosine",
                 "MSE: cosines between neighbouring epochs; runs with ELR >= 0.02 are in phase 2"),
            plot([18], "fig18-metrics", [f"{OUT}/mse"], "metrics",
                 "MSE: final metrics against the ELR; no run reaches zero train error in 6000 iterations and the "
                 "1/2 border is blurred (ELR 0.008-0.02)"),
            plot([19], "fig19-phase", [f"{OUT}/mse-subset"], "phase",
                 "MSE on the 10 % subset: all three phases and both sub-phases of phase 1 appear, as with "
                 "cross-entropy"),
            plot([20], "fig20-metrics", [f"{OUT}/mse-subset"], "metrics",
                 "MSE on the 10 % subset: the best test error, and the lowest GM, at the largest phase-1 ELR"),
            plot([21], "fig21-phase", [RunAt("mse-subset", s.mse_parent), *mse_finetunes], "phase",
                 "MSE fine-tuned at lower ELRs: the trajectories continue their trend and the loss falls, but GM "
                 "levels off or grows and the test error begins to rise (overfitting)"),
            plot([22], "fig22-curvature", [sweep], "curvature",
                 "the phase diagram with the trace of the Fisher matrix in place of GM: the same three phases, and "
                 "the high-curvature bottleneck phase-1 runs pass through", "--y", "fisher-trace"),
            plot([23], "fig23-curvature", [sweep], "curvature",
                 "the phase diagram with the largest Hessian eigenvalue: the same three phases", "--y", "hessian-eig"),
            plot([24, 25], "fig24-25-projection", [sweep], "projection",
                 "the projection error 1 - r of an SGD step followed by a projection back to the sphere (fig. 24 "
                 "draws one such step; sphrun draws no picture of it) against the ELR (fig. 25): under 2 % in "
                 "phases 1 and 2, large in phase 3, where each step turns the weights by nearly 90 degrees"),
            plot([26], "fig26-phase-vgg-wd0", [f"{OUT}/vgg-wd0"], "phase",
                 "VGG-16-BN off the sphere without weight decay: the trajectories of phase 1 and its two sub-phases, "
                 "noisier than the ConvNet's; large learning rates blow up to NaN at once"),
            plot([27], "fig27-metrics-vgg-wd0", [f"{OUT}/vgg-wd0"], "metrics",
                 "VGG-16-BN without weight decay: metrics fall as the learning rate grows; the best test error at "
                 "the largest stable learning rates, where curvature is lowest"),
            plot([28], "fig28-phase-vgg-wd1e-4", [f"{OUT}/vgg-wd0.0001"], "phase",
                 "VGG-16-BN with weight decay 1e-4: training is stable over a wider range; phase 1 and some phase-2 "
                 "runs, the loss of large phase-1 rates bending up at the end"),
            plot([29], "fig29-metrics-vgg-wd1e-4", [f"{OUT}/vgg-wd0.0001"], "metrics",
                 "VGG-16-BN with weight decay 1e-4: the best test error at the largest phase-1 learning rate"),
            plot([], "spectrum", [runs(s.p1_high)], "spectrum",
                 "not in the paper: the Hessian's eigenvalue density at the end of a phase-1 run (Ghorbani et al. "
                 "2019): a bulk near 0 and a few outliers"),
        ]


def scaled(scale, full_train):
    """The scale with its step counts scaled to a train set of `full_train` images (see Scale.steps_for)."""
    if not scale.steps_for or full_train == scale.steps_for:
        return scale
    def steps(n):
        return max(round(n * full_train / scale.steps_for), 1)
    return replace(scale, finetune_iters=steps(scale.finetune_iters),
                   finetune_eval_every=steps(scale.finetune_eval_every),
                   transitions=tuple(steps(d) for d in scale.transitions), mse_iters=steps(scale.mse_iters),
                   mse_subset_iters=steps(scale.mse_subset_iters))


def scaling_note(experiments):
    """A line for the plan when the step counts were scaled to the data given; None when they were not."""
    s = experiments.s
    if not s.steps_for or experiments.full_train == s.steps_for:
        return None
    return (f"its step counts are sized for {s.steps_for:,} train images and this data has "
            f"{experiments.full_train:,}: each is scaled by {experiments.full_train / s.steps_for:.3g}, the same "
            f"epochs (fine-tunes of {s.finetune_iters} steps, transitions of "
            f"{' and '.join(map(str, s.transitions))}, MSE {s.mse_iters} steps on the set and "
            f"{s.mse_subset_iters} on its subset)")


STAGE_ORDER = ("sweep-ce", "seeds", "controls", "mse", "vgg", "finetune", "schedules", "finetune-mse", "connect",
               "curvature", "figures")


def training_cost(models, steps, batch, points, train_size, test_size, vgg=False):
    return Cost("train", models, steps, batch, points, train_size, test_size, vgg)


def evaluations(steps, every):
    return steps // every + 1 + (steps % every > 0)


def subset_size(subset, full):
    if subset is None:
        return full
    value = float(subset)
    return int(value * full) if value < 1 else int(value)


def count_images(folder):
    return sum(len(files) for _, _, files in os.walk(folder))


def option(options, name, default):
    options = list(options)
    return int(options[options.index(name) + 1]) if name in options else default


def elr_list(elrs):
    return ",".join(f"{e:g}" for e in elrs)


def length_options(length):
    return [length[0], str(length[1])]


# --- shards ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """A command as one process runs it: with the --shard option sphrun gets, if any."""
    stage: str
    command: Command
    shard: tuple = ()

    def template(self):
        return " ".join([self.command.template(), *self.shard])

    def argv(self, out):
        return self.command.argv(out) + list(self.shard)

    def key(self):
        return hashlib.sha1(self.template().encode()).hexdigest()[:16]


def share(stages, index=0, count=1):
    """{stage: its jobs} for shard `index` of `count`. Measuring and drawing stages run only unsharded
    (count 1), after every shard. The runs of the training stages are dealt round-robin over the shards in
    plan order: a packed command's through sphrun's own --shard (every count-th run of its grid), and a
    fine-tune goes to the shard that trains its parent, so no shard waits for another."""
    jobs = {stage.name: [] for stage in stages}
    owner, position = {}, 0
    for stage in stages:
        if count == 1:
            jobs[stage.name] = [Job(stage.name, c) for c in stage.commands]
            continue
        if stage.kind != TRAIN:
            continue
        for command in stage.commands:
            if command.parent is not None:
                owner[command.runs[0]] = owner[command.parent]
                if owner[command.parent] == index:
                    jobs[stage.name].append(Job(stage.name, command))
                continue
            for k, run in enumerate(command.runs):
                owner[run] = (position + k) % count
            first = (index - position) % count  # the first of this shard's runs in the command's grid
            if len(command.runs) == 1 and first == 0:
                jobs[stage.name].append(Job(stage.name, command))
            elif len(command.runs) > 1 and first < len(command.runs):
                jobs[stage.name].append(Job(stage.name, command, ("--shard", f"{first}/{count}")))
            position += len(command.runs)
    return jobs


# --- the probe and the estimates -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Speed:
    """Seconds a model takes on this device: per step and per evaluation whatever the pack (its overheads),
    per image forward and backward, per image forward only."""
    step: float
    evaluation: float
    image: float
    forward: float


@dataclass(frozen=True)
class Probe:
    """Timed on this device with the scale's data and widths: the ConvNet and VGG-16-BN (Speed), a sphrun
    command's start (imports, data) and a curvature command's, a Hessian-vector product per image, a figure
    command (its start included)."""
    device: str
    convnet: Speed
    vgg: Speed
    startup: float
    curvature_startup: float
    hvp: float
    plot: float
    took: float

    def estimate(self, cost):
        if cost.kind == "plot":
            return self.plot
        if cost.kind == "curvature":
            return self.curvature_startup + cost.hvp * self.hvp
        speed = self.vgg if cost.vgg else self.convnet
        train_set = cost.train_size * speed.image
        test_set = cost.test_size * speed.forward
        if cost.kind == "connect":  # BatchNorm statistics recomputed, then evaluated
            return self.startup + cost.points * (speed.evaluation + cost.train_size * speed.forward + train_set
                                                 + test_set)
        return self.startup + (cost.steps * (speed.step + cost.models * cost.batch * speed.image)
                               + cost.points * (speed.evaluation + cost.models * (train_set + test_set)))


def probe(experiments, run_quietly):
    """Time short sphrun commands in a temporary folder, on a subset of the scale's data: 3 ConvNets in
    passes of 2 and 1 (their metrics' wall_s splits steps from evaluations, one model from two), one
    VGG-16-BN, curvature with 1 and 6 Lanczos steps, two figures."""
    s = experiments.s
    began = time.monotonic()
    folder = tempfile.mkdtemp(prefix="sphrun-paper-probe-")
    images, steps, test = 2 * s.batch, s.probe_steps, experiments.test_size
    common = [*experiments.data(str(images), s.batch), "--iters", str(steps), "--eval-every", str(steps)]
    try:
        convnet = os.path.join(folder, "convnet")
        wall, said = run_quietly(["train", "--elr", "1e-3,1e-2,3e-2", "--pack", "2", "--width", str(s.width),
                                  *common, "--out", convnet])
        runs = [os.path.join(convnet, name) for name in sorted(os.listdir(convnet))]
        (pair, pair_ends), (single, single_ends) = (timings(runs[:2]), timings(runs[2:]))
        speed = speed_of(pair, single, steps, s.batch, images, test)
        startup = wall - pair_ends - single_ends
        vgg = os.path.join(folder, "vgg")
        wall, _ = run_quietly(["train", "--model", "vgg16bn", "--no-sphere", "--lr", "0.01", "--width",
                               str(s.vgg_width), *common, "--out", vgg])
        vgg_single, vgg_ends = timings([vgg])
        curvature = [run_quietly(["curvature", runs[0], "--at", "last", "--measures", "hessian-eig", "--lanczos",
                                  str(lanczos), "--batches", "1", "--recompute", *experiments.device])[0]
                     for lanczos in (1, 6)]
        hvp = max(curvature[1] - curvature[0], 0.0) / (5 * s.batch)
        plot = min(run_quietly(["plot", convnet, "--kind", "phase", "--out", os.path.join(folder, "phase.png")])[0]
                   for _ in range(2))  # the first may build matplotlib's font cache
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return Probe(device_of(said), speed, speed_of(None, vgg_single, steps, s.batch, images, test), startup,
                 curvature[0] - s.batch * hvp, hvp, plot, time.monotonic() - began)


def timings(runs):
    """((seconds of the first evaluation, of `steps` steps and one more evaluation), the pass's seconds) from
    the metrics.csv of the runs of one pass: its wall_s starts when the first evaluation does."""
    with open(os.path.join(runs[0], "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    first, last = float(rows[0]["wall_s"]), float(rows[-1]["wall_s"])
    return (first, last - first), last


def speed_of(pair, single, steps, batch, images, test):
    """A Speed from the timings of a pass of two models and of one (None: one model's alone, all its time
    counted per image). The two evaluations of a pass cost alike."""
    def per_step_and_evaluation(timing):
        evaluation, rest = timing
        return max(rest - evaluation, 0.25 * rest) / steps, evaluation

    step1, evaluation1 = per_step_and_evaluation(single)
    if pair is None:
        image = step1 / batch
        return Speed(0.0, 0.0, image, max((evaluation1 - images * image) / test, 0.1 * image))
    step2, evaluation2 = per_step_and_evaluation(pair)
    image = max(step2 - step1, 0.2 * step2 / 2) / batch  # one more model: the images of its batch
    per_model = max(evaluation2 - evaluation1, 0.2 * evaluation2 / 2)
    return Speed(max(step1 - batch * image, 0.0), max(evaluation1 - per_model, 0.0), image,
                 max((per_model - images * image) / test, 0.1 * image))


def device_of(said):
    """The device a probe trained on, from sphrun's line `training ... on cpu, runs in ...`."""
    for line in said.splitlines():
        if " on " in line and line.startswith("training"):
            return line.rsplit(" on ", 1)[1].split(",")[0].split()[0]
    return "this device"


def describe_probe(p):
    ms = lambda seconds: f"{1e3 * seconds:.3g} ms"
    return (f"probe on {p.device} ({duration(p.took)}): a command starts in {p.startup:.1f} s; per image forward "
            f"and backward {ms(p.convnet.image)} (ConvNet), {ms(p.vgg.image)} (VGG-16-BN), forward "
            f"{ms(p.convnet.forward)}; a ConvNet step {ms(p.convnet.step)} and an evaluation {ms(p.convnet.evaluation)} "
            f"more per pack; a Hessian-vector product {ms(p.hvp)} per image; a figure {p.plot:.1f} s")


def plural(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


def duration(seconds):
    if seconds is None:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


# --- what is done: OUT/.paper ---------------------------------------------------------------------------------
class Record:
    """OUT/.paper: the scale it was made at, a file per finished command and per finished stage of a shard."""

    def __init__(self, out):
        self.out = out
        self.root = os.path.join(out, STATE)

    def settings_path(self):
        return os.path.join(self.root, "settings.json")

    def check_scale(self, scale):
        """Refuse a folder made at another scale, or one with files paper.py did not make; True when it is ours."""
        if os.path.isfile(self.settings_path()):
            made_at = (read_json(self.settings_path()) or {}).get("scale")
            if made_at != scale:
                raise DriverError(f"{self.out} was made at scale {made_at}, not {scale}: give another folder")
            return True
        # OUT/.paper alone: another shard of an array, started at the same moment, is making it
        if os.path.isdir(self.out) and set(os.listdir(self.out)) - {STATE}:
            raise DriverError(f"{self.out} is not empty and was not made by paper.py: give a new or empty folder")
        return False

    def claim(self, scale):
        if not self.check_scale(scale):
            for sub in ("commands", "stages"):
                os.makedirs(os.path.join(self.root, sub), exist_ok=True)
            write_json(self.settings_path(), {"scale": scale})
            self.check_scale(scale)  # two shards given different scales: the one that wrote last wins, the other stops

    def command_done(self, job):
        return read_json(os.path.join(self.root, "commands", job.key() + ".json"))

    def finish_command(self, job, text, wall):
        write_json(os.path.join(self.root, "commands", job.key() + ".json"),
                   {"stage": job.stage, "command": text, "wall_s": round(wall, 1)})

    def stage_path(self, name, index, count):
        return os.path.join(self.root, "stages", f"{name}@{index}of{count}.json")

    def finish_stage(self, name, index, count, wall, estimate):
        write_json(self.stage_path(name, index, count), {"wall_s": round(wall, 1), "estimate_s": estimate})

    def stage_done(self, name):
        """The stage's records when it finished unsharded or in every shard of some count; else None."""
        folder = os.path.join(self.root, "stages")
        by_count = {}
        for entry in os.listdir(folder) if os.path.isdir(folder) else []:
            stem, _, where = entry.removesuffix(".json").rpartition("@")
            if stem == name and "of" in where:
                index, count = (int(p) for p in where.split("of"))
                by_count.setdefault(count, {})[index] = read_json(os.path.join(folder, entry))
        for count, records in sorted(by_count.items()):
            if len(records) == count:
                return list(records.values())
        return None


def write_json(path, value):
    temporary = f"{path}.tmp-{os.getpid()}"  # whole or not at all: shards share the folder
    with open(temporary, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(temporary, path)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


# --- running ---------------------------------------------------------------------------------------------------
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
SPHRUN = [sys.executable, "-m", "sphrun"]  # the sphrun of this Python, whatever is first on PATH


class Stopped(Exception):
    def __init__(self, code, text):
        super().__init__(text)
        self.code = code


def sphrun_process(argv, quiet=False):
    """Run `sphrun ARGV` in this Python and wait for it: (exit status, stop signal the driver got meanwhile,
    its output when `quiet`). sphrun stops on a signal as it does alone (saves, exits 128 + its number):
    Ctrl-C reaches it with the terminal's process group; SIGTERM and SIGUSR1 are passed on, since a
    scheduler may signal the driver alone, and sphrun counts the same one again within 2 s as one."""
    caught, child = [], None

    def note(signum, frame):
        caught.append(signum)
        if child is not None and signum != signal.SIGINT:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, note) for sig in STOP_SIGNALS}
    try:
        output = subprocess.PIPE if quiet else None
        child = subprocess.Popen([*SPHRUN, *argv], stdout=output, stderr=subprocess.STDOUT if quiet else None,
                                 text=True)
        said, _ = child.communicate()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return child.returncode, (caught[0] if caught else None), said or ""


def quiet_runner():
    """Run `sphrun ARGV` without showing its output: (seconds, what it said); a failure stops the driver."""
    def run_quietly(argv):
        began = time.monotonic()
        code, signum, said = sphrun_process(argv, quiet=True)
        if code or signum:
            sys.stderr.write(said)
            raise Stopped(code or 128 + signum, f"the probe `{shlex.join(['sphrun', *argv])}` stopped with status "
                                                f"{code or 128 + signum}")
        return time.monotonic() - began, said
    return run_quietly


def run_stages(out, stages, jobs, record, index, count, estimate=None, execute=sphrun_process, say=print):
    """Run each stage's jobs in order, skipping finished stages and commands; `estimate(job)`: its seconds."""
    for stage in stages:
        mine = jobs[stage.name]
        done = record.stage_done(stage.name)
        if done is not None:
            say(f"== {stage.name}: done before ({duration(sum(r['wall_s'] for r in done))}), skipped")
            continue
        if count > 1 and stage.kind != TRAIN:
            continue
        expected = stage_estimate(mine, estimate)
        say(f"== {stage.name}: {stage.what} ({plural(len(mine), 'command')}, estimate {duration(expected)})")
        if stage.kind == DRAW:
            os.makedirs(os.path.join(out, "figures"), exist_ok=True)
        wall = 0.0
        for job in mine:
            finished = record.command_done(job)
            if finished:
                wall += finished["wall_s"]
                say(f"done before: {finished['command']}")
                continue
            argv = job.argv(out)  # finds the runs it names
            text = shlex.join(["sphrun", *argv])
            say(f"$ {text}", flush=True)
            began = time.monotonic()
            code, signum = execute(argv)[:2]
            if code:
                raise Stopped(code, f"`{text}` exited with status {code}" + (
                    "; run the same paper.py command to resume" if code > 128 else ""))
            record.finish_command(job, text, time.monotonic() - began)
            wall += time.monotonic() - began
            if signum:
                raise Stopped(128 + signum, f"stopped by {signal.Signals(signum).name} after `{text}`; run the same "
                                            f"paper.py command to resume")
        record.finish_stage(stage.name, index, count, wall, expected)
        say(f"== {stage.name}: {duration(wall)}")


# --- the plan, the index and the timings ------------------------------------------------------------------------
def estimator(probe):
    """A job's seconds by the probe; None without one."""
    return (lambda job: probe.estimate(job.command.cost)) if probe else None


def stage_estimate(jobs, estimate, record=None):
    """Seconds of the jobs (those not done yet, given the record) by `estimate`; None without it."""
    if estimate is None:
        return None
    return sum(estimate(job) for job in jobs if record is None or not record.command_done(job))


def print_plan(out, experiments, stages, jobs, record, estimate, commands=False, say=print):
    say(f"the paper at scale {experiments.s.name} into {out}: {experiments.s.about}")
    note = scaling_note(experiments)
    if note:
        say(f"  {note}")
    total = 0.0
    for stage in stages:
        mine = jobs[stage.name]
        left = None
        if record.stage_done(stage.name) is not None:
            state = "done"
        elif not mine:
            state = "nothing in this shard" if stage.kind == TRAIN else "after every shard, without --shard"
        else:
            finished = sum(1 for job in mine if record.command_done(job))
            state = f"{finished} of {len(mine)} commands done" if finished else "to run"
            left = stage_estimate(mine, estimate, record)
            total += left or 0
        runs = sum(len(trained_runs(job)) for job in mine)
        what = plural(runs, "run") if stage.kind == TRAIN else plural(len(mine), "command")
        say(f"  {stage.name:<13} {what:>12}  estimate {duration(left) if left is not None else '-':>12}  {state}")
        figures = figure_numbers(stage)
        say(f"  {'':<13} {stage.what}" + (f"; figures {figures}" if figures and stage.kind == DRAW else ""))
        if commands:
            for job in mine:
                say(f"      {job.template().replace(OUT, out)}")
    if estimate:
        say(f"total to run: {duration(total)}")


def trained_runs(job):
    """The runs a job trains: its command's, or with --shard J/N every N-th from the J-th (sphrun's rule)."""
    if not job.shard:
        return job.command.runs
    first, count = map(int, job.shard[1].split("/"))
    return job.command.runs[first::count]


def figure_numbers(stage):
    return ", ".join(map(str, sorted({n for c in stage.commands if c.figure for n in c.figure.numbers})))


def stage_times(stages, record):
    """{stage: (wall seconds, estimate or None)} of the finished stages, summed over their shards."""
    times = {}
    for stage in stages:
        done = record.stage_done(stage.name)
        if done:
            estimates = [r.get("estimate_s") for r in done]
            times[stage.name] = (sum(r["wall_s"] for r in done), None if None in estimates else sum(estimates))
    return times


def index_text(out, experiments, stages, record):
    """OUT/index.md: each paper figure, its file, the command that drew it and what the paper shows there."""
    s = experiments.s
    lines = [f"# The paper at scale `{s.name}`", "",
             f"{PAPER}.", "", f"Scale {s.name}: {s.about}. Each figure was drawn by the command beside it, "
             f"run from the folder where `examples/paper.py {s.name} {out}` ran; the runs are in this folder. The "
             f"last column says what the paper shows, with the paper's ELRs; this scale's are in the commands."
             + (f" Here {scaling_note(experiments)}." if scaling_note(experiments) else ""), "",
             "| paper | figure | command | what the paper shows there |", "|---|---|---|---|"]
    drawn = [(Job(stage.name, c), c.figure) for stage in stages for c in stage.commands if c.figure]
    for job, figure in sorted(drawn, key=lambda pair: pair[1].numbers or (99,)):
        finished = record.command_done(job)
        command = finished["command"] if finished else job.template().replace(OUT, out)
        numbers = ", ".join(map(str, figure.numbers)) or "-"
        present = os.path.isfile(os.path.join(out, figure.file))
        link = f"[{figure.file}]({figure.file})" if present else f"{figure.file} (not drawn yet)"
        lines.append(f"| {numbers} | {link} | `{command}` | {figure.shows} |")
    lines += ["", "Stage wall times: [timings.md](timings.md)."]
    return "\n".join(lines) + "\n"


def timings_text(times, probe):
    lines = ["# Wall time of each stage", "", "Summed over the shards where a stage ran in several.", "",
             "| stage | estimate | wall time |", "|---|---|---|"]
    lines += [f"| {name} | {duration(estimate)} | {duration(wall)} |" for name, (wall, estimate) in times.items()]
    lines += ["", f"Total: {duration(sum(wall for wall, _ in times.values()))}."]
    if probe:
        lines.append(f"The estimates of stages run last: {describe_probe(probe)}.")
    return "\n".join(lines) + "\n"


def print_timings(times, say=print):
    say("stage wall times (estimate):")
    for name, (wall, estimate) in times.items():
        say(f"  {name:<13} {duration(wall):>12}  ({duration(estimate)})")
    say(f"  {'total':<13} {duration(sum(wall for wall, _ in times.values())):>12}")


# --- checking a finished folder ----------------------------------------------------------------------------------
PHASES_FIGURE = "figures/fig02-metrics.png"


def check(out, stages):
    """Problems with a finished folder: a figure missing, or the cross-entropy sweep's phases (the phase
    table of fig. 2) not 1, then 2, then 3 as the ELR grows. Returns (problems, the phases by ELR)."""
    problems = [f"missing figure {c.figure.file}" for stage in stages for c in stage.commands
                if c.figure and not os.path.isfile(os.path.join(out, c.figure.file))]
    table = table_path_for(os.path.join(out, PHASES_FIGURE))
    try:
        with open(table, newline="") as f:
            rows = sorted(csv.DictReader(f), key=lambda row: float(row["elr"]))
    except FileNotFoundError:
        return problems + [f"missing phase table {table}"], ""
    phases = [row["phase"] if row["phase"] in PHASES else UNDECIDED for row in rows]
    elrs = [float(row["elr"]) for row in rows]
    found = " ".join(f"{e:g}:{p}" for e, p in zip(elrs, phases))
    if not in_paper_order(elrs, phases):
        problems.append(f"the sweep's phases are not 1, then 2, then 3 as the ELR grows: {found}")
    missing = [p for p in PHASES if p not in phases]
    if missing:
        problems.append(f"the sweep has no run in phase {', '.join(missing)}: {found}")
    return problems, found


# --- the command ---------------------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    def error(self, text):  # one line, as sphrun's own errors
        raise DriverError(text)


def arguments(argv):
    parser = Parser(prog="examples/paper.py", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scale", help="demo (synthetic set, minutes on a CPU), small (CIFAR-10, reduced width and "
                                      "epochs) or paper (the paper's settings)")
    parser.add_argument("out", metavar="OUT", help="the folder of every run, figure and the index")
    parser.add_argument("--data-dir", metavar="DIR", help="CIFAR-10 (torchvision's folder, downloaded when "
                                                          "absent, or an ImageFolder tree); small and paper only")
    parser.add_argument("--device", metavar="DEVICE", help="passed to every sphrun command (default: auto)")
    parser.add_argument("--shard", metavar="I/N", help="train the I-th of N shares of the training stages "
                                                       "(from 0); then run without --shard to measure and draw")
    parser.add_argument("--plan", action="store_true", help="print the plan with every command and exit")
    parser.add_argument("--check", action="store_true",
                        help="check a finished folder: every figure drawn, the sweep's phases 1, 2, 3 in order")
    args = parser.parse_args(argv)
    if args.scale not in SCALES:
        raise DriverError(f"unknown scale {args.scale!r}: choose demo, small or paper")
    if args.scale == "demo" and args.data_dir:
        raise DriverError("demo runs on the built-in synthetic set: --data-dir is for small and paper")
    return args


def main(argv=None):
    try:
        args = arguments(sys.argv[1:] if argv is None else argv)
        experiments = Experiments(SCALES[args.scale], args.data_dir, args.device)
        stages = experiments.stages()
        if args.check:
            problems, found = check(args.out, stages)
            print(f"phases of the cross-entropy sweep by ELR: {found}")
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            return 1 if problems else 0
        index, count = parse_shard(args.shard) if args.shard else (0, 1)
        record = Record(args.out)
        if args.plan:
            record.check_scale(args.scale)
        else:
            record.claim(args.scale)
        jobs = share(stages, index, count)
        pending = [job for stage in stages for job in jobs[stage.name]
                   if record.stage_done(stage.name) is None and not record.command_done(job)]
        probed = probe(experiments, quiet_runner()) if pending else None
        if probed:
            print(describe_probe(probed))
        estimate = estimator(probed)
        print_plan(args.out, experiments, stages, jobs, record, estimate, commands=args.plan)
        if args.plan:
            return 0
        run_stages(args.out, stages, jobs, record, index, count, estimate)
        times = stage_times(stages, record)
        print_timings(times)
        if count > 1:
            print(f"shard {index}/{count} trained; when every shard has, run `examples/paper.py {args.scale} "
                  f"{args.out}` without --shard to measure and draw")
            return 0
        with open(os.path.join(args.out, "timings.md"), "w") as f:
            f.write(timings_text(times, probed))
        with open(os.path.join(args.out, "index.md"), "w") as f:
            f.write(index_text(args.out, experiments, stages, record))
        print(f"wrote {os.path.join(args.out, 'index.md')} and {os.path.join(args.out, 'timings.md')}")
        return 0
    except (DriverError, SphrunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
