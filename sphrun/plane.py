"""The loss surface on the plane through three solutions (Garipov et al. 2018, "Loss surfaces, mode
connectivity, and fast ensembling of DNNs", section 3): metrics on a grid over the plane through
checkpoints of three runs in one function space.

The plane's origin is theta_A and its orthonormal basis comes from Gram-Schmidt on B - A and C - A:
e_u = (B - A) / |B - A|, e_v the part of C - A orthogonal to e_u, normalized. The point (u, v) is
theta_A + u e_u + v e_v, u and v in the units of the weights' norm, so A is at (0, 0), B at (|B - A|, 0)
and C at (<C - A, e_u>, the length of the rest of C - A).

Each point is rescaled to the sphere at the radius interpolated over the triangle: lambda_A rho_A +
lambda_B rho_B + lambda_C rho_C, with (lambda_A, lambda_B, lambda_C) the point's barycentric coordinates
(continued linearly past the triangle), so each end keeps its radius and along each edge the radius
moves as on the segment between its ends (sphrun.connect). Then its BatchNorm statistics are recomputed
and its metrics measured exactly as on the segment (connect.point_metrics).

On CUDA the ConvNet on the sphere measures POINTS_PER_PASS grid points at once, as the members of one
packed network (sphrun.packed: they share one function space); other models, and the CPU, where a pack
runs model by model anyway, take one point at a time.
"""

import math
import os
from typing import NamedTuple

import torch

from sphrun import SphrunError
from sphrun.connect import (POINT_COLUMNS, data_record, default_out, end_record, open_ends, option_parts,
                            parameter_names, point_metrics, point_text, write_output)
from sphrun.metrics import full_batches, tf32
from sphrun.models import ConvNet
from sphrun.packed import pack_models
from sphrun.progress import StepProgress, message
from sphrun.rundir import check_output_folder
from sphrun.sphere import project_

PLANE_COLUMNS = ("u", "v", *POINT_COLUMNS)
POINTS_PER_PASS = 16  # grid points packed together on CUDA: a few GB of activations at width 32, batch 128
COLLINEAR = 1e-4  # sin of the angle at A under which the three ends span no plane (float32 round-off: 1e-7)


class Plane(NamedTuple):
    """The plane through three weight vectors: origin theta_A and basis e_u, e_v (flat, float64), where B
    and C lie, (b, 0) and (c_u, c_v), and the three radii."""
    origin: torch.Tensor
    e_u: torch.Tensor
    e_v: torch.Tensor
    b: float
    c: tuple
    radii: tuple

    @property
    def cos_a(self):
        """The cosine of the triangle's angle at A, between B - A and C - A."""
        return self.c[0] / math.hypot(*self.c)

    def barycentric(self, u, v):
        """(lambda_A, lambda_B, lambda_C) of the point (u, v): weights summing to 1 whose mix of A, B and C
        is the point."""
        c_u, c_v = self.c
        lambda_c = v / c_v
        lambda_b = (u - lambda_c * c_u) / self.b
        return 1 - lambda_b - lambda_c, lambda_b, lambda_c

    def radius(self, u, v):
        return sum(w * rho for w, rho in zip(self.barycentric(u, v), self.radii))

    def points(self, coordinates, dtype):
        """The weights at the points [(u, v)] as rows of a (K, n) tensor of `dtype`, on the basis' device."""
        u, v = (torch.tensor(c, dtype=torch.float64, device=self.origin.device) for c in zip(*coordinates))
        return (self.origin + u[:, None] * self.e_u + v[:, None] * self.e_v).to(dtype)


def span_plane(theta_a, theta_b, theta_c):
    """The Plane through three flat weight vectors (Gram-Schmidt in float64); refused when they are
    collinear (B - A parallel to C - A, or two of them the same)."""
    a, b, c = (t.double() for t in (theta_a, theta_b, theta_c))
    length_b = torch.linalg.vector_norm(b - a).item()
    if length_b == 0:
        raise SphrunError("cannot span a plane: B has A's weights (the same run and step twice?); give three "
                          "different solutions")
    e_u = (b - a) / length_b
    c_u = torch.dot(c - a, e_u).item()
    rest = c - a - c_u * e_u
    c_v = torch.linalg.vector_norm(rest).item()
    length_c = torch.linalg.vector_norm(c - a).item()
    if c_v <= COLLINEAR * length_c or length_c == 0:
        raise SphrunError("cannot span a plane: A, B and C are collinear (C - A is parallel to B - A, or C is "
                          "A or B); give three solutions off one line, or connect two of them")
    radii = tuple(torch.linalg.vector_norm(t).item() for t in (a, b, c))
    return Plane(a, e_u, rest / c_v, length_b, (c_u, c_v), radii)


def grid(plane, points, margin):
    """[(u, v)]: `points` even steps per axis over the triangle's bounding box widened on each side by
    `margin` times its extent along that axis; v varies slowest, as plane.csv lists them."""
    us, vs = (0.0, plane.b, plane.c[0]), (0.0, 0.0, plane.c[1])
    axes = []
    for values in (us, vs):
        low, high = min(values), max(values)
        pad = margin * (high - low)
        axes.append([low - pad + (high - low + 2 * pad) * i / (points - 1) for i in range(points)])
    return [(u, v) for v in axes[1] for u in axes[0]]


def flat_weights(end, names):
    """An end's trained weights as one flat vector, in the network's parameter order."""
    return torch.cat([end.checkpoint["model"][name].reshape(-1) for name in names])


def points_per_pass(model, sphere, device):
    """How many grid points one pass measures: a pack of them for the ConvNet on the sphere on CUDA."""
    return POINTS_PER_PASS if device.type == "cuda" and sphere and isinstance(model, ConvNet) else 1


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
    write_figure(out)
    message(f"{out}: the plane through A, B and C (cosine of the angle at A {plane.cos_a:.3f}), train loss "
            f"{min(r['train_loss'] for r in rows):.4g} to {max(r['train_loss'] for r in rows):.4g}")
    return out


def write_figure(out):
    from sphrun.plot import plane_figure

    plane_figure(out, os.path.join(out, "plane.png"))
