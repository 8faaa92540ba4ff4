"""The training loop on the sphere: steps, evaluation points, checkpoints, resume.

Off the sphere (config.sphere False, PAPER.md §4.9) the same loop trains every parameter of the
conventional model with torch's SGD, no projection; the rate in `elr` is then the plain learning rate,
and the state also holds the optimizer's (momentum buffers), so a resume stays exact.
"""

import math
import signal
import time

import torch

from sphrun.lifecycle import (RunState, check_same_run, default_run_path, fresh_state, nothing_left, prepare,
                              resolve_device, run_record, total_steps)
from sphrun.metrics import batch_loss, cosine, eval_metrics, train_metrics
from sphrun.models import scale_invariant_parameters
from sphrun.progress import StepProgress, message
from sphrun.rundir import RunDir
from sphrun.sphere import global_norm, learning_rate, step_direction, step_on_sphere


class Interrupted(Exception):
    """Ctrl-C during training: the state was saved and the run marked interrupted."""


def evaluation_steps(origin, total, steps_per_epoch, eval_every=None):
    """Steps at which a run starting at `origin` and ending at `total` is evaluated.

    Log-spaced by default: every epoch for the first 10 epochs, then about 10 points per decade of
    epochs (13, 16, 20, 25, 32, ...), and always the last step. `eval_every` steps otherwise.
    """
    if eval_every:
        offsets = range(0, total - origin, eval_every)
    else:
        epochs, k = list(range(11)), 1
        while epochs[-1] * steps_per_epoch < total - origin:
            epochs.append(max(epochs[-1] + 1, round(10 ** (1 + k / 10))))
            k += 1
        offsets = [e * steps_per_epoch for e in epochs]
    return sorted({origin + o for o in offsets if origin + o < total} | {total})


def mixed_precision(config, device):
    """--precision bf16: convolutions and matrix products in bfloat16 (autocast); weights, gradients,
    norms, the projection and BatchNorm statistics stay float32. Off for fp32. (No weight cache, so the
    context may be captured in a CUDA graph.)"""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16",
                          cache_enabled=False)


def evaluate(model, params, data, config, order, state, elr):
    """The metrics.csv row of the current state; resets the projection-error accumulator.

    GM and the cosines are over the trainable parameters; si_norm over the scale-invariant ones, which
    off the sphere are some of the trainable ones, found from the structure."""
    start = time.perf_counter()
    with mixed_precision(config, data.train_x.device):
        train_loss, train_err, gm = train_metrics(model, params, data.train_x, data.train_y, config.loss,
                                                  config.batch_size, order.permutation(0))
        test_loss, test_err = eval_metrics(model, data.test_x, data.test_y, config.loss)
    si = params if config.sphere else scale_invariant_parameters(model)
    measured = {"train_loss": train_loss, "train_err": train_err, "test_loss": test_loss,
                "test_err": test_err, "gm": gm, "si_norm": global_norm(si).item()}
    return metrics_row(state, params, elr, order.steps_per_epoch, measured, start)


def metrics_row(state, params, elr, steps_per_epoch, measured, start):
    """The metrics.csv row of `state` from its `measured` losses, errors, GM and norm: adds the cosines,
    the projection error since the previous evaluation point and the wall time (this evaluation began at
    perf_counter() == start), then makes now the state's previous evaluation point."""
    steps = max(state.proj_err_steps, 1)
    row = {"iter": state.iter, "epoch": state.iter / steps_per_epoch, "elr": elr, **measured,
           "cos_prev": cosine(params, state.theta_prev), "cos_init": cosine(params, state.theta_init),
           "proj_err": state.proj_err_sum.item() / steps}
    state.theta_prev = [p.detach().clone() for p in params]
    state.proj_err_sum = torch.zeros_like(state.proj_err_sum)
    state.proj_err_steps = 0
    state.wall_s += time.perf_counter() - start
    row["wall_s"] = state.wall_s
    return row


def is_finite_row(row):
    return all(math.isfinite(row[k]) for k in ("train_loss", "gm", "si_norm"))


class StopRequest:
    """Turns the first Ctrl-C into a flag the loop checks between steps, so a step is never cut in half."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: the user insists
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def conventional_optimizer(params, config, saved=None):
    """torch's SGD over `params` with the run's momentum and weight decay, its momentum buffers taken
    from `saved` (a state_dict) when given; the learning rate is set at each step."""
    optimizer = torch.optim.SGD(params, lr=config.elr, momentum=config.momentum, weight_decay=config.wd)
    if saved is not None:  # the buffers only: the settings come from the configuration
        optimizer.load_state_dict({"state": saved["state"],
                                   "param_groups": optimizer.state_dict()["param_groups"]})
    return optimizer


def conventional_step(optimizer, params, grads, lr):
    """One step of torch's SGD at learning rate lr, in the whole parameter space."""
    for p, g in zip(params, grads):
        p.grad = g
    optimizer.param_groups[0]["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_steps(run, config, model, params, data, order, state, total, eval_steps, elr_at):
    """Train from state.iter to `total`, evaluating and checkpointing at `eval_steps`.

    On the sphere each step moves along config.step's direction (projected, or geodesic with
    config.geodesic) with the ELR elr_at(step); random directions are seeded by (config.seed, step),
    never saved. Off it each step is torch's SGD with learning rate elr_at(step).

    Returns the final status: done or diverged; raises Interrupted after saving on Ctrl-C.
    """
    keep_iter_file = {s: i % (config.keep or 1) == 0 or s == total for i, s in enumerate(eval_steps)}
    pending = [s for s in eval_steps if s > state.iter]
    nonfinite = torch.zeros((), dtype=torch.bool, device=params[0].device)
    rho = state.rho0
    optimizer = None if config.sphere else conventional_optimizer(params, config, state.optimizer)
    with StopRequest() as stop, StepProgress(total, start=state.iter) as bar:
        tick = time.perf_counter()
        while state.iter < total:
            elr = elr_at(state.iter)
            idx = order.indices(state.iter)
            with mixed_precision(config, data.train_x.device):
                loss = batch_loss(model(data.train_x[idx]), data.train_y[idx], config.loss)
            grads = torch.autograd.grad(loss, params)
            nonfinite |= ~torch.isfinite(loss)
            if optimizer is None:
                direction = step_direction(config.step, grads, params, config.seed, state.iter)
                proj_err = step_on_sphere(params, direction, learning_rate(elr, rho), rho, config.geodesic)
                state.proj_err_sum += proj_err
                nonfinite |= ~torch.isfinite(proj_err)
            else:  # no projection: proj_err stays 0
                conventional_step(optimizer, params, grads, elr)
            state.proj_err_steps += 1
            state.iter += 1
            at_eval = pending and state.iter == pending[0]
            if bar.due() or at_eval:  # the only host syncs: a few per second, and evaluation points
                if nonfinite.item():
                    return diverged(run, state)
                bar.update(state.iter, loss.item(), elr)
            if at_eval:
                pending.pop(0)
                now = time.perf_counter()
                state.wall_s += now - tick
                row = evaluate(model, params, data, config, order, state, elr)
                if not is_finite_row(row):
                    return diverged(run, state)
                run.append_metrics(row)
                run.save_checkpoint(state.checkpoint(model, elr, optimizer),
                                    at_eval_point=keep_iter_file[state.iter])
                bar.log(format_row(row))
                tick = time.perf_counter()
            if stop.requested:
                state.wall_s += time.perf_counter() - tick
                run.save_checkpoint(state.checkpoint(model, elr, optimizer), at_eval_point=False)
                run.set_status("interrupted")
                raise Interrupted(f"interrupted at step {state.iter}: checkpoint saved in {run}; "
                                  f"run the same command to resume")
    run.set_status("done")
    return "done"


def diverged(run, state):
    run.set_status("diverged")
    message(f"warning: {run} diverged (non-finite loss or norm) before step {state.iter}; "
            f"status diverged, metrics so far kept")
    return "diverged"


def format_row(row):
    return (f"step {row['iter']:>7d}  epoch {row['epoch']:8.2f}  train loss {row['train_loss']:.4g}  "
            f"train err {row['train_err']:.3f}  test err {row['test_err']:.3f}  gm {row['gm']:.4g}")


def train(config, out=None, argv=(), start=None):
    """Start, resume or extend the run of `config` in `out`; returns the run directory and its status.

    A new run starts from its init, or from `start`, a parent's checkpoint (a fine-tune); an existing
    one resumes from its own last checkpoint.
    """
    device = resolve_device(config.device)
    run = RunDir(out or default_run_path(config))
    stored = check_same_run(run, config) if run.exists() else None
    checkpoint = run.load_checkpoint("last") if stored else None
    data, model, params, order = prepare(config, device)
    total = total_steps(config, order.steps_per_epoch)
    if stored:
        state = RunState.from_checkpoint(checkpoint, model, params, run.checkpoint_path("last"))
        finished = nothing_left(run, stored, config, state.iter, total)
        if finished:
            return run, finished
    elif start:
        state = RunState.from_checkpoint(start.checkpoint, model, params, start.path)
    else:
        state = fresh_state(params)
    eval_steps = evaluation_steps(config.origin, total, order.steps_per_epoch, config.eval_every)
    with run.lock():
        if stored:
            run.truncate_metrics(state.iter)
            run.set_status("running")
            message(f"resuming {run} at step {state.iter} of {total}")
        else:
            what = "training"
            if start:
                what = f"fine-tuning {start.parent['run']} from step {config.origin} into"
            message(f"{what} {run}: {total - config.origin} steps ({order.steps_per_epoch} per epoch) "
                    f"on {device}")
            begin(run, config, data, model, params, order, state, argv, start)
        status = run_steps(run, config, model, params, data, order, state, total, eval_steps,
                           elr_at=config.elr_at)
    return run, status


def begin(run, config, data, model, params, order, state, argv, start):
    """Write a new run's config.json, its first metrics row and checkpoint."""
    run.write_config(run_record(config, data, order, state.rho0, argv, parent=start and start.parent))
    if start and start.row:
        # the parent's own row: the same weights, and its cos_prev and proj_err look back to the
        # parent's previous evaluation point, as they would have without the fine-tune
        row = start.row
    else:
        row = evaluate(model, params, data, config, order, state,
                       float(start.checkpoint["elr"]) if start else config.elr)
    run.append_metrics(row)
    run.save_checkpoint(state.checkpoint(model, row["elr"]), at_eval_point=True)
