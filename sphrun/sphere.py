"""The step on the sphere, the one place where trainable weights move.

Conventions (docs/science.md, The step): theta is all scale-invariant tensors together, rho = ||theta|| is one global
norm, lr = elr * rho0^2, and after each step theta is back on the sphere of radius rho0.

A step is a direction and a way to move along it. Directions: sgd (-grad), ascent (+grad) and random
(a uniformly random direction tangent to the sphere with the gradient's norm: the random-walk control
of figure 15). Moves: projected (theta + lr * direction, then rescaled to rho, as the paper trains) or
geodesic (theta turned along the great circle by exactly the nominal angle: the sphere's exponential map).
"""

import math

import torch

from sphrun import noise

# Packed tensors (sphrun.packed) carry K models along their first dimension. Every function below takes
# `members`: False for one model's tensors; EACH for packed ones reduced model by model with the calls
# of a single run, so that each model's numbers are its single run's to the bit (the CPU form); BATCHED
# for packed ones reduced all K at once, a few ops whatever K (the grouped CUDA form, rounded its way).
EACH, BATCHED = "each", "batched"


def global_norm(tensors, members=False):
    """The L2 norm of all tensors taken together, as a 0-d device tensor (no host sync); for members,
    the K models' norms, shape (K,)."""
    if members == BATCHED:  # over all dimensions but the first: no copy, whatever the memory format
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())))
                                                     for t in tensors]), dim=0)
    if members:
        k = len(tensors[0])
        norms = torch._foreach_norm([t[i] for i in range(k) for t in tensors])
        return torch.linalg.vector_norm(torch.stack(norms).view(k, -1), dim=1)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


def dot(a, b, members=False):
    """<a, b> with each tensor list taken as one vector, a 0-d device tensor (K of them for members)."""
    if members == BATCHED:
        return torch.stack([p.sum(tuple(range(1, p.dim()))) for p in torch._foreach_mul(a, b)]).sum(0)
    if members:
        k = len(a[0])
        return torch.stack([torch.sum(x[i] * y[i]) for i in range(k) for x, y in zip(a, b)]).view(k, -1).sum(1)
    return torch.stack([torch.sum(x * y) for x, y in zip(a, b)]).sum()


def per_model(value, tensors):
    """`value` as a factor of each tensor: a number or 0-d tensor as it is; K per-model values (packed
    tensors) shaped to scale the K slices of each tensor (one view per number of dimensions)."""
    if torch.is_tensor(value) and value.dim() == 1:
        shaped = {d: value.view(-1, *[1] * (d - 1)) for d in {t.dim() for t in tensors}}
        return [shaped[t.dim()] for t in tensors]
    return value


def learning_rate(elr, rho):
    """The plain SGD learning rate that moves a net of radius rho like `elr` moves it on the unit sphere."""
    return elr * rho ** 2


def tangent_part(direction, params, members=False):
    """`direction` less its component along theta: the part that moves theta along the sphere."""
    radial = dot(direction, params, members) / dot(params, params, members)
    return torch._foreach_sub(direction, torch._foreach_mul(params, per_model(radial, params)))


def random_keys(seeds):
    """The base keys of the random-step streams of runs with these seeds (sphrun.noise): a (K, 2) int64
    tensor for a list of seeds, a pair of words for one."""
    if isinstance(seeds, int):
        return noise.key(seeds, noise.RANDOM_STEP)
    return torch.tensor([noise.key(s, noise.RANDOM_STEP) for s in seeds], dtype=torch.int64)


def random_noise(params, keys, step, members=False, elements=None):
    """The random step's standard normal tensors, shaped like params, at `step` (an int, or an int64
    device tensor inside the step) in the streams of `keys` (random_keys; K of them for members, model k
    drawing what its single run draws). `elements`: noise.element_keys for the draw, when kept."""
    shapes = [p.shape[1:] if members else p.shape for p in params]
    sizes = [math.prod(shape) for shape in shapes]
    if elements is None:
        elements = noise.element_keys(noise.pairs(sum(sizes)), params[0].device)
    drawn = noise.gaussian(elements, noise.key_at(keys, step), sum(sizes))
    lead = drawn.shape[:-1]
    return [z.view(*lead, *shape) for z, shape in zip(drawn.split(sizes, dim=-1), shapes)]


def random_direction(grads, params, seed=0, step=0, members=False, noise=None):
    """Uniform over the directions tangent to the sphere at theta, with the norm of `grads`, so the step
    is as long as the SGD step would be. (A Gaussian projected on the tangent space is isotropic there.)
    `noise`: the Gaussian, shaped like params; when None, drawn from (seed, step): for members, every
    model the noise of its single run with that seed."""
    if noise is None:
        keys = random_keys(seed if not members else [seed] * len(params[0]))
        keys = keys.to(params[0].device) if torch.is_tensor(keys) else keys
        noise = random_noise(params, keys, step, members)
    tangent = tangent_part(noise, params, members)
    scale = global_norm(grads, members) / global_norm(tangent, members)
    return torch._foreach_mul(tangent, per_model(scale, tangent))


def step_direction(kind, grads, params, seed=0, step=0, members=False, noise=None):
    """The direction a step of `kind` moves theta along; `seed` and `step` seed the random kind (or
    `noise` gives its Gaussian: see random_direction)."""
    if kind == "sgd":
        return torch._foreach_neg(grads)
    if kind == "ascent":
        return list(grads)
    if kind == "random":
        return random_direction(grads, params, seed, step, members, noise)
    raise ValueError(f"unknown step kind {kind!r}")  # config.validate lets only config.STEPS through


@torch.no_grad()
def sgd_step(params, grads, lr, momentum, wd, buffers):
    """Conventional SGD off the sphere, as torch.optim.SGD (no dampening, no Nesterov), in place:
    d = grad + wd * theta, buf = momentum * buf + d, theta -= lr * buf. `buffers` start at zero, which
    gives torch's first step (buf = d) exactly; lr may be a (K,) tensor, so the step can be replayed."""
    directions = torch._foreach_add(grads, params, alpha=wd) if wd else list(grads)
    if momentum:
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, directions)
        directions = buffers
    torch._foreach_sub_(params, torch._foreach_mul(directions, per_model(lr, directions)))


@torch.no_grad()
def project_(params, rho, members=False):
    """Rescale all tensors jointly, in place, to the global norm rho (per model for members); returns
    the norm they had (a device tensor)."""
    norm = global_norm(params, members)
    # reciprocal * rho, which is what rho / norm computes for a number rho: one rounding for both forms
    torch._foreach_mul_(params, per_model(norm.reciprocal() * rho, params))
    return norm


@torch.no_grad()
def step_on_sphere(params, direction, lr, rho, geodesic=False, members=False):
    """Move theta along `direction` with learning rate lr; returns the projection error 1 - r of this step
    and the norm theta had before its rescale to rho, which is finite and positive exactly when the step
    was. For members, lr and rho are (K,) tensors, one value per model, and so are the results.

    The nominal step turns theta by x = lr * ||direction|| / rho radians (= elr * ||grad|| on the unit
    sphere). Projected: theta <- proj_rho(theta + lr * direction), which turns it by arctan(x) only, so
    r = arctan(x) / x is the true arc over the nominal one (docs/science.md, The step; direction = -grad
    is tangent since SI gradients are orthogonal to theta). Geodesic: theta <- cos(x) theta +
    sin(x) rho u with u the unit tangent direction, which turns it by exactly x (mod 2 pi), so r = 1.
    1 - r is a 0-d device tensor, accumulated without a host sync.
    """
    tiny = torch.finfo(params[0].dtype).tiny
    # an absurd ELR must end as a non-finite (diverged) run, not as an overflow error of the scalar lr
    largest = torch.finfo(params[0].dtype).max
    lr = lr.clamp(max=largest) if torch.is_tensor(lr) else min(lr, largest)
    if geodesic:
        tangent = tangent_part(direction, params, members)  # SI gradients are tangent only up to round-off
        norm = global_norm(tangent, members)
        x = lr * norm / rho
        unit = torch._foreach_div(tangent, per_model(norm.clamp_min(tiny), tangent))
        torch._foreach_mul_(params, per_model(torch.cos(x), params))
        torch._foreach_add_(params, torch._foreach_mul(unit, per_model(rho * torch.sin(x), unit)))
        norm = project_(params, rho, members)  # the rotation keeps the norm: this stops round-off drifting
        return torch.zeros_like(x), norm
    x = lr * global_norm(direction, members) / rho
    # (lr * direction) first, not alpha=lr: alpha takes one number, and this rounds as the per-model form
    torch._foreach_add_(params, torch._foreach_mul(direction, per_model(lr, direction)))
    norm = project_(params, rho, members)
    r = torch.where(x > 0, torch.atan(x) / x.clamp_min(tiny), 1.0)
    return 1 - r, norm
