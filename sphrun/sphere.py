"""The step on the sphere, the one place where trainable weights move.

Conventions (PAPER.md §1): theta is all scale-invariant tensors together, rho = ||theta|| is one global
norm, lr = elr * rho0^2, and after each step theta is back on the sphere of radius rho0.

A step is a direction and a way to move along it. Directions: sgd (-grad), ascent (+grad) and random
(a uniformly random direction tangent to the sphere with the gradient's norm: the random-walk control
of figure 15). Moves: projected (theta + lr * direction, then rescaled to rho, as the paper trains) or
geodesic (theta turned along the great circle by exactly the nominal angle: the sphere's exponential map).
"""

import numpy as np
import torch

RANDOM_STREAM = 0x72616E64  # keeps the random-walk stream apart from other streams seeded by (seed, step)


def global_norm(tensors):
    """The L2 norm of all tensors taken together, as a 0-d device tensor (no host sync)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


def dot(a, b):
    """<a, b> with each tensor list taken as one vector, a 0-d device tensor."""
    return torch.stack([torch.sum(x * y) for x, y in zip(a, b)]).sum()


def learning_rate(elr, rho):
    """The plain SGD learning rate that moves a net of radius rho like `elr` moves it on the unit sphere."""
    return elr * rho ** 2


def tangent_part(direction, params):
    """`direction` less its component along theta: the part that moves theta along the sphere."""
    radial = dot(direction, params) / dot(params, params)
    return torch._foreach_sub(direction, torch._foreach_mul(params, radial))


def random_seed(seed, step):
    """A generator seed that depends on (run seed, step) only, so a resumed or fine-tuned run draws the
    same directions without saving any random state."""
    entropy = [RANDOM_STREAM, seed & 0xFFFFFFFFFFFFFFFF, step]  # SeedSequence wants non-negative ints
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def random_direction(grads, params, seed, step):
    """Uniform over the directions tangent to the sphere at theta, with the norm of `grads`, so the step
    is as long as the SGD step would be. (A Gaussian projected on the tangent space is isotropic there.)"""
    device = params[0].device
    generator = torch.Generator(device=device).manual_seed(random_seed(seed, step))
    noise = [torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype) for p in params]
    tangent = tangent_part(noise, params)
    return torch._foreach_mul(tangent, global_norm(grads) / global_norm(tangent))


def step_direction(kind, grads, params, seed=0, step=0):
    """The direction a step of `kind` moves theta along; `seed` and `step` seed the random kind."""
    if kind == "sgd":
        return torch._foreach_neg(grads)
    if kind == "ascent":
        return list(grads)
    if kind == "random":
        return random_direction(grads, params, seed, step)
    raise ValueError(f"unknown step kind {kind!r}")  # config.validate lets only config.STEPS through


@torch.no_grad()
def project_(params, rho):
    """Rescale all tensors jointly, in place, to the global norm rho."""
    torch._foreach_mul_(params, rho / global_norm(params))


@torch.no_grad()
def step_on_sphere(params, direction, lr, rho, geodesic=False):
    """Move theta along `direction` with learning rate lr; returns the projection error 1 - r of this step.

    The nominal step turns theta by x = lr * ||direction|| / rho radians (= elr * ||grad|| on the unit
    sphere). Projected: theta <- proj_rho(theta + lr * direction), which turns it by arctan(x) only, so
    r = arctan(x) / x is the true arc over the nominal one (PAPER.md §1, appendix 3; direction = -grad
    is tangent since SI gradients are orthogonal to theta). Geodesic: theta <- cos(x) theta +
    sin(x) rho u with u the unit tangent direction, which turns it by exactly x (mod 2 pi), so r = 1.
    1 - r is a 0-d device tensor, accumulated without a host sync.
    """
    tiny = torch.finfo(params[0].dtype).tiny
    # an absurd ELR must end as a non-finite (diverged) run, not as an overflow error of the scalar lr
    lr = min(lr, torch.finfo(params[0].dtype).max)
    if geodesic:
        tangent = tangent_part(direction, params)  # SI gradients are tangent only up to round-off
        norm = global_norm(tangent)
        x = lr * norm / rho
        unit = torch._foreach_div(tangent, norm.clamp_min(tiny))
        torch._foreach_mul_(params, torch.cos(x))
        torch._foreach_add_(params, torch._foreach_mul(unit, rho * torch.sin(x)))
        project_(params, rho)  # the rotation keeps the norm; this only stops round-off from drifting
        return torch.zeros_like(x)
    x = lr * global_norm(direction) / rho
    torch._foreach_add_(params, direction, alpha=lr)
    project_(params, rho)
    r = torch.where(x > 0, torch.atan(x) / x.clamp_min(tiny), torch.ones_like(x))
    return 1 - r
