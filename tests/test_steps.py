"""The step kinds (sgd, random, ascent), the geodesic move, and the ELR schedule of a transition."""

import math

import pytest
import torch

from sphrun.config import TrainConfig
from sphrun.metrics import batch_loss
from sphrun.sphere import dot, global_norm, learning_rate, step_direction, step_on_sphere
from sphrun.lifecycle import prepare


def on_sphere(rho, seed=0):
    """Two float64 tensors taken together as a point of the sphere of radius rho in R^7."""
    g = torch.Generator().manual_seed(seed)
    theta = [torch.randn(3, generator=g, dtype=torch.float64),
             torch.randn(2, 2, generator=g, dtype=torch.float64)]
    torch._foreach_mul_(theta, rho / global_norm(theta))
    return theta


def angle(a, b):
    return math.acos((dot(a, b) / (global_norm(a) * global_norm(b))).clamp(-1, 1).item())


@pytest.mark.parametrize("x", [0.01, 0.7, 2.5])  # phase 1 to phase 3 sized steps, below pi
def test_geodesic_step_turns_by_the_nominal_angle_and_keeps_the_norm(x):
    rho, lr = 3.0, 0.5
    theta = on_sphere(rho)
    before = [t.clone() for t in theta]
    g = torch.Generator().manual_seed(1)
    noise = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in theta]
    radial = dot(noise, theta) / rho ** 2
    tangent = [n - radial * t for n, t in zip(noise, theta)]
    direction = torch._foreach_mul(tangent, x * rho / (lr * global_norm(tangent)))  # nominal angle x
    # a radial part must not change the move: only the tangent part moves theta along the sphere
    direction = [d + 0.3 * t for d, t in zip(direction, theta)]
    proj_err, _ = step_on_sphere(theta, direction, lr, rho, geodesic=True)
    assert math.isclose(angle(before, theta), x, rel_tol=1e-9)
    assert math.isclose(global_norm(theta).item(), rho, rel_tol=1e-12)
    assert proj_err.item() == 0
    # theta moved within the plane of theta and the tangent direction (a great circle)
    moved = [t - math.cos(x) * b for t, b in zip(theta, before)]
    expected = torch._foreach_mul(tangent, rho * math.sin(x) / global_norm(tangent))
    for m, e in zip(moved, expected):
        torch.testing.assert_close(m, e, rtol=1e-9, atol=1e-12)


def test_projected_step_turns_by_arctan_of_the_nominal_angle():
    # the contrast the geodesic step removes: projection realises arctan(x) < x
    rho, lr, x = 2.0, 1.0, 1.5
    theta = on_sphere(rho, seed=3)
    before = [t.clone() for t in theta]
    tangent = step_direction("random", [torch.ones_like(t) for t in theta], theta, seed=0, step=0)
    direction = torch._foreach_mul(tangent, x * rho / (lr * global_norm(tangent)))
    proj_err, _ = step_on_sphere(theta, direction, lr, rho)
    assert math.isclose(angle(before, theta), math.atan(x), rel_tol=1e-9)
    assert math.isclose(proj_err.item(), 1 - math.atan(x) / x, rel_tol=1e-9)


def gradients(config, step=0):
    data, model, params, order = prepare(config, torch.device("cpu"))
    idx = order.indices(step)
    loss = batch_loss(model(data.train_x[idx]), data.train_y[idx], config.loss)
    return model, params, data.train_x[idx], data.train_y[idx], loss, torch.autograd.grad(loss, params)


def test_random_step_is_tangent_and_as_long_as_the_sgd_step(tiny):
    model, params, x, y, loss, grads = gradients(tiny())
    rho = global_norm(params).item()
    sgd = step_direction("sgd", grads, params)
    random = step_direction("random", grads, params, seed=0, step=5)
    assert math.isclose(global_norm(random).item(), global_norm(sgd).item(), rel_tol=1e-6)
    cos_theta = dot(random, params) / (global_norm(random) * rho)
    assert abs(cos_theta.item()) < 1e-6
    assert abs(angle(random, sgd) - math.pi / 2) < 0.1  # in 432 dimensions a random direction is ~orthogonal
    # stateless: the same (seed, step) draws the same direction, another step or seed another one
    assert all(torch.equal(a, b) for a, b in zip(random, step_direction("random", grads, params, 0, 5)))
    assert angle(random, step_direction("random", grads, params, 0, 6)) > 1.0
    assert angle(random, step_direction("random", grads, params, 1, 5)) > 1.0


def test_random_directions_are_uniform_on_the_tangent_space():
    # mean 0 and covariance (I - u u^T) / (n - 1) for unit directions in the tangent space of u in R^n
    theta = on_sphere(1.0, seed=2)
    u = torch.cat([t.flatten() for t in theta])
    n = len(u)
    samples = torch.stack([torch.cat([d.flatten() for d in step_direction("random", theta, theta, 7, step)])
                           for step in range(4000)])
    samples = samples / samples.norm(dim=1, keepdim=True)
    assert samples.mean(0).abs().max().item() < 0.05
    covariance = samples.T @ samples / len(samples)
    expected = (torch.eye(n, dtype=u.dtype) - torch.outer(u, u)) / (n - 1)
    assert (covariance - expected).abs().max().item() < 0.02


def test_ascent_raises_and_sgd_lowers_the_batch_loss(tiny):
    config = tiny()
    for kind, sign in (("ascent", 1), ("sgd", -1)):
        model, params, x, y, loss, grads = gradients(config)
        rho = global_norm(params).item()
        # written out: rho (theta + sign lr g) / ||theta + sign lr g||, lr = elr rho^2
        moved = [p.detach().double() + sign * 1e-4 * rho ** 2 * g.double() for p, g in zip(params, grads)]
        expected = torch._foreach_mul(moved, rho / global_norm(moved).item())
        step_on_sphere(params, step_direction(kind, grads, params), learning_rate(1e-4, rho), rho)
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.double(), e, rtol=1e-5, atol=1e-7)
        with torch.no_grad():
            after = batch_loss(model(x), y, config.loss)  # BN in train mode, as the step saw it
        assert sign * (after.item() - loss.item()) > 0, kind


def test_transition_schedule_first_middle_last_step():
    config = TrainConfig(elr=1e-4, elr_from=1e-3, transition=4, origin=100, iters=10)
    assert config.elr_at(100) == pytest.approx(1e-3 - 9e-4 / 4, rel=1e-12)  # first step already moves
    assert config.elr_at(101) == pytest.approx(5.5e-4, rel=1e-12)  # middle: halfway
    assert config.elr_at(103) == 1e-4  # the D-th step lands on the new ELR exactly
    assert config.elr_at(104) == config.elr_at(109) == 1e-4
    jump = TrainConfig(elr=1e-4, elr_from=1e-3, transition=0, origin=100, iters=10)
    assert jump.elr_at(100) == 1e-4
    assert TrainConfig(elr=7e-4, iters=10).elr_at(0) == 7e-4


def test_step_kind_and_geodesic_name_a_train_run():
    assert TrainConfig(elr=1e-3).default_run_name().endswith("-elr0.001-s0")
    assert TrainConfig(elr=1e-3, step="random", geodesic=True).default_run_name().endswith("-s0-random-geo")
