"""Every convention of docs/science.md pinned to a value computed by hand, independently of sphrun's code:
the losses, train metrics and GM over full batches, test metrics in BN eval mode, the cosines, the ELR
(one step's angle), the projection error, the transition schedule, the stratified subset, bf16 and the
plain SGD step off the sphere."""

import csv
import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from conftest import TINY
from sphrun.config import TrainConfig
from sphrun.data import load_data, stratified_subset, synthetic_data
from sphrun.lifecycle import prepare, restore
from sphrun.metrics import batch_loss, cosine
from sphrun.rundir import RunDir
from sphrun.train import train

# 250 images at batch size 32: 7 full batches and 26 leftover images, which training never sees as a batch
LEFTOVER = dict(TINY, subset=250)
CPU = torch.device("cpu")


def rows(run):
    with open(os.path.join(run, "metrics.csv"), newline="") as f:
        return {int(r["iter"]): {k: float(v) for k, v in r.items()} for r in csv.DictReader(f)}


def hand_ce(logits, y):
    """Mean over images of -log softmax(logits)[label]."""
    z = logits.double()
    log_partition = z.exp().sum(1).log()
    return (log_partition - z[torch.arange(len(y)), y]).mean()


def hand_mse(logits, y):
    """Mean over images and classes of the squared error to the one-hot target."""
    z = logits.double()
    target = torch.zeros_like(z)
    target[torch.arange(len(y)), y] = 1
    return ((z - target) ** 2).sum() / z.numel()


HAND_LOSS = {"ce": hand_ce, "mse": hand_mse}


def flat64(tensors):
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def hand_cosine(a, b):
    a, b = flat64(a), flat64(b)
    return (a @ b / (a.norm() * b.norm())).item()


def hand_train_metrics(model, params, data, loss, batch_size, permutation):
    """(loss, error, GM) in BN train mode over the full batches of `permutation`, the leftover dropped."""
    model.train()
    count = len(permutation) // batch_size
    losses, norms, wrong = [], [], 0
    for b in range(count):
        idx = permutation[b * batch_size:(b + 1) * batch_size]
        logits = model(data.train_x[idx])
        value = HAND_LOSS[loss](logits, data.train_y[idx])
        norms.append(flat64(torch.autograd.grad(value, params)).norm().item())
        losses.append(value.item())
        wrong += (logits.argmax(1) != data.train_y[idx]).sum().item()
    return sum(losses) / count, wrong / (count * batch_size), sum(norms) / count


@torch.no_grad()
def hand_eval_forward(model, x, statistics=None):
    """The ConvNet with every BatchNorm normalizing by running statistics (BN eval mode), written out:
    (x - mean) / sqrt(var + eps). `statistics`: {layer index: (mean, var)} in place of the buffers."""
    for i, layer in enumerate(model.features):
        if isinstance(layer, nn.BatchNorm2d):
            mean, var = (statistics or {}).get(i, (layer.running_mean, layer.running_var))
            x = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + layer.eps)
        else:
            x = layer(x)
    return model.head(x)


def hand_test_metrics(model, data, loss, statistics=None):
    logits = hand_eval_forward(model, data.test_x, statistics)
    return HAND_LOSS[loss](logits, data.test_y).item(), (logits.argmax(1) != data.test_y).float().mean().item()


def close(value, expected, rel=1e-5):
    return value == pytest.approx(expected, rel=rel)


# --- losses ---------------------------------------------------------------------------------------

def test_losses_on_explicit_numbers():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    y = torch.tensor([0, 2])
    ce = (-math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
          - math.log(1 / (2 * math.exp(0.5) + 1))) / 2
    assert close(batch_loss(logits, y, "ce").item(), ce, 1e-6)
    # mean over the 2 images and the 3 classes, not the paper's sum over classes
    mse = ((2 - 1) ** 2 + 0 + 1 + 0.25 + 0.25 + 1) / 6
    assert close(batch_loss(logits, y, "mse").item(), mse, 1e-6)


@pytest.mark.parametrize("loss,norm", [("ce", 10.0), ("mse", 1.5)])
def test_frozen_head_norm_follows_the_loss(loss, norm):
    _, model, params, _ = prepare(TrainConfig(elr=1e-3, loss=loss, **TINY), CPU)
    assert model.head.weight.norm().item() == pytest.approx(norm, rel=1e-6)
    assert not model.head.weight.requires_grad and all(p.requires_grad for p in params)


def test_cosine_of_explicit_vectors():
    a = [torch.tensor([3.0, 0.0]), torch.tensor([[0.0]])]
    b = [torch.tensor([1.0, 1.0]), torch.tensor([[2.0]])]  # the lists are one vector each: (3,0,0), (1,1,2)
    assert close(cosine(a, b), 3 / (3 * math.sqrt(6)), 1e-6)


# --- one step from the init: train metrics, test metrics, the ELR -------------------------------

def one_step_run(folder, **settings):
    """A run of one step, evaluated before and after it: (config, run directory)."""
    torch.set_num_threads(1)
    config = TrainConfig(iters=1, eval_every=1, **LEFTOVER, **settings)
    path = str(folder / "run")
    train(config, path)
    return config, path


# ELRs that turn theta by about 0.6 rad on the first step: large enough that a wrong power of rho0 shows
@pytest.fixture(scope="module")
def ce_step(tmp_path_factory):
    return one_step_run(tmp_path_factory.mktemp("ce"), elr=4e-3)


@pytest.fixture(scope="module")
def mse_geodesic_step(tmp_path_factory):
    return one_step_run(tmp_path_factory.mktemp("mse"), elr=0.1, loss="mse", geodesic=True)


@pytest.fixture(params=["ce_step", "mse_geodesic_step"])
def one_step(request):
    return request.getfixturevalue(request.param)


def test_first_row_is_measured_over_full_batches_as_written_out(one_step):
    config, path = one_step
    row = rows(path)[0]
    data, model, params, order = prepare(config, CPU)
    rho0 = flat64(params).norm().item()
    test_loss, test_err = hand_test_metrics(model, data, config.loss)  # running statistics of the init
    train_loss, train_err, gm = hand_train_metrics(model, params, data, config.loss, config.batch_size,
                                                   order.permutation(0))
    assert close(row["train_loss"], train_loss) and close(row["train_err"], train_err, 1e-6)
    assert close(row["gm"], gm)  # the mean of the 7 batch gradient norms, not their RMS, nor 8 batches
    assert close(row["test_loss"], test_loss) and close(row["test_err"], test_err, 1e-6)
    assert close(row["si_norm"], rho0, 1e-6)
    assert row["cos_prev"] == row["cos_init"] == pytest.approx(1, abs=1e-6)


def test_one_step_turns_by_the_elr_angle(one_step):
    """lr = elr * rho0^2 turns theta by x = lr ||g|| / rho0 = elr ||g|| rho0: projected steps by arctan(x)
    (so proj_err = 1 - arctan(x) / x), geodesic ones by x itself (proj_err 0)."""
    config, path = one_step
    row = rows(path)[1]
    data, model, params, order = prepare(config, CPU)
    rho0 = flat64(params).norm().item()
    first = order.permutation(0)[:config.batch_size]  # step 0's batch: the start of epoch 0's permutation
    model.train()
    g = flat64(torch.autograd.grad(HAND_LOSS[config.loss](model(data.train_x[first]), data.train_y[first]),
                                   params)).norm().item()
    x = config.elr * g * rho0
    assert 0.3 < x < 1.5  # large enough that a wrong power of rho0 shows
    if config.geodesic:
        assert close(row["cos_init"], math.cos(x), 1e-5) and row["proj_err"] == 0
    else:
        assert close(row["cos_init"], math.cos(math.atan(x)), 1e-5)
        assert close(row["proj_err"], 1 - math.atan(x) / x, 1e-4)
    assert row["cos_prev"] == row["cos_init"]  # the previous evaluation point is the init here
    assert close(row["si_norm"], rho0, 1e-6)


# --- a longer run: cosines against saved vectors, test metrics with trained statistics -------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    path = str(tmp_path_factory.mktemp("run") / "run")
    train(TrainConfig(elr=2e-3, iters=16, eval_every=8, **LEFTOVER), path)
    return path


def weights_at(path, step, model=None):
    """A run's trainable weights at `step`; with `model`, loaded into it (BatchNorm buffers too)."""
    state = RunDir(path).load_checkpoint(step)["model"]
    model = model or restore(path, 0, CPU)[3]
    model.load_state_dict(state)
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def test_cosines_look_back_to_the_previous_point_and_to_the_init(run):
    metrics = rows(run)
    model = restore(run, 0, CPU)[3]
    theta = {s: weights_at(run, s, model) for s in (0, 8, 16)}
    for step, previous in ((8, 0), (16, 8)):
        assert close(metrics[step]["cos_prev"], hand_cosine(theta[step], theta[previous]), 1e-6)
        assert close(metrics[step]["cos_init"], hand_cosine(theta[step], theta[0]), 1e-6)
    # the two differ enough for the check to tell them apart
    assert hand_cosine(theta[16], theta[0]) < hand_cosine(theta[16], theta[8]) - 1e-3


def test_test_metrics_use_the_running_statistics(run):
    _, config, data, model, _, _, _ = restore(run, 16, CPU)
    test_loss, test_err = hand_test_metrics(model, data, config.loss)
    row = rows(run)[16]
    assert close(row["test_loss"], test_loss) and close(row["test_err"], test_err, 1e-6)
    model.train()  # batch statistics of the test set give other numbers: the check tells the modes apart
    with torch.no_grad():
        assert abs(hand_ce(model(data.test_x), data.test_y).item() - test_loss) > 1e-3


def test_transition_steps_turn_by_the_scheduled_elr(run, cli, tmp_path):
    """The k-th step of a transition of D steps from the parent's ELR uses from + (to - from) * k / D:
    read off the angle each step turned, not off the elr column alone."""
    child = str(tmp_path / "child")
    code, err = cli("finetune", run, "--elr", "8e-3", "--from", "8", "--transition", "3", "--iters", "4",
                    "--eval-every", "1", "--device", "cpu", "--out", child)
    assert code == 0, err
    metrics = rows(child)
    rho0 = rows(run)[0]["si_norm"]
    _, config, data, model, params, order, _ = restore(child, 8, CPU)
    for k, elr in enumerate((4e-3, 6e-3, 8e-3, 8e-3), start=1):
        weights_at(child, 8 + k - 1, model)
        idx = order.indices(8 + k - 1)
        model.train()
        g = flat64(torch.autograd.grad(hand_ce(model(data.train_x[idx]), data.train_y[idx]), params)).norm()
        x = elr * g.item() * rho0
        assert close(1 - metrics[8 + k]["cos_prev"], 1 - math.cos(math.atan(x)), 1e-3), k
        assert close(metrics[8 + k]["elr"], elr, 1e-6)


# --- data ------------------------------------------------------------------------------------------

def test_subset_takes_the_first_images_of_each_class():
    full = synthetic_data()
    subset = load_data("synthetic", None, subset=0.1)
    first = [i for c in range(10) for i in [j for j, y in enumerate(full.train_y.tolist()) if y == c][:50]]
    first.sort()
    assert torch.equal(subset.train_y, full.train_y[first])
    assert torch.equal(subset.train_x, full.train_x[first])
    assert torch.equal(subset.test_x, full.test_x)  # the test set stays whole


def test_subset_shares_out_by_class_size():
    labels = torch.tensor([0, 1, 0, 0, 2, 1, 0, 1, 0, 0])  # 6, 3 and 1 images: 40 % is 2.4, 1.2, 0.4
    # largest remainders: class 2's 0.4 gets the fourth image; the first ones of each class, in order
    assert stratified_subset(labels, 0.4, 3).tolist() == [0, 1, 2, 4]


# --- precision and the plain step off the sphere ----------------------------------------------------

def test_bf16_runs_convolutions_in_bfloat16_and_keeps_the_sphere_in_float32(ce_step, tmp_path):
    config, fp32_run = ce_step

    class ConvolutionDtypes(TorchFunctionMode):
        """Every convolution's output dtype, whichever module or packed form calls it."""
        dtypes = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is F.conv2d:
                self.dtypes.add(out.dtype)
            return out

    with ConvolutionDtypes():
        train(dataclasses.replace(config, precision="bf16"), str(tmp_path / "bf16"))
    assert ConvolutionDtypes.dtypes == {torch.bfloat16}  # in the step and in every evaluation
    model = restore(fp32_run, 0, CPU)[3]
    init, fp32, bf16 = (flat64(weights_at(run, step, model))
                        for run, step in ((fp32_run, 0), (fp32_run, 1), (str(tmp_path / "bf16"), 1)))
    assert 0 < (bf16 - fp32).norm() < 0.3 * (fp32 - init).norm()  # bf16 gradients: a step near fp32's
    assert close(bf16.norm().item(), init.norm().item(), 1e-6)  # the projection in float32: bf16 misses by 1e-3


def test_off_the_sphere_a_step_is_plain_sgd_at_lr(tmp_path):
    path = str(tmp_path / "off")
    train(TrainConfig(**{**TINY, "sphere": False, "elr": 0.05, "iters": 1, "eval_every": 1}), path)
    _, config, data, model, params, order, _ = restore(path, 0, CPU)
    idx = order.indices(0)
    model.train()
    grads = torch.autograd.grad(hand_ce(model(data.train_x[idx]), data.train_y[idx]), params)
    before = [p.detach().clone() for p in params]
    after = weights_at(path, 1, model)
    for p, g, q in zip(before, grads, after):  # w - lr * g with the plain lr: no rho0, no rescaling
        torch.testing.assert_close(q, p - 0.05 * g.float(), rtol=1e-5, atol=1e-6)
