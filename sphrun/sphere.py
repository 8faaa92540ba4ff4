"""The step on the sphere, the one place where trainable weights move.

Conventions (PAPER.md §1): theta is all scale-invariant tensors together, rho = ||theta|| is one global
norm, lr = elr * rho0^2, and after each step of plain SGD theta is rescaled back to the radius rho0.
"""

import torch


def global_norm(tensors):
    """The L2 norm of all tensors taken together, as a 0-d device tensor (no host sync)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


def learning_rate(elr, rho):
    """The plain SGD learning rate that moves a net of radius rho like `elr` moves it on the unit sphere."""
    return elr * rho ** 2


@torch.no_grad()
def project_(params, rho):
    """Rescale all tensors jointly, in place, to the global norm rho."""
    torch._foreach_mul_(params, rho / global_norm(params))


@torch.no_grad()
def step_on_sphere(params, direction, lr, rho):
    """theta <- proj_rho(theta + lr * direction); returns the projection error 1 - r of this step.

    For an SGD step direction = -grad, tangent to the sphere since SI gradients are orthogonal to theta.
    r = arctan(x) / x with x = lr * ||direction|| / rho is the true arc moved over the nominal one
    (PAPER.md §1, appendix 3); 1 - r is a 0-d device tensor, accumulated without a host sync.
    """
    x = lr * global_norm(direction) / rho
    torch._foreach_add_(params, direction, alpha=lr)
    project_(params, rho)
    r = torch.where(x > 0, torch.atan(x) / x.clamp_min(torch.finfo(x.dtype).tiny), torch.ones_like(x))
    return 1 - r
