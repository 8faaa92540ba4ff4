"""Linear mode connectivity (docs/science.md, Linear mode connectivity; figures 3, 5, 6): metrics along the segment between two
checkpoints of runs in one function space.

At each alpha of an even grid in [0, 1], theta(alpha) = (1 - alpha) theta_A + alpha theta_B (alpha = 0
is A) is rescaled to the radius (1 - alpha) rho_A + alpha rho_B, the runs' common radius when they share
an init: a fully SI net computes the same function at any radius, but its gradients, hence GM, scale
with 1 / radius. Then the BatchNorm running statistics are recomputed on the train set, since those of
either end do not fit the point between, and the metrics are taken: train ones in BN train mode (batch
statistics, as metrics.csv), test ones in eval mode with the recomputed statistics. Train batches are the
full batches of the epoch-0 permutation, as metrics.csv's; on CUDA everything runs in full float32 (no
TF32) unless asked.

With three checkpoints, the points of a grid over the plane through them (geometry: sphrun.plane) are
measured the same way (point_metrics), after the same checks of the ends (open_ends). On CUDA the ConvNet
on the sphere measures POINTS_PER_PASS of them at once, as the members of one packed network
(sphrun.packed: they share one function space); other models take one point at a time.

A measurement is long (a plane at --grid 11 took 35 min on a CPU), so each pass's points are kept as it
ends (Unfinished); a stop signal gives up the pass under way at its next batch, and the same command
resumes. The table, config.json and figure are written together once every point is measured
(write_output): an output folder changes as a whole or not at all. One process writes a folder at a time.
"""

import contextlib
import hashlib
import json
import math
import os
import signal
import tempfile
import time
from typing import NamedTuple

import torch

from sphrun import SphrunError, __version__
from sphrun.checkpoint import Checkpoint
from sphrun.files import (CannotWrite, append_line, cannot_write, format_value, held_lock, remove_files,
                          remove_temporaries, write_text, written_together)
from sphrun.lifecycle import data_difference, data_identity, read_settings, restore
from sphrun.metrics import eval_metrics, full_batches, tf32, train_metrics
from sphrun.models import NORMALIZATIONS, ConvNet, build_model
from sphrun.packed import pack_models
from sphrun.plane import grid, span_plane
from sphrun.plot import connect_figure, plane_figure
from sphrun.progress import StepProgress, duration, message
from sphrun.rundir import RunDir, check_output_folder
from sphrun.sphere import global_norm, project_
from sphrun.stopping import Interrupted, StopNow, StopRequest, by_signal, stopping_at_once

CONNECT_COLUMNS = ("alpha", "train_loss", "train_err", "test_loss", "test_err", "gm")
POINT_COLUMNS = CONNECT_COLUMNS[1:]  # what point_metrics measures, in its order
PLANE_COLUMNS = ("u", "v", *POINT_COLUMNS)
# Grid points packed together, by device type. CUDA: 16, a few GB of activations at width 32, batch 128.
# CPU: a pack runs its members one after the other, yet 4 at once took 1.2x less time per point than one at
# a time (benchmarks/plane_points.py, width 32, 2 cores, two runs), with 4x the activations of one point.
POINTS_PER_PASS = {"cuda": 16, "cpu": 4}
# Settings that fix the function space: runs differing in any of them cannot be interpolated.
FUNCTION_SPACE = ("model", "sphere", "width", "dataset", "subset", "loss")


def parse_which(text, option):
    """'last' -> 'last', '1200' -> 1200."""
    if text == "last":
        return "last"
    if not text.isdigit():
        raise SphrunError(f"{option} must be last or a step with a checkpoint, got {text!r}")
    return int(text)


class End(NamedTuple):
    """One end of the segment: a run and one of its checkpoints."""
    run: RunDir
    stored: dict  # config.json
    config: object  # its settings, a TrainConfig
    checkpoint: Checkpoint

    @property
    def iter(self):
        return self.checkpoint.iter


def load_end(path, which):
    run = RunDir(path)
    stored, config = read_settings(run)
    return End(run, stored, config, run.load_checkpoint(which))


def parameter_names(end, trainable=False):
    """Names of the frozen (or, `trainable`, the trained) parameters of a run's network, read from its
    structure, in the network's parameter order."""
    c = end.config
    model = build_model(c.model, c.width, end.stored["num_classes"], c.init_scale, c.seed, c.head_seed,
                        sphere=c.sphere)
    return [name for name, p in model.named_parameters() if p.requires_grad == trainable]


def incompatibility(a, b):
    """Why the runs of ends a and b are not in one function space, or None."""
    for key in FUNCTION_SPACE:
        if getattr(a.config, key) != getattr(b.config, key):
            return f"another {key} ({getattr(a.config, key)!r} in {a.run}, {getattr(b.config, key)!r} in {b.run})"
    for key in ("num_classes", "train_size"):
        if a.stored.get(key) != b.stored.get(key):
            return f"another data set ({key} {a.stored.get(key)} in {a.run}, {b.stored.get(key)} in {b.run})"
    kind = lambda end: str(end.stored.get("data_source", "")).split(":")[0]
    if kind(a) != kind(b):
        return f"another data source ({kind(a)} in {a.run}, {kind(b)} in {b.run})"
    for name in parameter_names(a):
        ta, tb = a.checkpoint.model.get(name), b.checkpoint.model.get(name)
        if ta is None or tb is None or ta.shape != tb.shape or not torch.equal(ta, tb):
            return (f"a different frozen layer ({name} differs; "
                    f"train both with the same --head-seed and --init-scale)")
    return None


@torch.no_grad()
def recompute_bn_statistics(model, x, batches):
    """BatchNorm running statistics as the plain average over `batches` of the batch statistics: reset,
    then the i-th batch (from 0) weighted 1 / (i + 1), set from Python. (momentum=None would give the
    same average, but reads the batch count back from the device at every BatchNorm of every batch.)"""
    norms = [m for m in model.modules() if isinstance(m, NORMALIZATIONS)]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
    model.train()
    for i, idx in enumerate(batches):
        for m in norms:
            m.momentum = 1 / (i + 1)
        model(x[idx])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


def point_metrics(model, params, data, loss, batch_size, permutation, bn_batches, check=None):
    """(train loss, train error, test loss, test error, GM) at the model's weights: its BatchNorm statistics
    recomputed over the batches `bn_batches`, train metrics over the full batches of `permutation` in BN
    train mode, test metrics in eval mode. Lists of K values for a pack of K points. `check`, when given,
    is called before each forward pass: a stop signal gives the point up within a batch."""
    hook = model.register_forward_pre_hook(lambda module, args: check()) if check else None
    try:
        recompute_bn_statistics(model, data.train_x, bn_batches)
        train_loss, train_err, gm = train_metrics(model, params, data.train_x, data.train_y, loss, batch_size,
                                                  permutation)
        test_loss, test_err = eval_metrics(model, data.test_x, data.test_y, loss)
    finally:
        if hook:
            hook.remove()
    return train_loss, train_err, test_loss, test_err, gm


@torch.no_grad()
def move_to_(params, theta_a, theta_b, alpha, radius):
    """params <- lerp(theta_a, theta_b, alpha), rescaled to `radius` unless it is None.
    torch.lerp is exact at both ends, so alpha = 0 and 1 give the runs' own weights."""
    for p, a, b in zip(params, theta_a, theta_b):
        torch.lerp(a, b, alpha, out=p)
    if radius is not None:
        project_(params, radius)


def barrier(alphas, values):
    """The largest rise of an interior point above the straight line between the end values (0 if none)."""
    line = lambda a: (1 - a) * values[0] + a * values[-1]
    return max([0.0] + [v - line(a) for a, v in zip(alphas[1:-1], values[1:-1])])


def open_ends(paths, whiches, bn_batches, project, other_data):
    """The ends (End) at paths[i], checkpoint whiches[i], checked before any work: one function space,
    trained on one data set (unless `other_data`), and --bn-batches within A's train batches. Returns them
    and whether points are rescaled: `project` None rescales for runs on the sphere, not for runs trained
    off it (there a rescaled point computes another function)."""
    if bn_batches is not None and bn_batches < 1:
        raise SphrunError(f"--bn-batches must be at least 1, got {bn_batches}")
    ends = [load_end(path, which) for path, which in zip(paths, whiches)]
    a = ends[0]
    for other in ends[1:]:
        reason = incompatibility(a, other)
        if reason:
            raise SphrunError(f"cannot connect {a.run} and {other.run}: they are not one function space: {reason}")
    if project and not a.config.sphere:
        raise SphrunError(f"--project rescales points to the sphere, but {a.run} was trained off it "
                          f"(--no-sphere), where that changes the function; drop --project")
    for other in ends[1:]:
        between = data_difference(a.stored.get("data"), other.stored.get("data"))
        if between and not other_data:
            raise SphrunError(f"cannot connect {a.run} and {other.run}: they were trained on other data "
                              f"({between}); pass --other-data to measure {'both' if len(ends) == 2 else 'all'} "
                              f"on A's")
    num_batches = a.stored["train_size"] // a.config.batch_size  # full batches, as train_metrics cuts them
    if bn_batches is not None and bn_batches > num_batches:
        raise SphrunError(f"--bn-batches {bn_batches} is more than the {num_batches} train batches of {a.run}")
    for other in ends[1:]:
        if (a.config.batch_size, a.config.data_seed) != (other.config.batch_size, other.config.data_seed):
            message(f"note: the runs differ in batch size or batch order; train metrics use those of {a.run}, "
                    f"so {other.run}'s end may differ from its own metrics")
    return ends, a.config.sphere if project is None else project


def default_out(ends, options):
    """connect/<A>@<step>--<B>@<step>[--<C>@<step>] and the options that differ from their defaults."""
    name = lambda end: os.path.basename(os.path.normpath(end.run.path))
    return os.path.join("connect", "-".join(["--".join(f"{name(e)}@{e.iter}" for e in ends), *options]))


def option_parts(bn_batches, project, allow_tf32):
    """The parts of an output's default name that the segment and the plane share."""
    return [f"bn{bn_batches}"] * (bn_batches is not None) + ["noproj"] * (not project) + ["tf32"] * allow_tf32


def end_record(end, radius):
    return {"run": end.run.path, "iter": end.iter, "elr": end.checkpoint.elr, "radius": radius,
            "settings": end.stored["settings"]}


def data_record(a, config, data, other_data, argv):
    """What an output's config.json says of the data measured on, the versions and the command line."""
    return {"batch_size": config.batch_size, "data_source": data.source, "other_data": other_data,
            "data": data_identity(data) if other_data else a.stored.get("data"),
            "train_size": a.stored["train_size"],  # for the figure's title, as the runs' figures give it
            "versions": {"sphrun": __version__, "torch": torch.__version__}, "argv": list(argv)}


# --- an output folder: one writer, its points kept as they come, its files changed as a whole ----------
class Unfinished:
    """OUT/unfinished.jsonl: the points of an output being measured, kept as each pass ends, so that the
    same command resumes after a stop. Its first line says what is measured (`identity`: the kind, the ends'
    steps and weights, the options, the data), each further line is one point's row, its floats in full so
    that the finished table equals an uninterrupted run's. Nothing reads it as an output; it goes once the
    output is written. The caller holds OUT's lock."""

    def __init__(self, out, identity):
        self.path = os.path.join(out, UNFINISHED)
        self.identity = identity
        self.kept = 0

    def resume(self, coordinate, names):
        """The rows kept, after checking that they are this measurement's and that row i is at the point
        coordinate(i) (its `names` columns); [] after starting the file when there is none."""
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        except (OSError, UnicodeDecodeError) as e:
            raise SphrunError(f"{self.path} is unreadable ({e}); {self.start_over}")
        whole = text[:text.rindex("\n") + 1] if "\n" in text else ""  # a last line cut by a kill goes
        lines = whole.splitlines()
        if not lines:
            write_text(self.path, json.dumps({"measuring": self.identity}) + "\n")
            return []
        try:
            theirs = json.loads(lines[0])["measuring"]
        except (ValueError, KeyError, TypeError):
            raise SphrunError(f"{self.path} is damaged (not sphrun's points); {self.start_over}")
        if theirs != self.identity:
            raise SphrunError(f"{os.path.dirname(self.path)} holds the unfinished points of another measurement "
                              f"({differences(theirs, self.identity)}): repeat its command to finish it, or "
                              f"{self.start_over}")
        for number, line in enumerate(lines[1:], 2):
            try:
                row = json.loads(line)
                at_its_point = tuple(row[k] for k in names) == tuple(coordinate(number - 2))
            except (ValueError, KeyError, TypeError):
                at_its_point = False
            if not at_its_point:
                raise SphrunError(f"{self.path} is damaged at line {number} (not the row of point {number - 1}); "
                                  f"{self.start_over}")
        if len(whole) < len(text):
            write_text(self.path, whole)
        self.kept = len(lines) - 1
        return [json.loads(line) for line in lines[1:]]

    @property
    def start_over(self):
        return f"delete {self.path} to measure every point anew"

    def add(self, rows):
        append_line(self.path, "".join(json.dumps(row) + "\n" for row in rows))
        self.kept += len(rows)

    def remove(self):
        remove_files([self.path])

    @property
    def measured(self):
        return "no point measured yet" if not self.kept else f"the {self.kept:,} point{'s' * (self.kept > 1)} measured"

    @contextlib.contextmanager
    def saying_what_is_kept(self, total):
        """A stop signal (StopNow: the first gives up the pass under way, a second stops at once) becomes
        Interrupted, and a write that fails (CannotWrite) says that OUT keeps its earlier files; both name
        where the points measured are kept."""
        out = os.path.dirname(self.path)
        try:
            yield
        except StopNow as e:
            at = f"at point {self.kept + 1:,} of {total:,}" if self.kept < total else "while writing the output"
            raise Interrupted(f"interrupted{by_signal(e.signum)} {at}: {self.measured} kept in {self.path}; run "
                              f"the same command to resume", e.signum) from e
        except CannotWrite as e:
            raise CannotWrite(f"{e}: {out} keeps its earlier files, and {self.measured} stay in {self.path}; free "
                              f"some space, then run the same command to go on") from e


UNFINISHED = "unfinished.jsonl"


def differences(theirs, ours):
    """How two measurements' identities differ, in words."""
    if theirs.get("kind") != ours.get("kind"):
        return f"a {theirs.get('kind')} there, a {ours.get('kind')} here"
    parts = []
    for key in dict.fromkeys([*theirs, *ours]):
        if theirs.get(key) != ours.get(key):
            parts.append("other ends: their steps or weights differ" if key == "ends" else
                         f"{key} {theirs.get(key)} there, {ours.get(key)} here")
    return ", ".join(parts)


def ends_identity(ends):
    """The ends of a measurement: each one's step and a digest of its checkpoint's weights."""
    return [{"iter": end.iter, "weights": weights_digest(end.checkpoint.model)} for end in ends]


def weights_digest(state):
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(record):
    return (record.get("data") or {}).get("fingerprint")


def output_lock(out):
    """OUT's lock: one writer per output folder; a second connect there is refused in one line."""
    return held_lock(os.path.join(out, ".lock"), refusal=lambda holder: f"{out} is being written by {holder}; wait "
                     f"for it or give this connect another --out")


def measure_all(unfinished, rows, total, per_pass, measure, label, where):
    """All `total` points' rows: the `rows` kept, then the rest, `per_pass` at a time: measure(start, stop,
    check) gives the rows of points start to stop - 1 (check, called before each forward pass, raises StopNow
    once a stop signal came, giving the pass up). Each pass's rows are kept as it ends. After the first pass,
    says how long the rest will take; each point's line says how far and how long."""
    with StopRequest() as stop, StepProgress(total, start=len(rows), label=label) as bar:
        first = True
        while len(rows) < total:
            stop.check()
            new = measure(len(rows), min(len(rows) + per_pass, total), stop.check)
            unfinished.add(new)
            rows += new
            if first and len(rows) < total:
                bar.log(f"{len(new)} point{'s' * (len(new) > 1)} took {duration(time.monotonic() - bar.started)}: "
                        f"{bar.time_left(len(rows))} for the other {total - len(rows):,} at that pace")
                first = False
            bar.update(len(rows))
            for k, row in enumerate(new, len(rows) - len(new) + 1):
                bar.log(f"{k:,}/{total:,}  {where(row)}  {point_text(row)}  ({bar.time_left(len(rows))})")
    return rows


def write_output(out, table, columns, rows, record, figure, draw):
    """OUT/<table> (the rows' columns), OUT/config.json and OUT/<figure>, which draw(folder, path) draws from
    the two, as one change (written_together): all three new or, when a write fails, all three as they
    were. The figure is drawn from a scratch copy of the two, since OUT's change only with it."""
    lines = [",".join(columns)] + [",".join(format_value(r[k]) for k in columns) for r in rows]
    files = {table: "\n".join(lines) + "\n", "config.json": json.dumps(record, indent=2) + "\n"}
    with written_together():
        for name, text in files.items():
            write_text(os.path.join(out, name), text)
        with tempfile.TemporaryDirectory(prefix="sphrun-connect-") as scratch:
            for name, text in files.items():
                try:
                    with open(os.path.join(scratch, name), "w") as f:
                        f.write(text)
                except OSError as e:
                    raise cannot_write(os.path.join(scratch, name), e) from e
            draw(scratch, os.path.join(out, figure))


def write_whole(out, *output):
    """write_output once every point is measured: a first stop signal now lets it finish, the command
    then ending as done (exit 0, as train's last step), with a note; a second stops at once."""
    with StopRequest() as stop:
        write_output(out, *output)
    if stop.requested:
        message(f"note: {signal.Signals(stop.signum).name} came as the last point ended: the output is written")


def connect(path_a, path_b, from_a="last", from_b="last", points=21, bn_batches=None, project=None,
            out=None, device="auto", data_dir=None, argv=(), allow_tf32=False, other_data=False):
    """Metrics along the segment from A to B; writes OUT/connect.csv, OUT/config.json and the figure.
    Returns the output directory. `project` None: rescale the points for runs on the sphere, not for runs
    trained off it. `allow_tf32`: TF32 on CUDA. `other_data`: go on on data other than A's, or with a B
    trained on other data than A (recorded). Points are kept as they come (Unfinished): a stopped
    connect resumes with the same command."""
    if points < 2:
        raise SphrunError(f"--points must be at least 2 (the two ends), got {points}")
    (a, b), project = open_ends([path_a, path_b], [from_a, from_b], bn_batches, project, other_data)
    options = [f"p{points}"] * (points != 21) + option_parts(bn_batches, project, allow_tf32)
    out = out or default_out([a, b], options)
    check_output_folder(out)  # before any work: never over a run's files

    with stopping_at_once():
        run, config, data, model, params, order, _ = restore(path_a, from_a, device, data_dir, other_data)
        names = {id(p): n for n, p in model.named_parameters()}
        theta_a = [p.detach().clone() for p in params]
        theta_b = [b.checkpoint.model[names[id(p)]].to(p.device, p.dtype) for p in params]
        rho_a, rho_b = global_norm(theta_a).item(), global_norm(theta_b).item()
        permutation = order.permutation(0)  # the batches of train metrics (metrics.train_metrics)
        batches = full_batches(permutation, config.batch_size)
        bn_batches_used = bn_batches or len(batches)
        about_data = data_record(a, config, data, other_data, argv)
        alpha_at = lambda i: i / (points - 1)

        def measure(start, stop, check):
            rows = []
            for i in range(start, stop):
                alpha = alpha_at(i)
                move_to_(params, theta_a, theta_b, alpha, (1 - alpha) * rho_a + alpha * rho_b if project else None)
                values = point_metrics(model, params, data, config.loss, config.batch_size, permutation,
                                       batches[:bn_batches_used], check)
                rows.append({"alpha": alpha, **dict(zip(POINT_COLUMNS, values))})
            return rows

        identity = {"kind": "segment", "ends": ends_identity([a, b]), "points": points, "project": project,
                    "bn_batches": bn_batches_used, "tf32": allow_tf32, "data": data_fingerprint(about_data)}
        with output_lock(out):
            remove_temporaries(out, ("connect.csv", "config.json", "connect.png", UNFINISHED))
            unfinished = Unfinished(out, identity)
            rows = unfinished.resume(lambda i: (alpha_at(i),), ("alpha",))
            message(f"connecting {a.run} at step {a.iter} to {b.run} at step {b.iter}: {points:,} points"
                    + resumed(unfinished, points))
            with unfinished.saying_what_is_kept(points), tf32(allow_tf32):
                rows = measure_all(unfinished, rows, points, 1, measure, "connect", lambda r: f"alpha {r['alpha']:.3f}")
                alphas = [r["alpha"] for r in rows]
                record = {"command": "connect", "a": end_record(a, rho_a), "b": end_record(b, rho_b),
                          "points": points, "project": project, "bn_batches": bn_batches_used, "tf32": allow_tf32,
                          "barrier": {"train_loss": barrier(alphas, [r["train_loss"] for r in rows]),
                                      "test_err": barrier(alphas, [r["test_err"] for r in rows])},
                          **about_data}
                write_whole(out, "connect.csv", CONNECT_COLUMNS, rows, record, "connect.png", draw_segment)
                unfinished.remove()
    message(f"{out}: barrier {record['barrier']['train_loss']:.4g} in train loss, "
            f"{record['barrier']['test_err']:.4g} in test error")
    return out


def resumed(unfinished, total):
    """The end of the announcement of a measurement that resumes."""
    if not unfinished.kept:
        return ""
    if unfinished.kept == total:
        return f", every one kept in {unfinished.path}: writing the output"
    return f", resuming at point {unfinished.kept + 1:,} ({unfinished.kept:,} kept in {unfinished.path})"


def point_text(row):
    return (f"train loss {row['train_loss']:.4g}  train err {row['train_err']:.3f}  test loss {row['test_loss']:.4g}  "
            f"test err {row['test_err']:.3f}  gm {row['gm']:.4g}")


def draw_segment(folder, path):
    connect_figure([folder], path)


# --- the plane through three solutions (its geometry: sphrun.plane) -------------------------------------
def flat_weights(end, names):
    """An end's trained weights as one flat vector, in the network's parameter order."""
    return torch.cat([end.checkpoint.model[name].reshape(-1) for name in names])


def points_per_pass(model, sphere, device):
    """How many grid points one pass measures: a pack of them for the ConvNet on the sphere."""
    if not (sphere and isinstance(model, ConvNet)):
        return 1
    return POINTS_PER_PASS.get(device.type, 1)


@torch.no_grad()
def place(pack, weights, radii):
    """Set the pack's K members to the rows of `weights` (K, n), each rescaled to its radius unless
    `radii` is None."""
    sizes = [p[0].numel() for p in pack.params]
    for p, block in zip(pack.params, weights.split(sizes, dim=1)):
        p.copy_(block.view_as(p))
    if radii is not None:
        project_(pack.params, torch.tensor(radii, device=weights.device), members=pack.form)


def measure_plane(model, config, data, permutation, bn_batches, plane, coordinates, radii, per_pass,
                  progress=lambda done, row: None, check=None):
    """Rows of plane.csv at the points `coordinates`, `per_pass` of them packed at once (a pack of one
    otherwise). `radii` None: points are not rescaled. progress(points done, row) follows each point;
    check, when given, is called before each forward pass (and may raise to give the points up)."""
    rows = []
    for start in range(0, len(coordinates), per_pass):
        chunk = coordinates[start:start + per_pass]
        pack = pack_models([model] * len(chunk), config.sphere, data.train_x.device)
        place(pack, plane.points(chunk, pack.params[0].dtype), None if radii is None else radii[start:start + per_pass])
        values = point_metrics(pack, pack.params, data, config.loss, config.batch_size, permutation, bn_batches,
                               check)
        for k, (u, v) in enumerate(chunk):
            rows.append({"u": u, "v": v, **{c: column[k] for c, column in zip(POINT_COLUMNS, values)}})
            progress(len(rows), rows[-1])
    return rows


def connect_plane(paths, whiches, points=21, margin=0.2, bn_batches=None, project=None, out=None, device="auto",
                  data_dir=None, argv=(), allow_tf32=False, other_data=False):
    """Metrics on a grid over the plane through A, B and C; writes OUT/plane.csv, OUT/config.json and the
    figure, and returns OUT. The options are connect's; `points` per axis, `margin` past the triangle.
    Points are kept as they come (Unfinished): a stopped plane resumes with the same command."""
    if points < 2:
        raise SphrunError(f"--grid must be at least 2 (points per axis), got {points}")
    if not (math.isfinite(margin) and margin >= 0):
        raise SphrunError(f"--margin must be 0 or more (a fraction of the triangle's extent), got {margin}")
    ends, project = open_ends(paths, whiches, bn_batches, project, other_data)
    names = parameter_names(ends[0], trainable=True)
    plane = span_plane(*(flat_weights(end, names) for end in ends))
    coordinates = grid(plane, points, margin)
    if project and min(plane.radius(u, v) for u, v in coordinates.corners()) <= 0:  # affine: least at a corner
        raise SphrunError(f"--margin {margin:g} reaches past where the interpolated radius is positive; give "
                          f"a smaller margin")
    options = [f"g{points}"] * (points != 21) + [f"m{margin:g}"] * (margin != 0.2)
    out = out or default_out(ends, options + option_parts(bn_batches, project, allow_tf32))
    check_output_folder(out, "plane.csv")  # before any work: never over a run's files

    with stopping_at_once():
        run, config, data, model, params, order, _ = restore(paths[0], whiches[0], device, data_dir, other_data)
        plane = plane._replace(**{k: getattr(plane, k).to(params[0].device) for k in ("origin", "e_u", "e_v")})
        permutation = order.permutation(0)  # the batches of train metrics (metrics.train_metrics)
        batches = full_batches(permutation, config.batch_size)
        bn_used = bn_batches or len(batches)
        per_pass = points_per_pass(model, config.sphere, params[0].device)
        about_data = data_record(ends[0], config, data, other_data, argv)
        total = len(coordinates)

        def measure(start, stop, check):
            chunk = coordinates[start:stop]
            radii = [plane.radius(u, v) for u, v in chunk] if project else None
            return measure_plane(model, config, data, permutation, batches[:bn_used], plane, chunk, radii, per_pass,
                                 check=check)

        identity = {"kind": "plane", "ends": ends_identity(ends), "grid": points, "margin": margin,
                    "project": project, "bn_batches": bn_used, "tf32": allow_tf32, "data": data_fingerprint(about_data)}
        with output_lock(out):
            remove_temporaries(out, ("plane.csv", "config.json", "plane.png", UNFINISHED))
            unfinished = Unfinished(out, identity)
            rows = unfinished.resume(lambda i: coordinates[i], ("u", "v"))
            message(f"the plane through {', '.join(f'{e.run} at step {e.iter}' for e in ends)}: {points:,} x "
                    f"{points:,} = {total:,} points, {min(per_pass, total)} per pass" + resumed(unfinished, total))
            with unfinished.saying_what_is_kept(total), tf32(allow_tf32):
                rows = measure_all(unfinished, rows, total, per_pass, measure, "plane",
                                   lambda r: f"u {r['u']:.4g}  v {r['v']:.4g}")
                lengths = {"ab": plane.b, "ac": math.hypot(*plane.c)}
                record = {"command": "connect", "kind": "plane",
                          **{key: end_record(end, rho) for key, end, rho in zip("abc", ends, plane.radii)},
                          "basis": {"b": [plane.b, 0.0], "c": list(plane.c), "lengths": lengths,
                                    "cos_a": plane.cos_a, "e_u": "(B - A) / |B - A|",
                                    "e_v": "C - A less its part along e_u, normalized"},
                          "grid": points, "margin": margin, "project": project,
                          "radius": "barycentric over the triangle of the ends' radii" if project else None,
                          "bn_batches": bn_used, "tf32": allow_tf32, **about_data}
                write_whole(out, "plane.csv", PLANE_COLUMNS, rows, record, "plane.png", draw_plane)
                unfinished.remove()
    message(f"{out}: the plane through A, B and C (cosine of the angle at A {plane.cos_a:.3f}), train loss "
            f"{min(r['train_loss'] for r in rows):.4g} to {max(r['train_loss'] for r in rows):.4g}")
    return out


def draw_plane(folder, path):
    plane_figure(folder, path)
