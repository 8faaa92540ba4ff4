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

import torch

from sphrun import SphrunError
from sphrun.config import evaluation_steps
from sphrun.lifecycle import default_run_path, open_runs, prepare
from sphrun.rundir import CannotWrite
from sphrun.metrics import cosine, eval_metrics, train_metrics
from sphrun.packed import Step, member_params, mixed_precision, pack_models
from sphrun.progress import StepProgress, message
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
            if m.status == "done" and m.stored["status"] != "done":  # stopped at its last step
                m.run.set_status("done")
        groups = passes([m for m in runs.members if m.status == "running"], pack or len(runs.members))
        for number, group in enumerate(groups, 1):
            order = runs.orders[group[0].config.data_seed]
            message(announcement(group, runs.total, order, runs.device) +
                    (f": pass {number} of {len(groups)}" if len(groups) > 1 else ""))
            train_pass(group, runs.data, runs.identity, order, runs.device, runs.total, argv)
    return [(m.run, m.status) for m in runs.members]


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
    return pack, Step(pack, data, [m.config for m in members], [m.state.rho0 for m in members], device, momentum)


def train_pass(members, data, identity, order, device, total, argv):
    """Train `members`, all at one step, together to step `total`, each in its run directory (locked by
    the caller). A second stop signal or a failed write (a full disk) marks the runs interrupted."""
    config = members[0].config
    pack, step = pack_members(members, data, device)
    eval_steps = evaluation_steps(config.origin, total, order.steps_per_epoch, config.eval_every)
    keep = {s: i % (config.keep or 1) == 0 or s == total for i, s in enumerate(eval_steps)}
    try:
        for m in members:
            m.run.remove_temporaries()  # a killed writer's; the run's lock is ours
            if m.checkpoint is not None:
                m.run.truncate_metrics(m.state.iter)
                m.run.remove_checkpoints_after(m.state.iter)
                m.run.set_status("running")
            else:  # config.json first: from now on the directory is this run's, resumed or restarted
                m.run.write_config(m.record(data, identity, order, argv))
                m.run.discard_metrics()
        first_rows(pack, step, data, order, members)
        run_pass(pack, step, data, order, members, total, eval_steps, keep)
    except (KeyboardInterrupt, StopNow, CannotWrite) as e:  # KeyboardInterrupt: Ctrl-C outside the loop
        raise stopped(members, e) from e


def stopped(members, error):
    """The exception that ends a pass stopped at once, by a stop signal that cannot wait for the step's
    end (StopNow, or Ctrl-C outside the loop) or a failed write, after marking its running members
    interrupted where the disk lets us: each resumes from its last checkpoint."""
    marked = True
    for m in members:
        if m.status == "running":
            try:
                m.run.set_status("interrupted")
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


def first_rows(pack, step, data, order, members):
    """A new run's first metrics row and checkpoint: a fine-tune's parent's row at its start step (the
    same weights; its cos_prev and proj_err look back to the parent's previous evaluation point), or
    measured now when there is none."""
    measure = []
    for k, m in enumerate(members):
        if m.checkpoint is not None:
            continue
        if m.start and m.start.row:
            m.run.append_metrics(m.start.row)
            save(m, pack, step, k, at_eval_point=True)
        else:
            measure.append(k)
    if measure:
        record(pack, step, data, order, members, measure, keep=True)
        freeze_diverged(step, members)


def run_pass(pack, step, data, order, members, total, eval_steps, keep):
    """The loop of a pass, from the members' step to `total`: steps without host syncs, evaluation
    points, divergence, Ctrl-C. Leaves the members' RunStates at the step reached."""
    it = members[0].state.iter
    pending = [s for s in eval_steps if s > it]
    label = f"{len(members)} runs" if len(members) > 1 else "train"
    with StopRequest() as stop, StepProgress(total, start=it, label=label) as bar:
        tick, since = time.perf_counter(), 0
        while it < total and any(m.status == "running" for m in members):
            step.take(it, order.indices(it))  # no host sync, no copy from the host (but a permutation an epoch)
            it, since = it + 1, since + 1
            at_eval = pending and it == pending[0]
            if bar.due() or at_eval:  # the only host syncs: a few per second, and evaluation points
                alive, losses = step.alive.tolist(), step.loss.tolist()
                for m, ok in zip(members, alive):
                    if m.status == "running" and not ok:
                        m.state.iter = it
                        m.status = diverged(m.run, it)
                running = [k for k, m in enumerate(members) if m.status == "running"]
                if running:
                    best = min(running, key=lambda k: losses[k])
                    bar.update(it, losses[best], members[best].config.elr_at(it - 1))
            if at_eval:
                pending.pop(0)
                catch_up(members, step, it, since, tick)
                since = 0
                running = [k for k, m in enumerate(members) if m.status == "running"]
                seeds_vary = len({m.config.seed for m in members}) > 1
                for m, row in record(pack, step, data, order, members, running, keep=keep[it]):
                    label = "" if len(members) == 1 else f"elr {row['elr']:<9.3g} " + (
                        f"seed {m.config.seed:<3d} " if seeds_vary else "")
                    bar.log(label + format_row(row))
                freeze_diverged(step, members)
                tick = time.perf_counter()
            if stop.requested:
                catch_up(members, step, it, since, tick)
                interrupt(pack, step, members, it, stop.signum)
    catch_up(members, step, it, since, tick)
    for m in members:
        if m.status == "running":
            m.run.set_status("done")
            m.status = "done"


def catch_up(members, step, it, steps, tick):
    """Bring the running members' RunStates to step `it`: `steps` more steps, the pass's projection
    errors since they last were (moved out of the step's accumulator) and the time since `tick`."""
    now = time.perf_counter()
    for k, m in enumerate(members):
        if m.status == "running":
            m.state.iter = it
            m.state.proj_err_sum = m.state.proj_err_sum + step.proj_err_sum[k]
            m.state.proj_err_steps += steps
            m.state.wall_s += now - tick
    step.proj_err_sum.zero_()


def interrupt(pack, step, members, it, signum):
    """A stop signal: save every running member where it is, mark it interrupted, and stop."""
    for k, m in enumerate(members):
        if m.status == "running":
            save(m, pack, step, k, at_eval_point=False)
            m.run.set_status("interrupted")
    if len(members) == 1:
        where = f"checkpoint saved in {members[0].run}"
    else:
        where = f"checkpoints saved in the runs in {os.path.dirname(str(members[0].run)) or '.'}/"
    raise Interrupted(f"interrupted{by_signal(signum)} at step {it}: {where}; run the same command to resume",
                      signum)


def freeze_diverged(step, members):
    """Stop moving the members found diverged at an evaluation point (a non-finite row)."""
    for k, m in enumerate(members):
        if m.status == "diverged":
            step.alive[k] = False


def diverged(run, it):
    run.set_status("diverged")
    message(f"warning: {run} diverged (non-finite loss or norm) before step {it}; "
            f"status diverged, metrics so far kept")
    return "diverged"


def latest_elr(config, it):
    """The ELR of the step that led to step `it`; at the run's start, its parent's (a fine-tune) or its own."""
    if it > config.origin:
        return config.elr_at(it - 1)
    return config.elr if config.elr_from is None else config.elr_from


# --- evaluation points ----------------------------------------------------------------------------
def save(member, pack, step, k, at_eval_point):
    """Member k's checkpoint: its slice of the pack's state, as its single model's, and its RunState."""
    model_state = {name: t.detach().clone() for name, t in pack.member_state_dict(k).items()}
    if step.momentum is not None:
        member.state.momentum = [b[k].clone() for b in step.momentum]
    checkpoint = member.state.checkpoint(model_state, latest_elr(member.config, member.state.iter))
    member.run.save_checkpoint(checkpoint, at_eval_point=at_eval_point)


def record(pack, step, data, order, members, which, keep):
    """Evaluate every model of the pack in one pass over the data; for the members `which` (indices),
    write the metrics row and checkpoint, or mark the member diverged when its row is not finite.
    Returns the (member, row) pairs written.

    GM and the cosines are over the trainable tensors; si_norm over the scale-invariant ones (off the
    sphere some of the trainable ones, found from the structure). Train metrics in BN train mode, test
    metrics in eval mode (sphrun.metrics)."""
    start = time.perf_counter()
    config = members[0].config
    with mixed_precision(config.precision, step.device):
        train_loss, train_err, gm = train_metrics(pack, pack.params, data.train_x, data.train_y, config.loss,
                                                  config.batch_size, order.permutation(0))
        test_loss, test_err = eval_metrics(pack, data.test_x, data.test_y, config.loss)
    norms = global_norm(pack.si_params, members=pack.form).tolist()
    rows = []
    for k in which:
        m = members[k]
        measured = {"train_loss": train_loss[k], "train_err": train_err[k], "test_loss": test_loss[k],
                    "test_err": test_err[k], "gm": gm[k], "si_norm": norms[k]}
        row = metrics_row(m.state, member_params(pack.params, k), latest_elr(m.config, m.state.iter),
                          order.steps_per_epoch, measured, start)
        if not is_finite_row(row):
            m.status = diverged(m.run, m.state.iter)
            continue
        m.run.append_metrics(row)
        save(m, pack, step, k, at_eval_point=keep)
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
