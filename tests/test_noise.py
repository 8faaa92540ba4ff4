"""The counter-based random numbers (sphrun.noise) of random steps and curvature probes: the hash and
its 64-bit keys as written out in plain Python integers, keys that no two streams share, uniforms
strictly inside (0, 1), the statistics of the draws, and runs of an earlier generator refused rather
than mixed."""

import json
import math

import pytest
import torch

from sphrun import noise
from sphrun.sphere import random_keys, random_noise

WORD = 2 ** 32
PREVIOUS = "sphrun.noise 1 (counter hash)"  # the generator of one-word keys, which run files name


def mueller_hash(x):
    """Thomas Mueller's 32-bit integer hash, in Python's unbounded integers, wrapped to 32 bits."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) % WORD
    return (x >> 16) ^ x


def stream_key(*counters):
    """A stream's two key words, spelled out: each counter's low then high word enters the first word as
    it is and the second hashed, from the starting words "lo64" and "hi64" in ASCII."""
    first, second = int.from_bytes(b"lo64", "big"), int.from_bytes(b"hi64", "big")
    for c in counters:
        for word in (c % WORD, c // WORD % WORD):
            first, second = mueller_hash(first ^ word), mueller_hash(second ^ mueller_hash(word))
    return first, second


def step_key(base, step):
    """The key of a step: each word w of the stream's key becomes hash(w ^ step) ^ w."""
    return tuple(mueller_hash(w ^ step) ^ w for w in base)


def test_the_hash_and_its_keys_are_as_written_in_plain_integers():
    values = [0, 1, 2, 12345, 2 ** 31, 2 ** 32 - 1]
    assert noise.mix(torch.tensor(values)).tolist() == [mueller_hash(v) for v in values]
    assert [noise.mix(v) for v in values] == [mueller_hash(v) for v in values]
    assert noise.key(7, noise.RANDOM_STEP) == stream_key(7, int.from_bytes(b"rand", "big"))
    assert noise.key(2 ** 40 + 3, noise.PROBE, 500, 2) == stream_key(2 ** 40 + 3, int.from_bytes(b"prob", "big"),
                                                                     500, 2)
    base = stream_key(7, noise.RANDOM_STEP)
    assert noise.key_at(base, 123456) == step_key(base, 123456)
    packed = noise.key_at(torch.tensor([base, base[::-1]]), torch.tensor(123456))  # a pack's, on the device
    assert packed.tolist() == [list(step_key(base, 123456)), list(step_key(base[::-1], 123456))]


def test_a_gaussian_draw_is_box_muller_of_the_hashed_counters():
    elements, key = noise.element_keys(6, "cpu"), noise.key_at(noise.key(3, noise.RANDOM_STEP), 5)
    first, second = step_key(stream_key(3, noise.RANDOM_STEP), 5)
    words = [mueller_hash(mueller_hash(mueller_hash(i) ^ first) ^ second) for i in range(6)]
    u = [((w >> 9) + 0.5) / 2 ** 23 for w in words]  # the top 23 bits, half a step in
    expected = [math.sqrt(-2 * math.log(u[i])) * (math.cos, math.sin)[j](2 * math.pi * u[i + 3])
                for j in range(2) for i in range(3)]
    drawn = noise.gaussian(elements, key, 6)
    assert drawn.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_uniforms_are_strictly_inside_0_1_even_at_the_boundary_words():
    """The top 23 bits m give (m + 1/2) / 2^23, exact in float32: the extreme words give 2^-24 and
    1 - 2^-24, never 0 or 1 (with 24 bits, m + 1/2 rounded to 2^24 for the top words: u = 1, radius 0)."""
    words = [0, 2 ** 9 - 1, 2 ** 31, 2 ** 32 - 2 ** 8, 2 ** 32 - 2 ** 9, 2 ** 32 - 1]
    u = noise.uniform(torch.tensor(words))
    assert u.dtype == torch.float32
    assert u.tolist() == [((w >> 9) + 0.5) / 2 ** 23 for w in words]  # exact: Python's floats are float64
    assert u.min().item() == 2 ** -24 and u.max().item() == 1 - 2 ** -24
    radius = torch.sqrt(-2.0 * torch.log(u))
    assert (radius > 0).all() and radius.isfinite().all()


def one_word_key(*counters):
    """An earlier sphrun's stream key (sphrun.noise 1): one word, each counter word folded in by XOR."""
    h = 0
    for c in counters:
        for word in (c % WORD, c // WORD % WORD):
            h = mueller_hash(h ^ word)
    return h


def shared_keys(keys):
    """How many of the 64-bit keys (..., 2) occur more than once: each key as one int64, first word high."""
    flat = ((keys[..., 0] - 2 ** 31) * WORD + keys[..., 1]).reshape(-1)
    return flat.numel() - flat.unique().numel()


def step_keys(bases, steps):
    """The keys of steps 0 .. steps - 1 in the streams of `bases` ((S, 2) words): (S, steps, 2)."""
    return noise.key_at(bases[:, None, :], torch.arange(steps)[None, :, None])


@pytest.mark.parametrize("seeds", [(931, 975), (16, 90)])
def test_two_seeds_streams_never_coincide_over_a_long_run(seeds):
    """The pairs whose streams were one stream shifted (386,784 and 255,712 shared steps of 390,000 with
    mix(base ^ step)) share no step key over 400,000 steps, 1,000 CIFAR epochs."""
    steps = 400_000
    one_word = noise.mix(torch.tensor([one_word_key(s, noise.RANDOM_STEP) for s in seeds])[:, None]
                         ^ torch.arange(steps))
    assert one_word.numel() - one_word.unique().numel() > 200_000  # the flaw, as this count sees it
    assert shared_keys(step_keys(random_keys(list(seeds)), steps)) == 0


def test_no_two_streams_share_a_key_in_a_sweep_of_seeds_and_probes():
    """500 seeds' random-step streams and 500 curvature probe streams (10 seeds x 10 checkpoints x 5
    measures), 4,096 steps or draws each: 4.1 million keys, no two alike (a 32-bit key would have about
    2,000 pairs alike; 64 bits, a chance of 5e-7)."""
    bases = [noise.key(s, noise.RANDOM_STEP) for s in range(500)]
    bases += [noise.key(s, noise.PROBE, it, m) for s in range(10) for it in range(0, 10_000, 1000) for m in range(5)]
    assert shared_keys(step_keys(torch.tensor(bases), 4096)) == 0


def test_no_difference_of_stream_keys_is_a_shift_of_steps():
    """Two streams whose keys differ by the same d in both words: with mix(word ^ step) alone, step t of
    one would be step t ^ d of the other, all along; adding each word back breaks that."""
    d = 12345
    base = torch.tensor([[0x9E3779B9, 0x7F4A7C15], [0x9E3779B9 ^ d, 0x7F4A7C15 ^ d]])
    assert shared_keys(step_keys(base, 2 ** 16)) == 0


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
    record["random_directions"] = PREVIOUS  # as the previous sphrun wrote it
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
    record["options"]["hessian-trace"]["generator"] = PREVIOUS  # as the previous sphrun wrote it
    stored.write_text(json.dumps(record))
    code, err = cli(*measure[:3], "4", *measure[4:])
    assert code == 2 and "probes of an earlier sphrun" in err and "--recompute" in err
    code, err = cli(*measure[:3], "4", *measure[4:], "--recompute")  # the fix the message names works
    assert code == 0, err
    assert json.loads(stored.read_text())["options"]["hessian-trace"]["generator"] == noise.GENERATOR
