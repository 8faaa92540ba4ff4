"""The GPU never waits on the host, counted on the emulated device (tests/emulated_cuda.py): no host
sync and no host-to-device copy per training step, a captured step of few ops at K = 16, and no sync
per batch in curvature's measures or connect's points (on the segment and, packed, on the plane)."""

import dataclasses

import pytest
import torch

from sphrun.config import TrainConfig
from sphrun.connect import measure_plane, points_per_pass, recompute_bn_statistics
from sphrun.curvature import measure
from sphrun.data import BatchOrder
from sphrun.lifecycle import Member, load_run_data, prepare
from sphrun.metrics import eval_metrics, full_batches, train_metrics
from sphrun.plane import span_plane
from sphrun.rundir import RunDir
from sphrun.train import pack_members

from conftest import TINY

K16 = [1e-4 * 1.5 ** k for k in range(16)]


def a_pass(tmp_path, elrs, **settings):
    """The pack and step of one pass of `elrs` on the emulated GPU, and its batch order."""
    configs = [TrainConfig(**{**TINY, "device": "cuda", "width": 2, "iters": 40, "elr": e, **settings}) for e in elrs]
    data, _ = load_run_data(configs[0], torch.device("cuda", 0))
    members = [Member(c, RunDir(tmp_path / str(i))) for i, c in enumerate(configs)]
    pack, step = pack_members(members, data, torch.device("cuda", 0))
    return pack, step, BatchOrder(len(data.train_y), configs[0].batch_size, configs[0].data_seed, step.device)


def steps_cost(cuda, step, order, start, count):
    """Counts over `count` steps from `start`, within one epoch (its permutation made before)."""
    order.indices(start)
    before = dataclasses.replace(cuda.counts)
    for it in range(start, start + count):
        step.take(it, order.indices(it))
    return cuda.counts.since(before)


STEPS = {"sgd": {}, "ascent": {"step": "ascent"}, "random": {"step": "random"}, "geodesic": {"geodesic": True},
         "transition": {"origin": 8, "elr_from": 1e-2, "transition": 20}}


@pytest.mark.parametrize("kind", STEPS)
def test_a_training_step_neither_syncs_nor_copies_from_the_host(cuda, tmp_path, kind):
    settings = dict(STEPS[kind])
    start = settings.get("origin", 0)
    _, step, order = a_pass(tmp_path, [1e-3, 1e-2], **settings)
    steps_cost(cuda, step, order, start, 5)  # three eager steps, the capture and its check (one sync)
    cost = steps_cost(cuda, step, order, start + 8, 7)  # the next epoch, replayed
    assert cost.syncs == 0 and cost.copies_in == 0, cost
    assert step.graph is not None and cuda.graphs[-1].replays == 9  # the check's, then one per step


# The most kernels in one captured step of 16 ConvNets (aten ops that launch work: views and allocations
# launch none, and a graph replays none for them): forward, loss and backward take about 60, the move
# on the sphere, its projection and the freeze of non-finite models the rest; a random direction adds
# its draw (about 30) and its tangent projection. Reductions over the 16 models at once keep the count
# from growing with K.
BUDGETS = {"sgd": 120, "random": 200, "geodesic": 200}


@pytest.mark.parametrize("kind", BUDGETS)
def test_a_captured_step_of_16_models_is_a_bounded_number_of_kernels(cuda, tmp_path, kind):
    _, step, order = a_pass(tmp_path, K16, **STEPS[kind])
    steps_cost(cuda, step, order, 0, 4)
    kernels = len(cuda.graphs[-1].kernels())
    assert kernels <= BUDGETS[kind], kernels
    _, eight, order = a_pass(tmp_path, K16[:8], **STEPS[kind])
    steps_cost(cuda, eight, order, 0, 4)
    assert len(cuda.graphs[-1].kernels()) == kernels  # the same for 8 models as for 16


def syncs_over(cuda, work):
    before = cuda.counts.syncs
    work()
    return cuda.counts.syncs - before


@pytest.mark.parametrize("which", ["gm", "fisher-trace", "hessian-trace", "hessian-eig", "hessian-density"])
def test_curvature_makes_no_sync_per_batch(cuda, which):
    config = TrainConfig(**{**TINY, "device": "cuda", "elr": 1e-3, "iters": 1})
    data, model, params, order = prepare(config, torch.device("cuda", 0))
    permutation = order.permutation(0)
    run = lambda batches: lambda: measure(model, params, data.train_x, data.train_y, "ce",
                                          permutation[:batches * 32], 32, [which], probes=2, lanczos=3)
    assert syncs_over(cuda, run(2)) == syncs_over(cuda, run(4))  # the same few syncs, whatever the batches


def test_a_point_of_connect_makes_no_sync_per_batch(cuda):
    config = TrainConfig(**{**TINY, "device": "cuda", "elr": 1e-3, "iters": 1})
    data, model, params, order = prepare(config, torch.device("cuda", 0))
    permutation = order.permutation(0)

    def point(batches):
        def work():
            recompute_bn_statistics(model, data.train_x, full_batches(permutation, 32)[:batches])
            train_metrics(model, params, data.train_x, data.train_y, "ce", 32, permutation[:batches * 32])
            eval_metrics(model, data.test_x, data.test_y, "ce", batch_size=500 // batches)
        return work

    assert syncs_over(cuda, point(2)) == syncs_over(cuda, point(4))


def test_a_pass_of_plane_points_makes_no_sync_per_batch(cuda):
    config = TrainConfig(**{**TINY, "device": "cuda", "elr": 1e-3, "iters": 1})
    data, model, params, order = prepare(config, torch.device("cuda", 0))
    theta = torch.cat([p.detach().reshape(-1) for p in params]).double()
    g = torch.Generator().manual_seed(0)
    b, c = (theta + torch.randn(theta.shape, generator=g, dtype=torch.float64).to(theta.device) for _ in range(2))
    plane = span_plane(theta, b, c)
    at = [(0.0, 0.0), (plane.b, 0.0), plane.c]
    per_pass = points_per_pass(model, config.sphere, params[0].device)
    assert per_pass >= len(at)  # one pack of the three points, the grouped form
    permutation = order.permutation(0)

    def points(batches):
        return lambda: measure_plane(model, config, data, permutation[:batches * 32],
                                     full_batches(permutation, 32)[:batches], plane, at,
                                     [plane.radius(u, v) for u, v in at], per_pass)

    assert syncs_over(cuda, points(2)) == syncs_over(cuda, points(4))
