"""The phase classifier: hand-made tables for each signature of docs/science.md (The three phases), the real sweep that issue 12
reported, and simulated trajectories on the default evaluation schedule with realistic noise, where the
rate of false phases is measured over many seeded tables."""

import math
import os
import random

import numpy as np
import pytest

from sphrun.phase_table import agreement, spread
from sphrun.phases import RULES, UNDECIDED, borders, classify, in_paper_order, later_half
from sphrun.train import evaluation_steps


def table(loss, gm, err, cos, points=31, every=39):
    """Rows at steps 0, every, 2*every, ..., one epoch apart; each metric a function of the point index k."""
    return [{"iter": k * every, "epoch": k, "train_loss": loss(k), "gm": gm(k), "train_err": err(k),
             "cos_prev": cos(k)} for k in range(points)]


def noisy(level, spread, seed):
    """A stationary series: `level` times independent factors within 1 +- spread."""
    rng = random.Random(seed)
    values = [level * (1 + spread * (2 * rng.random() - 1)) for _ in range(1000)]
    return lambda k: values[k]


def reason(verdict):
    return verdict.evidence.split(":")[0]


# --- one table per signature ---------------------------------------------------------------------------
def test_zero_train_error_is_converged_phase_1():
    rows = table(loss=noisy(1e-3, 0.05, 1), gm=noisy(0.01, 0.05, 2), err=lambda k: 0.0 if k > 20 else 0.1,
                 cos=lambda k: 0.95)
    verdict = classify(rows, 10)
    assert (verdict.phase, reason(verdict)) == ("1", "converged")


def test_error_falling_fast_is_phase_1_even_while_the_weights_move():
    # the largest phase-1 ELRs: error down from 8 % to 2 % over the later half, checkpoints 25 degrees apart
    rows = table(loss=lambda k: 0.5 / (1 + k), gm=lambda k: 3 / (1 + k) ** 0.5,
                 err=lambda k: 0.08 * (16 / (1 + k)) ** 2 if k >= 15 else 0.3, cos=lambda k: 0.9)
    verdict = classify(rows, 10)
    assert (verdict.phase, reason(verdict)) == ("1", "train error heading to 0"), verdict.evidence


def test_slow_steady_fall_with_settling_weights_is_phase_1():
    # a small ELR: the error barely moves, but the weights have almost stopped turning (1 degree per
    # point); the 60-degree turn up to the first point of the later half (k = 15) is not part of it
    rows = table(loss=lambda k: 2.0 - 0.002 * k, gm=lambda k: 11.0 - 0.01 * k, err=lambda k: 0.7 - 0.001 * k,
                 cos=lambda k: 0.5 if k == 15 else math.cos(math.radians(1)))
    verdict = classify(rows, 10)
    assert (verdict.phase, reason(verdict)) == ("1", "weights settling"), verdict.evidence


def test_settled_metrics_below_chance_are_phase_2():
    settle = lambda level, k: level * (1 + 3 * math.exp(-k))  # settled within a few epochs
    loss, gm = noisy(1.2, 0.05, 3), noisy(3.0, 0.05, 4)
    rows = table(loss=lambda k: settle(loss(k), k), gm=lambda k: settle(gm(k), k), err=noisy(0.4, 0.05, 5),
                 cos=noisy(0.6, 0.1, 6))
    verdict = classify(rows, 10)
    assert (verdict.phase, reason(verdict)) == ("2", "equilibrium"), verdict.evidence


def test_equilibrium_fluctuations_are_no_trend():
    # GM swings by +-30 % around its level and checkpoints stay close (cos 0.9): still an equilibrium
    rows = table(loss=noisy(1.0, 0.05, 16), gm=noisy(3.0, 0.3, 17), err=noisy(0.35, 0.05, 18),
                 cos=noisy(0.9, 0.05, 19))
    assert classify(rows, 10).phase == "2"


def test_the_real_sweep_of_issue_12():
    """Full CIFAR-10, width 32, evaluated every 5 epochs up to epoch 35 (390 steps per epoch): the later
    half holds epochs 20, 25, 30, 35. The run at ELR 1e-2 (phase 2 in the paper) still settles: error
    0.67 to 0.57, loss down 21 % and GM 27 % at every point, median |cos_prev| 0.56. Phase-1 runs had error
    under 0.09 and |cos_prev| 1.00, phase-3 runs 0.90 and 0.01."""
    epochs = [0, 5, 10, 15, 20, 25, 30, 35]

    def run(err, loss, gm, cos):
        return [{"iter": 390 * e, "epoch": e, "train_err": a, "train_loss": b, "gm": c, "cos_prev": d}
                for e, a, b, c, d in zip(epochs, err, loss, gm, cos)]

    settling = run(err=[0.9, 0.8, 0.74, 0.70, 0.67, 0.63, 0.60, 0.57],
                   loss=[2.3, 1.9, 1.7, 1.55, 1.45, 1.35, 1.25, 1.15], gm=[9, 6, 5, 4.4, 4.1, 3.7, 3.3, 3.0],
                   cos=[1, 0.3, 0.5, 0.55, 0.56, 0.55, 0.57, 0.56])
    assert classify(settling, 10).phase == "2"
    converging = run(err=[0.9, 0.5, 0.3, 0.2, 0.09, 0.06, 0.05, 0.04],
                     loss=[2.3, 1.4, 0.9, 0.6, 0.3, 0.2, 0.16, 0.13], gm=[9, 7, 5, 4, 3, 2.5, 2.2, 2.0],
                     cos=[1, 0.98, 0.995, 0.997, 0.998, 0.998, 0.999, 0.999])
    assert classify(converging, 10).phase == "1"
    walking = run(err=[0.9, 0.9, 0.899, 0.901, 0.9, 0.9, 0.902, 0.9], loss=[2.3, 9, 7, 8, 10, 6, 9, 8],
                  gm=[9, 900, 1100, 800, 1000, 950, 1050, 990],
                  cos=[1, 0.02, -0.01, 0.01, 0.0, 0.01, -0.02, 0.01])
    assert classify(walking, 10).phase == "3"


def test_a_real_sweep_at_width_8():
    """ConvNet width 8 on the 10 % CIFAR-10 subset, 30 epochs, run to calibrate these rules: the rows
    of the default schedule from epoch 15 on (and the start), cos_prev between its checkpoints. At 1e-4,
    3.16e-4 and 1e-3 the error keeps falling towards 0 (to 0.30, 0.14 and 0.14); at 1e-2 it has been
    stuck near 0.55 since epoch 15 while the weights keep turning."""
    runs = {
        1e-4: ("1", [(0.4162, 1.2408, 8.804, 0.99937), (0.376, 1.1159, 8.132, 0.99909),
                     (0.3398, 1.0285, 8.454, 0.99887), (0.2986, 0.9378, 8.138, 0.99901)]),
        3.16e-4: ("1", [(0.3126, 0.9331, 7.571, 0.99723), (0.2322, 0.7567, 6.549, 0.99628),
                        (0.19, 0.6723, 6.75, 0.99559), (0.1428, 0.5648, 6.325, 0.99624)]),
        1e-3: ("1", [(0.2578, 0.8249, 4.197, 0.98892), (0.221, 0.7099, 4.561, 0.98476),
                     (0.1786, 0.6132, 4.831, 0.98216), (0.1394, 0.5242, 4.759, 0.98423)]),
        1e-2: ("2", [(0.5372, 1.5171, 2.102, 0.87914), (0.5052, 1.4319, 2.211, 0.8327),
                     (0.5616, 1.669, 2.314, 0.81934), (0.5754, 1.6644, 2.471, 0.8123)]),
    }
    for elr, (phase, later) in runs.items():
        rows = [{"iter": 0, "epoch": 0, "train_err": 0.9, "train_loss": 13.3864, "gm": 39.546, "cos_prev": 1.0}]
        rows += [{"iter": 39 * epoch, "epoch": epoch, "train_err": e, "train_loss": l, "gm": g, "cos_prev": c}
                 for epoch, (e, l, g, c) in zip((16, 20, 25, 30), later)]
        verdict = classify(rows, 10)
        assert verdict.phase == phase, (elr, verdict.evidence)


def test_random_walk_at_chance_is_phase_3():
    rows = table(loss=noisy(6.0, 0.3, 7), gm=noisy(2000.0, 0.3, 8), err=noisy(0.9, 0.01, 9),
                 cos=lambda k: 0.01 * (-1) ** k)
    verdict = classify(rows, 10)
    assert (verdict.phase, reason(verdict)) == ("3", "random walk")


def test_chance_level_follows_the_number_of_classes():
    # 85 % error is chance level for 10 classes (>= 0.9 * 0.9) but far below it for 100 (0.99)
    rows = table(loss=noisy(2.0, 0.05, 10), gm=noisy(5.0, 0.05, 11), err=noisy(0.85, 0.005, 12),
                 cos=lambda k: 0.02)
    assert classify(rows, 10).phase == "3"
    assert classify(rows, 100).phase == "2"


def test_at_chance_but_correlated_is_not_phase_3():
    # a net stuck at chance that barely moves (cos ~ 1) is no random walk, nor an equilibrium below chance
    rows = table(loss=noisy(2.3, 0.01, 13), gm=noisy(1.0, 0.01, 14), err=noisy(0.9, 0.001, 15),
                 cos=lambda k: 0.99)
    assert classify(rows, 10).phase == UNDECIDED


def test_error_falling_by_a_quarter_to_a_third_while_moving_is_undecided():
    # neither stuck (an equilibrium's error falls less while it settles) nor clearly heading to 0
    rows = table(loss=lambda k: 1.0 * 0.99 ** k, gm=noisy(3.0, 0.02, 23), err=lambda k: 0.3 * 0.977 ** k,
                 cos=lambda k: 0.6)
    verdict = classify(rows, 10)
    assert verdict.phase == UNDECIDED and "by 25 % to 33 %" in verdict.evidence, verdict.evidence


def test_between_settling_and_moving_is_undecided():
    # the error neither falls nor reaches 0, and the weights turn about 40 degrees over the later half
    rows = table(loss=noisy(1.0, 0.02, 20), gm=noisy(3.0, 0.02, 21), err=noisy(0.3, 0.02, 22),
                 cos=lambda k: math.cos(math.radians(40 / 15)))
    verdict = classify(rows, 10)
    assert verdict.phase == UNDECIDED and "train longer" in verdict.evidence


# --- runs too short for the rules -------------------------------------------------------------------------
# The paper's phase 2 settles within 5-10 epochs and the rules read the later half: a run needs 2 x 10 = 20
# epochs from its first point before its later half is past the settling, and 4 points in that half.
SIGNATURES = {  # 31 points one epoch apart (30 epochs), each decided when whole
    "1": table(loss=noisy(1e-3, 0.05, 1), gm=noisy(0.01, 0.05, 2), err=lambda k: 0.0 if k > 5 else 0.1,
               cos=lambda k: 0.95),
    "2": table(loss=noisy(1.0, 0.05, 16), gm=noisy(3.0, 0.05, 17), err=noisy(0.35, 0.05, 18),
               cos=noisy(0.6, 0.05, 19)),
    "3": table(loss=noisy(6.0, 0.3, 7), gm=noisy(2000.0, 0.3, 8), err=noisy(0.9, 0.01, 9),
               cos=lambda k: 0.01 * (-1) ** k),
}


@pytest.mark.parametrize("phase", SIGNATURES)
def test_a_run_under_20_epochs_is_undecided_and_says_so(phase):
    rows = SIGNATURES[phase]
    assert classify(rows, 10).phase == phase
    assert classify(rows[:21], 10).phase == phase  # 20 epochs: the later half starts at epoch 10
    for epochs in (19, 10, 4, 0):
        verdict = classify(rows[:epochs + 1], 10)
        assert (verdict.phase, verdict.evidence) == (UNDECIDED, f"too short: {epochs} epochs, needs 20")
        assert verdict.too_short and verdict.label == f"undecided (too short: {epochs} epochs, needs 20)"


def test_a_fine_tunes_epochs_count_from_its_fork():
    rows = [dict(r, epoch=r["epoch"] + 100.5) for r in SIGNATURES["2"]]  # forked at epoch 100.5
    assert classify(rows, 10).phase == "2"
    assert classify(rows[:16], 10).evidence == "too short: 15 epochs, needs 20"


def test_too_few_points_in_the_later_half_is_undecided():
    # 30 epochs evaluated every 10: the later half (from epoch 15) holds epochs 20 and 30 alone
    rows = [r for r in SIGNATURES["2"] if r["epoch"] % 10 == 0]
    verdict = classify(rows, 10)
    assert verdict.too_short and verdict.evidence == "too short: 2 evaluation points in the later half, needs 4"
    assert classify(rows[:1], 10).phase == UNDECIDED


def test_row_order_does_not_matter():
    rows = table(loss=lambda k: 2.3 / math.sqrt(1 + k), gm=lambda k: 10 / (1 + k), err=lambda k: 0.5,
                 cos=lambda k: 0.99)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert classify(shuffled, 10) == classify(rows, 10)


def test_borders_and_paper_order():
    elrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    phases = ["1", "1", UNDECIDED, "2", "3", "3"]
    assert borders(elrs, phases) == [(1e-4, 1e-2, "1", "2"), (1e-2, 1e-1, "2", "3")]
    assert in_paper_order(elrs, phases)
    assert in_paper_order(list(reversed(elrs)), list(reversed(phases)))  # order of the input is irrelevant
    assert not in_paper_order(elrs, ["1", "2", "1", "2", "3", "3"])  # phase 1 in two blocks
    assert not in_paper_order(elrs, ["1", "3", "2", "2", "3", "3"])


def test_agreement_of_the_seeds_of_a_group():
    assert agreement(["2", "2", "2"]) == ("2", "2 (3/3)")
    assert agreement(["2", "3", "2"]) == ("2", "2 (2/3)")
    assert agreement([UNDECIDED, "1", UNDECIDED]) == (UNDECIDED, "undecided (2/3)")
    assert agreement(["1", "2", "3", "1"]) == ("1", "1 (2/4)")  # the most common phase, not over half
    assert agreement(["2", "1"]) == (UNDECIDED, "1 or 2 (1/2 each)")  # a tie has no majority
    assert agreement(["1"]) == ("1", "1 (1/1)")


def test_spread_over_seeds_is_the_mean_and_sample_std():
    assert spread([1.0, 2.0, 6.0]) == pytest.approx((3.0, math.sqrt(7.0)))  # ((4 + 1 + 9) / 2) ** 0.5
    assert spread([0.5]) == (0.5, None)  # one seed: no spread to tell


# --- simulated trajectories on the default schedule ------------------------------------------------
# Full CIFAR-10 at batch 128: 390 steps per epoch. The default schedule (every epoch up to 10, then about
# 10 points per decade) leaves 4 points in the later half of a 1000-epoch run (epochs 501, 631, 794,
# 1000) and of a 50-epoch run (25, 32, 40, 50): the rules must decide on 4 points.
STEPS_PER_EPOCH = 390
TRAIN_SIZE = 50_000


def default_schedule(epochs):
    steps = np.array(evaluation_steps(0, epochs * STEPS_PER_EPOCH, STEPS_PER_EPOCH))
    return steps, steps / STEPS_PER_EPOCH


def test_default_schedule_leaves_few_points_in_the_later_half():
    for epochs in (50, 1000):
        steps, _ = default_schedule(epochs)
        rows = [{"iter": int(s)} for s in steps]
        assert 4 <= len(later_half(rows)) <= 8, epochs


def jitter(rng, n, size):
    """Independent factors within 1 +- size: the fluctuation of a metric between evaluation points."""
    return 1 + size * rng.uniform(-1, 1, n)


def as_error(fraction):
    """A train error as measured: a whole number of the 50,000 images."""
    return np.round(np.clip(fraction, 0, 1) * TRAIN_SIZE) / TRAIN_SIZE


def as_rows(steps, loss, err, gm, angles):
    """metrics.csv rows; `angles` (radians) between each checkpoint and the previous one."""
    cos = np.concatenate([[1.0], np.cos(np.clip(angles, 0, math.pi))])
    return [{"iter": int(s), "epoch": s / STEPS_PER_EPOCH, "train_loss": float(l), "train_err": float(e),
             "gm": float(g), "cos_prev": float(c)} for s, l, e, g, c in zip(steps, loss, err, gm, cos)]


def log_uniform(rng, low, high):
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def converging(rng, epochs):
    """Phase 1: loss, error and GM fall as powers of the epoch. The weights turn by w * (t/25)^-a radians
    per epoch: at most 0.02 at epoch 25, where issue 12's phase-1 runs showed |cos_prev| 1.00 five epochs
    apart. A converging run moves little between checkpoints, so its metrics vary by a few % at most."""
    steps, t = default_schedule(epochs)
    t, n = np.maximum(t, 0.5), len(t)
    err = as_error(rng.uniform(0.3, 0.8) * t ** -rng.uniform(0.3, 1.5) * jitter(rng, n, 0.03))
    loss = rng.uniform(1, 2) * t ** -rng.uniform(0.3, 1.2) * jitter(rng, n, 0.02)
    gm = rng.uniform(2, 20) * t ** -rng.uniform(0.0, 0.8) * jitter(rng, n, 0.05)
    speed, a = log_uniform(rng, 1e-3, 2e-2), rng.uniform(0.8, 1.2)
    s = t / 25  # the angle between checkpoints: the integral of speed * s^-a over the epochs between them
    turned = 25 * (s[1:] ** (1 - a) - s[:-1] ** (1 - a)) / (1 - a)
    return as_rows(steps, loss, err, gm, speed * turned * jitter(rng, n - 1, 0.1))


def equilibrium(rng, epochs, still_settling=0.0):
    """Phase 2: loss, error and GM at a level (error 5 % to 75 %) with fluctuations of 5-10 %. With
    `still_settling`, loss and GM approach their level exponentially and still fall by that fraction over
    the later half (issue 12's run at 1e-2 fell 21 %), the error by half as much to as much. Checkpoints Dt
    epochs apart have cos = c + (1 - c) exp(-Dt / tau), with c in [0, 0.6) and tau 1 to 100 epochs."""
    steps, t = default_schedule(epochs)
    n = len(t)
    approach = np.ones(n)
    if still_settling:
        tau = epochs / 2 / rng.uniform(1, 3)  # 1 to 3 e-foldings left over the later half
        middle, end = math.exp(-epochs / 2 / tau), math.exp(-epochs / tau)
        amplitude = still_settling / ((1 - still_settling) * middle - end)  # falls by still_settling
        approach = 1 + amplitude * np.exp(-t / tau)
    err = as_error(np.minimum(rng.uniform(0.05, 0.6) * approach ** rng.uniform(0.5, 1), 0.75)
                   * jitter(rng, n, 0.05))
    loss = rng.uniform(0.5, 2) * approach * jitter(rng, n, 0.1)
    gm = rng.uniform(1, 10) * approach * jitter(rng, n, 0.1)
    floor, tau = rng.uniform(0.0, 0.6), log_uniform(rng, 1, 100)
    cos = floor + (1 - floor) * np.exp(-np.diff(t) / tau)
    return as_rows(steps, loss, err, gm, np.arccos(cos) * jitter(rng, n - 1, 0.1))


def random_walk(rng, epochs):
    """Phase 3: error at chance (90 %) within 1 %, large noisy loss and GM, cos_prev about 0."""
    steps, t = default_schedule(epochs)
    n = len(t)
    err = as_error(0.9 * jitter(rng, n, 0.01))
    loss = rng.uniform(3, 30) * jitter(rng, n, 0.1)
    gm = rng.uniform(100, 1e4) * jitter(rng, n, 0.1)
    return as_rows(steps, loss, err, gm, np.arccos(rng.normal(0, 0.02, n - 1)))


def flat_noise(rng, epochs, noise=0.15):
    """Issue 12's stress test: every metric a constant level times independent factors within 1 +- 15 %
    (the angle between checkpoints too, around a level with cos in [0, 0.95])."""
    steps, t = default_schedule(epochs)
    n = len(t)
    err = as_error(rng.uniform(0.05, 0.75) * jitter(rng, n, noise))
    loss = rng.uniform(0.5, 2) * jitter(rng, n, noise)
    gm = rng.uniform(1, 10) * jitter(rng, n, noise)
    angle = math.acos(rng.uniform(0.0, 0.95))
    return as_rows(steps, loss, err, gm, angle * jitter(rng, n - 1, noise))


def verdicts(simulate, epochs, count, seed, **options):
    """Phases of `count` simulated tables, each from its own seed."""
    found = {"1": 0, "2": 0, "3": 0, UNDECIDED: 0}
    for k in range(count):
        found[classify(simulate(np.random.default_rng([seed, k]), epochs, **options), 10).phase] += 1
    return found


@pytest.mark.parametrize("simulate, options", [
    (converging, {}), (equilibrium, {}), (equilibrium, {"still_settling": 0.2}), (random_walk, {}), (flat_noise, {}),
], ids=["converging", "settled", "still-settling", "random-walk", "flat-noise"])
def test_no_simulated_run_is_decided_before_20_epochs(simulate, options):
    """Cut where a phase-2 run may still be settling (before its 10th epoch, or with its later half
    starting there), every run is undecided, however its phase shows."""
    for k in range(100):
        rows = simulate(np.random.default_rng([14, k]), 50, **options)
        for cut in (5, 10, 16, 19):
            verdict = classify([r for r in rows if r["epoch"] <= cut], 10)
            assert verdict.too_short, (cut, verdict.evidence)


@pytest.mark.parametrize("epochs", [1000, 50])
def test_flat_noise_gives_a_false_phase_under_1_percent(epochs):
    found = verdicts(flat_noise, epochs, count=1000, seed=12)
    assert found["1"] + found["3"] < 10, found  # false phases: under 1 % of 1,000
    assert found[UNDECIDED] < 50, found  # and undecided under 5 %


@pytest.mark.parametrize("epochs", [1000, 50])
@pytest.mark.parametrize("simulate, options, phase", [
    (converging, {}, "1"),
    (equilibrium, {}, "2"),
    (equilibrium, {"still_settling": 0.2}, "2"),
    (random_walk, {}, "3"),
], ids=["converging", "settled", "still-settling", "random-walk"])
def test_simulated_runs_get_their_phase(epochs, simulate, options, phase):
    found = verdicts(simulate, epochs, count=300, seed=13, **options)
    wrong = sum(n for p, n in found.items() if p not in (phase, UNDECIDED))
    assert wrong <= 3 and found[phase] >= 0.95 * 300, found  # under 1 % wrong, at least 95 % right


# --- the rules in words: one definition -------------------------------------------------------------------
def words(text):
    return " ".join(text.replace("**", "").split())


def test_readme_and_help_state_the_rules_as_phases_py_does():
    """README.md's list of rules and `sphrun plot --help` are RULES word for word, numbers included: a
    threshold changed in sphrun/phases.py and not in the README fails here."""
    from typer.testing import CliRunner

    from sphrun.cli import app

    with open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8") as f:
        readme = words(f.read())
    shown = words(CliRunner().invoke(app, ["plot", "--help"], terminal_width=240).output)
    for rule in RULES:
        assert f"- {rule.heading}: {rule.text}" in readme, rule.heading
        assert f"{rule.heading}: {rule.text}" in shown, rule.heading
    assert [rule.heading for rule in RULES] == ["3 (divergence)", "1 (convergence)", "2 (chaotic equilibrium)",
                                                UNDECIDED]  # the order decide() tries them in
