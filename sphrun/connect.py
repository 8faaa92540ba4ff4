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
"""

import json
import math
import os
from typing import NamedTuple

import torch

from sphrun import SphrunError, __version__
from sphrun.checkpoint import Checkpoint
from sphrun.metrics import eval_metrics, full_batches, tf32, train_metrics
from sphrun.models import NORMALIZATIONS, ConvNet, build_model
from sphrun.packed import pack_models
from sphrun.plane import grid, span_plane
from sphrun.progress import StepProgress, message
from sphrun.rundir import RunDir, cannot_write, check_output_folder, format_value, write_text
from sphrun.sphere import global_norm, project_

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
    from sphrun.lifecycle import read_settings

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


def point_metrics(model, params, data, loss, batch_size, permutation, bn_batches):
    """(train loss, train error, test loss, test error, GM) at the model's weights: its BatchNorm statistics
    recomputed over the batches `bn_batches`, train metrics over the full batches of `permutation` in BN
    train mode, test metrics in eval mode. Lists of K values for a pack of K points."""
    recompute_bn_statistics(model, data.train_x, bn_batches)
    train_loss, train_err, gm = train_metrics(model, params, data.train_x, data.train_y, loss, batch_size,
                                              permutation)
    test_loss, test_err = eval_metrics(model, data.test_x, data.test_y, loss)
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
    from sphrun.lifecycle import data_difference

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
    from sphrun.lifecycle import data_identity

    return {"batch_size": config.batch_size, "data_source": data.source, "other_data": other_data,
            "data": data_identity(data) if other_data else a.stored.get("data"),
            "train_size": a.stored["train_size"],  # for the figure's title, as the runs' figures give it
            "versions": {"sphrun": __version__, "torch": torch.__version__}, "argv": list(argv)}


def write_output(out, table, columns, rows, record):
    """OUT/<table> (the rows' columns) and OUT/config.json, each written whole."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise cannot_write(out, e) from e
    lines = [",".join(columns)] + [",".join(format_value(r[k]) for k in columns) for r in rows]
    write_text(os.path.join(out, table), "\n".join(lines) + "\n")
    write_text(os.path.join(out, "config.json"), json.dumps(record, indent=2) + "\n")


def connect(path_a, path_b, from_a="last", from_b="last", points=21, bn_batches=None, project=None,
            out=None, device="auto", data_dir=None, argv=(), allow_tf32=False, other_data=False):
    """Metrics along the segment from A to B; writes OUT/connect.csv, OUT/config.json and the figure.
    Returns the output directory. `project` None: rescale the points for runs on the sphere, not for runs
    trained off it. `allow_tf32`: TF32 on CUDA. `other_data`: go on on data other than A's, or with a B
    trained on other data than A (recorded)."""
    from sphrun.lifecycle import restore

    if points < 2:
        raise SphrunError(f"--points must be at least 2 (the two ends), got {points}")
    (a, b), project = open_ends([path_a, path_b], [from_a, from_b], bn_batches, project, other_data)
    options = [f"p{points}"] * (points != 21) + option_parts(bn_batches, project, allow_tf32)
    out = out or default_out([a, b], options)
    check_output_folder(out)  # before any work: never over a run's files

    run, config, data, model, params, order, _ = restore(path_a, from_a, device, data_dir, other_data)
    names = {id(p): n for n, p in model.named_parameters()}
    theta_a = [p.detach().clone() for p in params]
    theta_b = [b.checkpoint.model[names[id(p)]].to(p.device, p.dtype) for p in params]
    rho_a, rho_b = global_norm(theta_a).item(), global_norm(theta_b).item()
    permutation = order.permutation(0)  # the batches of train metrics (metrics.train_metrics)
    batches = full_batches(permutation, config.batch_size)
    bn_batches_used = bn_batches or len(batches)

    alphas = [i / (points - 1) for i in range(points)]
    rows = []
    message(f"connecting {a.run} at step {a.iter} to {b.run} at step {b.iter}: {points} points")
    with StepProgress(points, label="connect") as bar, tf32(allow_tf32):
        for i, alpha in enumerate(alphas):
            move_to_(params, theta_a, theta_b, alpha, (1 - alpha) * rho_a + alpha * rho_b if project else None)
            values = point_metrics(model, params, data, config.loss, config.batch_size, permutation,
                                   batches[:bn_batches_used])
            rows.append({"alpha": alpha, **dict(zip(POINT_COLUMNS, values))})
            bar.update(i + 1)
            bar.log(f"alpha {alpha:.3f}  " + point_text(rows[-1]))

    record = {"command": "connect", "a": end_record(a, rho_a), "b": end_record(b, rho_b),
              "points": points, "project": project, "bn_batches": bn_batches_used, "tf32": allow_tf32,
              "barrier": {"train_loss": barrier(alphas, [r["train_loss"] for r in rows]),
                          "test_err": barrier(alphas, [r["test_err"] for r in rows])},
              **data_record(a, config, data, other_data, argv)}
    write_output(out, "connect.csv", CONNECT_COLUMNS, rows, record)
    write_figure(out)
    message(f"{out}: barrier {record['barrier']['train_loss']:.4g} in train loss, "
            f"{record['barrier']['test_err']:.4g} in test error")
    return out


def point_text(row):
    return (f"train loss {row['train_loss']:.4g}  train err {row['train_err']:.3f}  test loss {row['test_loss']:.4g}  "
            f"test err {row['test_err']:.3f}  gm {row['gm']:.4g}")


def write_figure(out):
    from sphrun.plot import connect_figure

    connect_figure([out], os.path.join(out, "connect.png"))


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
                  progress=lambda done, row: None):
    """Rows of plane.csv at the points `coordinates`, `per_pass` of them packed at once (a pack of one
    otherwise). `radii` None: points are not rescaled. progress(points done, row) follows each point."""
    rows = []
    for start in range(0, len(coordinates), per_pass):
        chunk = coordinates[start:start + per_pass]
        pack = pack_models([model] * len(chunk), config.sphere, data.train_x.device)
        place(pack, plane.points(chunk, pack.params[0].dtype), None if radii is None else radii[start:start + per_pass])
        values = point_metrics(pack, pack.params, data, config.loss, config.batch_size, permutation, bn_batches)
        for k, (u, v) in enumerate(chunk):
            rows.append({"u": u, "v": v, **{c: column[k] for c, column in zip(POINT_COLUMNS, values)}})
            progress(len(rows), rows[-1])
    return rows


def connect_plane(paths, whiches, points=21, margin=0.2, bn_batches=None, project=None, out=None, device="auto",
                  data_dir=None, argv=(), allow_tf32=False, other_data=False):
    """Metrics on a grid over the plane through A, B and C; writes OUT/plane.csv, OUT/config.json and the
    figure, and returns OUT. The options are connect's; `points` per axis, `margin` past the triangle."""
    from sphrun.lifecycle import restore

    if points < 2:
        raise SphrunError(f"--grid must be at least 2 (points per axis), got {points}")
    if not (math.isfinite(margin) and margin >= 0):
        raise SphrunError(f"--margin must be 0 or more (a fraction of the triangle's extent), got {margin}")
    ends, project = open_ends(paths, whiches, bn_batches, project, other_data)
    names = parameter_names(ends[0], trainable=True)
    plane = span_plane(*(flat_weights(end, names) for end in ends))
    coordinates = grid(plane, points, margin)
    radii = [plane.radius(u, v) for u, v in coordinates] if project else None
    if radii and min(radii) <= 0:
        raise SphrunError(f"--margin {margin:g} reaches past where the interpolated radius is positive; give "
                          f"a smaller margin")
    options = [f"g{points}"] * (points != 21) + [f"m{margin:g}"] * (margin != 0.2)
    out = out or default_out(ends, options + option_parts(bn_batches, project, allow_tf32))
    check_output_folder(out, "plane.csv")  # before any work: never over a run's files

    run, config, data, model, params, order, _ = restore(paths[0], whiches[0], device, data_dir, other_data)
    plane = plane._replace(**{k: getattr(plane, k).to(params[0].device) for k in ("origin", "e_u", "e_v")})
    permutation = order.permutation(0)  # the batches of train metrics (metrics.train_metrics)
    batches = full_batches(permutation, config.batch_size)
    bn_used = bn_batches or len(batches)
    per_pass = points_per_pass(model, config.sphere, params[0].device)
    message(f"the plane through {', '.join(f'{e.run} at step {e.iter}' for e in ends)}: {points} x {points} "
            f"points, {min(per_pass, len(coordinates))} per pass")
    with StepProgress(len(coordinates), label="plane") as bar, tf32(allow_tf32):
        def progress(done, row):
            bar.update(done)
            bar.log(f"u {row['u']:.4g}  v {row['v']:.4g}  " + point_text(row))

        rows = measure_plane(model, config, data, permutation, batches[:bn_used], plane, coordinates, radii,
                             per_pass, progress)

    lengths = {"ab": plane.b, "ac": math.hypot(*plane.c)}
    record = {"command": "connect", "kind": "plane",
              **{key: end_record(end, rho) for key, end, rho in zip("abc", ends, plane.radii)},
              "basis": {"b": [plane.b, 0.0], "c": list(plane.c), "lengths": lengths, "cos_a": plane.cos_a,
                        "e_u": "(B - A) / |B - A|", "e_v": "C - A less its part along e_u, normalized"},
              "grid": points, "margin": margin, "project": project,
              "radius": "barycentric over the triangle of the ends' radii" if project else None,
              "bn_batches": bn_used, "tf32": allow_tf32, **data_record(ends[0], config, data, other_data, argv)}
    write_output(out, "plane.csv", PLANE_COLUMNS, rows, record)
    write_plane_figure(out)
    message(f"{out}: the plane through A, B and C (cosine of the angle at A {plane.cos_a:.3f}), train loss "
            f"{min(r['train_loss'] for r in rows):.4g} to {max(r['train_loss'] for r in rows):.4g}")
    return out


def write_plane_figure(out):
    from sphrun.plot import plane_figure

    plane_figure(out, os.path.join(out, "plane.png"))
