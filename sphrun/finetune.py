"""Fine-tuning from a checkpoint (docs/science.md, Fine-tuning experiments): a child run that goes on from step ITER
of its parent with a new ELR, reached at once or along a linear transition, and optionally another step.

The child continues the parent's lineage: the same model, data, loss, radius rho0 and batch stream (the
batch order is a function of the step), its `iter` column counts on from ITER, and its first metrics
row is the parent's at ITER (evaluated afresh when ITER is a Ctrl-C checkpoint off the parent's
evaluation points). With the parent's ELR and step it reproduces the parent bit for bit.
"""

import dataclasses
import os

from sphrun import SphrunError
from sphrun.lifecycle import Start, read_settings
from sphrun.rundir import RunDir
from sphrun.train import train


def parse_start(text):
    """--from: 'last' or a step number."""
    if text == "last":
        return "last"
    try:
        step = int(text)
    except ValueError:
        raise SphrunError(f"--from must be last or a step number, got {text!r}")
    if step < 0:
        raise SphrunError(f"--from must be last or a step number at least 0, got {step}")
    return step


def child_path(parent_path, config):
    """The default run directory of a fine-tune: beside its parent, named by what differs from it."""
    rate = "elr" if config.sphere else "lr"
    parts = [f"ft-{rate}{config.elr:.3g}", f"from{config.origin}"]
    if config.transition:
        parts.append(f"D{config.transition}")
    if config.step != "sgd":
        parts.append(config.step)
    if config.geodesic:
        parts.append("geo")
    if config.eval_every:
        parts.append(f"every{config.eval_every}")
    return os.path.normpath(parent_path) + "-" + "-".join(parts)


def finetune(parent_path, elr, start="last", iters=None, epochs=None, transition=0, step="sgd",
             geodesic=False, eval_every=None, out=None, device="auto", data_dir=None, argv=(), plain_lr=None):
    """Start, resume or extend the fine-tune of `parent_path` from checkpoint `start` ('last' or a step)
    at ELR `elr`; returns the child's run directory and its status.

    Off the sphere `elr` is the plain learning rate; `plain_lr` says which the caller meant (checked
    against the parent when not None)."""
    if iters is not None and epochs is not None:
        raise SphrunError("give --iters or --epochs, not both")
    if iters is None and epochs is None:
        raise SphrunError("give the fine-tune's length: --iters N (steps) or --epochs N")
    which = parse_start(start)
    parent = RunDir(parent_path)
    parent_stored, parent_config = read_settings(parent)
    if plain_lr is not None and plain_lr == parent_config.sphere:
        form, option = ("on", "--elr") if parent_config.sphere else ("off", "--lr")
        raise SphrunError(f"{parent_path} was trained {form} the sphere: give its new rate as {option}")
    # the new settings are checked here, before any checkpoint is read or directory made
    config = dataclasses.replace(
        parent_config, elr=elr, transition=transition, step=step, geodesic=geodesic, iters=iters,
        epochs=epochs, eval_every=eval_every, keep=None, device=device,
        data_dir=data_dir or parent_config.data_dir)
    with parent.lock(shared=True):  # a consistent snapshot: nobody writes the parent while we read it
        checkpoint = parent.load_checkpoint(which)
        rows = parent.read_metrics()
    origin, parent_elr = int(checkpoint.iter), float(checkpoint.elr)
    # the transition starts from the ELR of the parent's last step before the checkpoint
    config = dataclasses.replace(config, origin=origin, elr_from=parent_elr)
    out = out or child_path(parent_path, config)
    if os.path.realpath(out) == os.path.realpath(parent_path):
        raise SphrunError(f"--out {out} is the parent run itself; give the fine-tune its own directory")
    row = next((r for r in rows if r["iter"] == origin), None)
    parent_record = {"run": os.path.normpath(parent_path), "iter": origin}
    start = Start(checkpoint, parent.checkpoint_path(which), row, parent_record, parent_stored.get("data"))
    return train(config, out, argv, start=start)
