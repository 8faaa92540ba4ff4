"""The one training loop. Every run is a pass of members trained together as one pack
(sphrun.packed): the ELRs of a sweep of the ConvNet on the sphere, or a single run (any model, on the
sphere or off it) as a pack of one. The loop steps the pack without a host sync, reads the device a
few times a second for the progress bar, evaluates and checkpoints every member at the evaluation
points, freezes a member that diverged, and on Ctrl-C, SIGTERM or SIGUSR1 (a scheduler's notice)
saves and stops.

On the sphere each step moves along config.step's direction (projected, or geodesic with
config.geodesic) with the ELR elr_at(step), lr = elr * rho0^2; random directions are seeded by
(seed, step), never saved. Off it (config.sphere False, docs/science.md, conventional training) each
step is SGD with momentum and weight decay over every trainable parameter, the rate in `elr` being
the plain learning rate, and the checkpoint also holds the momentum buffers, so a resume stays exact.
"""

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass

import torch

from sphrun import SphrunError
from sphrun.config import evaluation_steps
from sphrun.data import BatchOrder, Data
from sphrun.files import CannotWrite
from sphrun.fitting import halving_on_oom, pass_size
from sphrun.lifecycle import default_run_path, open_runs, prepare, remove_unstarted
from sphrun.metrics import cosine, eval_metrics, train_metrics
from sphrun.packed import TrainingStep, member_params, mixed_precision, pack_models
from sphrun.progress import StepProgress, message
from sphrun.rundir import Status
from sphrun.sphere import global_norm
from sphrun.stopping import Interrupted, StopNow, StopRequest, by_signal, stopping_at_once


# --- which runs train, and in which passes ---------------------------------------------------------
def train(config, out=None, argv=(), start=None):
    """Start, resume or extend the run of `config` in `out` (default: runs/<name from the settings>);
    returns the run directory and its status. A new run starts from its init, or from `start`, a
    parent's checkpoint (a fine-tune); an existing one resumes from its own last checkpoint."""
    [(run, status)] = train_runs([config], [out or default_run_path(config)], argv=argv, start=start)
    return run, status


def train_sweep(configs, parent=None, pack=None, argv=()):
    """Train the runs of `configs` (alike but for their ELR, seed and data seed) packed, each in
    `parent`/<its default run name> (default: where single runs go), `pack` models per pass (default:
    all of one data seed); [(run, status)]."""
    check_packable(configs[0])
    return train_runs(configs, run_paths(configs, parent), pack, argv)


def check_packable(config):
    if config.model != "convnet" or not config.sphere:
        what = f"--model {config.model}" + ("" if config.sphere else " --no-sphere")
        raise SphrunError(f"several ELRs or seeds train as one packed ConvNet on the sphere; with {what} "
                          f"train one run per command (a shell loop over --elr or --seed)")
    if config.origin != 0:
        raise SphrunError("a packed sweep starts from the init: fine-tune one ELR at a time")


def run_paths(configs, parent):
    """Each run's directory: its default name, under `parent` (default: where single runs go)."""
    paths = [os.path.join(parent, c.default_run_name()) if parent else default_run_path(c) for c in configs]
    if len(set(paths)) < len(paths):
        raise SphrunError("two runs of the sweep have the same run name: give ELRs that differ in their "
                          "first 3 significant digits")
    return paths


def train_runs(configs, paths, pack=None, argv=(), start=None):
    """Start, resume or extend the run of each config in its path, at most `pack` per pass (a pass
    trains runs of one data seed, which see the same batches). Every directory is checked before data
    is loaded or anything is written. Returns [(run, status)]."""
    if pack is not None and pack < 1:
        raise SphrunError(f"--pack must be at least 1 model per pass, got {pack}")
    with stopping_at_once(), contextlib.ExitStack() as locks:
        runs = open_runs(configs, paths, locks, start)
        for m in runs.members:  # every check passed: now say what happens, and write
            if m.note:
                message(m.note)
            if m.status == Status.DONE and m.stored["status"] != Status.DONE:  # stopped at its last step
                m.run.set_status(Status.DONE)
        running = [m for m in runs.members if m.status == Status.RUNNING]
        size, fits = pass_size(running, runs.data, runs.device, pack)  # on a GPU, what fits its memory
        groups = passes(running, size)
        try:
            for number, group in enumerate(groups, 1):
                order = runs.orders[group[0].config.data_seed]
                message(announcement(group, runs.total, order, runs.device) +
                        (f": pass {number} of {len(groups)}" if len(groups) > 1 else "") + fits)

                def trained(part):
                    p = open_pass(part, runs.data, order, runs.device, runs.total)
                    train_pass(p, runs.data_id, argv)
                    return p
                p, later = halving_on_oom(trained, group)  # a pass too large trains what fits, the rest next
                groups[number:number] = later
                if p.stopped_by is not None:
                    stop_after_pass(p.stopped_by, number, len(groups))
        finally:
            remove_unstarted(runs.made)
    return [(m.run, m.status) for m in runs.members]


def stop_after_pass(signum, number, count):
    """A stop signal that came as a pass ended, its runs done: the command stops before the next pass, or
    ends normally after the last (a scheduler's notice then costs no requeue)."""
    name = signal.Signals(signum).name
    if number < count:
        raise Interrupted(f"stopped by {name} after pass {number} of {count}, its runs done: run the same "
                          f"command to train the others", signum)
    message(f"note: {name} came as the last step ended: every run is done")


def passes(members, pack):
    """Groups of at most `pack` members that start at the same step and share their batches (one data
    seed): a pass trains them in lockstep."""
    groups = []
    together = lambda m: (m.begins_at, m.config.data_seed)
    for m in sorted(members, key=together):
        if groups and together(groups[-1][0]) == together(m) and len(groups[-1]) < pack:
            groups[-1].append(m)
        else:
            groups.append([m])
    return groups


def announcement(group, total, order, device):
    first = group[0]
    length = f"({order.steps_per_epoch} per epoch) on {device}"
    if len(group) == 1 and first.checkpoint:
        return f"resuming {first.run} at step {first.begins_at} of {total}"
    if len(group) == 1:
        what = (f"fine-tuning {first.start.parent['run']} from step {first.config.origin} into"
                if first.start else "training")
        return f"{what} {first.run}: {total - first.config.origin} steps {length}"
    what = "training" if first.begins_at == 0 else "resuming"
    where = os.path.dirname(str(first.run)) or "."
    return (f"{what} {len(group)} runs packed ({describe(group)}) from step {first.begins_at} to {total} "
            f"{length}, runs in {where}/")


def describe(group):
    """What the members of a pass differ in: 'ELRs 0.001, 0.01; seeds 0, 1; data seed 0'."""
    parts = []
    for label, values in (("ELR", [m.config.elr for m in group]), ("seed", [m.config.seed for m in group]),
                          ("data seed", [m.config.data_seed for m in group])):
        distinct = sorted(set(values))
        shown = ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in distinct)
        parts.append(f"{label}{'s' * (len(distinct) > 1)} {shown}")
    return "; ".join(parts)


# --- a pass ---------------------------------------------------------------------------------------
@dataclass
class Pass:
    """Runs trained in lockstep as one pack: the members, their pack and the step that trains it, the data
    and batch order they share, the step they train to, its evaluation points, and at which of those the
    iter checkpoints are kept (--keep)."""
    members: list
    pack: torch.nn.Module
    step: TrainingStep
    data: Data
    order: BatchOrder
    total: int
    eval_steps: list
    keep: dict
    stopped_by: int | None = None  # a stop signal that came at the last step, when every run was done

    def running(self):
        """Indices of the members still training."""
        return [k for k, m in enumerate(self.members) if m.status == Status.RUNNING]


def open_pass(members, data, order, device, total):
    """The pass that trains `members` (all at one step, on the batches of `order`) to step `total`."""
    pack, step = pack_members(members, data, device)
    config = members[0].config
    eval_steps = evaluation_steps(config.origin, total, order.steps_per_epoch, config.eval_every)
    keep = {s: i % (config.keep or 1) == 0 or s == total for i, s in enumerate(eval_steps)}
    return Pass(members, pack, step, data, order, total, eval_steps, keep)


def pack_members(members, data, device):
    """The members' models (from their checkpoints, a parent's, or their init) as one pack, and the
    step that trains it. Sets each member's RunState."""
    models = []
    for m in members:
        _, model, params, _ = prepare(m.config, device, data)
        m.load_state(model, params)
        models.append(model)
    config = members[0].config
    pack = pack_models(models, config.sphere, device)
    momentum = None
    if not config.sphere and all(m.state.momentum is not None for m in members):
        momentum = [torch.stack(buffers) for buffers in zip(*(m.state.momentum for m in members))]
    rho0s = [m.state.rho0 for m in members]
    return pack, TrainingStep(pack, data, [m.config for m in members], rho0s, device, momentum)


def train_pass(p, data_id, argv):
    """Train the pass's members, each in its run directory (locked by the caller); `data_id`: their data's
    identity, for a new run's config.json. A second stop signal or a failed write (a full disk) marks the
    runs interrupted."""
    try:
        for m in p.members:
            m.run.remove_temporaries()  # a killed writer's; the run's lock is ours
            if m.checkpoint is not None:
                m.run.truncate_metrics(m.state.iter)
                m.run.remove_checkpoints_after(m.state.iter)
                m.run.set_status(Status.RUNNING)
            else:  # config.json first: from now on the directory is this run's, resumed or restarted
                m.run.write_config(m.config_record(p.data, data_id, p.order, argv))
                m.run.discard_metrics()
        first_rows(p)
        run_pass(p)
    except (KeyboardInterrupt, StopNow, CannotWrite) as e:  # KeyboardInterrupt: Ctrl-C outside the loop
        raise stopped(p.members, e) from e


def stopped(members, error):
    """The exception that ends a pass stopped at once, by a stop signal that cannot wait for the step's
    end (StopNow, or Ctrl-C outside the loop) or a failed write, after marking its running members
    interrupted where the disk lets us: each resumes from its last checkpoint."""
    marked = True
    for m in members:
        if m.status == Status.RUNNING:
            try:
                m.run.set_status(Status.INTERRUPTED)
            except SphrunError:  # a full disk, or a new run whose config.json never got written
                marked = False
    folder = os.path.dirname(str(members[0].run)) or "."
    where = str(members[0].run) if len(members) == 1 else f"the runs in {folder}/"
    status = f"{where} marked interrupted" if marked else f"the status of {where} not updated"
    if isinstance(error, (KeyboardInterrupt, StopNow)):
        return Interrupted(f"stopped at once, without saving: {status}; run the same command to resume from "
                           f"the last checkpoint", getattr(error, "signum", signal.SIGINT))
    return CannotWrite(f"{error}; {status}: free some space, then run the same command to resume from the "
                       f"last checkpoint")


def first_rows(p):
    """A new run's first metrics row and checkpoint: a fine-tune's parent's row at its start step (the
    same weights; its cos_prev and proj_err look back to the parent's previous evaluation point), or
    measured now when there is none."""
    measure = []
    for k, m in enumerate(p.members):
        if m.checkpoint is not None:
            continue
        if m.start and m.start.row:
            m.run.append_metrics(m.start.row)
            save(p, k, at_eval_point=True)
        else:
            measure.append(k)
    if measure:
        record(p, measure, keep=True)
        freeze_diverged(p)


def run_pass(p):
    """The loop of a pass, from the members' step to p.total: steps without host syncs, evaluation points,
    divergence, stop signals. Leaves the members' RunStates at the step reached. A signal that comes at the
    last step, the runs done, ends them done and is kept in p.stopped_by."""
    members, step = p.members, p.step
    it = members[0].state.iter
    pending = [s for s in p.eval_steps if s > it]
    label = f"{len(members)} runs" if len(members) > 1 else "train"
    with StopRequest() as stop, StepProgress(p.total, start=it, label=label) as bar:
        tick, since = time.perf_counter(), 0
        while it < p.total and p.running():
            step.take(it, p.order.indices(it))  # no host sync, no copy from the host (but a permutation an epoch)
            it, since = it + 1, since + 1
            at_eval = pending and it == pending[0]
            if bar.due() or at_eval:  # the only host syncs: a few per second, and evaluation points
                alive, losses = step.alive.tolist(), step.loss.tolist()
                for m, ok in zip(members, alive):
                    if m.status == Status.RUNNING and not ok:
                        m.state.iter = it
                        m.status = diverged(m.run, it)
                running = p.running()
                if running:
                    best = min(running, key=lambda k: losses[k])
                    bar.update(it, losses[best], members[best].config.elr_at(it - 1))
            if at_eval:
                pending.pop(0)
                catch_up(p, it, since, tick)
                since = 0
                seeds_vary = len({m.config.seed for m in members}) > 1
                for m, row in record(p, p.running(), keep=p.keep[it]):
                    label = "" if len(members) == 1 else f"elr {row['elr']:<9.3g} " + (
                        f"seed {m.config.seed:<3d} " if seeds_vary else "")
                    bar.log(label + format_row(row))
                freeze_diverged(p)
                tick = time.perf_counter()
            if stop.requested and it < p.total:
                catch_up(p, it, since, tick)
                interrupt(p, it, stop.signum)
        p.stopped_by = stop.signum  # None, or a signal during the last evaluation: the runs are done
    catch_up(p, it, since, tick)
    for m in members:
        if m.status == Status.RUNNING:
            m.run.set_status(Status.DONE)
            m.status = Status.DONE


def catch_up(p, it, steps, tick):
    """Bring the running members' RunStates to step `it`: `steps` more steps, the pass's projection
    errors since they last were (moved out of the step's accumulator) and the time since `tick`."""
    now = time.perf_counter()
    for k in p.running():
        state = p.members[k].state
        state.iter = it
        state.proj_err_sum = state.proj_err_sum + p.step.proj_err_sum[k]
        state.proj_err_steps += steps
        state.wall_s += now - tick
    p.step.proj_err_sum.zero_()


def interrupt(p, it, signum):
    """A stop signal: save every running member where it is, mark it interrupted, and stop."""
    for k in p.running():
        save(p, k, at_eval_point=False)
        p.members[k].run.set_status(Status.INTERRUPTED)
    if len(p.members) == 1:
        where = f"checkpoint saved in {p.members[0].run}"
    else:
        where = f"checkpoints saved in the runs in {os.path.dirname(str(p.members[0].run)) or '.'}/"
    raise Interrupted(f"interrupted{by_signal(signum)} at step {it}: {where}; run the same command to resume",
                      signum)


def freeze_diverged(p):
    """Stop moving the members found diverged at an evaluation point (a non-finite row)."""
    for k, m in enumerate(p.members):
        if m.status == Status.DIVERGED:
            p.step.alive[k] = False


def diverged(run, it):
    run.set_status(Status.DIVERGED)
    message(f"warning: {run} diverged (non-finite loss or norm) before step {it}; "
            f"status diverged, metrics so far kept")
    return Status.DIVERGED


def latest_elr(config, it):
    """The ELR of the step that led to step `it`; at the run's start, its parent's (a fine-tune) or its own."""
    if it > config.origin:
        return config.elr_at(it - 1)
    return config.elr if config.elr_from is None else config.elr_from


# --- evaluation points ----------------------------------------------------------------------------
def save(p, k, at_eval_point):
    """Member k's checkpoint: its slice of the pack's state, as its single model's, its RunState and the
    settings it trains under."""
    member = p.members[k]
    model_state = {name: t.detach().clone() for name, t in p.pack.member_state_dict(k).items()}
    if p.step.momentum is not None:
        member.state.momentum = [b[k].clone() for b in p.step.momentum]
    checkpoint = member.state.checkpoint(model_state, latest_elr(member.config, member.state.iter),
                                         member.config.run_key())
    member.run.save_checkpoint(checkpoint, at_eval_point=at_eval_point)


def record(p, which, keep):
    """Evaluate every model of the pack in one pass over the data; for the members `which` (indices),
    write the metrics row and checkpoint, or mark the member diverged when its row is not finite.
    Returns the (member, row) pairs written.

    GM and the cosines are over the trainable tensors; si_norm over the scale-invariant ones (off the
    sphere some of the trainable ones, found from the structure). Train metrics in BN train mode, test
    metrics in eval mode (sphrun.metrics)."""
    start = time.perf_counter()
    pack, data, config = p.pack, p.data, p.members[0].config
    with mixed_precision(config.precision, p.step.device):
        train_loss, train_err, gm = train_metrics(pack, pack.params, data.train_x, data.train_y, config.loss,
                                                  config.batch_size, p.order.permutation(0))
        test_loss, test_err = eval_metrics(pack, data.test_x, data.test_y, config.loss)
    norms = global_norm(pack.si_params, members=pack.form).tolist()
    rows = []
    for k in which:
        m = p.members[k]
        measured = {"train_loss": train_loss[k], "train_err": train_err[k], "test_loss": test_loss[k],
                    "test_err": test_err[k], "gm": gm[k], "si_norm": norms[k]}
        row = metrics_row(m.state, member_params(pack.params, k), latest_elr(m.config, m.state.iter),
                          p.order.steps_per_epoch, measured, start)
        if not is_finite_row(row):
            m.status = diverged(m.run, m.state.iter)
            continue
        m.run.append_metrics(row)
        save(p, k, at_eval_point=keep)
        rows.append((m, row))
    return rows


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


def format_row(row):
    return (f"step {row['iter']:>7d}  epoch {row['epoch']:8.2f}  train loss {row['train_loss']:.4g}  "
            f"train err {row['train_err']:.3f}  test err {row['test_err']:.3f}  gm {row['gm']:.4g}")
