"""connect and curvature against computations written out by hand: the interior point of a segment
with its BatchNorm statistics recomputed, the full batches both commands measure over, and full float32
(no TF32) while they measure."""

import csv
import os

import pytest
import torch
from torch import nn

import sphrun.connect
import sphrun.curvature
from sphrun.config import TrainConfig
from sphrun.lifecycle import restore
from sphrun.rundir import RunDir
from sphrun.train import train
from test_conventions import LEFTOVER, close, hand_test_metrics, hand_train_metrics

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs from different inits on 250 images (7 full batches of 32, 26 images left over)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("measures")
    for name, seed in (("a", 0), ("b", 1)):
        train(TrainConfig(elr=2e-3, seed=seed, iters=8, eval_every=8, **LEFTOVER), str(root / name))
    return str(root / "a"), str(root / "b")


def read_rows(path):
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@torch.no_grad()
def batchnorm_statistics(model, x, batches):
    """{layer index: (mean, var)}: the plain average over `batches` of each BatchNorm's batch mean and
    unbiased batch variance, the network run in train mode (each layer sees batch-normalized inputs)."""
    inputs = {}
    hooks = [layer.register_forward_hook(lambda m, args, out, i=i: inputs.setdefault(i, []).append(args[0]))
             for i, layer in enumerate(model.features) if isinstance(layer, nn.BatchNorm2d)]
    model.train()
    for idx in batches:
        model(x[idx])
    for hook in hooks:
        hook.remove()
    return {i: (torch.stack([t.mean((0, 2, 3)) for t in ts]).mean(0),
                torch.stack([t.var((0, 2, 3), unbiased=True) for t in ts]).mean(0)) for i, ts in inputs.items()}


def test_interior_point_of_a_segment_by_hand(runs, cli, tmp_path):
    a, b = runs
    out = str(tmp_path / "ab")
    code, err = cli("connect", a, b, "--points", "3", "--device", "cpu", "--out", out)
    assert code == 0, err
    middle = read_rows(os.path.join(out, "connect.csv"))[1]
    assert middle["alpha"] == 0.5

    _, config, data, model, params, order, _ = restore(a, "last", CPU)
    state_b = RunDir(b).load_checkpoint("last")["model"]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta_a, theta_b = [p.detach().clone() for p in params], [state_b[n] for n in names]
    # The point in float32, rounded as sphrun rounds it: b - (b - a)(1 - alpha), torch.lerp's form for
    # alpha >= 0.5, and one float32 factor radius / ||point|| from per-tensor norms. Here a ReLU input of
    # batch 7 lies within one rounding of 0, so (a + b) / 2 or a float64 factor (1 ulp off) flips it and
    # moves GM by 1.7e-5: only the same rounding makes GM a check of the convention to 1e-5.
    norm32 = lambda tensors: torch.linalg.vector_norm(torch.stack([t.norm() for t in tensors]))
    radius = (norm32(theta_a).item() + norm32(theta_b).item()) / 2  # the runs' sphere, rho_A and rho_B apart
    point = [tb - (tb - ta) * 0.5 for ta, tb in zip(theta_a, theta_b)]
    scale = radius / norm32(point)
    with torch.no_grad():
        for p, q in zip(params, point):
            p.copy_(q * scale)
    permutation = order.permutation(0)
    full = [permutation[i * 32:(i + 1) * 32] for i in range(len(permutation) // 32)]  # 7 batches of 32
    statistics = batchnorm_statistics(model, data.train_x, full)
    test_loss, test_err = hand_test_metrics(model, data, config.loss, statistics)
    assert close(middle["test_loss"], test_loss) and close(middle["test_err"], test_err, 1e-6)
    # A's own running statistics give other test numbers: the check needs the recomputation
    assert abs(hand_test_metrics(model, data, config.loss)[0] - test_loss) > 1e-3
    train_loss, train_err, gm = hand_train_metrics(model, params, data, config.loss, 32, permutation)
    assert close(middle["train_loss"], train_loss) and close(middle["train_err"], train_err, 1e-6)
    assert close(middle["gm"], gm)


def test_curvature_gm_is_the_mean_over_full_batches(runs, cli):
    a, _ = runs
    code, err = cli("curvature", a, "--at", "last", "--measures", "gm", "--device", "cpu")
    assert code == 0, err
    _, config, data, model, params, order, _ = restore(a, "last", CPU)
    gm = hand_train_metrics(model, params, data, config.loss, 32, order.permutation(0))[2]
    measured = read_rows(os.path.join(a, "curvature.csv"))[0]["gm"]
    assert close(measured, gm) and close(measured, RunDir(a).read_metrics()[-1]["gm"])


@pytest.mark.parametrize("command", [["curvature", "--batches", "8"], ["connect", "--bn-batches", "8"]])
def test_both_commands_count_only_full_batches(runs, cli, tmp_path, command):
    a, b = runs
    name, *options = command
    ends = [a] if name == "curvature" else [a, b, "--out", str(tmp_path / "out")]
    code, err = cli(name, *ends, *options, "--device", "cpu")
    assert code == 2 and "more than the 7 train batches" in err, err


def tf32_flags():
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def set_tf32_flags(cudnn, matmul):
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


@pytest.fixture
def tf32_on_outside():
    """TF32 allowed, as a training process on CUDA has it, and the flags as found put back after.
    Plain reads and writes: the matmul flag is a property of torch's cuBLASModule, which
    monkeypatch.setattr cannot undo on every pytest (it deletes the attribute)."""
    saved = tf32_flags()
    set_tf32_flags(True, True)
    try:
        yield
    finally:
        set_tf32_flags(*saved)


def spy(monkeypatch, module, *names):
    """Replace each module.name by a wrapper that records the TF32 flags at each call; returns the set."""
    seen = set()
    for name in names:
        def wrapper(*args, original=getattr(module, name), **kwargs):
            seen.add(tf32_flags())
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
    return seen


@pytest.mark.parametrize("extra,inside", [([], (False, False)), (["--tf32"], (True, True))], ids=["fp32", "tf32"])
def test_connect_measures_in_full_float32_unless_asked(runs, cli, tmp_path, monkeypatch, tf32_on_outside,
                                                        extra, inside):
    seen = spy(monkeypatch, sphrun.connect, "recompute_bn_statistics", "train_metrics", "eval_metrics")
    code, err = cli("connect", *runs, "--points", "2", "--device", "cpu", "--out", str(tmp_path / "ab"), *extra)
    assert code == 0, err
    assert seen == {inside} and tf32_flags() == (True, True)  # restored after


@pytest.mark.parametrize("extra,inside", [([], (False, False)), (["--tf32"], (True, True))], ids=["fp32", "tf32"])
def test_curvature_measures_in_full_float32_unless_asked(runs, cli, monkeypatch, tf32_on_outside, extra, inside):
    seen = spy(monkeypatch, sphrun.curvature, "measure")
    code, err = cli("curvature", runs[1], "--at", "last", "--measures", "gm", "--device", "cpu", "--recompute",
                    *extra)
    assert code == 0, err
    assert seen == {inside} and tf32_flags() == (True, True)
