"""sphrun curvature: the estimators against explicit matrices on a tiny net, and the command's file."""

import copy
import csv
import json
import os
import signal

import numpy
import pytest
import torch
from torch import nn
from torch.func import functional_call

from sphrun.config import TrainConfig
from sphrun.curvature import (DENSITY_PAD, LANCZOS_STEPS, fisher_trace, flat, hessian_trace,
                              hessian_vector_product, lanczos_top_eigenvalue, measure, Probes, ritz_spectrum,
                              smoothed_density, unflat)
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
    (["--measures", "hessian-density", "--lanczos", "1"], "--lanczos 1 gives one Ritz value per probe"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, run, cli, args, expected):
    import shutil
    copy = str(tmp_path / "copy")
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("curvature.*"))
    code, err = cli("curvature", copy, *args)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and expected in err, err
    assert not any(name.startswith("curvature") for name in os.listdir(copy))


def test_a_curvature_stopped_by_a_signal_resumes_and_ends_with_the_uninterrupted_files(tmp_path, run, cli,
                                                                                       monkeypatch):
    import shutil

    import sphrun.curvature as curvature

    files = ("curvature.csv", "curvature.json", "hessian-density.csv")
    copies = [str(shutil.copytree(run, tmp_path / name, ignore=shutil.ignore_patterns(*files)))
              for name in ("straight", "stopped")]
    args = ("--at", "0,8", "--measures", "gm,hessian-density", "--probes", "2", "--lanczos", "3", "--batches", "2")
    assert cli("curvature", copies[0], *args)[0] == 0
    real, calls = curvature.measure, []

    def measure(*margs, **kwargs):  # Ctrl-C as the density at step 0 begins: given up at its first batch
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*margs, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(curvature, "measure", measure)
        code, err = cli("curvature", copies[1], *args)
    assert code == 130 and err.strip().splitlines()[-1] == (
        f"interrupted at step 0 (hessian-density): the values measured before it are kept in "
        f"{copies[1]}/curvature.csv; run the same command to measure the rest")
    assert [r["iter"] for r in read_rows(copies[1])] == ["0"] and not os.path.exists(copies[1] + "/hessian-density.csv")
    code, err = cli("curvature", copies[1], *args)
    assert code == 0 and "measuring 2 checkpoint(s)" in err and "hessian-density probe 2 of 2 done" in err, err
    assert all(open(os.path.join(copies[1], f), "rb").read() == open(os.path.join(copies[0], f), "rb").read()
               for f in files)


def test_missing_run_is_refused(tmp_path, cli):
    code, err = cli("curvature", str(tmp_path / "nowhere"))
    assert code == 2 and "not a sphrun run" in err and err.count("\n") == 1


# --- the eigenvalue density (stochastic Lanczos quadrature) ------------------------------------------

def integral(curve, weight=lambda e: 1.0):
    """The trapezoid integral of weight(eigenvalue) * density over the curve's grid."""
    e, d = torch.tensor(curve.eigenvalues, dtype=torch.float64), torch.tensor(curve.density, dtype=torch.float64)
    return torch.trapezoid(weight(e) * d, e).item()


def ritz_range(curve, sigma):
    """The lowest and highest Ritz values, read back from the grid, which reaches DENSITY_PAD widths
    of sigma * (highest - lowest) past them."""
    first, last = curve.eigenvalues[0], curve.eigenvalues[-1]
    spread = (last - first) / (1 + 2 * DENSITY_PAD * sigma)
    return first + DENSITY_PAD * sigma * spread, last - DENSITY_PAD * sigma * spread


def test_density_integrates_to_one_and_reaches_the_extreme_eigenvalues(problem):
    """Over the net's own Hessian-vector products: the density is a probability density, and its largest
    Ritz value is hessian-eig's, both converged to the explicit top eigenvalue."""
    net, params, x, y, order, batches = problem
    exact = torch.linalg.eigvalsh(sum(explicit(problem, "ce")[0]) / 2)
    values = measure(net, params, x, y, "ce", order, 10, ("hessian-eig", "hessian-density"), probes=2,
                     lanczos=40, sigma=0.02)
    curve = values["hessian-density"]
    assert integral(curve) == pytest.approx(1, abs=1e-6)
    assert all(d >= 0 for d in curve.density) and curve.eigenvalues == sorted(curve.eigenvalues)
    low, high = ritz_range(curve, 0.02)
    assert close(high, values["hessian-eig"], 1e-6) and close(high, exact[-1].item(), 1e-6)
    assert close(low, exact[0].item(), 1e-4)


def test_density_mass_on_either_side_of_a_threshold_is_the_share_of_eigenvalues_there(problem):
    """With as many Lanczos steps as parameters the quadrature of each probe is exact: the mass below t
    is (1/P) sum_p |Pi z_p|^2 / n, Pi the projection on the eigenvectors below t, whose mean over
    Rademacher probes is their share k / n, with variance 2 sum_{i != j} Pi_ij^2 / (P n^2). The
    smoothing may move the eigenvalues within 3 widths of t across it."""
    hessian = sum(explicit(problem, "ce")[0]) / 2
    exact, vectors = torch.linalg.eigh(hessian)
    n, sigma, probes = len(exact), 0.005, 12
    probe = Probes(0, 0, "hessian-density")
    spectra = [ritz_spectrum(lambda v: hessian @ v, probe(k, exact), n) for k in range(probes)]
    curve = smoothed_density(spectra, sigma)
    width = sigma * (exact[-1] - exact[0]).item()
    gaps = [(exact[i + 1] - exact[i]).item() for i in range(n - 1)]
    for quantile in (0.1, 0.3, 0.5, 0.7, 0.9):
        start = int(quantile * n) - 8
        i = max(range(start, start + 16), key=lambda i: gaps[i])  # the widest gap near the quantile
        threshold = (exact[i] + exact[i + 1]).item() / 2
        below = vectors[:, :i + 1]
        projection = below @ below.T
        spread = (2 * ((projection ** 2).sum() - (projection.diagonal() ** 2).sum()) / probes).item() ** 0.5 / n
        smoothing = ((exact - threshold).abs() < 3 * width).sum().item() / n
        mass_below = integral(curve, lambda e: (e < threshold).double())
        mass_above = integral(curve, lambda e: (e > threshold).double())
        assert abs(mass_below - (i + 1) / n) <= 4 * spread + smoothing, (threshold, mass_below, (i + 1) / n)
        assert abs(mass_above - (n - i - 1) / n) <= 4 * spread + smoothing


def test_density_smoothing_is_relative_to_the_spread(problem):
    """The Hessian of 1000 L has the eigenvalues of H times 1000: its density is H's stretched by 1000
    and 1000 times lower, point for point, since the widths scale with the spread."""
    hessian = sum(explicit(problem, "ce")[0]) / 2
    probe = lambda: Probes(0, 0, "hessian-density")
    curves = {}
    for scale in (1.0, 1000.0):
        start = probe()
        spectra = [ritz_spectrum(lambda v: scale * hessian @ v, start(k, hessian[0]), 12) for k in range(3)]
        curves[scale] = smoothed_density(spectra, 0.02)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float64)
    assert len(curves[1000.0].eigenvalues) == len(curves[1.0].eigenvalues)
    assert torch.allclose(as_tensor(curves[1000.0].eigenvalues), 1000 * as_tensor(curves[1.0].eigenvalues),
                          rtol=1e-9, atol=1e-9)
    assert torch.allclose(1000 * as_tensor(curves[1000.0].density), as_tensor(curves[1.0].density),
                          rtol=1e-7, atol=1e-9)


def test_trace_from_the_density_is_hutchinsons_and_agrees_with_hessian_trace(problem):
    """n * integral of lambda * density = (1/P) sum_p z_p^T H z_p for the density's own probes (each
    quadrature's mean is T[0, 0] = z^T H z / |z|^2, |z|^2 = n), and within the two estimators' errors of
    hessian-trace and of the exact trace."""
    net, params, x, y, order, batches = problem
    hessians = explicit(problem, "ce")[0]
    hessian = sum(hessians) / 2
    n, probes = hessian.shape[0], 4
    values = measure(net, params, x, y, "ce", order, 10, ("hessian-trace", "hessian-density"), probes=probes,
                     lanczos=6, sigma=0.01)
    from_density = n * integral(values["hessian-density"], lambda e: e)
    probe = Probes(0, 0, "hessian-density")
    draws = [probe(k, hessian[0]) for k in range(probes)]
    assert close(from_density, sum((z @ hessian @ z).item() for z in draws) / probes, 1e-6)
    off_diagonal = lambda h: 2 * ((h ** 2).sum() - (h.diagonal() ** 2).sum()).item()
    error_density = (off_diagonal(hessian) / probes) ** 0.5
    error_trace = (sum(off_diagonal(h) / 4 for h in hessians) / probes) ** 0.5  # batch weights 1/2
    exact = torch.trace(hessian).item()
    assert abs(from_density - exact) <= 4 * error_density
    assert abs(values["hessian-trace"] - exact) <= 4 * error_trace
    assert abs(from_density - values["hessian-trace"]) <= 4 * (error_density ** 2 + error_trace ** 2) ** 0.5


def error_and_noise(curve, exact, probes):
    """(The L1 distance from `curve` to the eigenvalues `exact` smoothed the same way, the bound N on its
    expectation from the probes' noise, the curve's width). E(t) = (1/n) sum_i g(t - lambda_i), g the
    curve's Gaussian; each probe's measure at t, z^T g(t - H) z / n, has mean E(t) and variance at most
    2 sum_i g(t - lambda_i)^2 / n^2 (a Rademacher z: 2 sum_{i != j} A_ij^2 <= 2 |A|_F^2), so the mean of P
    probes errs in L1 by at most N = integral of sqrt(that / P) dt in expectation (Jensen). The
    quadrature's own error, at a width it resolves, adds little."""
    e, d = (torch.tensor(values, dtype=torch.float64) for values in curve)
    width = 5 * e.diff().min().item()  # sampled every fifth of a width
    t = torch.arange(min(e[0], exact[0] - 5 * width), max(e[-1], exact[-1] + 5 * width), width / 5,
                     dtype=torch.float64)
    gaussians = torch.exp(-((t[:, None] - exact[None]) / width) ** 2 / 2) / (width * (2 * torch.pi) ** 0.5)
    ours = torch.from_numpy(numpy.interp(t.numpy(), e.numpy(), d.numpy(), left=0, right=0))  # 0 off its grid
    error = torch.trapezoid((ours - gaussians.mean(1)).abs(), t).item()
    noise = torch.trapezoid((2 * (gaussians ** 2).sum(1) / (len(exact) ** 2 * probes)).sqrt(), t).item()
    return error, noise, width


def test_the_default_density_resolves_the_spectrum_within_its_probes_noise(problem):
    """The default density (100 Lanczos steps, 5 probes, the width of the quadrature's resolution) of a net
    whose Hessian is formed errs by less than its probes' noise (error_and_noise), at a width under 1 % of
    the spectrum's spread (the old default's, which 10 steps drew as spikes: an error of 0.95 here)."""
    net, params, x, y, order, batches = problem
    exact = torch.linalg.eigvalsh(sum(explicit(problem, "ce")[0]) / 2)
    curve = measure(net, params, x, y, "ce", order, 10, ("hessian-density",))["hessian-density"]
    error, noise, width = error_and_noise(curve, exact, probes=5)
    assert error <= noise, (error, noise)
    assert width <= 0.01 * (exact[-1] - exact[0]).item()


def test_the_default_width_resolves_a_bulk_beside_far_outliers():
    """396 eigenvalues even over [-0.5, 0.5] and 4 outliers at 20 to 50, the Hessian of the paper's nets in
    small: the default width follows the Ritz values' gaps in the bulk, where most of them lie, not the
    spread (1 % of it would be the bulk's half width), so the bulk is resolved, within the probes' noise,
    and each outlier is a peak of its own."""
    outliers = [20.0, 30.0, 40.0, 50.0]
    exact = torch.cat([torch.linspace(-0.5, 0.5, 396, dtype=torch.float64),
                       torch.tensor(outliers, dtype=torch.float64)])
    basis, _ = torch.linalg.qr(torch.randn(400, 400, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    hessian = (basis * exact) @ basis.T
    probe = Probes(0, 0, "hessian-density")
    spectra = [ritz_spectrum(lambda v: hessian @ v, probe(k, exact), LANCZOS_STEPS["hessian-density"])
               for k in range(5)]
    curve = smoothed_density(spectra)
    error, noise, width = error_and_noise(curve, exact, probes=5)
    assert error <= noise, (error, noise)
    assert width <= 0.025  # 100 steps put about 90 Ritz values in the bulk: gaps of about a ninetieth of it
    e, d = curve
    peaks = [e[i] for i in range(1, len(d) - 1) if d[i - 1] < d[i] >= d[i + 1]]
    assert all(any(abs(p - outlier) < width for p in peaks) for outlier in outliers)


def read_density(run):
    with open(os.path.join(run, "hessian-density.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    curves = {}
    for r in rows:
        curves.setdefault(int(r["iter"]), []).append((float(r["eigenvalue"]), float(r["density"])))
    return curves


def test_density_command_writes_its_file_beside_curvature_csv_and_guards_its_options(tmp_path, run, cli):
    import shutil
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("curvature.*", "hessian-density.csv"))
    density = ("--measures", "hessian-density", "--probes", "2", "--lanczos", "3", "--batches", "2")
    code, err = cli("curvature", copy, "--at", "0,16", *density, "--sigma", "0.05")
    assert code == 0, err
    assert not os.path.exists(os.path.join(copy, "curvature.csv"))  # no scalar measured: no empty file
    with open(os.path.join(copy, "hessian-density.csv")) as f:
        assert f.readline() == "iter,eigenvalue,density\n"
    curves = read_density(copy)
    assert sorted(curves) == [0, 16]
    for points in curves.values():
        e, d = torch.tensor(points, dtype=torch.float64).T
        assert e.tolist() == sorted(e.tolist()) and torch.trapezoid(d, e).item() == pytest.approx(1, abs=1e-6)
        # every sigma / 5 around each Ritz value, DENSITY_PAD widths past the outermost ones: a grid of at most
        # 5 / sigma + 10 DENSITY_PAD + 1 points, less those beyond DENSITY_PAD widths of every Ritz value
        width = (e[-1] - e[0]).item() / (1 + 2 * DENSITY_PAD * 0.05) * 0.05
        steps = e.diff() / (width / 5)
        assert len(points) <= round(5 / 0.05 + 2 * DENSITY_PAD * 5) + 1 and steps.min().item() == pytest.approx(1)
        assert torch.allclose(steps, steps.round(), atol=1e-6)
    options = json.load(open(os.path.join(copy, "curvature.json")))["options"]["hessian-density"]
    assert (options["probes"], options["lanczos"], options["sigma"], options["batches"]) == (2, 3, 0.05, 2)

    code, err = cli("curvature", copy, "--at", "16", "--measures", "gm")  # a scalar beside: the curves stay
    assert code == 0, err
    assert read_density(copy) == curves and [r["iter"] for r in read_rows(copy)] == ["16"]
    code, err = cli("curvature", copy, "--at", "8", *density, "--sigma", "0.02")
    assert code == 2 and err.count("\n") == 1 and "hessian-density.csv has hessian-density measured with " \
        "other options (sigma 0.05 there, 0.02 here)" in err, err
    assert read_density(copy) == curves
    code, err = cli("curvature", copy, "--at", "8", *density, "--sigma", "0.02", "--recompute")
    assert code == 0, err
    assert sorted(read_density(copy)) == [8] and [r["iter"] for r in read_rows(copy)] == ["16"]


@pytest.mark.parametrize("sigma", ["0", "0.000001", "2"])
def test_a_sigma_out_of_range_is_one_line_and_writes_nothing(tmp_path, run, cli, sigma):
    import shutil
    copy = str(tmp_path / "copy")
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("curvature.*", "hessian-density.csv"))
    code, err = cli("curvature", copy, "--measures", "hessian-density", "--sigma", sigma)
    assert code == 2 and err.count("\n") == 1 and "--sigma must be between 1e-05 and 1" in err, err
    assert not any(name.startswith(("curvature", "hessian")) for name in os.listdir(copy))
