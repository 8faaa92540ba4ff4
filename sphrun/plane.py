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
and its metrics measured exactly as on the segment: sphrun.connect measures the plane's points, this
module is its geometry.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from sphrun import SphrunError

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


class Grid(Sequence):
    """The points (u, v) of an even grid over the axes `us` and `vs`, v varying slowest (as plane.csv lists
    them), each made when asked for: a --grid of 10,000 per axis is 10^8 points, too many to hold."""

    def __init__(self, us, vs):
        self.us, self.vs = us, vs

    def __len__(self):
        return len(self.us) * len(self.vs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        row, column = divmod(index % len(self), len(self.us))
        return self.us[column], self.vs[row]

    def corners(self):
        return [(u, v) for v in (self.vs[0], self.vs[-1]) for u in (self.us[0], self.us[-1])]


def grid(plane, points, margin):
    """The Grid of `points` even steps per axis over the triangle's bounding box widened on each side by
    `margin` times its extent along that axis."""
    us, vs = (0.0, plane.b, plane.c[0]), (0.0, 0.0, plane.c[1])
    axes = []
    for values in (us, vs):
        low, high = min(values), max(values)
        pad = margin * (high - low)
        axes.append([low - pad + (high - low + 2 * pad) * i / (points - 1) for i in range(points)])
    return Grid(*axes)
