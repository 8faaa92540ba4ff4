"""The invariants of training on the sphere."""

import math

import pytest
import torch

from sphrun.metrics import batch_loss
from sphrun.models import build_model, scale_invariant_parameters
from sphrun.sphere import global_norm, learning_rate, step_on_sphere
from sphrun.lifecycle import prepare


def flat64(tensors):
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def gradients(model, params, data, idx, loss):
    return torch.autograd.grad(batch_loss(model(data.train_x[idx]), data.train_y[idx], loss), params)


def test_projected_step_is_sgd_at_elr_rho0_squared_then_rescaled(tiny):
    """Each step lands on rho0 (theta - lr g) / ||theta - lr g|| with lr = elr * rho0^2, written out."""
    config = tiny()
    data, model, params, order = prepare(config, torch.device("cpu"))
    rho0, elr = global_norm(params).item(), 1e-3
    for step in range(5):
        grads = gradients(model, params, data, order.indices(step), config.loss)
        moved = flat64(params) - elr * rho0 ** 2 * flat64(grads)
        expected = rho0 * moved / moved.norm()
        step_on_sphere(params, torch._foreach_neg(grads), learning_rate(elr, rho0), rho0)
        torch.testing.assert_close(flat64(params), expected, rtol=1e-5, atol=1e-7)
        assert abs(global_norm(params).item() / rho0 - 1) < 1e-6


def test_an_elr_turns_theta_by_the_same_angle_on_any_sphere(tiny):
    """docs/science.md, The step: SGD at lr on the sphere of radius rho is SGD at elr = lr / rho^2 on the unit sphere,
    so a step turns theta by arctan(elr * ||gradient on the unit sphere||) whatever rho. The unit-sphere
    gradient is rho ||g|| at any radius (gradients of SI weights scale with 1 / radius); radii 3 to 30
    times the init's keep BatchNorm's eps, which breaks the invariance by 4e-4 at the init, out of it."""
    config = tiny()
    elr = 3e-3
    angles, unit_grads = [], []
    for scale in (3.0, 10.0, 30.0):  # times the init's radius
        data, model, params, order = prepare(config, torch.device("cpu"))
        with torch.no_grad():
            torch._foreach_mul_(params, scale)
        radius = global_norm(params).item()
        before = flat64(params)
        grads = gradients(model, params, data, order.indices(0), config.loss)
        unit_grads.append(radius * flat64(grads).norm().item())
        step_on_sphere(params, torch._foreach_neg(grads), learning_rate(elr, radius), radius)
        after = flat64(params)
        angles.append(math.acos(min(1.0, (before @ after / (before.norm() * after.norm())).item())))
    assert unit_grads == pytest.approx([unit_grads[0]] * 3, rel=1e-4)
    expected = math.atan(elr * unit_grads[0])
    assert 0.2 < expected < 1.2  # a step large enough that another power of rho would show
    assert angles == pytest.approx([expected] * 3, rel=1e-4)


def test_function_is_invariant_to_scaling_each_si_tensor():
    model = build_model("convnet", 4, 10, 10.0, seed=0, head_seed=0)
    x = torch.randn(16, 3, 32, 32)
    model.train()  # batch statistics: in eval mode the running statistics would have to scale too
    with torch.no_grad():
        reference = model(x)
        for p in scale_invariant_parameters(model):
            p.mul_(3.7)
            scaled = model(x)
            p.div_(3.7)
            # BatchNorm's eps breaks exact invariance by a hair
            torch.testing.assert_close(scaled, reference, rtol=1e-3, atol=1e-3)


def test_si_gradients_are_orthogonal_to_theta():
    model = build_model("convnet", 4, 10, 10.0, seed=1, head_seed=0)
    params = scale_invariant_parameters(model)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    grads = torch.autograd.grad(batch_loss(model(x), y, "ce"), params)
    for p, g in zip(params, grads):  # each tensor alone is SI, so each gradient is orthogonal to it
        cos = torch.dot(p.flatten(), g.flatten()) / (p.norm() * g.norm())
        assert abs(cos.item()) < 1e-4


def test_projection_error_is_arctan_ratio():
    theta = [torch.tensor([3.0, 0.0])]
    rho = 3.0
    direction = [torch.tensor([0.0, 2.0])]  # tangent
    lr = 0.6
    proj_err, _ = step_on_sphere(theta, direction, lr, rho)
    x = lr * 2.0 / rho
    assert math.isclose(proj_err.item(), 1 - math.atan(x) / x, rel_tol=1e-6)
    # the realised angle is arctan(x), which 1 - r measures against the nominal x
    angle = math.atan2(theta[0][1].item(), theta[0][0].item())
    assert math.isclose(angle, math.atan(x), rel_tol=1e-6)
    assert math.isclose(theta[0].norm().item(), rho, rel_tol=1e-6)
