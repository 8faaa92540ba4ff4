"""Conventional training off the sphere (docs/science.md, Conventional training): torch's SGD over every parameter, no projection."""

import json

import pytest
import torch
import torch.nn.functional as F

from sphrun.config import TrainConfig
from sphrun.models import build_model
from sphrun.phases import classify
from sphrun.rundir import RunDir
from sphrun.lifecycle import restore
from sphrun.train import train
from test_data import write_torchvision_cifar
from test_train import TINY_ARGS, assert_same_weights, final_state, rows_without_wall_time

from conftest import TINY

OFF = dict(TINY, sphere=False, elr=0.05, iters=8, eval_every=4)
MOMENTUM = dict(OFF, momentum=0.9, wd=1e-3)


def off_run(folder, **overrides):
    torch.set_num_threads(1)
    train(TrainConfig(**{**OFF, **overrides}), folder)
    return folder


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return off_run(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def with_momentum(tmp_path_factory):
    return off_run(tmp_path_factory.mktemp("momentum"), **MOMENTUM)


def test_off_the_sphere_everything_trains_and_the_norm_grows(plain):
    rows = RunDir(plain).read_metrics()
    assert [r["iter"] for r in rows] == [0, 4, 8]
    assert all(r["elr"] == 0.05 and r["proj_err"] == 0 for r in rows)  # the elr column is the plain lr
    # SI gradients are orthogonal to the weights, so without weight decay every step lengthens them
    norms = [r["si_norm"] for r in rows]
    assert all(b > a for a, b in zip(norms, norms[1:]))
    stored = json.loads((plain / "config.json").read_text())
    assert stored["status"] == "done" and stored["settings"]["sphere"] is False
    assert "plain" in stored["elr_meaning"]
    init = build_model("convnet", 4, 10, None, seed=0, head_seed=0, sphere=False).state_dict()
    last = final_state(plain)
    for name in ("features.1.weight", "features.1.bias", "head.weight", "head.bias"):  # BN affine, classifier
        assert not torch.equal(last[name], init[name]), name


def test_steps_with_momentum_and_weight_decay_are_torch_sgds(tmp_path):
    """Each of eight steps of sphrun's loop equals a step of torch.optim.SGD itself from the same state
    (weights and momentum buffers) and batch (torch applies the decay before the momentum, no dampening).
    Step by step: over eight steps a max-pool tie broken the other way by a last-bit difference of the
    two forms parts the runs by 1e-4 on some CPUs."""
    run = off_run(tmp_path, **{**MOMENTUM, "eval_every": 1})
    for step in range(MOMENTUM["iters"]):
        _, config, data, model, params, order, state = restore(run, step, "cpu")
        optimizer = torch.optim.SGD(params, lr=config.elr, momentum=config.momentum, weight_decay=config.wd)
        for p, buffer in zip(params, state.momentum or []):
            optimizer.state[p]["momentum_buffer"] = buffer.clone()
        model.train()
        idx = order.indices(step)
        F.cross_entropy(model(data.train_x[idx]), data.train_y[idx]).backward()
        optimizer.step()
        saved = RunDir(run).load_checkpoint(step + 1)
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        for name, p, buffer in zip(names, params, saved["momentum"]):
            torch.testing.assert_close(p.detach(), saved["model"][name], rtol=1e-5, atol=1e-6, msg=name)
            momentum = optimizer.state[p]["momentum_buffer"]
            torch.testing.assert_close(buffer, momentum, rtol=1e-5, atol=1e-6, msg=f"{name} momentum")


def test_weight_decay_shrinks_the_norm(tmp_path, plain):
    decayed = RunDir(off_run(tmp_path, wd=1.0)).read_metrics()
    plain = RunDir(plain).read_metrics()
    assert plain[0]["si_norm"] == decayed[0]["si_norm"]
    assert decayed[-1]["si_norm"] < decayed[0]["si_norm"] < plain[-1]["si_norm"]


def test_resume_with_momentum_is_bit_identical(tmp_path, with_momentum):
    off_run(tmp_path, **dict(MOMENTUM, iters=4))
    off_run(tmp_path, **MOMENTUM)
    assert_same_weights(final_state(tmp_path), final_state(with_momentum))
    assert rows_without_wall_time(tmp_path) == rows_without_wall_time(with_momentum)
    # without the momentum buffers in the checkpoint the second half would start from zero momentum
    assert RunDir(tmp_path).load_checkpoint(4)["momentum"]


def test_a_huge_learning_rate_blows_up_and_is_recorded_as_diverged(tmp_path, cli):
    out = tmp_path / "vgg"
    code, err = cli("train", "--model", "vgg16bn", "--no-sphere", "--lr", "1e10", "--iters", "16",
                    "--eval-every", "8", "--dataset", "synthetic", "--subset", "256", "--width", "2",
                    "--batch-size", "32", "--device", "cpu", "--out", out)
    assert code == 0 and "diverged" in err and "Traceback" not in err
    assert json.loads((out / "config.json").read_text())["status"] == "diverged"
    assert [r["iter"] for r in RunDir(out).read_metrics()] == [0]  # the metrics so far are kept


def test_cifar100_through_the_torchvision_loader(tmp_path, tiny):
    write_torchvision_cifar(tmp_path / "data", "cifar100", per_split=64)
    run, status = train(tiny(dataset="cifar100", data_dir=str(tmp_path / "data"), subset=None, iters=2,
                             eval_every=2), tmp_path / "run")
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert status == "done" and stored["num_classes"] == 100 and stored["train_size"] == 64
    assert final_state(tmp_path / "run")["head.weight"].shape == (100, 32)
    # the phase rules measure chance against 1 - 1/C: 85 % train error is chance for 10 classes, not 100
    rows = [{"iter": i, "epoch": 3 * i, "train_loss": 4.6, "train_err": 0.85, "gm": 1.0, "cos_prev": 0.0}
            for i in range(8)]  # 21 epochs: long enough for the rules
    assert classify(rows, 10).phase == "3" and classify(rows, 100).phase != "3"


def test_finetune_connect_and_curvature_work_off_the_sphere(tmp_path, cli, plain, with_momentum):
    # a fine-tune with the parent's lr carries the momentum buffers on and reproduces the parent
    code, err = cli("finetune", with_momentum, "--lr", "0.05", "--from", "4", "--iters", "4",
                    "--eval-every", "4", "--device", "cpu", "--out", tmp_path / "ft")
    assert code == 0, err
    assert_same_weights(final_state(tmp_path / "ft"), final_state(with_momentum))
    code, err = cli("finetune", with_momentum, "--elr", "1e-3", "--iters", "4", "--out", tmp_path / "bad")
    assert code == 2 and "--lr" in err

    code, err = cli("connect", plain, with_momentum, "--points", "3", "--device", "cpu", "--out", tmp_path / "ab")
    assert code == 0, err
    assert json.loads((tmp_path / "ab" / "config.json").read_text())["project"] is False
    alpha0 = open(tmp_path / "ab" / "connect.csv").read().splitlines()[1].split(",")
    # alpha = 0 is A itself, unrescaled: its train loss and GM as in its own metrics.csv
    assert float(alpha0[1]) == pytest.approx(RunDir(plain).read_metrics()[-1]["train_loss"], rel=1e-5)
    assert float(alpha0[5]) == pytest.approx(RunDir(plain).read_metrics()[-1]["gm"], rel=1e-5)
    code, err = cli("connect", plain, with_momentum, "--project", "--out", tmp_path / "bad")
    assert code == 2 and "off" in err

    _, _, _, model, params, _, _ = restore(plain, device="cpu")
    assert len(params) == len(list(model.parameters()))  # every parameter is measured off the sphere
    code, err = cli("curvature", plain, "--at", "last", "--measures", "gm", "--device", "cpu")
    assert code == 0, err
    gm = float(open(plain / "curvature.csv").read().splitlines()[1].split(",")[1])
    assert gm == pytest.approx(RunDir(plain).read_metrics()[-1]["gm"], rel=1e-5)


@pytest.mark.parametrize("args, complaint", [
    (["--elr", "1e-3", "--lr", "0.1"], "--lr"),
    (["--elr", "1e-3", "--wd", "1e-4"], "--wd"),
    (["--elr", "1e-3", "--momentum", "0.9"], "--momentum"),
    (["--no-sphere", "--elr", "1e-3"], "--elr"),
    (["--no-sphere"], "--lr"),
    (["--no-sphere", "--lr", "-0.1"], "--lr"),
    (["--no-sphere", "--lr", "0.1", "--wd", "-1e-4"], "--wd"),
    (["--no-sphere", "--lr", "0.1", "--momentum", "-0.5"], "--momentum"),
    (["--no-sphere", "--lr", "0.1", "--momentum", "1"], "--momentum"),
    (["--no-sphere", "--lr", "0.1", "--step", "random"], "--step"),
    (["--elr", "1e-3", "--model", "resnet50"], "resnet50"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, cli, args, complaint):
    code, err = cli("train", *args, "--iters", "2", *TINY_ARGS, "--out", tmp_path / "run")
    assert code == 2 and err.startswith("error:") and complaint in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
