"""The counter-based random numbers (sphrun.noise) of random steps and curvature probes: the hash as
written out in plain Python integers, the statistics of the draws, and runs of an earlier generator
refused rather than mixed."""

import json
import math

import pytest
import torch

from sphrun import noise
from sphrun.sphere import random_keys, random_noise


def mueller_hash(x):
    """Thomas Mueller's 32-bit integer hash, in Python's unbounded integers, wrapped to 32 bits."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) % 2 ** 32
    return (x >> 16) ^ x


def test_the_hash_is_mueller_s_in_plain_integers():
    values = [0, 1, 2, 12345, 2 ** 31, 2 ** 32 - 1]
    assert noise.mix(torch.tensor(values)).tolist() == [mueller_hash(v) for v in values]
    assert [noise.mix(v) for v in values] == [mueller_hash(v) for v in values]
    assert noise.key(7) == mueller_hash(mueller_hash(7))  # (7, 0): the low word, then the high one


def test_a_gaussian_draw_is_box_muller_of_the_hashed_counters():
    elements, key = noise.element_keys(6, "cpu"), noise.key(3, noise.RANDOM_STEP, 5)
    words = [mueller_hash(mueller_hash(i) ^ key) for i in range(6)]
    u = [((w >> 8) + 0.5) / 2 ** 24 for w in words]
    expected = [math.sqrt(-2 * math.log(u[i])) * (math.cos, math.sin)[j](2 * math.pi * u[i + 3])
                for j in range(2) for i in range(3)]
    drawn = noise.gaussian(elements, key, 6)
    assert drawn.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def draws(seed, step, count=200_000):
    params = [torch.zeros(count)]
    return random_noise(params, random_keys(seed), torch.tensor(step))[0]


def test_gaussian_marginals_are_standard_normal():
    z = torch.cat([draws(seed, step) for seed in (0, 1) for step in (0, 1, 2)]).double()
    n = len(z)
    assert abs(z.mean().item()) < 4 / n ** 0.5
    assert abs(z.var().item() - 1) < 4 * (2 / n) ** 0.5
    assert abs((z ** 3).mean().item()) < 4 * (15 / n) ** 0.5  # skewness 0
    assert abs((z ** 4).mean().item() - 3) < 4 * (96 / n) ** 0.5  # kurtosis 3
    # Kolmogorov-Smirnov distance to the normal distribution: under 1.63 / sqrt(n) at the 1 % level
    ordered = z.sort().values
    cdf = 0.5 * (1 + torch.erf(ordered / 2 ** 0.5))
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (cdf - ranks).abs().max().item() < 1.63 / n ** 0.5


@pytest.mark.parametrize("other", [dict(step=1), dict(seed=1), dict(seed=2 ** 40), dict(step=2 ** 20)],
                         ids=["next step", "next seed", "a seed past 32 bits", "a far step"])
def test_draws_of_other_steps_and_seeds_are_uncorrelated(other):
    a, b = draws(0, 0), draws(other.get("seed", 0), other.get("step", 0))
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 4 / len(a) ** 0.5


@pytest.mark.parametrize("lag", [1, 2, 100_000], ids=["neighbours", "lag 2", "Box-Muller's pairs"])
def test_elements_of_one_draw_are_uncorrelated(lag):
    z = draws(0, 0)
    a, b = z[:-lag], z[lag:]
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 4 / len(a) ** 0.5
    assert abs(torch.corrcoef(torch.stack([a ** 2, b ** 2]))[0, 1].item()) < 4 / len(a) ** 0.5


def test_a_pack_draws_what_each_single_run_draws():
    params = [torch.zeros(3, 40, 5), torch.zeros(3, 7)]
    packed = random_noise(params, random_keys([0, 1, 2]), torch.tensor(9), members=True)
    for k in range(3):
        single = random_noise([p[k] for p in params], random_keys(k), 9)
        assert all(torch.equal(p[k], s) for p, s in zip(packed, single))


def test_rademacher_signs_are_fair_and_independent():
    elements = noise.element_keys(100_000, "cpu")
    a, b = noise.rademacher(elements, noise.key(1)), noise.rademacher(elements, noise.key(2))
    n = len(a)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert abs(a.mean().item()) < 4 / n ** 0.5 and abs((a * b).mean().item()) < 4 / n ** 0.5
    assert abs((a[1:] * a[:-1]).mean().item()) < 4 / n ** 0.5


def test_a_random_step_run_of_an_earlier_generator_is_refused_not_mixed(cli, tmp_path):
    args = ["train", "--elr", "1e-3", "--step", "random", "--dataset", "synthetic", "--subset", "256", "--width",
            "4", "--batch-size", "32", "--eval-every", "4", "--device", "cpu", "--out", tmp_path / "run"]
    assert cli(*args, "--iters", "4")[0] == 0
    config = tmp_path / "run" / "config.json"
    record = json.loads(config.read_text())
    assert record["random_directions"] == noise.GENERATOR
    del record["random_directions"]  # as an earlier sphrun wrote it
    config.write_text(json.dumps(record))
    before = (tmp_path / "run" / "metrics.csv").read_text()
    code, err = cli(*args, "--iters", "8")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "an earlier sphrun" in err
    assert (tmp_path / "run" / "metrics.csv").read_text() == before


def test_curvature_of_an_earlier_generator_is_refused_until_recomputed(cli, tmp_path):
    args = ["--dataset", "synthetic", "--subset", "256", "--width", "4", "--batch-size", "32", "--device", "cpu"]
    assert cli("train", "--elr", "1e-3", "--iters", "4", "--eval-every", "4", *args[:-2], "--device", "cpu",
               "--out", tmp_path / "run")[0] == 0
    measure = ["curvature", tmp_path / "run", "--at", "0", "--measures", "hessian-trace", "--probes", "1",
               "--batches", "2", "--device", "cpu"]
    assert cli(*measure)[0] == 0
    stored = tmp_path / "run" / "curvature.json"
    record = json.loads(stored.read_text())
    del record["options"]["hessian-trace"]["generator"]  # as an earlier sphrun wrote it
    stored.write_text(json.dumps(record))
    code, err = cli(*measure[:3], "4", *measure[4:])
    assert code == 2 and "probes of an earlier sphrun" in err and "--recompute" in err
    code, err = cli(*measure[:3], "4", *measure[4:], "--recompute")  # the fix the message names works
    assert code == 0, err
    assert json.loads(stored.read_text())["options"]["hessian-trace"]["generator"] == noise.GENERATOR
