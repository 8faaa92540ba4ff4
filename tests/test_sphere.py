"""The invariants of training on the sphere."""

import math

import torch

from sphrun.metrics import batch_loss
from sphrun.models import build_model, scale_invariant_parameters
from sphrun.sphere import global_norm, learning_rate, step_on_sphere
from sphrun.lifecycle import prepare


def test_norm_is_rho0_after_every_step(tiny):
    config = tiny()
    data, model, params, order = prepare(config, torch.device("cpu"))
    rho0 = global_norm(params).item()
    for step in range(20):
        idx = order.indices(step)
        loss = batch_loss(model(data.train_x[idx]), data.train_y[idx], config.loss)
        grads = torch.autograd.grad(loss, params)
        step_on_sphere(params, torch._foreach_neg(grads), learning_rate(0.05, rho0), rho0)
        assert abs(global_norm(params).item() / rho0 - 1) < 1e-6


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
    proj_err = step_on_sphere(theta, direction, lr, rho)
    x = lr * 2.0 / rho
    assert math.isclose(proj_err.item(), 1 - math.atan(x) / x, rel_tol=1e-6)
    # the realised angle is arctan(x), which 1 - r measures against the nominal x
    angle = math.atan2(theta[0][1].item(), theta[0][0].item())
    assert math.isclose(angle, math.atan(x), rel_tol=1e-6)
    assert math.isclose(theta[0].norm().item(), rho, rel_tol=1e-6)
