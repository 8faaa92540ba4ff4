"""sphrun curvature: the estimators against explicit matrices on a tiny net, and the command's file."""

import copy
import csv
import json
import os

import pytest
import torch
from torch import nn
from torch.func import functional_call

from sphrun.config import TrainConfig
from sphrun.curvature import (fisher_trace, flat, hessian_trace, hessian_vector_product,
                              lanczos_top_eigenvalue, measure, Probes, unflat)
from sphrun.metrics import batch_loss
from sphrun.models import trainable_scale_invariant
from sphrun.train import train


def tiny_net():
    """Fully scale-invariant, 189 SI parameters (81 + 108), frozen head; float64 for tight checks."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 3, 3, bias=False), nn.BatchNorm2d(3, affine=False), nn.ReLU(),
                        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    net[-1].requires_grad_(False)
    return net.double()


@pytest.fixture(scope="module")
def problem():
    net = tiny_net()
    params = trainable_scale_invariant(net)  # also checks that the net is fully SI
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (20,), generator=g)
    order = torch.randperm(20, generator=g)
    return net, params, x, y, order, order.split(10)  # two equal batches, weights 1/2 each


EXPLICIT = {}


def explicit(problem, loss, bn_mode="train"):
    """(per-batch Hessians, per-batch Gauss-Newton matrices) from torch.autograd.functional."""
    if (loss, bn_mode) not in EXPLICIT:
        EXPLICIT[loss, bn_mode] = explicit_matrices(problem, loss, bn_mode)
    return EXPLICIT[loss, bn_mode]


def explicit_matrices(problem, loss, bn_mode):
    net, params, x, y, order, batches = problem
    net = copy.deepcopy(net).train(bn_mode == "train")
    if bn_mode == "train":  # batch statistics without running ones, which vectorized autograd can't update
        torch.func.replace_all_batch_norm_modules_(net)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    theta = flat([p.detach() for p in params])
    logits_at = lambda t, idx: functional_call(net, dict(zip(names, unflat(t, params))), (x[idx],))
    hessians, gauss_newtons = [], []
    for idx in batches:
        hessians.append(torch.autograd.functional.hessian(
            lambda t: batch_loss(logits_at(t, idx), y[idx], loss), theta, vectorize=True))
        jacobian = torch.autograd.functional.jacobian(lambda t: logits_at(t, idx).reshape(-1), theta,
                                                      vectorize=True)
        z = logits_at(theta, idx).detach()
        q = torch.autograd.functional.hessian(lambda f: batch_loss(f.view_as(z), y[idx], loss), z.reshape(-1))
        gauss_newtons.append(jacobian.T @ q @ jacobian)
    return hessians, gauss_newtons


def scaled_basis(k, like):
    """sqrt(n) e_k: over k = 0..n-1 its mean outer product is the identity, so the Hutchinson mean
    over all n of them is the exact trace."""
    e = torch.zeros_like(like)
    e[k] = like.numel() ** 0.5
    return e


def close(a, b, rel=1e-4):
    return abs(a - b) <= rel * abs(b)


@pytest.mark.parametrize("loss,bn_mode", [("ce", "train"), ("mse", "train"), ("ce", "eval")])
def test_traces_and_top_eigenvalue_match_explicit_matrices(problem, loss, bn_mode):
    net, params, x, y, order, batches = problem
    hessians, gauss_newtons = explicit(problem, loss, bn_mode)
    h = sum(hessians) / 2
    fisher = sum(gauss_newtons) / 2
    net.train(bn_mode == "train")
    n_params, n_outputs = h.shape[0], 10 * len(batches[0])
    assert n_params == 189
    assert close(hessian_trace(net, params, x, y, loss, batches, n_params, scaled_basis), torch.trace(h).item())
    assert close(fisher_trace(net, params, x, y, loss, batches, n_outputs, scaled_basis),
                 torch.trace(fisher).item())
    v = torch.randn(n_params, dtype=torch.float64)
    hv = hessian_vector_product(net, params, x, y, loss, batches, v)
    assert torch.allclose(hv, h @ v, rtol=1e-8, atol=1e-10)
    top = torch.linalg.eigvalsh(h)[-1].item()
    matvec = lambda v: hessian_vector_product(net, params, x, y, loss, batches, v)
    assert close(lanczos_top_eigenvalue(matvec, torch.ones(n_params, dtype=torch.float64), 25), top)
    net.train()


def test_fisher_is_the_fisher_for_cross_entropy(problem):
    """For ce the Gauss-Newton matrix is the Fisher: E over labels drawn from the softmax of g g^T."""
    net, params, x, y, order, batches = problem
    idx = batches[0]
    _, gauss_newtons = explicit(problem, "ce")
    logits = net(x[idx])
    p = torch.softmax(logits, 1).detach()
    fisher = 0
    for i in range(len(idx)):  # per image and label: the score of one image in its batch
        for c in range(10):
            g = flat(torch.autograd.grad(torch.log_softmax(logits, 1)[i, c], params, retain_graph=True))
            fisher = fisher + p[i, c] * torch.outer(g, g) / len(idx)
    assert torch.allclose(gauss_newtons[0], fisher, rtol=1e-6, atol=1e-10)


def test_hutchinson_converges_to_the_trace(problem):
    net, params, x, y, order, batches = problem
    hessian = explicit(problem, "ce")[0][0]
    exact = torch.trace(hessian).item()
    # the variance of z^T H z for one Rademacher probe z: 2 * sum_{i != j} H[i, j]^2
    variance = 2 * ((hessian ** 2).sum() - (hessian.diagonal() ** 2).sum()).item()
    errors = {}
    for probes in (4, 256):
        estimates = [hessian_trace(net, params, x, y, "ce", batches[:1], probes,
                                   Probes(seed, 0, "hessian-trace")) for seed in range(2)]
        errors[probes] = [abs(e - exact) for e in estimates]
        assert max(errors[probes]) <= 4 * (variance / probes) ** 0.5
    assert sum(errors[256]) < sum(errors[4]) / 2


def test_measure_leaves_the_model_as_found(problem):
    net, params, x, y, order, batches = problem
    net.eval()
    before = {n: t.clone() for n, t in net.state_dict().items()}
    values = measure(net, params, x, y, "ce", order, 10, ("gm", "fisher-trace", "hessian-trace", "hessian-eig"),
                     probes=2, lanczos=3, bn_mode="train")
    assert set(values) == {"gm", "fisher-trace", "hessian-trace", "hessian-eig"}
    assert not net.training
    assert all(torch.equal(before[n], t) for n, t in net.state_dict().items())
    net.train()


# --- the command ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    path = str(tmp_path_factory.mktemp("curv") / "run")
    train(TrainConfig(elr=1e-3, iters=16, eval_every=8, dataset="synthetic", subset=256, width=4,
                      batch_size=32, device="cpu"), path)
    return path


def read_rows(run):
    with open(os.path.join(run, "curvature.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_command_writes_skips_and_guards_settings(run, cli):
    code, err = cli("curvature", run, "--at", "last", "--measures", "gm")
    assert code == 0, err
    metrics = list(csv.DictReader(open(os.path.join(run, "metrics.csv"))))
    rows = read_rows(run)
    assert [r["iter"] for r in rows] == ["16"]
    # over all batches in train mode, gm is metrics.csv's gm at that step
    assert close(float(rows[0]["gm"]), float(metrics[-1]["gm"]), 1e-6)

    eig = ("--measures", "hessian-eig", "--lanczos", "2", "--batches", "2")
    code, err = cli("curvature", run, "--at", "0,16", *eig)
    assert code == 0, err
    rows = read_rows(run)
    assert list(rows[0]) == ["iter", "gm", "hessian-eig"] and [r["iter"] for r in rows] == ["0", "16"]
    assert rows[0]["gm"] == "" and all(float(r["hessian-eig"]) > 0 for r in rows)

    code, err = cli("curvature", run, "--at", "all", *eig)
    assert code == 0 and "measuring 1 checkpoint" in err  # only step 8 is new
    code, err = cli("curvature", run, "--at", "16,0", *eig)
    assert code == 0 and "already has" in err
    code, err = cli("curvature", run, "--at", "0", "--measures", "hessian-eig", "--lanczos", "3", "--batches", "2")
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and "--recompute" in err
    assert read_rows(run)[0] == {"iter": "0", "gm": "", "hessian-eig": rows[0]["hessian-eig"]}

    code, err = cli("curvature", run, "--at", "0", "--measures", "hessian-eig", "--lanczos", "3",
                    "--batches", "2", "--recompute")
    assert code == 0, err
    rows = read_rows(run)  # the column measured with 2 Lanczos steps is gone, gm (which doesn't use them) kept
    assert [(r["iter"], bool(r["gm"]), bool(r["hessian-eig"])) for r in rows] == [("0", False, True),
                                                                                  ("16", True, False)]
    options = json.load(open(os.path.join(run, "curvature.json")))["options"]
    assert options["hessian-eig"]["lanczos"] == 3 and options["gm"] == {"batches": 8, "tf32": False}


@pytest.mark.parametrize("args,expected", [
    (["--at", "999"], "no checkpoint 999"),
    (["--at", "soon"], "--at must be"),
    (["--measures", "gm,curviness"], "unknown measure curviness"),
    (["--probes", "0"], "--probes must be at least 1"),
    (["--batches", "100"], "more than the 8 train batches"),
    (["--bn-mode", "frozen"], "--bn-mode must be train or eval"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, run, cli, args, expected):
    import shutil
    copy = str(tmp_path / "copy")
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("curvature.*"))
    code, err = cli("curvature", copy, *args)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and expected in err, err
    assert not any(name.startswith("curvature") for name in os.listdir(copy))


def test_missing_run_is_refused(tmp_path, cli):
    code, err = cli("curvature", str(tmp_path / "nowhere"))
    assert code == 2 and "not a sphrun run" in err and err.count("\n") == 1
