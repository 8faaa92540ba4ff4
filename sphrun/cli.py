"""The sphrun command line: each command parses, validates and calls the modules that do the work."""

import sys
from typing import Optional

import typer

from sphrun import SphrunError
from sphrun.config import TrainConfig, parse_subset
from sphrun.progress import message

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train scale-invariant networks on the sphere and study their loss landscape.")


@app.callback()
def _root():
    """Train scale-invariant networks on the sphere and study their loss landscape."""


def parse_elr(text):
    try:
        return float(text)
    except ValueError:
        raise SphrunError(f"--elr must be a number like 7e-4, got {text!r}")


@app.command()
def train(
    elr: str = typer.Option(..., help="Effective learning rate on the unit sphere: lr = elr * rho0^2 "
                                       "(dimensionless). The paper's phase 1/2 border for ce is near 7e-4."),
    loss: str = typer.Option("ce", help="Loss: ce (cross-entropy) or mse (squared error to the one-hot "
                                        "target, mean over classes)."),
    dataset: str = typer.Option("cifar10", help="cifar10, cifar100 or synthetic (built-in, offline)."),
    data_dir: Optional[str] = typer.Option(None, help="Folder with torchvision's CIFAR files or an ImageFolder "
                                                      "tree train/<class>/, test/<class>/. (default: "
                                                      "$SPHRUN_DATA, else ./data; CIFAR is downloaded there "
                                                      "when absent]"),
    subset: Optional[str] = typer.Option(None, help="Train on a class-stratified subset: a fraction (0.1) or "
                                                    "a count of images (5000); the test set stays whole."),
    width: int = typer.Option(32, help="ConvNet width c (channels of the first conv; 387,936 weights at 32)."),
    init_scale: Optional[float] = typer.Option(None, help="Frobenius norm of the frozen last layer. "
                                                          "(default: 10 for ce, 1.5 for mse)"),
    seed: int = typer.Option(0, help="Seed of the trainable (conv) weights' init."),
    head_seed: int = typer.Option(0, help="Seed of the frozen last layer; keep it shared so runs "
                                          "live in one function space."),
    data_seed: int = typer.Option(0, help="Seed of the batch order, shared by every ELR of a sweep."),
    batch_size: int = typer.Option(128, help="Mini-batch size (images per SGD step)."),
    epochs: Optional[int] = typer.Option(None, help="Length in epochs (passes over the train set). "
                                                    "(default: 1000, the authors' setting)"),
    iters: Optional[int] = typer.Option(None, help="Length in SGD steps, instead of --epochs."),
    eval_every: Optional[int] = typer.Option(None, help="Evaluate every N steps. (default: log-spaced: "
                                                        "every epoch for 10 epochs, then ~10 per decade]"),
    keep: Optional[int] = typer.Option(None, help="Keep the checkpoint of every K-th evaluation point "
                                                  "(first and last always). (default: all)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    out: Optional[str] = typer.Option(None, help="Run directory. (default: runs/<name from the settings>); "
                                                 "an existing one is resumed or extended."),
):
    """Train the paper's fully scale-invariant ConvNet on the sphere at a fixed effective learning rate.

    Writes a run directory (config.json, metrics.csv, checkpoints/). Running the same command again
    resumes it; a larger --epochs/--iters extends it. Ctrl-C saves and stops.
    """
    import os

    from sphrun import train as training

    if epochs is not None and iters is not None:
        raise SphrunError("give --epochs or --iters, not both")
    config = TrainConfig(
        elr=parse_elr(elr), loss=loss, dataset=dataset,
        data_dir=data_dir or os.environ.get("SPHRUN_DATA") or "./data", subset=parse_subset(subset),
        width=width, init_scale=init_scale, seed=seed, head_seed=head_seed, data_seed=data_seed,
        batch_size=batch_size, epochs=None if iters is not None else (epochs or 1000), iters=iters,
        eval_every=eval_every, keep=keep, device=device)
    run, status = training.train(config, out, argv=sys.argv)
    message(f"{run}: {status}")


def main():
    from sphrun.train import Interrupted

    try:
        app()
    except SphrunError as e:
        message(f"error: {e}")
        sys.exit(2)
    except Interrupted as e:
        message(str(e))
        sys.exit(130)
