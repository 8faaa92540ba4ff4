"""The sphrun command line: each command parses, validates and calls the modules that do the work."""

import dataclasses
import math
import sys
from typing import Annotated, Optional

try:  # Ctrl-C while the command starts: one line, as main() says it later, not a traceback
    import typer

    from sphrun import SphrunError, __version__
    from sphrun.config import TrainConfig, parse_subset
    from sphrun.phases import HELP as PHASES_HELP
    from sphrun.progress import message
except KeyboardInterrupt:
    sys.stderr.write("interrupted\n")
    sys.exit(130)

# No markup: help texts are printed as written (markdown mode ate <placeholders> as HTML tags) and
# their paragraphs reflow to the terminal width.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Train scale-invariant networks on the sphere and study their loss landscape.")


class Command(typer.core.TyperCommand):
    """Arguments go by their metavar alone, as in the README: `sphrun finetune [OPTIONS] RUN`, an optional
    one in brackets (recent Typer writes {RUN} in the usage line and `RUN <str>` in the list of arguments)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.param_type_name == "argument":
                param.display_type_rich = lambda ctx: None

    def collect_usage_pieces(self, ctx):
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":  # every argument has a metavar
                piece = param.metavar + ("..." if param.nargs != 1 else "")
                pieces.append(piece if param.required else f"[{piece}]")
        return pieces


def show_version(asked: bool):
    if asked:
        print(f"sphrun {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=show_version,
                                       help="Print the version of sphrun and exit.")):
    """Train scale-invariant networks on the sphere and study their loss landscape.

    The science, conventions and phases: docs/science.md. Each command has --help.
    """


# --- options several commands share, declared once ------------------------------------------------------
Device = Annotated[str, typer.Option(
    metavar="DEVICE", help="Where to compute: auto (a CUDA GPU when present, else the CPU), cpu, cuda or cuda:N.")]
# Says its default in words and hides Typer's own "[default: no-tf32]".
Tf32 = Annotated[bool, typer.Option(
    show_default=False,
    help="Let CUDA run convolutions and matrix products in TF32 (10-bit mantissa), as training does. "
         "(default: off, full float32; no effect on the CPU)")]
StepDirection = Annotated[str, typer.Option(
    metavar="DIRECTION",
    help="Step direction: sgd (-gradient); random (a uniformly random direction tangent to the sphere, as long "
         "as the SGD step: the random-walk control of phase 3); ascent (+gradient).")]
Geodesic = Annotated[bool, typer.Option(
    help="Geodesic steps: turn theta along the great circle by exactly the nominal angle "
         "elr * ||grad on the unit sphere|| (radians; the sphere's exponential map), so the realised ELR is the "
         "nominal one and proj_err reads 0. Projected steps (the default, the paper's): theta + lr * direction, "
         "then rescaled to rho0, which turns theta by only arctan of that angle (1 - r under 2 % in phases 1-2, "
         "large in phase 3; docs/science.md, The step).")]
OtherData = Annotated[bool, typer.Option(
    "--other-data",
    help="Measure on the data set found (--data-dir) though it is not the one the run (A, for connect) was "
         "trained on, or connect runs trained on different data: the output records that data's fingerprint "
         "(config.json, curvature.json), so its values never mix with those of the runs' own data. "
         "(default: refused)")]


def data_dir_option(whose):
    """--data-dir of a command that reads `whose` data set (a run's, A's) from where it was trained."""
    return Annotated[Optional[str], typer.Option(
        metavar="DIR", help=f"Where {whose} data set is. (default: {whose} --data-dir)")]


ParentDataDir, EndsDataDir, RunDataDir = (data_dir_option(w) for w in ("the parent's", "A's", "the run's"))


def parse_elr(text):
    try:
        return float(text)
    except ValueError:
        raise SphrunError(f"--elr must be a number like 7e-4, got {text!r}")


def parse_elrs(text):
    """--elr: one value (7e-4), a list (1e-4,5e-4,1e-3) or a log grid start:stop:count (1e-5:1:16).

    Grid values are log-spaced from start to stop, both included, and rounded to 3 significant digits,
    as run names show them, so `sphrun train --elr <value>` names the same run as the sweep.
    """
    text = text.strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise SphrunError(f"--elr grid must be start:stop:count, like 1e-5:1:16, got {text!r}")
        start, stop = (positive_elr(p) for p in parts[:2])
        try:
            count = int(parts[2])
        except ValueError:
            raise SphrunError(f"--elr grid count must be a whole number, got {parts[2]!r} in {text!r}")
        if count < 1:
            raise SphrunError(f"--elr grid count must be at least 1, got {count} in {text!r}")
        if start > stop:
            raise SphrunError(f"--elr grid start {start:g} is above its stop {stop:g}: write start:stop:count")
        import numpy as np

        values = [float(f"{v:.3g}") for v in np.logspace(math.log10(start), math.log10(stop), count)]
    else:
        values = [positive_elr(p) for p in text.split(",")]
    if len(set(values)) < len(values):
        raise SphrunError(f"--elr {text} repeats a value (grid values are rounded to 3 digits): "
                          f"give distinct ELRs")
    return values


def positive_elr(text):
    try:
        value = float(text)
    except ValueError:
        raise SphrunError(f"--elr must be a number like 7e-4, a list like 1e-4,1e-3 or a grid like 1e-5:1:16, "
                          f"got {text!r}")
    if not (math.isfinite(value) and value > 0):
        raise SphrunError(f"--elr must be a positive finite number, got {text.strip()}")
    return value


def parse_shard(text):
    """--shard I/N: (I, N), 0 <= I < N."""
    try:
        index, count = (int(p) for p in text.split("/"))
    except ValueError:
        raise SphrunError(f"--shard must be I/N with whole numbers, like 0/4, got {text!r}")
    if count < 1 or not 0 <= index < count:
        raise SphrunError(f"--shard {text}: need 0 <= I < N (I counts from 0)")
    return index, count


def shard_of(runs, index, count):
    """Every count-th run of the grid starting at `index`: N shards cover the grid exactly once, each
    with the same number of runs give or take one, and each a spread of ELRs (which take alike long)."""
    mine = runs[index::count]
    if not mine:
        raise SphrunError(f"--shard {index}/{count} of {len(runs)} runs is empty: use at most {len(runs)} shards")
    return mine


MAX_SEEDS = 10_000  # more is a typo (0:10000000), not a sweep


def parse_seeds(text, option="--seed"):
    """--seed, --data-seed: one seed (0), a list (0,1,2) or a range start:stop (0:5 is 0, 1, 2, 3, 4)."""
    text = text.strip()
    try:
        if ":" in text:
            start, stop = (int(p) for p in text.split(":"))
            if stop - start > MAX_SEEDS:  # checked before listing them: 0:2^70 is a typo
                raise SphrunError(f"{option} {text} gives more than {MAX_SEEDS} seeds, each a run of its "
                                  f"own: give fewer")
            seeds = list(range(start, stop))
        else:
            seeds = [int(p) for p in text.split(",")]
    except ValueError:
        raise SphrunError(f"{option} must be a whole number like 0, a list like 0,1,2 or a range like 0:5 "
                          f"(seeds 0 to 4), got {text!r}")
    if not seeds:
        raise SphrunError(f"{option} {text} is an empty range: start:stop runs from start to stop - 1, so "
                          f"stop must be above start")
    if min(seeds) < 0:
        raise SphrunError(f"{option} must be 0 or more, got {min(seeds)}")
    if max(seeds) >= 2 ** 64:  # torch's generators take 64-bit seeds
        raise SphrunError(f"{option} must be below 2^64, got {max(seeds)}")
    if len(set(seeds)) < len(seeds):
        raise SphrunError(f"{option} {text} repeats a seed: give distinct seeds")
    return seeds


def run_grid(config, elrs, seeds, data_seeds):
    """Every combination of the ELRs, init seeds and data seeds, ELR-major: the runs of one command."""
    return [dataclasses.replace(config, elr=elr, seed=seed, data_seed=data_seed)
            for elr in elrs for seed in seeds for data_seed in data_seeds]


def training_rates(sphere, elr, lr, wd, momentum):
    """The rates of the steps: --elr on the sphere (one, a list or a grid: parse_elrs),
    --lr off it, each refused in the other's place."""
    if sphere:
        given = [name for name, value in (("--lr", lr), ("--wd", wd), ("--momentum", momentum)) if value is not None]
        if given:
            raise SphrunError(f"{', '.join(given)} set conventional training: add --no-sphere (on the sphere "
                              f"the rate is --elr, with no weight decay or momentum)")
        if elr is None:
            raise SphrunError("give --elr, the effective learning rate on the sphere (or --no-sphere --lr X)")
        return parse_elrs(elr)
    if elr is not None:
        raise SphrunError("--elr is the rate on the sphere; with --no-sphere give the plain learning rate --lr")
    if lr is None:
        raise SphrunError("--no-sphere needs --lr, the plain SGD learning rate")
    return [lr]


def at_least(value, option, least=1):
    """Refuse a count under `least`: 0 must never fall back to a default (`x or default`)."""
    if value is not None and value < least:
        raise SphrunError(f"{option} must be at least {least}, got {value}")
    return value


def folder(value, option):
    """Refuse an empty folder name, which would otherwise fall back to the default silently."""
    if value is not None and not value.strip():
        raise SphrunError(f"{option} is empty: give a folder, or leave the option out for its default")
    return value


SPHERE_HELP = ("On the sphere (the default): the model's fully scale-invariant form (BatchNorm affine=False, the "
               "last layer frozen at --init-scale), every step rescaled to rho0, the rate given by --elr. "
               "--no-sphere: conventional training (docs/science.md, Conventional training) of every "
               "parameter of the usual model, BatchNorm affine and last layer included, with torch's SGD and "
               "no projection; "
               "the rate is --lr, and the elr column of metrics.csv and GM are then the plain learning rate "
               "and the mean gradient norm over all trainable parameters (si_norm stays that of the "
               "scale-invariant tensors).")
TRAIN_OUT_HELP = ("With one run: the run directory itself (default: runs/<name from the settings>); an "
                  "existing run there is resumed or extended. With several runs (ELRs or seeds): the folder "
                  "that holds one run directory per run, each named from its settings (default: runs). A run "
                  "never goes inside another run, and a folder of runs is not a run directory: for one run "
                  "give --out DIR/<name>, not --out DIR.")


@app.command(cls=Command, short_help="Train on the sphere at fixed ELRs: one run, or a packed sweep.")
def train(
    elr: Optional[str] = typer.Option(
        None, metavar="ELR",
        help="Effective learning rate on the unit sphere: lr = elr * rho0^2 (dimensionless). The paper's "
             "phase 1/2 border for ce is near 7e-4. Several ELRs, a list (1e-4,5e-4,1e-3) or a log grid "
             "start:stop:count (1e-5:1:16: 16 values, ends included, rounded to 3 digits), train together "
             "from one init as one packed ConvNet, each into its own run directory."),
    model: str = typer.Option(
        "convnet", metavar="NAME",
        help="convnet (the paper's table 1), vgg16bn (CIFAR VGG-16 with BatchNorm) or resnet18 "
             "(pre-activation CIFAR ResNet-18; on the sphere with a BatchNorm closing each branch and "
             "projection, so every conv is scale-invariant)."),
    sphere: bool = typer.Option(True, help=SPHERE_HELP),
    lr: Optional[float] = typer.Option(None, metavar="LR", help="With --no-sphere: the plain SGD learning rate."),
    wd: Optional[float] = typer.Option(
        None, metavar="WD",
        help="With --no-sphere: weight decay (L2 coefficient added to the gradient, torch's SGD). (default: 0)"),
    momentum: Optional[float] = typer.Option(
        None, metavar="M", help="With --no-sphere: SGD momentum in [0, 1). (default: 0)"),
    loss: str = typer.Option(
        "ce", metavar="NAME",
        help="Loss: ce (cross-entropy) or mse (squared error to the one-hot target, mean over classes)."),
    dataset: str = typer.Option(
        "cifar10", metavar="NAME", help="cifar10, cifar100 or synthetic (built-in, offline)."),
    data_dir: Optional[str] = typer.Option(
        None, metavar="DIR",
        help="Folder with torchvision's CIFAR files, or an ImageFolder tree DIR/train/<class>/<image> and "
             "DIR/test/<class>/<image> (32x32 images in any format PIL reads). (default: $SPHRUN_DATA, "
             "else ./data; CIFAR is downloaded there when absent)"),
    subset: Optional[str] = typer.Option(
        None, metavar="FRACTION|COUNT",
        help="Train on a class-stratified subset: a fraction (0.1) or a count of images (5000); the test "
             "set stays whole."),
    width: Optional[int] = typer.Option(
        None, metavar="C",
        help="Channels of the first conv; the others scale with it. (default: 32 for convnet, 387,936 conv "
             "weights; 64 for vgg16bn and resnet18, their usual sizes)"),
    init_scale: Optional[float] = typer.Option(
        None, metavar="NORM",
        help="Frobenius norm of the frozen last layer. (default: 10 for ce, 1.5 for mse; with --no-sphere "
             "the last layer trains and keeps torch's init)"),
    seed: str = typer.Option(
        "0", metavar="SEEDS",
        help="Seed of the trainable (conv) weights' init: one (0), a list (0,1,2) or a range start:stop (0:5 is "
             "seeds 0 to 4). Several seeds train with the ELRs as one pack, every ELR with every seed."),
    head_seed: int = typer.Option(
        0, metavar="SEED",
        help="Seed of the frozen last layer; keep it shared so runs live in one function space."),
    data_seed: str = typer.Option(
        "0", metavar="SEEDS",
        help="Seed of the batch order, shared by every ELR of a sweep; a list or range as --seed gives every "
             "run each of them (runs of one data seed train together)."),
    batch_size: int = typer.Option(128, metavar="N", help="Mini-batch size (images per SGD step)."),
    epochs: Optional[int] = typer.Option(
        None, metavar="N",
        help="Length in epochs (passes over the train set), at least 1. (default: 1000, the authors' setting)"),
    iters: Optional[int] = typer.Option(None, metavar="N", help="Length in SGD steps, instead of --epochs."),
    eval_every: Optional[int] = typer.Option(
        None, metavar="N",
        help="Evaluate every N steps. (default: log-spaced: every epoch for 10 epochs, then ~10 per decade)"),
    keep: Optional[int] = typer.Option(
        None, metavar="K",
        help="Keep the checkpoint of every K-th evaluation point (first and last always). (default: all)"),
    step: StepDirection = "sgd",
    geodesic: Geodesic = False,
    device: Device = "auto",
    precision: str = typer.Option(
        "fp32", metavar="NAME",
        help="fp32 (TF32 convolutions allowed on CUDA), or bf16: convolutions and matrix products in "
             "bfloat16, weights, norms, the projection and BatchNorm statistics in float32. Part of the "
             "run's settings."),
    pack: Optional[int] = typer.Option(
        None, metavar="K",
        help="With several runs (ELRs or seeds): at most K models per pass (bounds the memory); the rest "
             "train in later passes. (default: all in one pass)"),
    shard: Optional[str] = typer.Option(
        None, metavar="I/N",
        help="Train every N-th run of the grid (each ELR with each seed and data seed, ELR-major), starting "
             "at the I-th (from 0), so N processes (a SLURM array, GNU parallel) share one sweep on a shared "
             "file system."),
    out: Optional[str] = typer.Option(None, metavar="DIR", help=TRAIN_OUT_HELP),
):
    """Train a fully scale-invariant network on the sphere at a fixed effective learning rate, or
    conventionally off it (--no-sphere --lr).

    Writes a run directory (config.json, metrics.csv, checkpoints/). Running the same command again
    resumes it; a larger --epochs/--iters extends it. Ctrl-C, SIGTERM or SIGUSR1 save and stop (exit
    128 + the signal's number).

    Several ELRs (--elr 1e-5:1:16 or 1e-4,1e-3) train as one packed network, the ConvNet on the sphere
    only: the same init and batches, one learning rate and one norm per model, each model writing the
    run directory its single run would (same files and settings). A diverging model is marked diverged
    and frozen; the others go on.
    """
    import os

    from sphrun import train as training

    if epochs is not None and iters is not None:
        raise SphrunError("give --epochs or --iters, not both")
    rates = training_rates(sphere, elr, lr, wd, momentum)
    seeds, data_seeds = parse_seeds(seed), parse_seeds(data_seed, "--data-seed")
    at_least(pack, "--pack")
    if epochs is None and iters is None:
        epochs = 1000
    config = TrainConfig(
        elr=rates[0], model=model, sphere=sphere, wd=wd or 0.0, momentum=momentum or 0.0, loss=loss, dataset=dataset,
        data_dir=folder(data_dir, "--data-dir") or os.environ.get("SPHRUN_DATA") or "./data",
        subset=parse_subset(subset), width=width, init_scale=init_scale, seed=seeds[0], head_seed=head_seed,
        data_seed=data_seeds[0], batch_size=batch_size, epochs=epochs, iters=iters, eval_every=eval_every,
        keep=keep, step=step, geodesic=geodesic, precision=precision, device=device)
    out = folder(out, "--out")
    configs = run_grid(config, rates, seeds, data_seeds)
    several = len(configs) > 1
    if shard is not None:
        configs = shard_of(configs, *parse_shard(shard))
    if several:
        for run, status in training.train_sweep(configs, out, pack, argv=sys.argv):
            message(f"{run}: {status}")
        return
    run, status = training.train(configs[0], out, argv=sys.argv)
    message(f"{run}: {status}")

@app.command(cls=Command, short_help="Continue a run from a checkpoint with a new ELR or schedule.")
def finetune(
    run: str = typer.Argument(
        ..., metavar="RUN", help="The parent run directory (made by sphrun train or finetune)."),
    elr: Optional[str] = typer.Option(
        None, metavar="ELR",
        help="The new effective learning rate on the unit sphere (dimensionless), on the parent's sphere "
             "of radius rho0: lr = elr * rho0^2."),
    lr: Optional[float] = typer.Option(
        None, metavar="LR",
        help="Instead of --elr, for a parent trained off the sphere (--no-sphere): the new plain SGD "
             "learning rate; its momentum buffers and weight decay carry on."),
    start: str = typer.Option(
        "last", "--from", metavar="STEP",
        help="The parent's checkpoint to start from: last, or the step of one (SGD steps since the lineage "
             "began)."),
    iters: Optional[int] = typer.Option(None, metavar="N", help="Length of the fine-tune in SGD steps."),
    epochs: Optional[int] = typer.Option(
        None, metavar="N", help="Length of the fine-tune in epochs, instead of --iters."),
    transition: int = typer.Option(
        0, metavar="D",
        help="Steps D over which the ELR moves linearly from the parent's to --elr (the k-th step uses "
             "parent + (elr - parent) * k / D), then stays there. 0: a jump."),
    step: StepDirection = "sgd",
    geodesic: Geodesic = False,
    eval_every: Optional[int] = typer.Option(
        None, metavar="N",
        help="Evaluate every N steps from the start step. (default: log-spaced from the start step: every "
             "epoch for 10 epochs, then ~10 per decade)"),
    data_dir: ParentDataDir = None,
    device: Device = "auto",
    out: Optional[str] = typer.Option(
        None, metavar="DIR",
        help="Run directory of the fine-tune. (default: beside the parent, "
             "RUN-ft-elr<X>-from<ITER>[-D<D>][-<step>][-geo][-every<N>], ft-lr<X> off the sphere, every<N> "
             "with --eval-every N); an existing one is "
             "resumed or extended."),
):
    """Fine-tune a run from one of its checkpoints with a new ELR (docs/science.md, Fine-tuning
    experiments).

    Continues the parent on its sphere with its model, data, loss and batch stream: the new run's iter
    column counts on from the start step, its config.json names the parent. With the parent's ELR and
    step it reproduces the parent exactly. Running the same command again resumes or extends it.
    """
    from sphrun.finetune import finetune as fine_tune

    if (elr is None) == (lr is None):
        raise SphrunError("give the new rate: --elr for a run on the sphere, or --lr for one trained off it")
    rate = parse_elr(elr) if lr is None else lr
    child, status = fine_tune(run, rate, start, iters=iters, epochs=epochs, transition=transition,
                              step=step, geodesic=geodesic, eval_every=eval_every, out=folder(out, "--out"),
                              device=device, data_dir=folder(data_dir, "--data-dir"), argv=sys.argv,
                              plain_lr=lr is not None)
    message(f"{child}: {status}")


@app.command(cls=Command, short_help="Draw the paper's figures from runs, and classify their phases.",
             help="Draw the paper's figures from run directories, and tell which phase each run is in.\n\n"
                  + PHASES_HELP)
def plot(
    paths: list[str] = typer.Argument(
        ..., metavar="RUN_OR_DIR",
        help="Run directories, or folders searched for every run below them (connect outputs for --kind "
             "connect, a plane output for --kind plane)."),
    kind: str = typer.Option(
        "phase", metavar="KIND",
        help="phase: (train loss, GM) trajectories coloured by ELR; metrics: final metrics against ELR with "
             "the phases, plus a phase table; cosine: cosines between neighbouring checkpoints per ELR; "
             "connect: metrics against alpha of sphrun connect outputs; curvature: the phase diagram with a "
             "curvature.csv measure; projection: the projection error 1 - r against ELR; plane: filled "
             "contours over the plane of a `sphrun connect A B C` output (train loss and test error, or "
             "--y); spectrum: the Hessian's eigenvalue density (hessian-density.csv) on a log axis, of "
             "several runs at their last measured step coloured by ELR, or of one run at each step."),
    out: Optional[str] = typer.Option(
        None, metavar="FILE",
        help="Figure file, .png, .svg or .pdf. (default: <kind>.png in the folder of the runs, "
             "<run>-<kind>.png beside one run)"),
    x: Optional[str] = typer.Option(
        None, metavar="COLUMN",
        help="phase and curvature kinds: the x column, from metrics.csv or curvature.csv. (default: "
             "train_loss)"),
    y: Optional[str] = typer.Option(
        None, metavar="COLUMN",
        help="phase and curvature kinds: the y column; plane: the one column of plane.csv drawn (train_loss, "
             "train_err, test_loss, test_err or gm). (default: gm; for curvature the first measure in "
             "curvature.csv; for plane train_loss and test_err, one panel each)"),
    aggregate: bool = typer.Option(
        True, "--aggregate/--no-aggregate",
        help="Runs that differ only in their seeds (--seed, --data-seed) form one group: metrics draws the mean "
             "over the seeds with a band from the lowest to the highest seed (min-max), cosine pools their "
             "cosines in one box per ELR, phase draws one line per seed in the group's colour, and the phase "
             "table has one row per group. --no-aggregate draws every run alone."),
):
    from sphrun.plot import plot as draw
    from sphrun.files import check_output_file

    if out is not None:
        check_output_file(out)  # before the runs are read: a folder, a read-only place
    message(f"wrote {draw(paths, kind, out=out, x=x, y=y, aggregate=aggregate)}")


@app.command(cls=Command, short_help="Metrics along the line between two checkpoints, or over the plane of three.")
def connect(
    run_a: str = typer.Argument(..., metavar="RUN_A", help="Run directory of end A (alpha = 0; the plane's origin)."),
    run_b: str = typer.Argument(..., metavar="RUN_B", help="Run directory of end B (alpha = 1)."),
    run_c: Optional[str] = typer.Argument(
        None, metavar="RUN_C",
        help="Run directory of a third end C: the plane through A, B and C instead of the segment."),
    from_a: str = typer.Option("last", metavar="STEP", help="A's checkpoint: last, or the step of one."),
    from_b: str = typer.Option("last", metavar="STEP", help="B's checkpoint: last, or the step of one."),
    from_c: str = typer.Option("last", metavar="STEP", help="C's checkpoint: last, or the step of one."),
    points: Optional[int] = typer.Option(
        None, metavar="N",
        help="Segment: number of alphas, evenly spaced in [0, 1], ends included (>= 2). (default: 21)"),
    grid: Optional[int] = typer.Option(
        None, metavar="N",
        help="Plane: grid points per axis (>= 2), N x N points in all, each a BatchNorm recomputation and "
             "an evaluation. (default: 21)"),
    margin: Optional[float] = typer.Option(
        None, metavar="FRACTION",
        help="Plane: how far the grid reaches past the triangle ABC on each side, as a fraction of the "
             "triangle's extent along that axis (>= 0). (default: 0.2)"),
    bn_batches: Optional[int] = typer.Option(
        None, metavar="N",
        help="Full train batches (of A's batch size) over which each point's BatchNorm running statistics "
             "are recomputed, as a plain average. (default: all)"),
    project: Optional[bool] = typer.Option(
        None, "--project/--no-project",
        help="Rescale each point to the sphere, radius (1 - alpha) rho_A + alpha rho_B (the runs' radius; on "
             "the plane the ends' radii interpolated by the point's barycentric coordinates). Only GM depends "
             "on it. (default: on for runs on the sphere; runs trained off it (--no-sphere) are never "
             "rescaled)"),
    data_dir: EndsDataDir = None,
    device: Device = "auto",
    other_data: OtherData = False,
    out: Optional[str] = typer.Option(
        None, metavar="DIR",
        help="Output folder, a folder of its own: never a run directory, inside one, or a folder of runs. "
             "(default: connect/<A>@<step>--<B>@<step>[-p<points>][-bn<N>][-noproj][-tf32], and for a "
             "plane connect/<A>@<step>--<B>@<step>--<C>@<step>[-g<grid>][-m<margin>][-bn<N>][-noproj][-tf32])"),
    tf32: Tf32 = False,
):
    """Linear mode connectivity: metrics along (1 - alpha) theta_A + alpha theta_B (docs/science.md,
    Linear mode connectivity); with three runs, over the plane through them.

    At each point BatchNorm statistics are recomputed on the train set, then train loss/error and GM
    are measured in BN train mode (batch statistics, as metrics.csv) and test loss/error in eval mode.
    Train metrics and the recomputation use A's full train batches, as training cuts them: the
    n mod batch-size leftover images are left out, and GM is the plain mean over the batches.
    Writes OUT/connect.csv (alpha,train_loss,train_err,test_loss,test_err,gm; errors as fractions),
    OUT/config.json (both ends, settings, and the barrier: the largest rise of an inner point above the
    straight line between the ends, for train loss and test error) and OUT/connect.png. The runs must be
    one function space (model, width, data, loss, frozen last layer); their seeds and ELRs may differ.

    Three runs (Garipov et al. 2018): the plane with origin A and the orthonormal basis e_u = (B - A) /
    |B - A|, e_v = the rest of C - A, normalized; the point (u, v) is theta_A + u e_u + v e_v (u, v in
    units of the weights' norm), rescaled to the ends' radii interpolated by its barycentric coordinates.
    A --grid N x N grid over the triangle, widened by --margin, writes OUT/plane.csv
    (u,v,train_loss,train_err,test_loss,test_err,gm), OUT/config.json (the three ends, where B and C lie,
    the basis lengths, the cosine of the angle at A, the options) and OUT/plane.png (filled contours of
    train loss on log levels and of test error). Collinear ends are refused.
    """
    from sphrun.connect import connect as run_connect, parse_which

    if run_c is None:
        if grid is not None or margin is not None or from_c != "last":
            raise SphrunError("--grid, --margin and --from-c set the plane through three runs: give RUN_C (or "
                              "--points for the segment)")
        run_connect(run_a, run_b, parse_which(from_a, "--from-a"), parse_which(from_b, "--from-b"),
                    points=21 if points is None else points, bn_batches=bn_batches, project=project,
                    out=folder(out, "--out"), device=device, data_dir=folder(data_dir, "--data-dir"),
                    argv=sys.argv, allow_tf32=tf32, other_data=other_data)
        return
    from sphrun.connect import connect_plane

    if points is not None:
        raise SphrunError("--points sets the segment between two runs; the plane through three takes --grid")
    whiches = [parse_which(text, option) for text, option in ((from_a, "--from-a"), (from_b, "--from-b"),
                                                               (from_c, "--from-c"))]
    connect_plane([run_a, run_b, run_c], whiches, points=21 if grid is None else grid,
                  margin=0.2 if margin is None else margin, bn_batches=bn_batches, project=project,
                  out=folder(out, "--out"), device=device, data_dir=folder(data_dir, "--data-dir"), argv=sys.argv,
                  allow_tf32=tf32, other_data=other_data)


@app.command(cls=Command, short_help="Gradient norm, Fisher and Hessian traces, Hessian eigenvalues and density.")
def curvature(
    run: str = typer.Argument(..., metavar="RUN", help="Run directory."),
    at: str = typer.Option(
        "all", metavar="STEPS", help="Checkpoints to measure: all, last, or steps like 100,200."),
    measures: str = typer.Option(
        "gm,fisher-trace,hessian-trace,hessian-eig", metavar="MEASURES",
        help="Comma-separated, from: gm (mean over batches of the SI gradient norm, BN train mode always, "
             "as metrics.csv); fisher-trace (trace of the Gauss-Newton matrix mean_b J_b^T Q_b J_b, Q_b "
             "the Hessian of the loss in the logits: diag(p) - p p^T per image for ce, 2/C I for mse; the "
             "Fisher for these losses); hessian-trace (trace of the Hessian of the train loss); hessian-eig "
             "(the largest eigenvalue of that Hessian: the top Ritz value of --lanczos Lanczos steps, which "
             "approaches it from below); hessian-density (the density of that Hessian's eigenvalues by "
             "stochastic Lanczos quadrature: --probes Lanczos runs of --lanczos steps from Rademacher "
             "starts, their Ritz values weighted by the squared first components of the tridiagonal "
             "matrix's eigenvectors, averaged, and smoothed by --sigma; written to RUN/hessian-density.csv "
             "as iter,eigenvalue,density, in 1/eigenvalue units, integrating to 1; asked for by name, not "
             "in the default). Matrices are over all SI parameters and traces are totals over them, not "
             "per parameter."),
    probes: int = typer.Option(
        5, metavar="N",
        help="Rademacher probe vectors per batch of the Hutchinson traces; Lanczos runs (random starts) of "
             "hessian-density."),
    lanczos: Optional[int] = typer.Option(
        None, metavar="N",
        help="Lanczos steps (Hessian-vector products over all batches) of hessian-eig, and of each run of "
             "hessian-density (at least 2: one step gives one Ritz value per probe, no density). (default: 10 "
             "for hessian-eig, the paper's; 100 for hessian-density, PyHessian's)"),
    sigma: Optional[float] = typer.Option(
        None, metavar="S",
        help="hessian-density: the standard deviation of the Gaussian that smooths each Ritz value, as a "
             "fraction of the spread of the Ritz values (largest minus smallest over all probes), from 1e-5 "
             "to 1. The curve is sampled every fifth of that width, out to 7 widths around each Ritz value. "
             "(default: the quadrature's resolution, the median gap between neighbouring Ritz values of a "
             "probe: a smooth bulk, sharp outliers; docs/science.md, The Hessian's eigenvalue density)"),
    batches: Optional[int] = typer.Option(
        None, metavar="N",
        help="Measure over the first N full train batches of the run's batch size, those of metrics.csv; at "
             "least 1. (default: all full batches; the n mod batch-size leftover images are left out, as "
             "training leaves them out)"),
    bn_mode: str = typer.Option(
        "train", metavar="MODE",
        help="BatchNorm during the second-order measures: train (batch statistics, as the paper) or eval "
             "(running statistics)."),
    recompute: bool = typer.Option(False, help="Measure again steps already in curvature.csv."),
    seed: int = typer.Option(
        0, metavar="SEED", help="Seed of the probes and of the Lanczos start vector, 0 or more."),
    data_dir: RunDataDir = None,
    other_data: OtherData = False,
    device: Device = "auto",
    tf32: Tf32 = False,
):
    """Curvature of the train loss at a run's checkpoints (docs/science.md, What is measured; the
    paper's figures 22, 23).

    The loss is the mean of the batch losses L_b over the run's full train batches (those of
    metrics.csv: the n mod batch-size leftover images are left out), BatchNorm in train mode by
    default; BatchNorm buffers are left as found. Adds one row per step to RUN/curvature.csv (iter plus
    one column per measure), and hessian-density's curve (one row per eigenvalue of its grid) to
    RUN/hessian-density.csv; steps and measures already there are skipped unless --recompute. The
    settings used are kept in RUN/curvature.json, and values of other settings are never mixed in.
    Several processes may measure one run at once: each value is merged into the files as written.
    Cost per checkpoint in passes over the batches: gm 1, each trace --probes, hessian-eig --lanczos,
    hessian-density --probes x --lanczos.
    """
    from sphrun.curvature import run_curvature

    run_curvature(run, at, measures, probes=probes, lanczos=lanczos,
                  batches=at_least(batches, "--batches"), bn_mode=bn_mode, recompute=recompute,
                  seed=seed, device=device, data_dir=folder(data_dir, "--data-dir"), allow_tf32=tf32,
                  other_data=other_data, sigma=sigma)


def main():
    """The `sphrun` command: exit 0, 2 for a user's mistake or a damaged file, 1 for a write that failed (a
    full disk), 128 + the signal's number when stopped by one (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1)."""
    try:
        run_app()
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (importing, loading data): nothing to save
        message("interrupted")
        sys.exit(130)


def run_app():
    import signal

    import torch  # noqa: F401 (the slow part of starting, imported where a Ctrl-C during it is met)

    from sphrun.stopping import Interrupted, StopNow

    try:
        app()
    except SphrunError as e:
        message(f"error: {e}")
        sys.exit(e.exit_code)
    except Interrupted as e:
        message(str(e))
        sys.exit(128 + e.signum)
    except StopNow as e:  # SIGTERM or SIGUSR1 before training began: nothing to save
        message(f"interrupted by {signal.Signals(e.signum).name}")
        sys.exit(128 + e.signum)
